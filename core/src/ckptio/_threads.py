"""How many threads a rank's I/O pools get: the cores this process may use, shared among the
ranks on its machine.

Eight ranks on an eight-core machine each running four reader threads is 32 threads fighting
for eight cores: every thread switch, lock hand-off and cache refill is paid by the ranks that
wait for the slowest one. So pools are sized by the cores available *per local rank*:

* the cores: ``os.sched_getaffinity`` (a ``taskset``/cgroup cpuset), capped by a cgroup CPU
  quota (``cpu.max``, or ``cpu.cfs_quota_us`` on cgroup v1), else ``os.cpu_count()``;
* the ranks on this machine: ``$LOCAL_WORLD_SIZE`` (torchrun), the equivalents of other
  launchers (Open MPI, MPICH, MVAPICH, Slurm's ``--ntasks-per-node``); else, once
  ``torch.distributed`` is initialised, learned from the default group's store: every rank
  that asks registers its host name there, and the count is used as soon as every rank of the
  group has registered (no collective, so asking on some ranks only never blocks); until then
  every rank of the group is assumed to be on this machine, which is what ``mp.spawn`` does.

:func:`resolve_thread_count` is what the formats call: the user's ``thread_count`` option when
given, else :func:`default_thread_count`. Both are exported by :mod:`ckptio.ext`.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import weakref
from typing import Any

#: Launcher variables that hold the number of processes on this machine, in order of trust.
LOCAL_SIZE_VARS = (
    "LOCAL_WORLD_SIZE",  # torchrun, torch.distributed.elastic
    "OMPI_COMM_WORLD_LOCAL_SIZE",  # Open MPI
    "MPI_LOCALNRANKS",  # MPICH (hydra)
    "MV2_COMM_WORLD_LOCAL_SIZE",  # MVAPICH
    "SLURM_NTASKS_PER_NODE",  # srun --ntasks-per-node
)
_STORE_PREFIX = "ckptio/local_world_size/"

_lock = threading.Lock()
_cores: int | None = None
#: for the current default process group: [weak reference to it, registered on its store yet,
#: learned local size or None]
_learned: list[Any] = [None, False, None]


def _cgroup_quota() -> float | None:
    """CPUs this process's cgroup may use per period (``None``: no quota, or not Linux)."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2: "<quota|max> <period>"
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """The CPUs this process may run on (affinity mask, then cgroup quota), at least 1. Cached."""
    global _cores
    if _cores is None:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            n = os.cpu_count() or 1
        quota = _cgroup_quota()
        if quota is not None:
            n = min(n, math.ceil(quota))
        _cores = max(1, n)
    return _cores


def _from_env() -> int | None:
    for var in LOCAL_SIZE_VARS:
        raw = os.environ.get(var, "").strip()
        if raw.isdigit() and int(raw) >= 1:
            return int(raw)
    return None


def _from_process_group() -> int | None:
    """Ranks of the default group on this host; ``None`` without ``torch.distributed``."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        world = dist.get_world_size()
        if world <= 1:
            return 1
        from torch.distributed import distributed_c10d as c10d

        group = c10d._get_default_group()
        store = c10d._get_default_store()
    except Exception:  # a torch without these private helpers: assume every rank is local
        return None
    host = _STORE_PREFIX + "host/" + socket.gethostname()
    with _lock:  # one registration per process and group, even when threads ask at once
        if _learned[0] is None or _learned[0]() is not group:  # a new group: start over
            _learned[:] = [weakref.ref(group), False, None]
        if _learned[2] is not None:
            return int(_learned[2])
        try:
            if not _learned[1]:
                store.add(host, 1)
                store.add(_STORE_PREFIX + "ranks", 1)
                _learned[1] = True
            if int(store.add(_STORE_PREFIX + "ranks", 0)) < world:
                return world  # not every rank has registered yet: assume all are here (mp.spawn)
            local = max(1, min(world, int(store.add(host, 0))))
        except Exception:  # a store that refuses: assume every rank is on this machine
            return world
        _learned[2] = local
        return local


def local_world_size() -> int:
    """The number of ranks (processes) on this machine, at least 1 (see the module docstring)."""
    return _from_env() or _from_process_group() or 1


def default_thread_count(cap: int | None = None, *, per_core: float = 1.0) -> int:
    """Threads for one rank's I/O pool: ``per_core`` threads per core available to each rank on
    this machine (``available_cores() / local_world_size()``), at most ``cap``, at least 1.

    ``per_core`` above 1 suits pools whose threads mostly wait for storage (reads of a cold
    disk or an object store); 1 suits pools that copy and hash.
    """
    n = int(available_cores() / local_world_size() * per_core)
    if cap is not None:
        n = min(n, cap)
    return max(1, n)


def resolve_thread_count(value: Any, cap: int | None = None, *, per_core: float = 1.0) -> int:
    """A pool size: ``value`` (the user's ``thread_count`` option) when it is not ``None``, else
    :func:`default_thread_count`. A value below 1 is raised to 1."""
    if value is None:
        return default_thread_count(cap, per_core=per_core)
    return max(1, int(value))


def _reset() -> None:
    """Forget the cached core count and learned local sizes (tests)."""
    global _cores
    with _lock:
        _cores = None
        _learned[:] = [None, False, None]


__all__ = [
    "LOCAL_SIZE_VARS",
    "available_cores",
    "default_thread_count",
    "local_world_size",
    "resolve_thread_count",
]
