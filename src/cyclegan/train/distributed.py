"""The one place where DDP is decided: from the environment torchrun sets.

Under ``torchrun`` (or a Kubeflow ``TrainJob``, whose launcher passes ``PET_*`` settings to
torchrun, which sets the same variables) each process sees ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; without them the process is a single, non-distributed run. Everything else in
training asks :class:`DistInfo` instead of reading the environment.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cyclegan.hardware import resolve_device

# How long a rank waits for the others in a collective before failing. A crashed rank is
# normally noticed much sooner (torchrun stops the other workers when one exits non-zero);
# this bounds the wait if a peer hangs instead. Rank 0's checkpoint writes happen while the
# others wait at a barrier, so it must exceed the slowest checkpoint save.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """True when running as one of several DDP ranks."""
        return self.world_size > 1

    @property
    def master_process(self) -> bool:
        """Rank 0: the only process that logs, writes files and talks to MLflow."""
        return self.rank == 0


def under_torchrun() -> bool:
    """True when torchrun (or an equivalent launcher) started this process as a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(requested_device: str) -> DistInfo:
    """Join the process group if torchrun started us (NCCL on GPU, gloo on CPU)."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(device=resolve_device(requested_device, key="train.device"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank, key="train.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=COLLECTIVE_TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def teardown(info: DistInfo) -> None:
    """Leave the process group (a no-op when not distributed)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def peer_lost(e: BaseException) -> bool:
    """True if ``e`` is a collective failing because another rank went away (gloo reports a
    closed connection as a plain RuntimeError, NCCL as a DistBackendError)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        m in text for m in ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
    )


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first sentence of an error's message, without gloo's source location prefix."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0][:limit]


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here."""
    if info.enabled:
        dist.barrier()


def broadcast(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None).

    Used for the resume decision and the checkpoint itself, so other ranks need no access to
    rank 0's disk (on several nodes they usually have none). The bytes come from our own rank
    0 process, never from a file.
    """
    if not info.enabled:
        return obj
    box = [obj if info.master_process else None]
    dist.broadcast_object_list(box, src=0, device=_comm_device(info))
    return box[0]


def gather(info: DistInfo, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.master_process else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_mean(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over ranks (in place); ``t`` itself when not distributed."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def _comm_device(info: DistInfo) -> torch.device | None:
    return info.device if info.device.type == "cuda" else None
