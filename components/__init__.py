"""Kubeflow components: one per stage, each a thin adapter from KFP inputs to the library.

A lightweight component's body is shipped alone into its container, so every component
imports what it needs inside its body. The project (this package included) is installed in
the image, so bodies share the few helpers below instead of repeating them.

``IMAGE`` is the container image every component runs in. A component's ``base_image`` is
fixed when it is defined, so it comes from ``$CYCLEGAN_IMAGE`` at import time;
``cyclegan_kfp.cli.compile_pipeline(..., image=...)`` rewrites it in the compiled YAML.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cyclegan import __version__

if TYPE_CHECKING:
    from cyclegan.config import Config

DEFAULT_IMAGE = f"ghcr.io/your-org/cyclegan-pipeline:{__version__}"
IMAGE = os.environ.get("CYCLEGAN_IMAGE") or DEFAULT_IMAGE


def stage_config(
    params: str,
    overrides: Sequence[str],
    settings: Mapping[str, Any] | None = None,
    s3_endpoint: str = "",
    variant: Sequence[str] = (),
) -> Config:
    """The validated :class:`~cyclegan.config.Config` of one pipeline step.

    ``params`` is a params.yaml document ("" = the built-in defaults), ``overrides`` are
    ``section.key=value`` strings, then ``variant`` (the sweep's overrides for this branch), and
    ``settings`` are dedicated pipeline parameters (``{"mlflow.tracking_uri": ...}``); empty
    ones are skipped, the others win over all.
    ``s3_endpoint`` is exported for boto3 and MLflow's S3 artifact store. Also sets up logging,
    so library messages reach the step's log.
    """
    from cyclegan.config import config_from_yaml
    from cyclegan.log import setup_logging

    setup_logging()
    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
        settings = {"data.s3_endpoint_url": s3_endpoint, **(settings or {})}
    # JSON is YAML: a value given as a pipeline parameter keeps its type ("yes" stays a string).
    extra = [f"{k}={json.dumps(v)}" for k, v in (settings or {}).items() if v not in ("", None)]
    return config_from_yaml(
        params,
        [*overrides, *variant, *extra],
        source="pipeline parameter 'params'",
        flag="overrides",
    )


def out_dir(artifact: Any) -> Path:
    """The folder of an output artifact, created (a step that writes nothing still leaves one,
    which the artifact upload needs)."""
    path = Path(artifact.path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_metrics(metrics: Any, values: Mapping[str, Any]) -> None:
    """Log the numeric entries of ``values`` on a KFP ``Metrics`` artifact (for the UI)."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON file's object, or {} if the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------
# What the Kubeflow run page shows: Markdown and HTML artifacts next to the Metrics
# ---------------------------------------------------------------------------------------------


def _number(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def markdown_table(values: Mapping[str, Any]) -> str:
    """``| key | value |`` rows of the scalar entries of ``values``."""
    rows = [f"| `{k}` | {_number(v)} |" for k, v in values.items() if not isinstance(v, dict)]
    return "\n".join(["| | |", "|---|---|", *rows])


def write_markdown(artifact: Any, text: str) -> None:
    """Write a ``Markdown`` output artifact (the run page renders it)."""
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(text)


def html_report(title: str, values: Mapping[str, Any], image: Path | None = None) -> str:
    """A self-contained HTML page: a title, the image inlined as a data URI, a table."""
    import base64
    import html

    rows = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(_number(v))}</td></tr>"
        for k, v in values.items()
        if not isinstance(v, dict)
    )
    img = ""
    if image is not None and image.is_file():
        data = base64.b64encode(image.read_bytes()).decode()
        img = f'<p><img alt="samples" src="data:image/png;base64,{data}"></p>'
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>"
        f"<h2>{html.escape(title)}</h2>{img}<table>{rows}</table></body></html>"
    )
