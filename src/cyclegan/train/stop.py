"""A graceful stop on SIGTERM or SIGINT: finish the step, save everything, exit 143 / 130.

Kubernetes stops a pod with SIGTERM and, a grace period later (30 s by default), SIGKILL;
Ctrl-C sends SIGINT. Either way the training loop is told through :class:`StopRequest`; at
the end of the current step every rank agrees to stop at that same step (one tiny
all-reduce per step, on a CPU process group so that a GPU stream is never synchronised),
writes a full checkpoint, ends its MLflow run as KILLED and exits with 128 + the signal.

A second signal exits at once (the user means it). Under torchrun the signal reaches each
rank once: the launcher forwards it to the agent, which forwards it to the workers (each in a
session of its own, so a terminal's Ctrl-C does not reach them twice).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from cyclegan.train.distributed import DistInfo

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set by a signal handler; read by the loop once per step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            # The second signal: no more waiting. os._exit skips every cleanup, which is what
            # "at once" means (a checkpoint being written stays a temp file, removed later).
            print(f"\n{signal.Signals(signum).name} again: exiting now", file=sys.stderr)
            os._exit(128 + signum)
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":  # one message for the whole job
            print(
                f"\n{signal.Signals(signum).name}: stopping after this step and saving a "
                "checkpoint (send it again to exit at once)",
                file=sys.stderr,
            )

    def agreed(self, info: DistInfo, group: Any) -> int | None:
        """The signal number if any rank has been asked to stop, else None; the same answer
        on every rank (the collective is the agreement)."""
        if not info.enabled:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        value = int(flag.item())
        return value or None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Install the graceful handlers for the block (main thread only), then restore."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            if request.signum is not None:
                # Stopped and saved: a later signal (torchrun's agent repeats its own) only
                # hurries the exit along, quietly.
                code = 128 + request.signum
                handler = lambda signum, frame, code=code: os._exit(code)  # noqa: E731
            signal.signal(s, handler)


def control_group(info: DistInfo) -> Any:
    """A process group for small CPU-side agreements (stop requests): gloo, so reading its
    result never waits on a GPU stream. The default group when that is gloo already."""
    if not info.enabled:
        return None
    if info.device.type == "cpu":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")
