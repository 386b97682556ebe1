"""The MLflow experience end to end, against real servers on loopback.

A real ``mlflow server`` (SQLite backend, ``--serve-artifacts`` into moto's S3 server) and the
real ``cyclegan`` stages, run twice with tiny settings and different learning rates. Then:
the server holds the contract's metrics, params, tags, images and weights with the artifacts
in the bucket; the registry has a champion; the test credentials appear nowhere; and the
MLflow UI, driven in headless Chromium, compares the two runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.contract import EVAL_METRICS, GT_METRICS, TRAIN_METRICS
from tests.servers import BIN, TEST_ACCESS_KEY, TEST_SECRET_KEY, MlflowServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Screenshots go to the test's temporary folder; set CYCLEGAN_SCREENSHOTS=docs/screenshots to
# refresh the README's images.
SCREENSHOTS_ENV = "CYCLEGAN_SCREENSHOTS"

# Small enough for seconds per stage on 2 cores, big enough for every code path.
TINY = [
    "register.onnx=false",  # attached ONNX files: tests/test_serving.py
    "data.synthetic.n_train_a=24",
    "data.synthetic.n_train_b=24",
    "data.synthetic.n_test=8",
    "train.epochs=1",
    "train.epochs_decay=1",
    "train.ngf=8",
    "train.ndf=8",
    "train.log_every=4",
    "train.sample_every=16",
    "train.checkpoint_every=16",
    "evaluate.kid_subsets=10",
    "evaluate.kid_subset_size=4",
    "evaluate.num_samples=4",
]
CONTRACT_TRAIN_METRICS = TRAIN_METRICS
CONTRACT_EVAL_METRICS = EVAL_METRICS | GT_METRICS


@dataclass
class Runs:
    server: MlflowServer
    workdir: Path
    run_ids: list[str]
    lrs: list[float]
    logs: list[str] = field(default_factory=list)


def _stage(args: list[str], cwd: Path, env: dict[str, str], logs: list[str]) -> None:
    r = subprocess.run(
        ["cyclegan", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    logs.append(r.stdout + r.stderr)
    assert r.returncode == 0, f"cyclegan {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"


@pytest.fixture(scope="module")
def runs(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Two full pipeline runs (lr 2e-4 and 1e-4) logged to the server."""
    work = tmp_path_factory.mktemp("e2e")
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    # The user's shell has S3 credentials (e.g. for DVC); with --serve-artifacts the client
    # needs none, and none may leak into MLflow.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(mlflow_server.s3.env)
    env["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv's `cyclegan`
    env["PYTHONUNBUFFERED"] = "1"
    # MLflow's own setting: sample system metrics every second (default 10 s), so that these
    # few-second runs record some.
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    out = Runs(server=mlflow_server, workdir=work, run_ids=[], lrs=[2e-4, 1e-4])
    sets = [a for s in TINY for a in ("--set", s)]
    _stage(["prepare", *sets], work, env, out.logs)
    for lr in out.lrs:
        lr_set = ["--set", f"train.lr={lr}"]
        for stage in ("train", "evaluate", "register"):
            _stage([stage, *sets, *lr_set], work, env, out.logs)
        out.run_ids.append(json.loads((work / "models/cyclegan/run.json").read_text())["run_id"])
    assert len(set(out.run_ids)) == 2
    return out


def test_server_holds_metrics_params_tags_and_artifacts_in_s3(runs: Runs) -> None:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=runs.server.uri, registry_uri=runs.server.uri)
    s3_keys = [
        o["Key"]
        for page in runs.server.s3.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=runs.server.artifact_bucket)
        for o in page.get("Contents", [])
    ]
    for run_id, lr in zip(runs.run_ids, runs.lrs, strict=True):
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert set(run.data.metrics) >= CONTRACT_TRAIN_METRICS, run.data.metrics.keys()
        assert set(run.data.metrics) >= CONTRACT_EVAL_METRICS, run.data.metrics.keys()
        # Loss curves are by step, not one value.
        assert len(c.get_metric_history(run_id, "loss_G")) >= 2
        assert float(run.data.params["train.lr"]) == pytest.approx(lr)
        for tag in ("git_commit", "data_version", "dvc_exp_name"):
            assert tag in run.data.tags
        assert run.data.tags["data_version"] != "unknown"
        # Traceable: where it ran from, and the data it really used (what prepare recorded,
        # not the train stage's own data.* defaults) in the Dataset column.
        assert run.data.tags["mlflow.source.name"] == "cyclegan train"
        assert run.data.params["data.source"] == "synthetic"
        assert run.data.params["data.synthetic.n_train_a"] == "24"
        (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
        assert dataset.name == "synthetic"
        assert dataset.digest and dataset.digest in run.data.tags["data_version"]
        assert json.loads(dataset.profile)["trainA"] == 24
        # System metrics (CPU and memory; GPU where there is one) in the run's own tab.
        assert any(k.startswith("system/cpu") for k in run.data.metrics), run.data.metrics
        # Images and weights, stored in the bucket (the server proxies them).
        run_keys = [k for k in s3_keys if f"/{run_id}/" in k]
        assert any(k.endswith(".png") for k in run_keys), run_keys
        assert any(k.endswith("G_A.safetensors") for k in run_keys), run_keys


def test_registry_has_a_champion_loadable_through_the_server(runs: Runs) -> None:
    import io

    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from PIL import Image

    c = MlflowClient(tracking_uri=runs.server.uri, registry_uri=runs.server.uri)
    champion = c.get_model_version_by_alias("cyclegan", "champion")
    assert champion.run_id in runs.run_ids
    decisions = json.loads((runs.workdir / "metrics/register.json").read_text())
    assert "reason" in decisions
    # As a user's notebook would: point MLflow (tracking and registry) at the server.
    mlflow.set_tracking_uri(runs.server.uri)
    mlflow.set_registry_uri(runs.server.uri)
    model = mlflow.pyfunc.load_model("models:/cyclegan@champion")
    img = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    out = model.predict(pd.DataFrame({"image": [buf.getvalue()]}))
    translated = Image.open(io.BytesIO(out["image"][0]))
    assert translated.size == (30, 20) and translated.mode == "RGB"


def test_no_credential_reaches_mlflow_or_logs(runs: Runs) -> None:
    secrets = [TEST_ACCESS_KEY.encode(), TEST_SECRET_KEY.encode()]
    haystacks: dict[str, bytes] = {
        "mlflow db": runs.server.backend.read_bytes(),
        "mlflow server log": runs.server.log.read_bytes(),
        "stage output": "\n".join(runs.logs).encode(),
    }
    s3 = runs.server.s3.client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=runs.server.artifact_bucket):
        for o in page.get("Contents", []):
            body = s3.get_object(Bucket=runs.server.artifact_bucket, Key=o["Key"])["Body"].read()
            haystacks[f"s3://{o['Key']}"] = body
    for p in runs.workdir.rglob("*"):
        if p.is_file() and p.stat().st_size < 50_000_000:
            haystacks[str(p.relative_to(runs.workdir))] = p.read_bytes()
    for name, data in haystacks.items():
        for s in secrets:
            assert s not in data, f"a test credential leaked into {name}"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_ui_compares_runs_in_a_browser(runs: Runs, tmp_path: Path) -> None:
    """Open the experiment, select both runs, press Compare, and read the comparison."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    exp_id = (
        MlflowClient(tracking_uri=runs.server.uri, registry_uri=runs.server.uri)
        .get_run(runs.run_ids[0])
        .info.experiment_id
    )
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{runs.server.uri}/#/experiments/{exp_id}/runs", wait_until="load")
            rows = page.get_by_role("row")
            page.get_by_text("Training runs").first.wait_for(timeout=60_000)
            client = MlflowClient(tracking_uri=runs.server.uri, registry_uri=runs.server.uri)
            names = [client.get_run(run_id).info.run_name for run_id in runs.run_ids]
            # Runs a person can tell apart: distinct, readable names (not one random name).
            assert len(set(names)) == 2 and all("lr=" in n for n in names), names
            for name in names:
                row = rows.filter(has_text=name)
                row.get_by_role("checkbox").first.check(timeout=30_000)
            # The Dataset column: the data the run really used, by name and DVC hash.
            page.get_by_text("synthetic").first.wait_for(timeout=30_000)
            table = page.inner_text("body")
            page.screenshot(path=str(shots / "mlflow_runs.png"))
            page.get_by_role("button", name="Compare").first.click()
            page.get_by_text("Comparing 2 Runs").first.wait_for(timeout=60_000)
            page.get_by_text("fid_A2B").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "mlflow_compare.png"), full_page=True)
            text = page.inner_text("body")
        finally:
            browser.close()
    for run_id in runs.run_ids:
        assert run_id in text
    assert all(name in table for name in names)
    assert "fid_A2B" in text and "loss_G" in text and "train.lr" in text
    # The differing parameter is shown with both values.
    assert "0.0002" in text and "0.0001" in text
