"""A site config in the shape PanDA's pilot 3 reads as its queue description (``queuedata``).

Pilot 3 reads fields such as nickname, copytools/acopytools, maxwdir, maxrss, maxtime, corecount;
our own pilot reads the whole site config from the extra key ``panda_wms``, and acts on it only
when ``panda_wms_signature`` verifies with the server's key (``signed_queuedata``).
"""
from __future__ import annotations

from collections.abc import Callable

from panda_core.canonical import QUEUEDATA_SIGNATURE_KEY, queuedata_signed_bytes

# Our copytool names -> the module pilot 3 has for them (pilot/copytool/<name>.py). Pilot 3's ``mv``
# module does cp, mv and symlink between its launch directory and the job directory.
PILOT3_COPYTOOLS = {"cp": "mv", "mv": "mv", "symlink": "mv", "xrdcp": "xrdcp", "gfal": "gfal",
                    "http": "gfal"}


def pilot3_copytool(name: str) -> str:
    return PILOT3_COPYTOOLS.get(name, name)


def pilot3_container(sandbox: dict) -> tuple[str, str]:
    """(``container_type``, ``container_options``) of the queue description from the site
    config's ``sandbox`` (docs/compat.md, "Containers"). Pilot 3 reads ``container_type`` as
    ``name:user`` pairs joined by ``;`` (user ``pilot``: the pilot runs the payload in that
    container; ``wrapper``, ``middleware``: the pilot itself or its stage-in/out tools, which no
    site config here asks for) and ``container_options`` as the runtime's options. Only our
    ``apptainer`` runtime is a container pilot 3 knows: ``bwrap`` and ``none`` say no container
    (pilot 3 then runs payloads without one, and fails a job naming an image, as on a PanDA
    queue without ``container_type``)."""
    if (sandbox or {}).get("runtime") != "apptainer":
        return "", ""
    # the isolation our apptainer runtime gives (pilot/sandbox/apptainer.py), in apptainer's
    # words: the site's paths read-only and the job's work dir (pilot 3's ${workdir}) bound,
    # private /tmp and home, own IPC and PID namespaces, optionally no network
    binds = [f"{path}:{path}:ro" for path in sandbox.get("bind") or []] + ["${workdir}"]
    options = f"-B {','.join(binds)} --contain --ipc --pid"
    if sandbox.get("network") is False:
        options += " --net --network none"
    return "apptainer:pilot", options


def queuedata(config: dict) -> dict:
    res = config.get("resources") or {}
    limits = config.get("limits") or {}
    tools = config.get("copytools") or {}
    storage = config.get("storage") or {}
    pilots = config.get("pilots") or {}
    t_in = pilot3_copytool((tools.get("input") or {}).get("name", "cp"))
    t_out = pilot3_copytool((tools.get("output") or {}).get("name", "cp"))
    status = config.get("status", "online")
    name = config["name"]
    container_type, container_options = pilot3_container(config.get("sandbox") or {})
    return {
        "name": name,
        "nickname": name,
        "panda_resource": name,
        "siteid": name,
        "site": name,
        "atlas_site": name,
        "cloud": config.get("region", ""),
        "region": config.get("region", ""),
        "state": "ACTIVE" if status != "offline" else "INACTIVE",
        "status": status,
        "type": "production",
        "resource_type": "GRID",
        "copytools": {t_in: {"setup": ""}, t_out: {"setup": ""}},
        "acopytools": {"pr": [t_in], "pw": [t_out], "pl": [t_out]},
        "astorages": {"pr": [storage.get("input", {}).get("name", "")],
                      "pw": [storage.get("output", {}).get("name", "")],
                      "pl": [storage.get("output", {}).get("name", "")]},
        "direct_access_lan": bool(config.get("direct_read", False)),
        "direct_access_wan": False,
        "maxwdir": int(limits.get("max_workdir_mb", res.get("max_disk_mb", 20000))),
        "maxrss": int(res.get("memory_mb", 2000)),
        "maxtime": int(res.get("max_walltime_s", 86400)),
        "corecount": int(res.get("cores", 1)),
        "catchall": "",
        "params": {},
        "container_type": container_type,
        "container_options": container_options,
        "is_cvmfs": False,
        "pledgedcpu": 0,
        "timefloor": int(pilots.get("timefloor", 0)),   # minutes, as pilot 3 reads it
        "maxinputsize": int(res.get("max_disk_mb", 20000)),
        "panda_wms": config,
    }


def signed_queuedata(config: dict, sign: Callable[[bytes], str]) -> dict:
    """``queuedata(config)`` with the signature of its site config (``sign``: the key store's
    ``sign_canonical``), which our pilot checks before it acts on storage or copytools."""
    data = queuedata(config)
    data[QUEUEDATA_SIGNATURE_KEY] = sign(queuedata_signed_bytes(config["name"], config))
    return data


def _protocol(url: str, pid: int) -> dict:
    """A storage URL split the way pilot 3's storage data holds it: endpoint + path."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    endpoint = f"{parts.scheme}://{parts.netloc or ('localhost' if parts.scheme == 'file' else '')}"
    path = parts.path or "/"
    if parts.scheme in ("root", "xroot"):
        # pilot 3 writes endpoint + path + the file's path: XRootD reads a path after a single
        # slash as relative (and refuses it, [3010]); the absolute path needs two
        path = "//" + path.lstrip("/")
    return {"id": pid, "endpoint": endpoint, "path": path,
            "flavour": "POSIX" if parts.scheme == "file" else parts.scheme.upper(),
            "activities": [["r", 1], ["w", 1], ["read_lan", 1], ["write_lan", 1],
                           ["read_wan", 1], ["write_wan", 1], ["pr", 1], ["pw", 1]]}


def storagedata(configs: list[dict]) -> dict:
    """Every storage element of the site configs, in the shape of pilot 3's ``ddmendpoints.json``.

    Pilot 3 loads this at start (``--storagedata-url``) and looks up each file's ``ddmendpoint``
    in it; without it, it retries unreachable hosts for minutes.
    """
    out: dict[str, dict] = {}
    for config in configs:
        for role in ("input", "output"):
            se = (config.get("storage") or {}).get(role) or {}
            name, url = se.get("name"), se.get("url")
            if not name or not url or name in out:
                continue
            proto = _protocol(url, 0)
            acts = {a: [proto] for a, _ in proto["activities"]}
            out[name] = {"name": name, "id": len(out) + 1, "type": "DATADISK", "token": "",
                         "state": "ACTIVE", "site": config["name"], "resource": {},
                         "is_deterministic": True, "rprotocols": {"0": proto}, "arprotocols": acts}
    return out
