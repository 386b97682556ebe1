"""Whole training runs in-process on a tiny dataset: outputs, re-runs, settings changes, NaN.

Each run is 16 steps of a 4-filter model on 16x16 crops (a second or two).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cyclegan.errors import CheckpointError
from cyclegan.models import load_generator
from cyclegan.train import checkpoint as ckpt
from cyclegan.train import trainer
from cyclegan.train.trainer import NonFiniteLossError, train
from tests.contract import TRAIN_METRICS
from tests.train_support import (
    TINY,
    make_prepared,
    paths_in,
    run_cli,
    sets,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONTRACT_METRICS = TRAIN_METRICS


def _client(tmp: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(
        tracking_uri=f"sqlite:///{tmp / 'mlruns.db'}", registry_uri=f"sqlite:///{tmp / 'mlruns.db'}"
    )


def test_tiny_training_writes_every_output(workdir: Path) -> None:
    paths = paths_in(workdir)
    summary = train(tiny_config(workdir), paths)

    # 8 A images, batch 1: 8 steps per epoch, 1 + 1 epochs.
    assert summary["steps"] == 16 and summary["epochs"] == 2.0
    metrics = json.loads((paths.metrics / "train.json").read_text())
    assert metrics["steps"] == 16 and metrics["img_per_s"] > 0
    assert set(metrics) >= CONTRACT_METRICS - {"img_per_s"}
    assert metrics["lr"] == pytest.approx(1e-4)  # second epoch: 1 - 1/2 of 2e-4

    with open(paths.plots / "train_loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(2, 17, 2))
    assert set(rows[0]) >= CONTRACT_METRICS | {"step", "epoch"}
    assert (paths.plots / "train_samples.png").stat().st_size > 0

    # The model folder is the final format, with the run id and the training settings.
    meta = json.loads((paths.model / "model.json").read_text())
    run = json.loads(paths.run_file.read_text())
    assert meta["run_id"] == run["run_id"] and meta["train"]["ngf"] == 4
    x = torch.zeros(1, 3, 16, 16)
    assert load_generator(paths.model, "B2A")(x).shape == x.shape

    # Checkpoints: the last K (2), the newest at the final step.
    assert [p.name for p in ckpt.list_checkpoints(paths.checkpoints)] == [
        "step_00000015.pt",
        "step_00000016.pt",
    ]
    state = ckpt.load(paths.checkpoints / "step_00000016.pt")
    assert state["progress"]["epoch"] == 2 and len(state["ranks"]) == 1
    assert torch.equal(
        state["model"]["nets"]["G_A"]["model.1.weight"],
        load_file(str(paths.model / "G_A.safetensors"))["model.1.weight"],
    )

    # MLflow: one finished run with the contract's metrics by step, params, tags, artifacts.
    c = _client(workdir)
    r = c.get_run(run["run_id"])
    assert r.info.status == "FINISHED"
    assert set(r.data.metrics) >= CONTRACT_METRICS
    assert len(c.get_metric_history(r.info.run_id, "loss_G")) == 8
    assert r.data.params["train.ngf"] == "4" and r.data.params["data.load_size"] == "16"
    assert {"git_commit", "data_version", "dvc_exp_name"} <= set(r.data.tags)
    samples = [f.path for f in c.list_artifacts(r.info.run_id, "samples")]
    assert "samples/step_00000004.png" in samples and "samples/step_00000016.png" in samples
    model_files = {f.path for f in c.list_artifacts(r.info.run_id, "model")}
    assert {"model/G_A.safetensors", "model/G_B.safetensors", "model/model.json"} <= model_files


def test_rerun_of_a_finished_training_only_rewrites_outputs(workdir, monkeypatch) -> None:
    paths = paths_in(workdir)
    cfg = tiny_config(workdir)
    train(cfg, paths)
    weights = (paths.model / "G_A.safetensors").read_bytes()
    run_id = json.loads(paths.run_file.read_text())["run_id"]
    # dvc repro deletes the stage's outputs before running it again.
    for p in (paths.model, paths.metrics / "train.json", paths.plots / "train_loss.csv"):
        p.unlink() if p.is_file() else [f.unlink() for f in p.iterdir()]

    def must_not_train(*a, **k):
        raise AssertionError("a finished training was trained again")

    monkeypatch.setattr(trainer, "train_step", must_not_train)
    summary = train(cfg, paths)
    assert summary["steps"] == 16
    assert (paths.model / "G_A.safetensors").read_bytes() == weights
    assert json.loads(paths.run_file.read_text())["run_id"] == run_id
    assert (paths.metrics / "train.json").is_file()
    assert len((paths.plots / "train_loss.csv").read_text().splitlines()) == 1 + 8
    assert len(_client(workdir).search_runs([r.experiment_id for r in [
        _client(workdir).get_run(run_id).info]])) == 1  # fmt: skip


def test_settings_change_starts_fresh_and_forced_resume_is_refused(workdir, cli_env) -> None:
    paths = paths_in(workdir)
    train(tiny_config(workdir, "train.max_steps=5"), paths)
    first = json.loads(paths.run_file.read_text())["run_id"]
    old = ckpt.list_checkpoints(paths.checkpoints)
    old_bytes = {p.name: p.read_bytes() for p in old}

    train(tiny_config(workdir, "train.max_steps=5", "train.ngf=8"), paths)
    stale = [d for d in paths.checkpoints.iterdir() if d.name.startswith("stale-")]
    assert len(stale) == 1
    assert {p.name: p.read_bytes() for p in stale[0].iterdir()} == old_bytes  # kept intact
    assert ckpt.load(ckpt.list_checkpoints(paths.checkpoints)[-1])["settings"]["train.ngf"] == 8
    assert json.loads(paths.run_file.read_text())["run_id"] != first  # a new MLflow run

    # Forcing a resume across the change: one clear line naming the key, nothing trained.
    before = sorted(p.name for p in paths.checkpoints.rglob("*.pt"))
    r = run_cli(
        ["train", *sets(*TINY, "train.resume=always", "train.max_steps=5", "train.ngf=4")],
        cwd=workdir,
        env={**cli_env, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlruns.db'}"},
    )
    assert r.returncode == 2, r.stderr  # bad input: the exit code for it
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("cyclegan train: error:")]
    assert len(lines) == 1 and "train.ngf: 8 -> 4" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in paths.checkpoints.rglob("*.pt")) == before


def test_resume_always_without_checkpoint_is_refused(workdir) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_config(workdir, "train.resume=always"), paths_in(workdir))


@pytest.mark.parametrize(
    ("log_every", "poison_after", "stops_at"),
    [
        (2, 5, 6),  # found at the log point of step 6
        (4, 4, 6),  # found by the guard before the step-6 checkpoint (not a log point)
    ],
)
def test_nan_stops_training_and_keeps_the_last_good_checkpoint(
    workdir, monkeypatch, log_every, poison_after, stops_at
) -> None:
    real_step = trainer.train_step
    calls = {"n": 0}

    def poisoned(model, a, b):
        out = real_step(model, a, b)
        calls["n"] += 1
        if calls["n"] == poison_after:
            with torch.no_grad():
                model.nets["G_A"].model[1].weight.fill_(float("nan"))
        return out

    monkeypatch.setattr(trainer, "train_step", poisoned)
    paths = paths_in(workdir)
    with pytest.raises(NonFiniteLossError, match=f"at step {stops_at}"):
        train(tiny_config(workdir, f"train.log_every={log_every}"), paths)
    saved = ckpt.list_checkpoints(paths.checkpoints)
    assert [p.name for p in saved] == ["step_00000003.pt"]
    w = ckpt.load(saved[0])["model"]["nets"]["G_A"]["model.1.weight"]
    assert torch.isfinite(w).all()
    run = _client(workdir).search_runs(
        [_client(workdir).get_experiment_by_name("cyclegan").experiment_id]
    )[0]
    assert run.info.status == "FAILED"


def test_crop_too_small_for_the_discriminator_is_a_config_error(workdir) -> None:
    from cyclegan.errors import ConfigError

    with pytest.raises(ConfigError, match="n_layers_D = 3"):
        train(tiny_config(workdir, "train.n_layers_D=3"), paths_in(workdir))


def test_loader_workers_change_nothing(tmp_path: Path) -> None:
    """Two epochs with 2 persistent worker processes give the same weights as loading in the
    main process: every item is a function of (seed, epoch, index), wherever it is loaded."""
    weights = []
    for workers in (0, 2):
        root = tmp_path / f"w{workers}"
        make_prepared(root / "data/prepared")
        train(tiny_config(root, f"train.num_workers={workers}"), paths_in(root))
        weights.append((root / "models/cyclegan/G_A.safetensors").read_bytes())
    assert weights[0] == weights[1]
