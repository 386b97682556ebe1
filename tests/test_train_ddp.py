"""DDP on CPU: two gloo ranks under torchrun end with identical weights, rank 0 alone writes,
and one failing rank brings the whole job down quickly.

Faults and observations come from outside the library: torchrun starts each rank as
``tests/fault_entry.py`` (the real command line, with the step and the weights digest wrapped),
which writes every rank's final digest (``FAULT_DIGEST_DIR``) or makes one rank fail at a step
(``FAULT_FAIL_AT``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from cyclegan.config import config_from_dict
from cyclegan.train import checkpoint as ckpt
from cyclegan.train.step import CycleGAN
from tests.train_support import TINY, make_prepared, run_cli, sets

REPO = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300):
    """The ranks as torchrun starts them, each running tests/fault_entry.py."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "tests.fault_entry", *args]  # fmt: skip
    env = {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _digest(state: dict) -> str:
    """The weights digest of a checkpoint, as CycleGAN computes it for a live model."""
    model = CycleGAN(config_from_dict(state["config"]).train)
    model.load_state_dict(state["model"])
    return model.weights_digest()


def test_two_gloo_ranks_end_identical_and_rank0_alone_writes(tmp_path: Path, cli_env) -> None:
    make_prepared(tmp_path / "data/prepared")
    digests = tmp_path / "digests"
    digests.mkdir()
    r = _torchrun(["train", *sets(*TINY)], tmp_path, {**cli_env, "FAULT_DIGEST_DIR": str(digests)})
    assert r.returncode == 0, r.stderr[-3000:]

    d0, d1 = ((digests / f"rank{i}.sha256").read_text() for i in (0, 1))
    assert d0 == d1
    # Rank 0's final checkpoint holds those weights, and the pools of both ranks.
    final = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    state = ckpt.load(final)
    assert _digest(state) == d0
    assert len(state["ranks"]) == 2 and state["settings"]["world_size"] == 2
    # 8 items over 2 ranks at batch 1: 4 steps per epoch, 2 images per step.
    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    assert (metrics["steps"], metrics["world_size"], metrics["global_batch"]) == (8, 2, 2)
    assert metrics["images_seen"] == 16
    # Only rank 0 logs (other ranks are silent except for errors).
    assert "[rank 1]" not in r.stderr
    assert r.stderr.count("MLflow run ") == 1


def test_cyclegan_train_starts_the_ranks_itself(tmp_path: Path, cli_env) -> None:
    """With train.nproc_per_node > 1 the plain command runs torchrun's agent and its ranks:
    same result as torchrun by hand, one MLflow run, rank 0 alone speaks."""
    make_prepared(tmp_path / "data/prepared")
    r = run_cli(["train", *sets(*TINY, "train.nproc_per_node=2")], tmp_path, cli_env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = ckpt.load(ckpt.list_checkpoints(tmp_path / "checkpoints")[-1])
    assert len(state["ranks"]) == 2 and state["settings"]["world_size"] == 2
    assert r.stderr.count("MLflow run ") == 1 and "Traceback" not in r.stderr


def test_a_failing_rank_stops_the_whole_job_within_a_minute(tmp_path: Path, cli_env) -> None:
    make_prepared(tmp_path / "data/prepared")
    # Long enough that only the failure can end it early.
    args = ["train", *sets(*TINY, "train.epochs=500")]
    start = time.monotonic()
    r = _torchrun(args, tmp_path, {**cli_env, "FAULT_FAIL_AT": "1:3"}, timeout=120)
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    assert "injected failure on rank 1 at step 3" in r.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s"
