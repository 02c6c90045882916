"""Worker-node information: what a pilot says about its node, and how the server reads it.

The pilot sends it with its first update (``starting``) and every heartbeat, as one JSON object
in the updateJob field ``workerNode``; the server parses it into the job's ``wn_*`` columns,
which the monitor groups by (CPU model, cores, pilot version...). One contract, written here:
the pilot builds a :class:`WorkerNode`, the server calls :func:`parse`. PanDA's pilot 3 sends
none of this field; its updates simply leave the columns as they are.

What the network may send is bounded: each value of the wrong type or outside its range is
dropped (the rest is kept), text is cut to its column's width, and a field that is not a JSON
object is ignored as a whole. Node information never costs the update it rides on.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

FIELD = "workerNode"
MAX_FIELD_BYTES = 4096


@dataclass(frozen=True)
class WorkerNode:
    node: str = ""
    cpu_model: str = ""
    cores: int | None = None
    mem_mb: int | None = None              # total memory
    mem_available_mb: int | None = None
    load1: float | None = None             # 1-minute load average
    disk_free_mb: int | None = None        # free space where the job runs
    pilot_version: str = ""

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, "")},
                          separators=(",", ":"), sort_keys=True)


#: attribute -> (job column, kind, bound): text width, or the largest number taken
COLUMNS: dict[str, tuple[str, type, int]] = {
    "node": ("node", str, 255),
    "cpu_model": ("wn_cpu_model", str, 128),
    "cores": ("wn_cores", int, 1 << 20),
    "mem_mb": ("wn_mem_mb", int, 1 << 40),
    "mem_available_mb": ("wn_mem_available_mb", int, 1 << 40),
    "load1": ("wn_load1", float, 1 << 20),
    "disk_free_mb": ("wn_disk_free_mb", int, 1 << 50),
    "pilot_version": ("wn_pilot_version", str, 128),
}
assert set(COLUMNS) == {f.name for f in fields(WorkerNode)}


def _value(raw: Any, kind: type, bound: int) -> Any:
    if kind is str:
        if not isinstance(raw, str):
            return None
        text = "".join(c for c in raw if c.isprintable()).strip()
        return text[:bound] or None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    if kind is int:
        if isinstance(raw, float) and not raw.is_integer():
            return None
        raw = int(raw)
    elif not math.isfinite(raw):
        return None
    return raw if 0 <= raw <= bound else None


def parse(text: Any) -> dict[str, Any]:
    """The job columns a ``workerNode`` field sets ({} when it is absent or not an object)."""
    if not isinstance(text, str) or not text or len(text) > MAX_FIELD_BYTES:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out = {}
    for name, (column, kind, bound) in COLUMNS.items():
        value = _value(data.get(name), kind, bound)
        if value is not None:
            out[column] = value
    return out
