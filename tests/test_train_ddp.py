"""DDP on CPU: two gloo ranks under torchrun end with identical weights, rank 0 alone writes,
and one failing rank brings the whole job down quickly.

Test-only hooks (environment variables no user sets): ``CYCLEGAN_TEST_DIGEST_DIR`` makes every
rank write the sha256 of its final weights; ``CYCLEGAN_TEST_FAIL_AT=RANK:STEP`` makes that rank
raise after that step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cyclegan.train import checkpoint as ckpt
from cyclegan.train.trainer import weights_digest
from tests.test_train_support import TINY, make_prepared, run_cli, sets

pytestmark = pytest.mark.slow


def test_two_gloo_ranks_end_identical_and_rank0_alone_writes(tmp_path: Path, cli_env) -> None:
    make_prepared(tmp_path / "data/prepared")
    digests = tmp_path / "digests"
    digests.mkdir()
    env = {**cli_env, "CYCLEGAN_TEST_DIGEST_DIR": str(digests)}
    # `cyclegan train` starts torchrun itself for nproc_per_node > 1.
    r = run_cli(["train", *sets(*TINY, "train.nproc_per_node=2")], tmp_path, env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    d0, d1 = ((digests / f"rank{i}.sha256").read_text() for i in (0, 1))
    assert d0 == d1
    # Rank 0's final checkpoint holds those weights, and the pools of both ranks.
    final = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    state = ckpt.load(final)
    assert weights_digest(state["model"]["nets"]) == d0
    assert len(state["ranks"]) == 2 and state["settings"]["world_size"] == 2
    # 8 items over 2 ranks at batch 1: 4 steps per epoch, 2 images per step.
    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    assert (metrics["steps"], metrics["world_size"], metrics["global_batch"]) == (8, 2, 2)
    assert metrics["images_seen"] == 16
    # Only rank 0 logs (other ranks are silent except for errors).
    assert "[rank 1]" not in r.stderr
    assert r.stderr.count("MLflow run ") == 1


def test_a_failing_rank_stops_the_whole_job_within_a_minute(tmp_path: Path, cli_env) -> None:
    make_prepared(tmp_path / "data/prepared")
    env = {**cli_env, "CYCLEGAN_TEST_FAIL_AT": "1:3", "OMP_NUM_THREADS": "1"}
    # Long enough that only the failure can end it early.
    args = sets(*TINY, "train.epochs=500")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "cyclegan", "train", *args]  # fmt: skip
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    assert "test-injected failure on rank 1 at step 3" in r.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s"
