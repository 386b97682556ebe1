"""Kubeflow components: one per stage, each a thin adapter from KFP inputs to the library.

A lightweight component's body is shipped alone into its container, so every component
imports what it needs inside its body. The project (this package included) is installed in
the image, so bodies share the few helpers below instead of repeating them.

``IMAGE`` is the container image every component runs in. A component's ``base_image`` is
fixed when it is defined, so it comes from ``$CYCLEGAN_IMAGE`` at import time;
``pipeline.cli.compile_pipeline(..., image=...)`` rewrites it in the compiled YAML.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cyclegan.config import Config
    from cyclegan.paths import Paths

DEFAULT_IMAGE = "ghcr.io/your-org/cyclegan-pipeline:0.1.0"
IMAGE = os.environ.get("CYCLEGAN_IMAGE") or DEFAULT_IMAGE


def stage_config(
    params: str,
    overrides: Sequence[str],
    settings: Mapping[str, Any] | None = None,
    s3_endpoint: str = "",
) -> Config:
    """The validated :class:`~cyclegan.config.Config` of one pipeline step.

    ``params`` is a params.yaml document ("" = the built-in defaults), ``overrides`` are
    ``section.key=value`` strings, and ``settings`` are dedicated pipeline parameters
    (``{"mlflow.tracking_uri": ...}``); empty ones are skipped, the others win over both.
    ``s3_endpoint`` is exported for boto3 and MLflow's S3 artifact store. Also sets up logging,
    so library messages reach the step's log.
    """
    from cyclegan.config import load_config
    from cyclegan.log import setup_logging

    setup_logging()
    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
        settings = {"data.s3_endpoint_url": s3_endpoint, **(settings or {})}
    # JSON is YAML: a value given as a pipeline parameter keeps its type ("yes" stays a string).
    extra = [f"{k}={json.dumps(v)}" for k, v in (settings or {}).items() if v not in ("", None)]
    with tempfile.TemporaryDirectory(prefix="cyclegan-") as tmp:
        path = Path(tmp) / "pipeline-params.yaml"
        path.write_text(params)
        return load_config(path, [*overrides, *extra], required=True)


def write_params(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as a complete params.yaml (for ``cyclegan ... --params``)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def out_dir(artifact: Any) -> Path:
    """The folder of an output artifact, created (a step that writes nothing still leaves one,
    which the artifact upload needs)."""
    path = Path(artifact.path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def train_argv(params_file: str | Path, paths: Paths) -> list[str]:
    """``cyclegan`` arguments that train with ``params_file`` into ``paths``."""
    return [
        "train",
        "--params",
        str(params_file),
        "--prepared-dir",
        str(paths.prepared),
        "--checkpoints-dir",
        str(paths.checkpoints),
        "--model-dir",
        str(paths.model),
        "--metrics-dir",
        str(paths.metrics),
        "--plots-dir",
        str(paths.plots),
    ]


def log_metrics(metrics: Any, values: Mapping[str, Any]) -> None:
    """Log the numeric entries of ``values`` on a KFP ``Metrics`` artifact (for the UI)."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON file's object, or {} if the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}
