"""``python -m tests.fault_entry ARGS`` is ``cyclegan ARGS`` with faults injected from outside
the library, for the tests that need one at an exact step. The library has no switch for it:
this module wraps two of its functions before handing over to the real command line, driven by
variables the test sets:

* ``FAULT_KILL_AT_STEP=N`` - the process SIGKILLs itself right after step N (counted from the
  start of this process), so a kill lands between two checkpoints without racing a test
  against a fast run;
* ``FAULT_FAIL_AT=RANK:STEP`` - that DDP rank raises after that step;
* ``FAULT_DIGEST_DIR=DIR`` - every rank writes the sha256 of its final weights to
  ``DIR/rank<R>.sha256``.

Run with the repository on ``PYTHONPATH``. For DDP, torchrun starts it as each rank
(``python -m torch.distributed.run ... -m tests.fault_entry train ...``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def install() -> None:
    """Wrap the training step and the final weights digest as the environment asks."""
    from cyclegan.train import trainer
    from cyclegan.train.step import CycleGAN

    rank = int(os.environ.get("RANK", "0"))
    kill = int(os.environ.get("FAULT_KILL_AT_STEP", "0"))
    fail_rank, _, fail_step = os.environ.get("FAULT_FAIL_AT", "").partition(":")
    fail = int(fail_step) if fail_rank and int(fail_rank) == rank else 0
    digest_dir = os.environ.get("FAULT_DIGEST_DIR")
    step_fn, steps = trainer.train_step, [0]

    def train_step(*args: Any, **kwargs: Any) -> Any:
        out = step_fn(*args, **kwargs)
        steps[0] += 1
        if steps[0] == kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if steps[0] == fail:
            raise RuntimeError(f"injected failure on rank {rank} at step {steps[0]}")
        return out

    trainer.train_step = train_step
    if digest_dir:
        digest_fn = CycleGAN.weights_digest

        def weights_digest(self: CycleGAN) -> str:
            digest = digest_fn(self)
            Path(digest_dir, f"rank{rank}.sha256").write_text(digest)
            return digest

        CycleGAN.weights_digest = weights_digest  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from cyclegan.cli import main

    raise SystemExit(main(sys.argv[1:]))
