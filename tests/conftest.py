"""Shared fixtures. GPU tests skip without CUDA; slow tests run real servers/processes."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
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


@pytest.fixture(name="one_thread")
def one_thread_fixture() -> Iterator[None]:
    """Single-threaded torch for the test (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(name="workdir")
def workdir_fixture(tmp_path: Path) -> Iterator[Path]:
    """A tmp cwd holding a tiny prepared dataset at data/prepared."""
    from tests.train_support import make_prepared

    make_prepared(tmp_path / "data/prepared")
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


# Real servers on loopback (moto S3, mlflow server), shared by the integration tests.
pytest_plugins = ["tests.servers"]
