"""Process-wide settings for the commands that run the model (the CLI, a server): how
torch is imported and how many CPU threads it uses.

This module imports no torch at import time. The library itself never changes
process-wide state here: only a command's entry point calls `configure_threads` (before
torch is imported) and `apply_threads` (after). Every module of the package may import
torch through `import_torch`, which only silences one warning during the import.

    from perceiver_cli import runtime

    runtime.configure_threads(threads)      # before anything imports torch
    torch = runtime.import_torch()
    runtime.apply_threads(torch, threads)
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

# What torch's C++ side warns (once, while `import torch` runs) when NumPy is not
# installed. NumPy is a dependency (safetensors needs it to write a file: the int8 cache,
# a converted pytorch_model.bin), but an environment installed with --no-deps, or one whose
# NumPy was removed, still fills; there the warning is only noise on stderr before every
# result. Only this message is silenced: a NumPy that is installed but broken
# ("Failed to initialize NumPy: _ARRAY_API not found", a version torch was not built for)
# still warns, as it should.
NUMPY_MISSING = "Failed to initialize NumPy: No module named 'numpy'"


@contextmanager
def numpy_missing_quiet():
    """Within the block, torch's 'NumPy is not installed' warning is not shown; every other
    warning is handled as before (the filters are restored on exit)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(NUMPY_MISSING), category=UserWarning)
        yield


def import_torch():
    """`import torch`, without the warning torch prints when NumPy is not installed.
    Returns the module; a no-op (the same module) once torch is imported."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch
    with numpy_missing_quiet():
        import torch
    return torch


# -- threads ---------------------------------------------------------------------------
#
# torch's CPU kernels run on an OpenMP thread pool (libgomp in the pip wheels), one thread
# per CPU. Between parallel regions libgomp's idle threads spin (OMP_WAIT_POLICY unset:
# ~300k iterations, a few hundred microseconds) before they sleep. On a quiet machine that
# saves a little wake-up latency; on a loaded one it is a disaster: a thread whose core is
# taken by another process keeps the others spinning at every barrier, and a batch that
# takes 2 s with one thread took 20-25 s with two (BENCHMARKS.md, "Threads under load").
# With OMP_WAIT_POLICY=PASSIVE idle threads sleep at once: no slower on a quiet machine, and
# no collapse when the cores are shared. The OpenMP runtime reads its environment once,
# when it is loaded (when torch is imported), so this is set before that.

# Variables that already choose how idle OpenMP threads wait: a user who set one of them
# keeps it, and we set nothing (GOMP_SPINCOUNT: libgomp; KMP_BLOCKTIME: Intel's OpenMP).
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
WAIT_POLICY = "PASSIVE"


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask (taskset, cpusets), capped by a
    cgroup v2 CPU quota (`docker --cpus`, Kubernetes limits) when there is one."""
    try:
        cpus = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = max(1, min(cpus, math.ceil(quota)))
    return cpus


def _cgroup_cpu_quota() -> float | None:
    """The smallest CPU quota (in CPUs) of the cgroup v2 this process is in and of the
    cgroups above it (`cpu.max`); None: no quota, or no cgroup v2 here."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None:
        return None
    quotas = []
    folder = Path("/sys/fs/cgroup", own.lstrip("/"))
    for directory in (folder, *folder.parents):
        try:
            quota, period = (Path(directory) / "cpu.max").read_text().split()
            if quota != "max" and int(quota) > 0 and int(period) > 0:
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            pass
        if directory == Path("/sys/fs/cgroup"):
            break
    return min(quotas, default=None)


def configure_threads(threads: int | None = None) -> None:
    """Call before torch is imported (it does nothing once torch is): idle OpenMP threads
    will sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE), unless the user has chosen a
    wait policy (`WAIT_VARIABLES`). The policy is the same for every thread count, so
    `threads` changes nothing here; `apply_threads` sets the count after the import."""
    if "torch" in sys.modules or any(name in os.environ for name in WAIT_VARIABLES):
        return
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY


def apply_threads(torch, threads: int | None = None) -> int:
    """After torch is imported: `threads` intra-op threads, or by default one per CPU this
    process may use (`available_cpus`: a cgroup quota lowers torch's own default, which
    counts the affinity mask only). Returns the count in effect."""
    want = threads if threads is not None else min(torch.get_num_threads(), available_cpus())
    if want != torch.get_num_threads():
        torch.set_num_threads(want)
    return torch.get_num_threads()
