"""How many worker processes the server runs: light (no web framework), so the CLI can show and
check the option without importing the server."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

MAX_WORKERS = 64
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_OWN_CGROUP = Path("/proc/self/cgroup")


def default_workers(cgroup_root: Path = _CGROUP_ROOT, own_cgroup: Path = _OWN_CGROUP) -> int:
    """One worker per core this process may run on, at most :data:`MAX_WORKERS`: a fresh release is
    CPU work (OpenDP's noise, the exact counts), so one process would leave the other cores idle.
    The cores are those of its CPU affinity (which a container's cpuset narrows), and no more than
    its cgroup's CPU quota rounded up (``docker run --cpus 2`` on a 64-core host: 2 workers, not 64,
    each of which would build its own caches)."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(cgroup_root, own_cgroup)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, min(MAX_WORKERS, cores))


def cgroup_cpu_quota(cgroup_root: Path = _CGROUP_ROOT, own_cgroup: Path = _OWN_CGROUP) -> float | None:
    """This process's CPU quota in cores, from its cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``
    over ``cpu.cfs_period_us``); None when there is none or it cannot be read (not Linux, no cgroup
    file system). A container usually sees its own cgroup at the root of the mount, so the root is
    tried after the path ``/proc/self/cgroup`` names."""
    try:
        lines = own_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hierarchy, controllers, path = parts
        relative = path.lstrip("/")
        if controllers == "":  # the unified (v2) hierarchy
            bases = [cgroup_root / relative, cgroup_root]
            quota = _first(_v2_quota(base) for base in bases)
        elif "cpu" in controllers.split(","):
            bases = [cgroup_root / "cpu" / relative, cgroup_root / "cpu"]
            quota = _first(_v1_quota(base) for base in bases)
        else:
            continue
        if quota is not None:
            return quota
    return None


def _v2_quota(base: Path) -> float | None:
    try:
        quota, period = (base / "cpu.max").read_text().split()
        if quota == "max":
            return None
        cores, every = int(quota), int(period)
    except (OSError, ValueError):
        return None
    return None if cores <= 0 or every <= 0 else cores / every


def _v1_quota(base: Path) -> float | None:
    try:
        quota = int((base / "cpu.cfs_quota_us").read_text())
        period = int((base / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def _first(values: Iterable[float | None]) -> float | None:
    return next((v for v in values if v is not None), None)
