"""Training against a real ``mlflow server`` on loopback (artifacts proxied to moto S3), and
against one that is not there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cyclegan.train.trainer import train
from tests.contract import TRAIN_METRICS
from tests.servers import MlflowServer, free_port
from tests.train_support import (
    TINY,
    make_prepared,
    paths_in,
    run_cli,
    sets,
    tiny_config,
)

CONTRACT_METRICS = TRAIN_METRICS


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_run_on_a_tracking_server_holds_metrics_params_tags_images_weights(
    mlflow_server: MlflowServer, workdir: Path
) -> None:
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(
        workdir, f"mlflow.tracking_uri={mlflow_server.uri}", "mlflow.experiment=train-tests"
    )
    paths = paths_in(workdir)
    train(cfg, paths)

    run_file = json.loads(paths.run_file.read_text())
    assert run_file["tracking_uri"] == mlflow_server.uri
    c = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    run = c.get_run(run_file["run_id"])
    assert run.info.status == "FINISHED"
    assert c.get_experiment(run.info.experiment_id).name == "train-tests"
    assert set(run.data.metrics) >= CONTRACT_METRICS
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "loss_D_A")]
    assert steps == list(range(2, 17, 2))
    assert run.data.params["train.lambda_identity"] == "0.5"
    assert run.data.params["mlflow.experiment"] == "train-tests"
    assert {"git_commit", "data_version", "dvc_exp_name"} <= set(run.data.tags)

    samples = {f.path for f in c.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/step_00000004.png", "samples/step_00000016.png"} <= samples
    local = Path(c.download_artifacts(run.info.run_id, "model", str(workdir / "dl")))
    for f in ("G_A.safetensors", "G_B.safetensors", "model.json"):
        assert (local / f).read_bytes() == (paths.model / f).read_bytes()
    # The bytes really went to the S3 bucket behind the server.
    keys = [
        o["Key"]
        for o in mlflow_server.s3.client()
        .list_objects_v2(Bucket=mlflow_server.artifact_bucket)
        .get("Contents", [])
    ]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/model/G_A.safetensors") for k in keys)


def test_unreachable_tracking_server_fails_before_training(tmp_path: Path, cli_env) -> None:
    make_prepared(tmp_path / "data/prepared")
    uri = f"http://127.0.0.1:{free_port()}"
    r = run_cli(["train", *sets(*TINY)], tmp_path, {**cli_env, "MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("cyclegan train: error: MLflow tracking server") and uri in lines[0]
    assert not (tmp_path / "checkpoints").exists()
