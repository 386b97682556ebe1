"""Shared fixtures. GPU tests skip without CUDA; slow tests run real servers/processes."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo_root() -> Path:
    """The project's root (where params.yaml and dvc.yaml live)."""
    return REPO


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running the `cyclegan` console script in a subprocess: the venv's bin
    first on PATH, a private MLflow store, no inherited tracking URI or AWS credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def cyclegan_exe() -> str:
    exe = shutil.which("cyclegan", path=str(BIN))
    assert exe, "the cyclegan console script is not installed (pip install -e .)"
    return exe


# Real servers on loopback (moto S3, mlflow server), shared by the integration tests.
pytest_plugins = ["tests.servers"]
