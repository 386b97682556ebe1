"""``cyclegan pipeline run-local``: the whole Kubeflow pipeline on this machine (kfp.local,
one subprocess per step), registering a model in the local MLflow store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from cyclegan.config import Config, MlflowConfig
from pipeline.cli import local_tracking_uri

TINY = {
    "data": {
        "load_size": 32,
        "num_workers": 1,
        "synthetic": {"image_size": 32, "n_train_a": 8, "n_train_b": 8, "n_test": 4},
    },
    "train": {
        "epochs": 1,
        "epochs_decay": 0,
        "max_steps": 2,
        "crop_size": 24,
        "ngf": 4,
        "ndf": 4,
        "device": "cpu",
        "log_every": 1,
    },
    "evaluate": {"device": "cpu", "batch_size": 8, "kid_subsets": 2, "num_samples": 2},
    "register": {"model_name": "cyclegan-local-test"},
}


def test_relative_sqlite_store_is_made_absolute(tmp_path, monkeypatch) -> None:
    # Steps run in subprocesses: a relative store would depend on their working directory.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert local_tracking_uri(Config(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    cfg = Config(mlflow=MlflowConfig(tracking_uri="http://mlflow:5000"))
    assert local_tracking_uri(cfg, tmp_path) == "http://mlflow:5000"
    cfg = Config(mlflow=MlflowConfig(tracking_uri="sqlite:////abs/m.db"))
    assert local_tracking_uri(cfg, tmp_path) == "sqlite:////abs/m.db"


def test_a_failing_step_fails_the_run_with_one_line(cyclegan_exe, tmp_path, cli_env) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": str(tmp_path / "no-such-folder")}}))
    r = subprocess.run(
        [cyclegan_exe, "pipeline", "run-local", "--params", str(params), "--workdir", "kfp"],
        cwd=tmp_path,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cyclegan pipeline: error: the local pipeline run failed"), r.stderr
    assert "'prepare'" in last and "\x1b" not in last  # which step, without colour codes
    assert "no-such-folder" in r.stdout + r.stderr  # the step's own reason, in its log


@pytest.mark.slow
def test_run_local_trains_evaluates_and_registers_a_champion(
    cyclegan_exe, tmp_path, cli_env
) -> None:
    from mlflow.tracking import MlflowClient

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY))
    env = {k: v for k, v in cli_env.items() if k != "MLFLOW_TRACKING_URI"}  # the default store
    r = subprocess.run(
        [cyclegan_exe, "pipeline", "run-local", "--params", str(params), "--workdir", "kfp"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    root = tmp_path / "kfp" / "pipeline_root"
    (eval_json,) = root.rglob("evaluate*/metrics/eval.json")
    metrics = json.loads(eval_json.read_text())
    assert metrics["num_images_A2B"] == 4 and metrics["fid_A2B"] > 0
    (register_json,) = root.rglob("register*/result/register.json")
    assert list(root.rglob("train/model/G_A.safetensors"))

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    version = client.get_model_version_by_alias("cyclegan-local-test", "champion")
    run = client.get_run(version.run_id)
    assert run.data.metrics["fid_A2B"] == pytest.approx(metrics["fid_A2B"])
    assert json.loads(register_json.read_text())  # the step's own record
    assert not list(Path(tmp_path).glob("kfp/**/launch-trainjob"))  # single-node branch only
