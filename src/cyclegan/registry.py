"""The ``register`` stage: a gated MLflow Model Registry entry with a ``champion`` alias.

The gate, on ``register.metric`` from ``metrics/eval.json`` (default ``fid_A2B``):

1. If ``register.threshold`` is set, the value must reach it (``<=`` for lower-is-better
   metrics, ``>=`` otherwise).
2. It must strictly beat the version that holds ``register.alias`` (default ``champion``),
   compared with that version's tag of the same metric (or, if it lacks the tag, its run's
   metric). No champion yet: the first model that passes the threshold becomes it.

Passing both: the generators are logged to the training's run as an MLflow pyfunc model
(``registered_model``; :mod:`cyclegan.serving`, models-from-code, safetensors weights, no
pickle), a new version is created (tagged with ``run_id``, ``data_version``, ``git_commit``,
the Inception weights' ``fid_weights_sha256`` and every eval metric) and the alias moves to
it. Failing either: nothing is registered and the alias stays where it is. A run that already
has a version is never registered twice: that version is reused.

Direction of "better": ``register.greater_is_better``, or from the metric's name (``fid*``,
``kid*``: lower; ``psnr*``, ``ssim*``: higher).

The decision and its reason go to ``metrics/register.json`` (numbers numeric for ``dvc
metrics``: ``registered`` and ``created`` - a new version was made by this call - are 0/1).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cyclegan import tracking
from cyclegan.config import Config, RegisterConfig
from cyclegan.errors import ConfigError, CycleGANError, DataError
from cyclegan.fsio import write_json
from cyclegan.models.io import GENERATOR_FILES, read_model_json
from cyclegan.paths import Paths

log = logging.getLogger("cyclegan.registry")

MODEL_ARTIFACT = "registered_model"  # name of the logged model in the run
REGISTER_FILE = "register.json"
SERVING_FILE = Path(__file__).with_name("serving.py")
PACKAGE_DIR = Path(__file__).parent
_LOWER_IS_BETTER = ("fid", "kid")
_HIGHER_IS_BETTER = ("psnr", "ssim")
_SERVING_REQUIREMENTS = ("torch", "numpy", "pillow", "safetensors", "pandas")


def greater_is_better(metric: str, configured: bool | None = None) -> bool:
    """Whether a larger ``metric`` is better: ``configured`` if given, else from its name."""
    if configured is not None:
        return configured
    name = metric.lower()
    if name.startswith(_LOWER_IS_BETTER):
        return False
    if name.startswith(_HIGHER_IS_BETTER):
        return True
    err = ConfigError(
        f"register.metric = {metric!r}: cannot tell whether higher or lower is better",
        "set register.greater_is_better to true or false",
    )
    err.key = "register.greater_is_better"
    raise err


def passes_threshold(value: float, threshold: float | None, higher_better: bool) -> bool:
    """True when there is no threshold or ``value`` reaches it."""
    if threshold is None:
        return True
    return value >= threshold if higher_better else value <= threshold


def threshold_gate(
    rcfg: RegisterConfig, metrics: Mapping[str, Any], source: str = "eval.json"
) -> tuple[bool, str]:
    """The first half of the gate (see the module docstring): does ``register.metric`` in
    ``metrics`` reach ``register.threshold``? Returns the answer and, when no, why. The
    Kubeflow pipeline's registration condition is this same function's answer."""
    if rcfg.metric not in metrics:
        err = ConfigError(
            f"register.metric = {rcfg.metric!r} is not in {source}",
            f"choose one of: {', '.join(sorted(metrics))}",
        )
        err.key = "register.metric"
        raise err
    higher = greater_is_better(rcfg.metric, rcfg.greater_is_better)
    value = _as_float(metrics[rcfg.metric])
    if value is None:
        return False, f"{rcfg.metric} is {metrics[rcfg.metric]!r}, not a finite number"
    if not passes_threshold(value, rcfg.threshold, higher):
        op = ">=" if higher else "<="
        return False, (
            f"{rcfg.metric} = {value:.6g} does not pass the threshold ({op} {rcfg.threshold})"
        )
    return True, ""


def beats(value: float, champion: float, higher_better: bool) -> bool:
    """Strictly better: a tie keeps the champion."""
    return value > champion if higher_better else value < champion


def _read_eval(paths: Paths) -> dict[str, Any]:
    path = paths.metrics / "eval.json"
    if not path.is_file():
        raise CycleGANError(f"{path} not found", "run `cyclegan evaluate` first")
    try:
        metrics = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path} is not valid JSON ({str(e)[:80]})", "run `cyclegan evaluate` again"
        ) from None
    if not isinstance(metrics, dict):
        raise DataError(f"{path} is not a JSON object", "run `cyclegan evaluate` again")
    return metrics


def _read_details(paths: Paths) -> dict[str, Any]:
    path = paths.metrics / "eval_details.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _write_result(paths: Paths, result: dict[str, Any]) -> None:
    write_json(paths.metrics / REGISTER_FILE, result)


def _requirements() -> list[str]:
    reqs = []
    for dist in _SERVING_REQUIREMENTS:
        try:
            # Drop local version labels (2.5.0+cpu): pip on another host cannot resolve them.
            reqs.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _champion(c: Any, name: str, alias: str, metric: str) -> tuple[Any, float | None]:
    """The version holding ``alias`` (or None) and its value of ``metric`` (or None)."""
    from mlflow.exceptions import MlflowException

    try:
        mv = c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None, None
        raise
    value = _as_float(mv.tags.get(metric))
    if value is None and mv.run_id:
        with contextlib.suppress(Exception):
            value = _as_float(c.get_run(mv.run_id).data.metrics.get(metric))
    return mv, value


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _versions_of_run(c: Any, name: str, run_id: str) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return []
    return sorted(found, key=lambda mv: int(mv.version))


def log_pyfunc_model(uri: str, run_id: str, model_dir: Path, onnx: bool = False) -> str:
    """Log the generators in ``model_dir`` as a pyfunc model under ``run_id``; its URI. With
    ``onnx``, the model also carries ``G_A.onnx`` and ``G_B.onnx`` (artifact ``onnx``), each
    checked against PyTorch in onnxruntime, so a registered version serves either way."""
    import mlflow
    import numpy as np
    import pandas as pd

    from cyclegan.serving import GENERATORS_ARTIFACT, encode_png, signature

    read_model_json(model_dir)  # a clear error if this is not a model folder
    status = tracking.client(uri).get_run(run_id).info.status
    with tempfile.TemporaryDirectory(prefix="cyclegan-register-") as tmp:
        staged = Path(tmp) / "generators"
        staged.mkdir()
        # Only the weights and architecture: run.json and anything else stay out of the model.
        for name in (*GENERATOR_FILES.values(), "model.json"):
            if not (model_dir / name).is_file():
                raise CycleGANError(f"{model_dir / name} is missing", "re-run `cyclegan train`")
            shutil.copy2(model_dir / name, staged / name)
        artifacts = {GENERATORS_ARTIFACT: str(staged)}
        if onnx and _onnx_available():
            artifacts["onnx"] = str(_onnx_files(model_dir, Path(tmp) / "onnx"))
        tracking.use_uri(uri)  # log_model and register_model use MLflow's process-wide URIs
        mlflow.start_run(run_id=run_id)
        try:
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(SERVING_FILE),
                artifacts=artifacts,
                code_paths=[str(PACKAGE_DIR)],
                signature=signature(),
                # A tiny odd-sized image: documents the input and checks it translates.
                input_example=pd.DataFrame(
                    {"image": [encode_png(np.full((6, 10, 3), 128, np.uint8))]}
                ),
                pip_requirements=_requirements(),
            )
        finally:
            # Resuming the run set it RUNNING; give it back the status it had.
            mlflow.end_run(status=status if status != "RUNNING" else "FINISHED")
    return info.model_uri


def _onnx_available() -> bool:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        log.warning(
            "register.onnx: the %s package is not installed; the version has no ONNX files "
            "(pip install 'cyclegan-pipeline[onnx]', or set register.onnx=false)",
            missing[0],
        )
    return not missing


def _onnx_files(model_dir: Path, out: Path) -> Path:
    """The ONNX export of the generators in ``out``; a missing onnx package is one line."""
    from cyclegan.export import export_onnx

    export_onnx(model_dir, out)
    return out


def register(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Run the gate and, if it passes, register and promote (see the module docstring).

    Returns what it writes to ``metrics/register.json``.
    """
    rcfg = cfg.register
    metrics = _read_eval(paths)
    passed, why = threshold_gate(rcfg, metrics, source=str(paths.metrics / "eval.json"))
    higher = greater_is_better(rcfg.metric, rcfg.greater_is_better)
    value = _as_float(metrics[rcfg.metric])
    result: dict[str, Any] = {
        "model_name": rcfg.model_name,
        "alias": rcfg.alias,
        "metric": rcfg.metric,
        "greater_is_better": int(higher),
        "value": value,
        "threshold": rcfg.threshold,
        "registered": 0,
        "created": 0,
        "version": None,
        "champion_version": None,
        "champion_value": None,
        "run_id": None,
    }

    def done(decision: str, reason: str) -> dict[str, Any]:
        result["decision"], result["reason"] = decision, reason
        _write_result(paths, result)
        (log.info if result["registered"] else log.warning)("register: %s", reason)
        return result

    if not passed:
        return done("rejected", why)
    assert value is not None  # the gate passed, so the metric is a finite number

    uri = tracking.use(cfg.mlflow)
    tracking.ensure_reachable(uri)
    c = tracking.client(uri)
    run_id, _ = tracking.stage_run(c, cfg, paths, "registration")
    result["run_id"] = run_id
    name, alias = rcfg.model_name, rcfg.alias
    champion, champion_value = _champion(c, name, alias, rcfg.metric)
    if champion is not None:
        result["champion_version"] = int(champion.version)
        result["champion_value"] = champion_value
    existing = _versions_of_run(c, name, run_id)

    if champion is not None and champion.run_id == run_id:
        result["registered"], result["version"] = 1, int(champion.version)
        return done(
            "already_champion",
            f"version {champion.version} of {name}, from this run, already holds @{alias}",
        )
    if champion is not None and champion_value is None:
        return done(
            "rejected",
            f"the current @{alias} (version {champion.version}) has no {rcfg.metric} to compare "
            f"with; not replacing it (move the alias by hand, or choose another register.metric)",
        )
    if champion is not None and not beats(value, champion_value, higher):  # type: ignore[arg-type]
        return done(
            "rejected",
            f"{rcfg.metric} = {value:.6g} does not beat @{alias} version {champion.version} "
            f"({champion_value:.6g}; {'higher' if higher else 'lower'} is better)",
        )

    if existing:
        version = existing[-1]
        log.info("run %s already has version %s of %s; reusing it", run_id, version.version, name)
    else:
        version = _create_version(c, cfg, paths, uri, run_id, metrics)
        result["created"] = 1
    c.set_registered_model_alias(name, alias, version.version)
    result["registered"], result["version"] = 1, int(version.version)
    before = (
        f"over version {champion.version} ({champion_value:.6g})"
        if champion is not None
        else "(no previous champion)"
    )
    return done(
        "registered",
        f"version {version.version} of {name} is now @{alias}: {rcfg.metric} = "
        f"{value:.6g} {before}",
    )


def _create_version(
    c: Any, cfg: Config, paths: Paths, uri: str, run_id: str, metrics: dict[str, Any]
) -> Any:
    """Log the pyfunc model under the run and register it as a new, tagged version."""
    import mlflow

    run = c.get_run(run_id)
    details = _read_details(paths)
    tags = {
        "run_id": run_id,
        "data_version": run.data.tags.get("data_version") or tracking.data_version(paths.prepared),
        "git_commit": run.data.tags.get("git_commit") or tracking.git_commit(),
        "register_metric": cfg.register.metric,
        **{k: str(v) for k, v in metrics.items()},
    }
    if details.get("fid_weights_sha256"):
        tags["fid_weights_sha256"] = str(details["fid_weights_sha256"])
    model_uri = log_pyfunc_model(uri, run_id, paths.model, onnx=cfg.register.onnx)
    tracking.use_uri(uri)
    mv = mlflow.register_model(model_uri, cfg.register.model_name, tags=tags)
    log.info("registered %s version %s from run %s", cfg.register.model_name, mv.version, run_id)
    return mv
