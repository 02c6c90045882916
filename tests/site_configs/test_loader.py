"""Site config loading: the examples are valid, and every kind of breakage names file, key, reason."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

import site_configs
from site_configs import ConfigError, EXAMPLES_DIR, load_dir, load_site_config
from site_configs.schema import plugin_names

DEMO = EXAMPLES_DIR / "LOCAL_DEMO.yaml"
EXAMPLES = sorted((EXAMPLES_DIR / "examples").glob("*.yaml"))


def demo_dict() -> dict:
    return yaml.safe_load(DEMO.read_text())


def write(tmp: Path, name: str, data) -> Path:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def errors_of(path: Path) -> list[ConfigError]:
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    return info.value.errors


def test_demo_site_loads_with_defaults_expanded(monkeypatch):
    monkeypatch.delenv("PANDA_SE_ROOT", raising=False)
    cfg = load_site_config(DEMO)
    assert cfg.name == "LOCAL_DEMO" and cfg.online
    assert cfg.scheduler.backend == "local"
    assert cfg.storage.input.name == cfg.storage.output.name == "LOCAL_SE"
    assert cfg.storage.input.url == "file:///var/lib/panda/se"
    assert cfg.copytools.input.name == cfg.copytools.output.name == "cp"
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data            # JSON-able, nothing lost
    assert "source" not in data
    assert site_configs.validate_dict(data) == data        # the server's round trip


def test_env_var_expansion(monkeypatch, tmp_path):
    monkeypatch.setenv("PANDA_SE_ROOT", str(tmp_path / "se"))
    monkeypatch.setenv("MAXQ", "7")
    data = demo_dict()
    data["pilots"]["max_queued"] = "${MAXQ}"
    data["pilots"]["max_running"] = "${UNSET_MAXR_XYZ:-9}"
    data["region"] = "eu-${UNSET_REGION_XYZ:-west}"
    cfg = load_site_config(write(tmp_path, "s.yaml", data))
    assert cfg.storage.output.url == f"file://{tmp_path / 'se'}"
    assert cfg.pilots.max_queued == 7 and cfg.pilots.max_running == 9
    assert cfg.region == "eu-west"


def test_unset_env_var_without_default_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_VAR_XYZ", raising=False)
    data = demo_dict()
    data["storage"]["input"]["url"] = "file://${NO_SUCH_VAR_XYZ}/se"
    errs = errors_of(write(tmp_path, "s.yaml", data))
    assert [(e.key_path, "NO_SUCH_VAR_XYZ" in e.reason) for e in errs] == [("storage.input.url", True)]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_backend_example_is_valid(path):
    data = yaml.safe_load(path.read_text())
    backend = data["scheduler"]["backend"]
    if backend not in plugin_names("panda.schedulers"):
        pytest.skip(f"scheduler backend {backend!r} is not registered in setup.py yet")
    cfg = load_site_config(path)
    assert cfg.scheduler.backend == backend
    assert cfg.name == path.stem


def test_one_example_per_backend():
    backends = {yaml.safe_load(p.read_text())["scheduler"]["backend"] for p in EXAMPLES}
    assert backends == {"slurm", "htcondor", "arc"}


def _mutate(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()

BROKEN = [
    # (key to change, new value, key path reported, words in the reason)
    ("resources.cores", _DELETE, "resources.cores", "missing required key"),
    ("name", _DELETE, "name", "missing required key"),
    ("pilots.max_queued", "four", "pilots.max_queued", "expected integer, got string"),
    ("resources.memory_mb", 1.5, "resources.memory_mb", "expected integer"),
    ("direct_read", "yes please", "direct_read", "expected boolean"),
    ("scheduler", "slurm", "scheduler", "expected mapping"),
    ("status", "sleeping", "status", "unknown value 'sleeping'"),
    ("scheduler.backend", "pbs", "scheduler.backend", "unknown scheduler backend 'pbs'"),
    ("copytools.output.name", "teleport", "copytools.output.name", "unknown copytool 'teleport'"),
    ("colour", "blue", "colour", "unknown key"),
    ("limits.looping", 5, "limits.looping", "unknown key"),
    ("name", "../etc/passwd", "name", "only letters, digits"),
    # the site's job slots, which brokerage weighs it by: zero, negative, a string, a number
    ("pilots.max_running", -1, "pilots.max_running", "below the minimum 1"),
    ("pilots.max_running", 0, "pilots.max_running", "below the minimum 1: the jobs the site "
     "runs at once (a site that must take no work: status offline or brokeroff)"),
    ("pilots.max_running", "lots", "pilots.max_running", "expected integer, got string 'lots'"),
    ("pilots.max_running", "${UNSET_MAXR_XYZ:-0}", "pilots.max_running", "below the minimum 1"),
    ("pilots.max_running", 2.5, "pilots.max_running", "expected integer, got number 2.5"),
    ("pilots.max_running", True, "pilots.max_running", "expected integer, got boolean"),
    ("pilots.max_running", _DELETE, "pilots.max_running", "missing required key"),
    ("pilots.timefloor", -5, "pilots.timefloor", "below the minimum 0"),
    ("pilots.timefloor", "10m", "pilots.timefloor", "expected integer, got string"),
    # the demo's pilots have 3600 s: a pilot taking jobs for 60 minutes would be killed in one
    ("pilots.timefloor", 60, "pilots.timefloor", "not shorter than the pilot's wall time"),
]


@pytest.mark.parametrize("key,value,key_path,reason", BROKEN,
                         ids=[f"{b[0]}={b[1] if b[1] is not _DELETE else 'missing'}" for b in BROKEN])
def test_broken_config_names_file_key_and_reason(tmp_path, key, value, key_path, reason):
    path = write(tmp_path, "broken.yaml", _mutate(demo_dict(), key, value))
    errs = errors_of(path)
    assert len(errs) == 1, [str(e) for e in errs]
    err = errs[0]
    assert err.file == str(path) and err.key_path == key_path and reason in err.reason
    assert str(path) in str(err) and key_path in str(err)


def test_every_error_of_a_file_is_reported(tmp_path):
    data = _mutate(_mutate(demo_dict(), "scheduler.backend", "pbs"), "resources.cores", "x")
    data = _mutate(data, "storage.input", _DELETE)
    errs = errors_of(write(tmp_path, "b.yaml", data))
    assert sorted(e.key_path for e in errs) == ["resources.cores", "scheduler.backend",
                                               "storage.input"]


@pytest.mark.parametrize("text,reason", [
    ("name: [unclosed\n", "not valid YAML at line"),
    ("", "empty file"),
    ("- just\n- a list\n", "must be a mapping, got list"),
    ("just a string\n", "must be a mapping, got string"),
])
def test_unreadable_files(tmp_path, text, reason):
    errs = errors_of(write(tmp_path, "bad.yaml", text))
    assert len(errs) == 1 and errs[0].key_path == "" and reason in errs[0].reason


def test_binary_and_huge_files(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"name: \xff\xfe\x00")
    assert "not UTF-8" in errors_of(tmp_path / "bin.yaml")[0].reason
    (tmp_path / "big.yaml").write_text("# " + "x" * (2 << 20))
    assert "too large" in errors_of(tmp_path / "big.yaml")[0].reason


def test_yaml_tags_are_not_executed(tmp_path):
    path = write(tmp_path, "evil.yaml", "name: !!python/object/apply:os.system ['true']\n")
    assert "not valid YAML" in errors_of(path)[0].reason


def test_load_dir_broken_files_do_not_stop_the_others(tmp_path):
    good = demo_dict()
    write(tmp_path, "a_good.yaml", good)
    write(tmp_path, "b_missing.yaml", _mutate(good, "resources.cores", _DELETE) | {"name": "B"})
    write(tmp_path, "c_type.yaml", _mutate(good, "pilots.max_queued", "x") | {"name": "C"})
    write(tmp_path, "d_backend.yaml", _mutate(good, "scheduler.backend", "pbs") | {"name": "D"})
    write(tmp_path, "e_copytool.yaml", _mutate(good, "copytools.input.name", "ftp") | {"name": "E"})
    write(tmp_path, "f_yaml.yml", "name: [\n")
    write(tmp_path, "g_other.yml", good | {"name": "OTHER"})
    write(tmp_path, "h_dup.yaml", good)                      # same name as a_good
    write(tmp_path, "notes.txt", "not a config")
    write(tmp_path, ".hidden.yaml", "junk: [")
    configs, errors = load_dir(tmp_path)
    assert [c.name for c in configs] == ["LOCAL_DEMO", "OTHER"]
    by_file = {Path(e.file).name: e for e in errors}
    assert set(by_file) == {"b_missing.yaml", "c_type.yaml", "d_backend.yaml",
                            "e_copytool.yaml", "f_yaml.yml", "h_dup.yaml"}
    assert by_file["b_missing.yaml"].key_path == "resources.cores"
    assert by_file["c_type.yaml"].key_path == "pilots.max_queued"
    assert by_file["d_backend.yaml"].key_path == "scheduler.backend"
    assert by_file["e_copytool.yaml"].key_path == "copytools.input.name"
    assert "duplicate site name 'LOCAL_DEMO'" in by_file["h_dup.yaml"].reason
    assert "a_good.yaml" in by_file["h_dup.yaml"].reason


def test_load_dir_of_a_missing_directory(tmp_path):
    configs, errors = load_dir(tmp_path / "nope")
    assert configs == [] and len(errors) == 1 and "not a directory" in errors[0].reason


def test_package_dir_holds_the_demo_site():
    configs, errors = load_dir(EXAMPLES_DIR)
    assert [c.name for c in configs] == ["LOCAL_DEMO"] and errors == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_example_backend_accepts_its_options(path):
    """The options in the example are the ones its backend takes (it refuses unknown ones)."""
    from schedulers.base import backend_class
    data = yaml.safe_load(path.read_text())
    backend = data["scheduler"]["backend"]
    if backend not in plugin_names("panda.schedulers"):
        pytest.skip(f"scheduler backend {backend!r} is not registered in setup.py yet")
    try:
        cls = backend_class(backend)
    except ModuleNotFoundError as exc:
        pytest.skip(f"scheduler backend {backend!r} is registered but not importable yet: {exc}")
    cfg = load_site_config(path)
    instance = cls(**cfg.scheduler.options)
    assert instance.name == backend
