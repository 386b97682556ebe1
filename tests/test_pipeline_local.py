"""``cyclegan pipeline run-local``: the whole Kubeflow pipeline on this machine (kfp.local,
one subprocess per step), registering a model in the local MLflow store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from cyclegan.config import Config, MlflowConfig
from cyclegan_kfp.cli import local_tracking_uri
from tests.train_support import PIPELINE_TINY

TINY = {**PIPELINE_TINY, "register": {"model_name": "cyclegan-local-test", "onnx": False}}


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
    assert last.startswith("cyclegan pipeline run-local: error: the local pipeline run failed"), (
        r.stderr
    )
    assert "'prepare'" in last and "\x1b" not in last  # which step, without colour codes
    assert "no-such-folder" in r.stdout + r.stderr  # the step's own reason, in its log


@pytest.mark.slow
def test_run_local_sweep_registers_the_best_and_shows_it_on_the_run_page(
    cyclegan_exe, tmp_path, cli_env
) -> None:
    """Two variants train, evaluate and register in turn; the better one (by the library's
    gate) holds the champion alias; each step leaves what the KFP run page shows: Metrics,
    the evaluation's HTML report (sample grid and table), the registration's decision with
    the model version, and the training's link to its MLflow run."""
    from mlflow.tracking import MlflowClient

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY))
    env = {k: v for k, v in cli_env.items() if k != "MLFLOW_TRACKING_URI"}  # the default store
    r = subprocess.run(
        [
            cyclegan_exe,
            "pipeline",
            "run-local",
            "--params",
            str(params),
            "--workdir",
            "kfp",
            "--variant",
            "train.seed=1",
            "--variant",
            "train.seed=2 train.lr=0.001",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    root = tmp_path / "kfp" / "pipeline_root"
    evals = [json.loads(p.read_text()) for p in root.rglob("evaluate*/metrics/eval.json")]
    assert len(evals) == 2 and all(m["num_images_A2B"] == 4 for m in evals)
    registers = [json.loads(p.read_text()) for p in root.rglob("register*/result/register.json")]
    assert len(registers) == 2
    assert len(list(root.rglob("train/model/G_A.safetensors"))) == 2

    client = MlflowClient(
        tracking_uri=f"sqlite:///{tmp_path}/mlruns.db",
        registry_uri=f"sqlite:///{tmp_path}/mlruns.db",
    )
    version = client.get_model_version_by_alias("cyclegan-local-test", "champion")
    champion_fid = client.get_run(version.run_id).data.metrics["fid_A2B"]
    assert champion_fid == pytest.approx(min(m["fid_A2B"] for m in evals))
    assert f"models:/cyclegan-local-test@champion is version {version.version}" in r.stderr

    reports = [p.read_text() for p in root.rglob("evaluate*/report")]
    assert len(reports) == 2
    assert all("data:image/png;base64," in h and "fid_A2B" in h for h in reports)
    decisions = [p.read_text() for p in root.rglob("register*/decision")]
    assert len(decisions) == 2 and any(
        f"models:/cyclegan-local-test/{version.version}" in d for d in decisions
    )
    summaries = [p.read_text() for p in root.rglob("train/summary")]
    assert len(summaries) == 2 and all("MLflow run: run `" in m for m in summaries)
    assert not list(Path(tmp_path).glob("kfp/**/launch-trainjob"))  # single-node branch only


def test_an_empty_sweep_is_refused_before_anything_runs(tmp_path) -> None:
    from cyclegan.errors import ConfigError
    from cyclegan_kfp.cli import check_variants

    with pytest.raises(ConfigError, match="variants is empty"):
        check_variants([])
    with pytest.raises(ConfigError, match="variant 2"):
        check_variants([["train.lr=0.001"], ["train.lr=fast"]])
    assert check_variants(["train.lr=0.001 train.seed=3"]) == [["train.lr=0.001", "train.seed=3"]]
