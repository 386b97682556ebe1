"""Where each stage reads and writes: the file layout of dvc.yaml, in one place.

The CLI uses the defaults (relative to the working directory, as ``dvc repro`` runs);
Kubeflow components point the same fields at their artifact paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Paths:
    """Stage inputs and outputs. Every path may be overridden on its own."""

    raw: Path = field(default_factory=lambda: Path("data/raw"))
    """Fetched or generated source data, before validation (persistent: downloads are kept)."""
    prepared: Path = field(default_factory=lambda: Path("data/prepared"))
    """trainA/ trainB/ testA/ testB/ (+ testA_gt/ testB_gt/) and manifest.json."""
    checkpoints: Path = field(default_factory=lambda: Path("checkpoints"))
    """Full training state, for exact resume (a persistent DVC output)."""
    model: Path = field(default_factory=lambda: Path("models/cyclegan"))
    """Final generators (safetensors), model.json, run.json (the MLflow run)."""
    metrics: Path = field(default_factory=lambda: Path("metrics"))
    """train.json, eval.json, register.json."""
    plots: Path = field(default_factory=lambda: Path("plots"))
    """train_loss.csv and sample grids."""

    @property
    def run_file(self) -> Path:
        """JSON with the MLflow run id that training opened; evaluate/register log into it."""
        return self.model / "run.json"
