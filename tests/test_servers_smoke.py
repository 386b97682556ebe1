"""The loopback servers the integration tests rely on actually work together."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_mlflow_server_stores_artifacts_in_s3(mlflow_server, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    exp = c.create_experiment("smoke")
    run = c.create_run(exp)
    f = tmp_path / "hello.txt"
    f.write_text("hi")
    c.log_artifact(run.info.run_id, str(f), "x")
    keys = [
        o["Key"]
        for o in mlflow_server.s3.client()
        .list_objects_v2(Bucket=mlflow_server.artifact_bucket)
        .get("Contents", [])
    ]
    assert any(k.endswith("x/hello.txt") for k in keys), keys
