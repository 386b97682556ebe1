"""Exact resume on CPU: a run SIGKILLed mid-epoch and restarted ends bit-identical to a run
that was never interrupted (all four networks, both optimizers), with a consistent loss CSV
and the same MLflow run.

The kill comes from outside the library: the killed run is ``tests/fault_entry.py`` (the real
command line with the step wrapped), which SIGKILLs its own process right after step 15, so the
kill always lands between two checkpoints, never racing a polling test against a fast run.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cyclegan.train import checkpoint as ckpt
from tests.train_support import TINY, make_prepared, run_cli, sets

pytestmark = pytest.mark.slow

# 8 steps per epoch, 2 + 1 epochs = 24 steps; a 4-image pool so its random swaps matter.
SETTINGS = (
    *TINY,
    "train.epochs=2",
    "train.epochs_decay=1",
    "train.pool_size=4",
    "train.checkpoint_every=4",
    "train.keep_checkpoints=10",
)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r.pop("img_per_s")  # wall-clock, naturally different
    return rows


def _assert_states_equal(a: dict, b: dict, where: str = "") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_states_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_states_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, where


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path, cli_env) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for d in (straight, killed):
        make_prepared(d / "data/prepared")

    r = run_cli(["train", *sets(*SETTINGS)], cwd=straight, env=cli_env)
    assert r.returncode == 0, r.stderr

    kill_env = {
        **cli_env,
        "FAULT_KILL_AT_STEP": "15",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    r = subprocess.run(
        [sys.executable, "-m", "tests.fault_entry", "train", *sets(*SETTINGS)],
        cwd=killed,
        env=kill_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    saved = ckpt.list_checkpoints(killed / "checkpoints")
    assert saved[-1].name == "step_00000012.pt"  # mid-epoch: epoch 2, 4 of 8 batches done
    assert ckpt.load(saved[-1])["progress"]["batches_done"] == 4
    rows_at_kill = _csv(killed / "plots/train_loss.csv")
    assert rows_at_kill[-1]["step"] == "14"  # logged past the checkpoint, then lost
    run_id = json.loads((killed / "models/cyclegan/run.json").read_text())["run_id"]

    r = run_cli(["train", *sets(*SETTINGS)], cwd=killed, env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 12" in r.stderr

    final = "checkpoints/step_00000024.pt"
    a, b = ckpt.load(straight / final), ckpt.load(killed / final)
    _assert_states_equal(a["model"], b["model"], "model")  # nets, optimizers, schedulers
    _assert_states_equal(a["ranks"], b["ranks"], "ranks")  # pools and their RNG
    for f in ("G_A.safetensors", "G_B.safetensors"):
        assert (straight / "models/cyclegan" / f).read_bytes() == (
            killed / "models/cyclegan" / f
        ).read_bytes()
    # The CSV was cut back to the checkpoint and continued: no duplicated or missing steps.
    assert _csv(killed / "plots/train_loss.csv") == _csv(straight / "plots/train_loss.csv")
    # ... and the resumed training logged into the same MLflow run.
    assert json.loads((killed / "models/cyclegan/run.json").read_text())["run_id"] == run_id
