"""panda_core.drivers.load_driver: every way a plugin can be missing or broken ends in the
caller's error type, naming the group and what is installed."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from stevedore.extension import ExtensionManager

from panda_core.drivers import installed_names, load_driver

GROUP = "panda.testdrivers"

MODULE = '''
class Greeter:
    def __init__(self, greeting="hello"):
        self.greeting = greeting


class Refusing:
    def __init__(self, **options):
        raise KeyError(f"refusing options {sorted(options)}")
'''


class DriverRefused(LookupError):
    """The error type of the caller in these tests."""


@pytest.fixture(params=["stevedore", "stdlib"])
def group(tmp_path, monkeypatch, request):
    """A distribution registering three drivers in GROUP: one good, one refusing, one broken;
    loaded by stevedore, and by the standard library where stevedore is missing (the one-file
    pilot carries no stevedore)."""
    if request.param == "stdlib":
        monkeypatch.setitem(sys.modules, "stevedore", None)     # import stevedore fails
    (tmp_path / "testdrivers_mod.py").write_text(MODULE)
    (tmp_path / "testdrivers_broken.py").write_text("raise ImportError('missing dependency xyz')\n")
    dist = tmp_path / "testdrivers-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: testdrivers\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{GROUP}]\ngreeter = testdrivers_mod:Greeter\nrefusing = testdrivers_mod:Refusing\n"
        "broken = testdrivers_broken:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(ExtensionManager, "ENTRY_POINT_CACHE", {})
    yield
    for name in ("testdrivers_mod", "testdrivers_broken"):
        sys.modules.pop(name, None)


def test_loads_constructed_or_as_registered(group):
    assert installed_names(GROUP) == ["broken", "greeter", "refusing"]
    greeter = load_driver(GROUP, "greeter", invoke_kwds={"greeting": "hej"})
    assert greeter.greeting == "hej"
    cls = load_driver(GROUP, "greeter", invoke=False)
    assert isinstance(greeter, cls) and cls.__name__ == "Greeter"


def test_unknown_name_lists_the_installed_ones(group):
    with pytest.raises(DriverRefused) as err:
        load_driver(GROUP, "nosuch", error=DriverRefused, kind="test driver")
    assert str(err.value) == (f"no test driver 'nosuch' in entry-point group {GROUP} "
                              "(installed: broken, greeter, refusing)")
    assert err.value.__cause__ is None
    with pytest.raises(LookupError, match="no driver 'x' in entry-point group panda.none "
                                          r"\(installed: none\)"):
        load_driver("panda.none", "x")


def test_a_driver_that_does_not_load_is_the_callers_error(group):
    with pytest.raises(DriverRefused, match="test driver 'broken' in entry-point group "
                       f"{GROUP} failed to load: ImportError: missing dependency xyz") as err:
        load_driver(GROUP, "broken", error=DriverRefused, kind="test driver")
    assert isinstance(err.value.__cause__, ImportError)
    with pytest.raises(RuntimeError, match="failed to load: TypeError: .*unexpected keyword"):
        load_driver(GROUP, "greeter", invoke_kwds={"volume": 11}, error=RuntimeError)


def test_an_error_of_the_callers_type_passes_unchanged(group):
    """The driver already said why (KeyError is a LookupError): no second wrapping."""
    with pytest.raises(KeyError, match="refusing options"):
        load_driver(GROUP, "refusing", invoke_kwds={"a": 1}, error=LookupError)


def test_importing_it_costs_no_stevedore():
    """panda_core stays standard library at import time; stevedore comes with the first load."""
    code = "import sys, panda_core.drivers; print('stevedore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_one_scan_per_sys_path_serves_every_stdlib_lookup(group, monkeypatch, tmp_path):
    """``use_stevedore=False`` (the pilot's way) loads from the shared scan, also where
    stevedore is installed; the distributions are scanned again only when sys.path changes."""
    import importlib.metadata

    import panda_core.drivers as drivers

    scans = []
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: (scans.append(kw), real(**kw))[1])
    monkeypatch.setattr(drivers, "_scan", None)
    greeter = load_driver(GROUP, "greeter", invoke_kwds={"greeting": "hej"}, use_stevedore=False)
    assert greeter.greeting == "hej"
    assert installed_names(GROUP) == ["broken", "greeter", "refusing"]
    with pytest.raises(DriverRefused, match=r"no test driver 'nosuch' .*\(installed: broken, "
                                            "greeter, refusing\\)"):
        load_driver(GROUP, "nosuch", error=DriverRefused, kind="test driver",
                    use_stevedore=False)
    assert scans == [{}]                     # one scan of everything for all three
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    assert installed_names(GROUP) == ["broken", "greeter", "refusing"]
    assert scans == [{}, {}]                 # a new sys.path is scanned again
