"""What the hardware can do: CPU threads that fit, native bf16, peak FLOP/s for MFU.

**Threads.** How many CPU threads to use: the CPUs this process may really use, shared fairly.

PyTorch starts as many intra-op threads as the machine has cores. That is wrong in three
common cases, and on a small machine each costs a large factor:

- a Kubernetes pod with a CPU limit (a cgroup quota) sees every core of the node, so a pod
  limited to 2 CPUs on a 64-core node starts 64 threads and is throttled most of the time;
- a process pinned to some cores (``taskset``, cpusets) sees them all too;
- beside other busy processes, threads of one parallel region wait at every barrier for a
  sibling the scheduler has preempted: at small sizes the step collapses (measured here,
  see docs/training.md).

:func:`choose_threads` takes the CPUs allowed by affinity and by the cgroup quota (v2
``cpu.max``, v1 ``cpu.cfs_quota_us``), divides them among the ranks on this node and their
data-loader workers and, with no quota to rely on, leaves out the CPUs that other runnable
processes are using right now.

**bf16.** :func:`native_bf16` says whether the device computes bf16 in hardware (CUDA with
bf16; CPUs with AVX512-BF16 or AMX); ``precision: auto`` uses it only where it pays.

**Peak.** :func:`peak_tflops` is the device's dense peak for model-FLOPs utilisation (MFU):
NVIDIA's datasheet figures for known GPUs, and for CPUs an estimate from the vector width
and the clock (``/proc/cpuinfo``), labelled as such.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cyclegan.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("cyclegan")

_CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadChoice:
    """The number of intra-op threads and why."""

    threads: int
    reason: str


def affinity_cpus() -> int:
    """CPUs this process may run on (``sched_getaffinity``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cgroup_paths() -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and v1 ``cpu`` controller path."""
    v2 = v1 = None
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and controllers == "":
                v2 = path
            elif "cpu" in controllers.split(","):
                v1 = path
    except (OSError, ValueError):
        pass
    return v2, v1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def quota_cpus(root: Path = _CGROUP) -> float | None:
    """The CPU quota of this process's cgroup (and its parents), in CPUs; None if unlimited."""
    v2, v1 = _cgroup_paths()
    limits: list[float] = []
    if v2 is not None and (root / "cgroup.controllers").exists():
        folder = root / v2.lstrip("/")
        while True:
            text = _read(folder / "cpu.max")
            if text:
                quota, _, period = text.partition(" ")
                if quota != "max" and period:
                    limits.append(int(quota) / int(period))
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
    else:
        for mount in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
            if not mount.is_dir():
                continue
            for folder in {mount / (v1 or "/").lstrip("/"), mount}:
                q, t = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                if q and t and int(q) > 0 and int(t) > 0:
                    limits.append(int(q) / int(t))
            break
    return min(limits) if limits else None


def runnable_others(samples: int = 5, interval: float = 0.02) -> float:
    """Processes other than this one that are runnable right now (``procs_running`` of
    /proc/stat, averaged over a few samples, less this process's own running thread)."""
    counts = []
    for i in range(samples):
        try:
            for line in Path("/proc/stat").read_text().splitlines():
                if line.startswith("procs_running"):
                    counts.append(int(line.split()[1]))
                    break
        except (OSError, ValueError):
            return 0.0
        if i + 1 < samples:
            time.sleep(interval)
    return max(0.0, (sum(counts) / len(counts)) - 1.0) if counts else 0.0


def choose_threads(
    setting: int | str, local_ranks: int = 1, loader_workers: int = 0, *, load_aware: bool = True
) -> ThreadChoice:
    """Intra-op threads for one rank: ``setting`` if it is a number, else (``auto``) the
    usable CPUs divided among ``local_ranks`` ranks, less ``loader_workers`` per rank.

    ``load_aware`` also leaves out CPUs other processes are busy on (training, whose small
    steps collapse beside them). Evaluation passes False: its numbers must not depend on the
    load (float reductions, and so features, differ between thread counts).
    """
    if setting != "auto":
        return ThreadChoice(int(setting), "set explicitly")
    cpus, why = affinity_cpus(), "affinity"
    quota = quota_cpus()
    if quota is not None and quota < cpus:
        cpus, why = max(1, math.floor(quota)), f"cgroup quota {quota:g} CPUs"
    elif quota is None and load_aware:
        # The job's own other ranks on this node, starting at the same moment, are not others.
        busy = max(0.0, runnable_others() - (local_ranks - 1))
        free = max(1, round(cpus - busy))
        if free < cpus:
            # Threads that must wait for preempted siblings at every barrier are slower than
            # fewer threads that run: leave the busy CPUs to their owners.
            cpus, why = free, f"{cpus} CPUs by affinity, {busy:.1f} busy with other processes"
    per_rank = max(1, cpus // max(1, local_ranks) - loader_workers)
    parts = [f"{cpus} usable ({why})"]
    if local_ranks > 1:
        parts.append(f"shared by {local_ranks} ranks")
    if loader_workers:
        parts.append(f"{loader_workers} loader workers per rank")
    return ThreadChoice(per_rank, ", ".join(parts))


def apply_threads(
    setting: int | str, local_ranks: int = 1, loader_workers: int = 0, *, load_aware: bool = True
) -> int:
    """Choose and set torch's intra-op threads (logged with the reason); returns the count."""
    import torch

    choice = choose_threads(setting, local_ranks, loader_workers, load_aware=load_aware)
    torch.set_num_threads(choice.threads)
    log.info("CPU threads: %d (%s)", choice.threads, choice.reason)
    return choice.threads


# ---------------------------------------------------------------------------------------------
# Devices, bf16 and peak FLOP/s
# ---------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (SXM parts; sparsity excluded): H100
# SXM 989.4 TFLOP/s, H200 the same silicon and clocks; A100 312; L40S 362; A10G 70 (approx.).
GPU_PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 70.0}


def resolve_device(
    requested: str | torch.device = "auto", local_rank: int = 0, key: str = "device"
) -> torch.device:
    """The device for ``requested`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``): ``auto`` is this
    rank's GPU when there is one, else the CPU; asking for CUDA without a GPU is an error naming
    the parameter ``key``. The one rule for training, evaluation, translation and serving."""
    import torch

    if isinstance(requested, torch.device):
        return requested
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        err = ConfigError(
            f"{key} = {requested!r} but no CUDA GPU is visible", f"set {key} to auto or cpu"
        )
        err.key = key
        raise err
    if requested.startswith("cuda:"):
        return torch.device(requested)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` ("cuda" or "cpu") computes bf16 natively."""
    if device_type == "cuda":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _cpu_mhz() -> float | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.partition(":")[2])
    except (OSError, ValueError):
        pass
    return None


def peak_tflops(device_type: str, threads: int, bf16: bool) -> tuple[float | None, str]:
    """The dense peak (TFLOP/s) to compute MFU against, and where the figure comes from."""
    if device_type == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        for key, tflops in GPU_PEAK_BF16_TFLOPS.items():
            if key in name:
                # fp32 without tensor cores is far lower; MFU against bf16 peak, as is usual.
                return tflops, f"{key} bf16 datasheet"
        return None, f"unknown GPU {name!r}"
    mhz = _cpu_mhz()
    if not mhz:
        return None, "unknown CPU clock"
    flags = cpu_flags()
    # FLOPs per cycle per core: two FMA pipes x vector lanes x 2 (AVX-512: 16 fp32 lanes).
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    if bf16 and "amx_bf16" in flags:
        per_cycle *= 16  # AMX tiles
    elif bf16 and "avx512_bf16" in flags:
        per_cycle *= 2  # VDPBF16PS: two bf16 products per fp32 lane
    return threads * mhz * 1e6 * per_cycle / 1e12, f"CPU estimate ({threads} x {mhz:.0f} MHz)"
