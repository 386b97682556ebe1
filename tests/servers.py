"""Real servers on loopback for integration tests: moto's S3 server and ``mlflow server``.

Both are started as subprocesses on free ports and stopped at the end of the test session.
The test credentials below are fake values that only moto accepts; the secrets test searches
for them in MLflow stores and logs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TEST_ACCESS_KEY = "AKIACYCLEGANTESTKEY1"
TEST_SECRET_KEY = "cyclegan-test-secret-5f1e0c9a7b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Poll ``url`` until it answers 200, failing fast if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables for a client of the moto server."""
    return {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


@dataclass
class MotoS3:
    endpoint: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> str:
        c = self.client()
        with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou):
            c.create_bucket(Bucket=name)
        return name


@dataclass
class MlflowServer:
    uri: str
    backend: Path
    artifact_bucket: str
    artifact_prefix: str
    s3: MotoS3
    log: Path


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """moto's S3 server on loopback: a real S3 endpoint for boto3, DVC and MLflow."""
    d = tmp_path_factory.mktemp("moto")
    port = free_port()
    log = d / "moto.log"
    endpoint = f"http://127.0.0.1:{port}"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"{endpoint}/moto-api/", proc, 60, log)
        yield MotoS3(endpoint=endpoint, log=log, env=s3_env(endpoint))
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, moto_s3: MotoS3
) -> Iterator[MlflowServer]:
    """A real ``mlflow server``: SQLite backend, artifacts proxied to moto S3
    (``--serve-artifacts``), so clients need no S3 credentials of their own."""
    d = tmp_path_factory.mktemp("mlflow")
    bucket = moto_s3.create_bucket("mlflow-artifacts")
    prefix = "runs"
    port = free_port()
    log = d / "mlflow.log"
    env = {**os.environ, **moto_s3.env}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{d / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{bucket}/{prefix}",
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=d,
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc, 180, log)
        yield MlflowServer(
            uri=uri,
            backend=d / "mlflow.db",
            artifact_bucket=bucket,
            artifact_prefix=prefix,
            s3=moto_s3,
            log=log,
        )
    finally:
        stop(proc)
