"""``cyclegan train`` starting torchrun itself when asked for several ranks.

``train.nproc_per_node`` > 1 (or ``auto`` with several GPUs) re-runs the same command line
under ``python -m torch.distributed.run --standalone``; each rank then runs
``cyclegan train`` as an ordinary DDP process. Inside a Kubeflow TrainJob the launcher passes
``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR``... to torchrun as its defaults, so
there the command line gets no node settings of its own.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cyclegan.config import Config, write_params
from cyclegan.errors import ConfigError, CycleGANError, Stopped
from cyclegan.paths import Paths
from cyclegan.train.distributed import under_torchrun

log = logging.getLogger("cyclegan.train")

# Variables through which Kubeflow Trainer (torch-distributed runtime) configures torchrun.
_PET_VARS = ("PET_NNODES", "PET_NPROC_PER_NODE")


def ranks_per_node(cfg: Config) -> int:
    """``train.nproc_per_node`` resolved: ``auto`` = the visible GPUs (1 on a CPU-only host)."""
    n = cfg.train.nproc_per_node
    use_gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
    if n == "auto":
        return max(1, torch.cuda.device_count()) if use_gpu else 1
    # Bounded before any process starts: one rank per GPU; on CPUs, more ranks than cores
    # only slows down (2 always allowed, for a DDP check on a small machine).
    most = torch.cuda.device_count() if use_gpu else max(2, os.cpu_count() or 1)
    if int(n) > most:
        where = f"{most} GPU(s)" if use_gpu else f"{most} CPU core(s) and no GPU in use"
        err = ConfigError(
            f"train.nproc_per_node = {n} is more ranks than this node has devices ({where})",
            "use train.nproc_per_node=auto (one rank per GPU) or a smaller number",
        )
        err.key = "train.nproc_per_node"
        raise err
    return int(n)


def torchrun_command(cfg: Config, argv: Sequence[str]) -> list[str] | None:
    """The torchrun command line that runs ``argv`` as DDP ranks, or None to run in-process."""
    if under_torchrun():
        return None  # we are a rank already
    run = [sys.executable, "-m", "torch.distributed.run"]
    entry = ["-m", "cyclegan", *argv]
    if any(os.environ.get(v) for v in _PET_VARS):
        # A Kubeflow TrainJob pod: torchrun reads nodes, ranks and rendezvous from PET_*.
        return [*run, *entry]
    n = ranks_per_node(cfg)
    if n <= 1:
        return None
    return [*run, "--standalone", "--nproc_per_node", str(n), *entry]


def run(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Train with ``cfg`` into ``paths``: in this process, or - when several ranks are wanted
    (``train.nproc_per_node``, or a TrainJob node) - as DDP ranks this process starts and
    watches. Returns what ``metrics/train.json`` holds. The one entry point of the CLI and the
    Kubeflow train step.

    The ranks are separate processes started with a command line, so they read the
    parameters from one params file written here from ``cfg`` (never re-derived from the
    caller's own arguments).
    """
    if torchrun_command(cfg, []) is None:
        from cyclegan.train.trainer import train

        return train(cfg, paths)
    with tempfile.TemporaryDirectory(prefix="cyclegan-ranks-") as tmp:
        params = write_params(cfg, Path(tmp) / "params.yaml")
        code = launch_if_needed(cfg, rank_argv(params, paths))
    if code:
        # Every rank stopped at the same step and saved; rank 0 has said where, in one line.
        raise Stopped("", code - 128)
    path = paths.metrics / "train.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def launch_if_needed(cfg: Config, argv: Sequence[str]) -> int | None:
    """Run ``cyclegan <argv>`` as DDP ranks under torchrun's agent, in this process.

    Returns the exit code for the whole job, or None when this process should train by
    itself. The agent runs here rather than as a ``torchrun`` subprocess so that this process
    (PID 1 in a pod) stays in charge of its signals and its messages: SIGTERM/SIGINT reach
    the agent, which passes them once to every rank; the ranks finish their step, save and
    exit 143/130; and the outcome is one line, not torchrun's failure report.
    """
    cmd = torchrun_command(cfg, argv)
    if cmd is None:
        return None
    # Fail before starting any rank if the tracking store cannot be used.
    from cyclegan import tracking

    tracking.ensure_reachable(tracking.use(cfg.mlflow))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    log.info("starting torchrun: %s", " ".join(cmd[1:]))
    # Its per-event lines ("Sending process ... closing signal", "failed (exitcode: -9)") are
    # noise here: the outcome is our one line below. torch gives each of its modules a logger
    # with a level of its own: quiet them all.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # Each rank sizes its own threads (train.num_threads); this only replaces torchrun's
    # blanket OMP_NUM_THREADS=1 (and its warning) with the same per-rank share.
    if "OMP_NUM_THREADS" not in os.environ:
        from cyclegan.hardware import choose_threads

        local = ranks_per_node(cfg) if not any(os.environ.get(v) for v in _PET_VARS) else 1
        share = choose_threads(cfg.train.num_threads, local, cfg.train.num_workers)
        os.environ["OMP_NUM_THREADS"] = str(share.threads)
    # Time for the ranks to finish a step and write a checkpoint after a stop request
    # before the agent kills them (the pod's grace period bounds it anyway).
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_GRACE_S))
    try:
        run(parse_args(cmd[3:]))
    except SignalException as e:
        # The agent passed the signal to every rank; rank 0 said where it saved.
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        stop_codes = {128 + s for s in (signal.SIGTERM, signal.SIGINT)}
        if codes <= stop_codes:  # a rank was signalled directly; all stopped together
            return max(codes)
        rank, failure = _root_cause(e.failures)
        how, hint = f"exited with code {failure.exitcode}", "fix the cause printed above"
        if failure.exitcode < 0:
            how = f"was killed by {_signal_name(-failure.exitcode)}"
            if -failure.exitcode == signal.SIGKILL:
                hint = "SIGKILL from the kernel usually means out of memory: lower the batch"
        raise CycleGANError(
            f"training failed: rank {rank} {how} (ranks that failed: "
            f"{', '.join(str(r) for r in sorted(e.failures))})",
            f"{hint}, then run the same command: training resumes from the last checkpoint",
        ) from None
    return 0


def _root_cause(failures: dict[int, Any]) -> tuple[int, Any]:
    """The failure that brought the job down: a rank killed by a signal the agent does not
    send (SIGKILL from the OOM killer, SIGSEGV) rather than the ranks that then lost it, else
    the earliest."""
    killed = {r: f for r, f in failures.items() if f.exitcode < 0 and -f.exitcode != signal.SIGTERM}
    pool = killed or failures
    return min(pool.items(), key=lambda item: (item[1].timestamp, item[0]))


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


SHUTDOWN_GRACE_S = 120


def rank_argv(params_file: str | Path, paths: Paths) -> list[str]:
    """``cyclegan`` arguments that train with ``params_file`` into ``paths``: the command of
    every rank this launcher starts and of every TrainJob node."""
    return [
        "train",
        "--params",
        str(params_file),
        "--prepared-dir",
        str(paths.prepared),
        "--checkpoints-dir",
        str(paths.checkpoints),
        "--model-dir",
        str(paths.model),
        "--metrics-dir",
        str(paths.metrics),
        "--plots-dir",
        str(paths.plots),
    ]
