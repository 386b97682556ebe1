"""The tracking module's own rules: where the store is, what is redacted, and the spool.

The outage itself (a real ``mlflow server`` killed and restarted under a training run) is in
tests/test_reliability_mlflow.py; these check the pieces it relies on, against a real SQLite
store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cyclegan import tracking
from cyclegan.config import MlflowConfig
from cyclegan.log import redact
from cyclegan.paths import Paths
from cyclegan.spool import Spool, replay_all, spools


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("http://alice:s3cret@mlflow:5000/api", "s3cret"),
        ("could not reach https://token123@host/x (refused)", "token123"),
        ("postgresql://mlflow:pw0rd@db/mlflow", "pw0rd"),
        ("s3://b/k?X-Amz-Signature=abcdef&X-Amz-Credential=AKIA1", "abcdef"),
        ("s3://b/k?X-Amz-Signature=abcdef&X-Amz-Credential=AKIA1", "AKIA1"),
    ],
)
def test_redact_removes_credentials_and_keeps_the_rest(text: str, secret: str) -> None:
    clean = redact(text)
    assert secret not in clean
    assert clean.split("://")[0] == text.split("://")[0]  # still says which server


def test_redact_leaves_plain_text_and_stores_alone() -> None:
    for text in ("sqlite:///mlruns.db", "train.lr = 0.0002", "models:/cyclegan@champion"):
        assert redact(text) == text


def test_use_points_tracking_and_registry_at_the_default_store(tmp_path, monkeypatch) -> None:
    """With nothing configured, both URIs are ./mlruns.db: a models:/ URI resolves there,
    and MLflow opens no stray mlflow.db of its own."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    uri = tracking.use(MlflowConfig())
    assert uri == "sqlite:///mlruns.db"
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == uri
    c = tracking.client(uri)
    c.create_registered_model("m")
    assert [m.name for m in c.search_registered_models()] == ["m"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns.db"]
    # params win over the environment, the environment over the default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    assert tracking.tracking_uri(MlflowConfig()).endswith("env.db")
    assert tracking.tracking_uri(MlflowConfig(tracking_uri="sqlite:///p.db")) == "sqlite:///p.db"


def test_stage_run_reuses_training_run_or_opens_a_named_one(tmp_path: Path) -> None:
    from cyclegan.config import Config

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = Config()
    cfg.mlflow.tracking_uri = uri
    c = tracking.client(uri)
    paths = Paths(model=tmp_path / "model", prepared=tmp_path / "prepared")
    run_id, created = tracking.stage_run(c, cfg, paths, "evaluation")  # no run.json
    assert created and c.get_run(run_id).info.run_name == "evaluation"
    tracking.write_run_file(paths.run_file, run_id, "0", uri)
    assert tracking.stage_run(c, cfg, paths, "registration") == (run_id, False)
    c.delete_run(run_id)  # a deleted training run is not logged into
    other, created = tracking.stage_run(c, cfg, paths, "registration")
    assert created and other != run_id


def test_spool_replays_in_order_and_keeps_what_fails(tmp_path: Path) -> None:
    """A replay stopped by a failure keeps exactly the operations not yet sent, files too."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    c = tracking.client(uri)
    exp = tracking.get_or_create_experiment(c, "e")
    run_id = c.create_run(exp).info.run_id
    folder = tmp_path / "spool"
    sp = Spool(folder, run_id, uri)
    sp.log_batch([("loss_G", 1.0, 1000, 1), ("loss_G", 0.5, 2000, 2)], params={"a": "1"})
    artifact = tmp_path / "grid.png"
    artifact.write_bytes(b"png")
    sp.upload(artifact, "samples")
    sp.terminate("FINISHED", 3000)
    assert sp.pending().describe() == (
        "2 metric values, 1 params, 1 uploads, the run's end (FINISHED)"
    )

    class Dies:  # the server goes away after the metrics went out
        def __init__(self) -> None:
            self.calls = 0

        def __getattr__(self, name: str):
            def call(*args, **kwargs):
                self.calls += 1
                if name != "log_batch":
                    raise ConnectionError("refused")
                return getattr(c, name)(*args, **kwargs)

            return call

    assert not sp.replay(Dies())
    left = sp.pending()
    assert (left.metrics, left.params, left.uploads, left.status) == (0, 0, 1, "FINISHED")
    assert [s.run_id for s in spools(folder)] == [run_id]
    # Another server's records are left alone; this server's go out, in order.
    assert replay_all(folder, "sqlite:///elsewhere.db", lambda: c)[0].run_id == run_id
    assert replay_all(folder, uri, lambda: c) == []
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == 3000
    assert [m.value for m in c.get_metric_history(run_id, "loss_G")] == [1.0, 0.5]
    assert [a.path for a in c.list_artifacts(run_id, "samples")] == ["samples/grid.png"]
    assert not (folder / f"{run_id}.jsonl").exists() and not (folder / run_id).exists()


def test_run_file_without_credentials_and_unreadable_one_ignored(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    tracking.write_run_file(path, "abc", "1", "http://bob:hunter2@mlflow:5000")
    assert "hunter2" not in path.read_text()
    assert json.loads(path.read_text())["run_id"] == "abc"
    path.write_text("{not json")
    assert tracking.read_run_file(path) is None
