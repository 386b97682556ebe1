"""The evaluate stage on a tiny prepared set with ground truth: eval.json with the contract's
keys, the sample grid, and the numbers in the training's MLflow run (from run.json)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclegan import tracking
from cyclegan.config import Config
from cyclegan.evaluate.evaluate import CONTRACT_KEYS, GT_KEYS, evaluate, log_to_mlflow
from cyclegan.models import GeneratorSpec, init_weights, save_generators
from cyclegan.paths import Paths

N_TEST = 4


def make_project(root: Path, n: int = N_TEST, size: int = 32) -> Paths:
    """A prepared dataset with ground truth and a random-init model folder (ngf 8, 1 block)."""
    rng = np.random.default_rng(0)
    data = root / "data" / "prepared"
    for split in ("testA", "testB", "testA_gt", "testB_gt"):
        (data / split).mkdir(parents=True)
    for i in range(n):
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        b = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
        Image.fromarray(a).save(data / "testA" / f"{i:03d}.png")
        Image.fromarray(255 - a).save(data / "testA_gt" / f"{i:03d}.png")
        Image.fromarray(b).save(data / "testB" / f"{i:03d}.png")
        Image.fromarray(255 - b).save(data / "testB_gt" / f"{i:03d}.png")
    paths = Paths(
        prepared=data, model=root / "models" / "cyclegan", metrics=root / "m", plots=root / "p"
    )
    spec = GeneratorSpec(ngf=8, n_blocks=1)
    g = torch.Generator().manual_seed(0)
    nets = [spec.build(), spec.build()]
    for net in nets:
        init_weights(net, generator=g)
    save_generators(paths.model, nets[0], nets[1], spec, extra={"step": 123})
    return paths


def training_run(paths: Paths, uri: str) -> str:
    """What training leaves behind: an MLflow run and run.json pointing at it."""
    c = tracking.client(uri)
    exp = tracking.get_or_create_experiment(c, "cyclegan")
    run = c.create_run(exp, tags={"data_version": "test-data", "git_commit": "abc123"})
    c.set_terminated(run.info.run_id)
    tracking.write_run_file(paths.run_file, run.info.run_id, exp, uri)
    return run.info.run_id


@pytest.mark.slow
def test_evaluate_writes_contract_metrics_grid_and_logs_to_the_training_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    paths = make_project(tmp_path)
    run_id = training_run(paths, uri)
    cfg = Config()
    cfg.mlflow.tracking_uri = uri
    cfg.evaluate.device = "cpu"
    cfg.evaluate.kid_subsets = 5
    cfg.evaluate.num_samples = 3

    metrics = evaluate(cfg, paths)

    on_disk = json.loads((paths.metrics / "eval.json").read_text())
    assert on_disk == metrics
    for key in (*CONTRACT_KEYS, *GT_KEYS, "fid_A2B_identity", "psnr_A2B_identity", "fid_A2B_gt"):
        assert key in on_disk, key
    assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in on_disk.values())
    assert on_disk["num_images_A2B"] == on_disk["num_images_B2A"] == N_TEST
    # The ground truth is exactly 255 - input: its PSNR against the input is known.
    assert 0 < on_disk["psnr_A2B"] < 100 and -1 <= on_disk["ssim_A2B"] <= 1

    details = json.loads((paths.metrics / "eval_details.json").read_text())
    from cyclegan.evaluate.inception import PACKAGED_SHA256

    assert details["fid_weights_sha256"] == PACKAGED_SHA256
    assert details["mlflow_run_id"] == run_id

    with Image.open(paths.plots / "eval_samples.png") as grid:
        # Two directions side by side, three rows of input | translation | ground truth.
        assert grid.width > 6 * 32 and grid.height > 3 * 32

    run = tracking.client(uri).get_run(run_id)
    for key in CONTRACT_KEYS + GT_KEYS:
        assert run.data.metrics[key] == pytest.approx(on_disk[key])
    assert run.data.tags["fid_weights_sha256"] == PACKAGED_SHA256
    history = tracking.client(uri).get_metric_history(run_id, "fid_A2B")
    assert [m.step for m in history] == [123]  # the training's last step, from model.json
    artifacts = {a.path for a in tracking.client(uri).list_artifacts(run_id, "evaluation")}
    assert artifacts == {
        "evaluation/eval.json",
        "evaluation/eval_samples.png",
        "evaluation/eval_details.json",
    }


def _fake_results(paths: Paths) -> tuple[dict, dict, list[Path]]:
    paths.metrics.mkdir(parents=True, exist_ok=True)
    f = paths.metrics / "eval.json"
    f.write_text("{}")
    metrics = {"fid_A2B": 10.0, "num_images_A2B": 4}
    details = {"fid_weights_sha256": "0" * 64, "fid_weights_source": "test"}
    return metrics, details, [f]


def test_without_run_file_the_evaluation_opens_a_new_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    paths = Paths(prepared=tmp_path / "d", model=tmp_path / "model", metrics=tmp_path / "m")
    cfg = Config()
    cfg.mlflow.tracking_uri = uri
    metrics, details, files = _fake_results(paths)
    with caplog.at_level(logging.WARNING, logger="cyclegan"):
        run_id = log_to_mlflow(cfg, paths, metrics, details, files, {})
    assert run_id is not None
    assert "run.json" in caplog.text and "new" in caplog.text
    run = tracking.client(uri).get_run(run_id)
    assert run.data.metrics["fid_A2B"] == 10.0
    assert run.info.status == "FINISHED"


def test_an_unreachable_tracking_server_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.servers import free_port

    paths = Paths(metrics=tmp_path / "m", model=tmp_path / "model")
    cfg = Config()
    cfg.mlflow.tracking_uri = f"http://127.0.0.1:{free_port()}"
    metrics, details, files = _fake_results(paths)
    with caplog.at_level(logging.WARNING, logger="cyclegan"):
        assert log_to_mlflow(cfg, paths, metrics, details, files, {}) is None
    assert "is unreachable and no training run is known" in caplog.text
    assert (paths.metrics / "eval.json").exists()
