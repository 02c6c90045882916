"""The backend contract in code: abstract methods, and push mode as a capability the factory asks a
backend for (a new push-capable backend is one installed class, no change to the factory)."""
from __future__ import annotations

import importlib
import sys
from dataclasses import replace

import pytest
import yaml
from stevedore.extension import ExtensionManager

from schedulers.arc import ArcBackend
from schedulers.arc_push import ArcPushDriver
from schedulers.base import BatchState, SchedulerBackend, SchedulerError, backend_class
from schedulers.factory import Factory
from site_configs import EXAMPLES_DIR, parse_site_config

SITE = "PUSHTEST"

PUSH_BACKEND = '''
from schedulers.base import BatchState, SchedulerBackend


class RecordingDriver:
    def __init__(self, site_config, server_url, token, state_dir):
        self.site_config, self.server_url, self.token, self.state_dir = (
            site_config, server_url, token, state_dir)
        self.calls = []

    def poll(self):
        self.calls.append("poll")
        return {}

    def tracked(self):
        return []

    def fetch_and_submit(self, n_jobs=1):
        self.calls.append(("fetch_and_submit", n_jobs))
        return list(range(1, n_jobs + 1))


class PushBackend(SchedulerBackend):
    name = "pushtest"
    supports_push = True

    def __init__(self, push=False):
        super().__init__(push=push)

    def submit(self, spec):
        raise AssertionError("a push-mode site gets no pilots")

    def status(self, batch_ids):
        return {b: BatchState.UNKNOWN for b in batch_ids}

    def cancel(self, batch_ids):
        pass

    @classmethod
    def push_driver(cls, site_config, server_url, token, state_dir):
        return RecordingDriver(site_config, server_url, token, state_dir)
'''


@pytest.fixture
def push_backend(tmp_path, monkeypatch):
    """A third-party distribution adding the push-capable backend ``pushtest``."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "pushtest_backend.py").write_text(PUSH_BACKEND)
    dist = site / "pushtest_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pushtest-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[panda.schedulers]\npushtest = pushtest_backend:PushBackend\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    # stevedore keeps each group's entry points for the life of the process
    monkeypatch.setattr(ExtensionManager, "ENTRY_POINT_CACHE", {})
    yield
    sys.modules.pop("pushtest_backend", None)


def site_config(tmp_path, backend: str, options: dict):
    data = yaml.safe_load((EXAMPLES_DIR / "LOCAL_DEMO.yaml").read_text())
    data["name"] = SITE
    data["scheduler"] = {"backend": backend, "options": options}
    return parse_site_config(data, env={"PANDA_SE_ROOT": str(tmp_path / "se")})


def test_a_backend_missing_a_method_cannot_be_made():
    class NoCancel(SchedulerBackend):
        name = "nocancel"

        def submit(self, spec):
            return "1"

        def status(self, batch_ids):
            return {b: BatchState.UNKNOWN for b in batch_ids}

    with pytest.raises(TypeError, match="abstract.*cancel"):
        NoCancel()


def test_push_mode_is_declared_by_the_backend():
    assert ArcBackend.supports_push
    assert [name for name in ("local", "slurm", "htcondor")
            if backend_class(name).supports_push] == []
    with pytest.raises(SchedulerError, match="'local' has no push mode"):
        backend_class("local").push_driver({}, "http://h", "t", "/tmp/x")


def test_the_factory_asks_the_backend_not_its_name(tmp_path):
    """``push: true`` only means push mode where the backend supports it."""
    assert Factory.is_push(site_config(tmp_path, "arc", {"ce": "https://ce.example", "push": True}))
    assert not Factory.is_push(site_config(tmp_path, "arc", {"ce": "https://ce.example"}))
    assert not Factory.is_push(site_config(tmp_path, "local", {"push": True}))


def test_arc_builds_its_push_driver(tmp_path):
    site = site_config(tmp_path, "arc", {"ce": "https://ce.example", "push": True})
    site = replace(site, storage=replace(site.storage, input=replace(
        site.storage.input, url="https://se.example/in"), output=replace(
        site.storage.output, url="https://se.example/out")))
    driver = ArcBackend.push_driver(site.to_dict(), "http://server", "tok", tmp_path / "push")
    assert isinstance(driver, ArcPushDriver) and driver.site == SITE
    assert driver.input_se == "https://se.example/in"
    assert driver.output_se == "https://se.example/out"
    assert driver.backend.client.base.startswith("https://ce.example")
    assert driver.state_dir == tmp_path / "push"


def test_a_push_capable_backend_plugs_in_without_touching_the_factory(push_backend, tmp_path):
    site = site_config(tmp_path, "pushtest", {"push": True})
    factory = Factory("http://127.0.0.1:1", [site], token="factory-token",
                      pilot_token="pilot-token", state_dir=tmp_path / "factory")
    factory.activated_count = lambda name: 2
    factory.report = lambda records: None
    cycle = factory.run_once().sites[SITE]
    assert cycle.errors == [] and cycle.submitted == 2
    driver = factory.push_driver(site)
    assert driver.calls == ["poll", ("fetch_and_submit", 2)]
    assert (driver.server_url, driver.token) == ("http://127.0.0.1:1", "pilot-token")
    assert driver.state_dir == tmp_path / "factory" / "push" / SITE
    assert driver.site_config["name"] == SITE and factory.pilots == {}
