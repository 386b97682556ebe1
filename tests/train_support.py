"""Shared helpers for the training tests (their fixtures, one_thread and workdir, are in
conftest.py).

Tiny settings keep every training run to seconds on 2 shared cores: 16x16 crops, 4-filter
networks, a 2-layer PatchGAN, a dozen images. Torch runs single-threaded: on a loaded machine
OpenMP's spinning threads make two threads tens of times slower than one.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cyclegan.config import Config, load_config
from cyclegan.paths import Paths

TINY = (
    "data.load_size=16",
    "train.crop_size=16",
    "train.ngf=4",
    "train.ndf=4",
    "train.n_layers_D=2",
    "train.epochs=1",
    "train.epochs_decay=1",
    "train.log_every=2",
    "train.sample_every=4",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=2",
)


def make_prepared(root: Path, n_a: int = 8, n_b: int = 6, size: int = 16, seed: int = 0) -> Path:
    """A prepared dataset (trainA/trainB/testA/testB) of smooth random PNGs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split, n in (("trainA", n_a), ("trainB", n_b), ("testA", 2), ("testB", 2)):
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            c = rng.uniform(0, 255, (3, 3))
            img = c[0] + c[1] * xx[..., None] / 2 + c[2] * yy[..., None] / 2
            if split.endswith("B"):
                img = 255 - img
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{split}_{i:03d}.png")
    return root


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    """TINY settings, a private SQLite MLflow store in ``tmp_path``, then ``overrides``."""
    store = f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}"
    return load_config(None, [*TINY, store, *overrides])


def paths_in(root: Path) -> Paths:
    """Every stage path under ``root`` (absolute, so the cwd does not matter)."""
    return Paths(
        raw=root / "data/raw",
        prepared=root / "data/prepared",
        checkpoints=root / "checkpoints",
        model=root / "models/cyclegan",
        metrics=root / "metrics",
        plots=root / "plots",
    )


def run_cli(
    args: Sequence[str], cwd: Path, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``cyclegan <args>`` in ``cwd``, single-threaded, output captured."""
    env = {**env, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["cyclegan", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def sets(*overrides: str) -> list[str]:
    """``--set a --set b ...``"""
    return [x for o in overrides for x in ("--set", o)]


# The whole pipeline at the smallest size that runs every step (kfp.local, containers).
PIPELINE_TINY = {
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
    "register": {"onnx": False},  # attached ONNX files: tests/test_serving.py
}

REPO = Path(__file__).resolve().parents[1]


def copy_project(work: Path) -> None:
    """The project's files as a fresh clone has them, plus new ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, work / rel)
