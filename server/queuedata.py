"""A site config in the shape PanDA's pilot 3 reads as its queue description (``queuedata``).

Pilot 3 reads fields such as nickname, copytools/acopytools, maxwdir, maxrss, maxtime, corecount;
our own pilot reads the whole site config from the extra key ``panda_wms``.
"""
from __future__ import annotations


def queuedata(config: dict) -> dict:
    res = config.get("resources") or {}
    limits = config.get("limits") or {}
    tools = config.get("copytools") or {}
    storage = config.get("storage") or {}
    t_in = (tools.get("input") or {}).get("name", "cp")
    t_out = (tools.get("output") or {}).get("name", "cp")
    status = config.get("status", "online")
    name = config["name"]
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
        "container_type": "",
        "container_options": "",
        "is_cvmfs": False,
        "pledgedcpu": 0,
        "timefloor": 0,
        "maxinputsize": int(res.get("max_disk_mb", 20000)),
        "panda_wms": config,
    }
