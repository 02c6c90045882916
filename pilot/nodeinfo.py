"""Worker-node facts for getJob and heartbeats: CPU model, cores, memory, load, disk."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from panda_core.workernode import WorkerNode


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform   # the fallback only: ~1.3 ms to import, on the way to the payload

    return platform.processor() or platform.machine()


def _meminfo(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_mb() -> int:
    """Total memory in MB, from /proc/meminfo (no psutil: this is on the start-up path)."""
    return _meminfo("MemTotal")


def worker_node(workdir: str | Path) -> WorkerNode:
    """What the first update and every heartbeat say about this node (``workerNode``), read
    from /proc and the standard library (no psutil: the first update is on the start path)."""
    from .job import pilot_version

    try:
        load1: float | None = round(os.getloadavg()[0], 2)
    except OSError:
        load1 = None
    try:
        free: int | None = shutil.disk_usage(workdir).free // 2**20
    except OSError:
        free = None
    return WorkerNode(node=socket.gethostname(), cpu_model=cpu_model(),
                      cores=os.cpu_count() or 1, mem_mb=memory_mb() or None,
                      mem_available_mb=_meminfo("MemAvailable") or None, load1=load1,
                      disk_free_mb=free, pilot_version=pilot_version())


def node_info(workdir: str | Path) -> dict[str, object]:
    """The getJob fields describing this node (PanDA names: node, cpu in MHz-less model, mem MB,
    diskSpace MB free where jobs run)."""
    return {
        "node": socket.gethostname(),
        "cpu": cpu_model(),
        "mem": memory_mb(),
        "diskSpace": shutil.disk_usage(workdir).free // 2**20,
        "cores": os.cpu_count() or 1,
    }


def heartbeat_info(workdir: str | Path) -> dict[str, object]:
    """Node facts sent with heartbeats (psutil for what /proc alone gives awkwardly)."""
    import psutil

    vm = psutil.virtual_memory()
    load1, load5, load15 = os.getloadavg()
    return {
        "cpuModel": cpu_model(), "cpuCores": os.cpu_count() or 1,
        "memTotalMB": vm.total // 2**20, "memAvailableMB": vm.available // 2**20,
        "load1": round(load1, 2), "load5": round(load5, 2),
        "diskFreeMB": shutil.disk_usage(workdir).free // 2**20,
    }
