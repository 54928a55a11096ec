"""How many threads a step may use: the CPUs its container is given, not the cores of the node.

torch and OpenMP size their thread pools by the cores they see. In a pod limited to 4 CPUs on a 96-core node,
or in one of several jobs sharing a small machine, that is many times too many threads: they fight for the CPU
quota and a step runs several times slower. The quota is read from the cgroup (v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) and combined with the CPUs this process may run on; an
``OMP_NUM_THREADS`` set by the user is never raised.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
THREADS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _own_v2_dir(root: Path, proc_cgroup: Path) -> Path:
    """This process's cgroup v2 directory (``0::/path``), or the root when it cannot be read (a namespace)."""
    for line in (_read(proc_cgroup) or "").splitlines():
        if line.startswith("0::"):
            candidate = root / line[3:].lstrip("/")
            if (candidate / "cpu.max").is_file():
                return candidate
    return root


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``2.5`` = 250 ms per 100 ms); None when unlimited.

    Under cgroup v2 every level up to the root may set a quota; the smallest one applies.
    """
    limits = []
    directory = _own_v2_dir(root, proc_cgroup)
    while True:
        quota = (_read(directory / "cpu.max") or "").split()
        if len(quota) == 2 and quota[0] != "max":
            limits.append(int(quota[0]) / int(quota[1]))
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        quota_us, period_us = _read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")
        if quota_us and period_us and int(quota_us) > 0 and int(period_us) > 0:
            limits.append(int(quota_us) / int(period_us))
    return min(limits) if limits else None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process can use: its CPU affinity, capped by the cgroup quota (rounded down, at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def _user_threads() -> int | None:
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def thread_count(workers: int = 1, root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """Threads for each of ``workers`` processes sharing this container; a user's OMP_NUM_THREADS caps it."""
    count = max(1, available_cpus(root, proc_cgroup) // max(1, workers))
    user = _user_threads()
    return min(count, user) if user else count


def limit_threads(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """Size this process's torch and OpenMP thread pools (and its children's) to the CPUs it is given.

    Sets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` for processes started later, and lowers torch's intra-op
    pool now when torch is loaded (which also sets OpenMP's); a pool already smaller is left alone. Returns the
    thread count.
    """
    count = thread_count(1, root, proc_cgroup)
    for name in THREADS_ENV:
        os.environ[name] = str(count)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() > count:
        log.info(
            "using %d threads (the CPUs this container is given), not %d", count, torch.get_num_threads()
        )
        torch.set_num_threads(count)
    return count
