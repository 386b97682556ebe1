"""Where each stage reads and writes: the file layout of dvc.yaml, in one place.

The CLI uses the defaults (relative to the working directory, as ``dvc repro`` runs);
Kubeflow components point the same fields at their artifact paths.
"""

from __future__ import annotations

import os
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
    state: Path = field(default_factory=lambda: Path(".cyclegan"))
    """The project folder's own state, never versioned: the writer lock, MLflow calls waiting
    for the server, cached features of real images."""

    @property
    def run_file(self) -> Path:
        """JSON with the MLflow run id that training opened; evaluate/register log into it."""
        return self.model / "run.json"

    @property
    def lock_file(self) -> Path:
        """Held by the stage that writes in this project folder (one writer at a time)."""
        return self.state / "lock"

    @property
    def project_state(self) -> Path:
        """The state folder of the project itself: ``state``, except in a DVC experiment run
        from the queue, which runs in a temporary copy of the project (DVC names the real one
        in ``$DVC_ROOT``): pending MLflow records and caches must outlive that copy."""
        root = os.environ.get("DVC_ROOT")
        if root and not self.state.is_absolute() and Path(root).resolve() != Path.cwd().resolve():
            return Path(root) / self.state
        return self.state

    @property
    def spool(self) -> Path:
        """MLflow calls that could not be sent yet (replayed when the server answers)."""
        return self.project_state / "spool"

    @property
    def cache(self) -> Path:
        """Caches keyed by content (e.g. Inception features of the real test images)."""
        return self.project_state / "cache"
