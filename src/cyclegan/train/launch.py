"""``cyclegan train`` starting torchrun itself when asked for several ranks.

``train.nproc_per_node`` > 1 (or ``auto`` with several GPUs) re-runs the same command line
under ``python -m torch.distributed.run --standalone``; each rank then runs
``cyclegan train`` as an ordinary DDP process. Inside a Kubeflow TrainJob the launcher passes
``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR``... to torchrun as its defaults, so
there the command line gets no node settings of its own.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import torch

from cyclegan.config import Config
from cyclegan.train.distributed import under_torchrun

log = logging.getLogger("cyclegan.train")

# Variables through which Kubeflow Trainer (torch-distributed runtime) configures torchrun.
_PET_VARS = ("PET_NNODES", "PET_NPROC_PER_NODE")


def ranks_per_node(cfg: Config) -> int:
    """``train.nproc_per_node`` resolved: ``auto`` = the visible GPUs (1 on a CPU-only host)."""
    n = cfg.train.nproc_per_node
    if n == "auto":
        use_gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
        return max(1, torch.cuda.device_count()) if use_gpu else 1
    return int(n)


def torchrun_command(cfg: Config, argv: Sequence[str]) -> list[str] | None:
    """The torchrun command line that runs ``argv`` as DDP ranks, or None to run in-process."""
    if under_torchrun():
        return None  # we are a rank already
    run = [sys.executable, "-m", "torch.distributed.run"]
    if any(os.environ.get(v) for v in _PET_VARS):
        # A Kubeflow TrainJob pod: torchrun reads nodes, ranks and rendezvous from PET_*.
        return [*run, "-m", "cyclegan", *argv]
    n = ranks_per_node(cfg)
    if n <= 1:
        return None
    return [*run, "--standalone", "--nproc_per_node", str(n), "-m", "cyclegan", *argv]


def launch_if_needed(cfg: Config, argv: Sequence[str]) -> int | None:
    """Run ``cyclegan <argv>`` under torchrun when several ranks are wanted.

    Returns torchrun's exit code, or None when this process should train by itself.
    """
    cmd = torchrun_command(cfg, argv)
    if cmd is None:
        return None
    # Fail before starting any rank if the tracking store cannot be used.
    from cyclegan import tracking

    tracking.ensure_reachable(tracking.tracking_uri(cfg.mlflow))
    log.info("starting torchrun: %s", " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd)
    # Pass a termination request (Kubernetes sends SIGTERM) on to torchrun, which stops the
    # ranks; Ctrl-C reaches the whole process group by itself.
    previous = signal.signal(signal.SIGTERM, lambda s, f: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
