"""``cyclegan pipeline compile | run-local | submit``: the Kubeflow front end of the CLI."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cyclegan.config import Config
from cyclegan.errors import ConfigError, CycleGANError

log = logging.getLogger("cyclegan.pipeline")

_SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
_SA_TOKEN_DEFAULT = "/var/run/secrets/kubeflow/pipelines/token"


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------


def compile_pipeline(output: Path, image: str | None = None) -> Path:
    """Write the pipeline YAML to ``output``; every step (and the TrainJob default) runs in
    ``image`` (default: ``$CYCLEGAN_IMAGE`` or the placeholder in :mod:`components`)."""
    from kfp import compiler

    from components import IMAGE
    from pipeline.pipeline import cyclegan_pipeline

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(cyclegan_pipeline, str(output))
    if image and image != IMAGE:
        _set_image(output, image)
    log.info("wrote %s (image %s)", output, image or IMAGE)
    return output


def _set_image(path: Path, image: str) -> None:
    """Point every executor and the ``image`` parameter's default at ``image``: a component's
    base image is fixed when it is defined, so a different one is set in the compiled spec."""
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = docs[0]
    for executor in spec["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = image
    spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] = image
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# run-local
# ---------------------------------------------------------------------------------------------


def local_tracking_uri(cfg: Config, base: Path | None = None) -> str:
    """The tracking URI for a local run, with a relative SQLite path made absolute: steps run
    in subprocesses whose working directory is not ours."""
    from cyclegan.tracking import tracking_uri

    uri = tracking_uri(cfg.mlflow)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        db = (base or Path.cwd()) / uri[len(prefix) :]
        return prefix + str(db.resolve())
    return uri


def run_local(cfg: Config, workdir: Path) -> Path:
    """Run the whole pipeline on this machine (``kfp.local``, one subprocess per step) with
    ``cfg``; artifacts go under ``workdir``, runs and the registered model to MLflow."""
    from kfp import local

    from pipeline.pipeline import build_pipeline

    cyclegan_pipeline = build_pipeline(retries=0)  # a local failure does not pass by itself
    workdir = Path(workdir).resolve()
    root = workdir / "pipeline_root"
    root.mkdir(parents=True, exist_ok=True)
    uri = local_tracking_uri(cfg)
    threshold = cfg.register.threshold
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    log.info("running the pipeline locally; artifacts under %s, MLflow at %s", root, uri)
    try:
        cyclegan_pipeline(
            params=yaml.safe_dump(cfg.to_dict(), sort_keys=False),
            mlflow_tracking_uri=uri,
            num_nodes=1,
            gpus_per_node=0,  # train.nproc_per_node decides, as in `dvc repro`
            fid_threshold=float(threshold) if threshold is not None else 1e9,
        )
    except RuntimeError as e:  # kfp.local's "finished with status FAILURE"
        raise CycleGANError(
            f"the local pipeline run failed: {_first_line(e)}",
            f"the failing step's log is above; its files are under {root}",
        ) from None
    name = cfg.register.model_name
    log.info(
        "done: artifacts in %s; model models:/%s@%s in %s", root, name, cfg.register.alias, uri
    )
    return root


# ---------------------------------------------------------------------------------------------
# submit
# ---------------------------------------------------------------------------------------------


def pipeline_parameters() -> dict[str, str]:
    """The pipeline's parameters and their KFP types (``String``, ``Integer``, ``Float``,
    ``Boolean``, ``List``, ``Dict``)."""
    from pipeline.pipeline import cyclegan_pipeline

    return {name: spec.type for name, spec in cyclegan_pipeline.component_spec.inputs.items()}


def parse_arguments(items: Sequence[str], types: Mapping[str, str]) -> dict[str, Any]:
    """``name=value`` strings as typed pipeline arguments.

    A ``List`` parameter takes a JSON list, or one item per repetition
    (``--arg overrides=train.lr=0.001 --arg overrides=train.epochs=5``); a ``String`` value
    ``@FILE`` is read from FILE (``--arg params=@params.paper.yaml``).
    """
    allowed = ", ".join(sorted(types))
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--arg {item!r}: expected NAME=VALUE", f"names: {allowed}")
        if name not in types:
            raise ConfigError(f"--arg {name}: no such pipeline parameter", f"allowed: {allowed}")
        kind = types[name]
        if kind == "List":
            if text.lstrip().startswith("["):
                out[name] = _convert(name, text, kind)
            else:
                out.setdefault(name, []).append(text)
        else:
            out[name] = _convert(name, text, kind)
    return out


def _convert(name: str, text: str, kind: str) -> Any:
    try:
        if kind == "String":
            if text.startswith("@"):
                return Path(text[1:]).read_text()
            return text
        if kind == "Integer":
            return int(text)
        if kind == "Float":
            return float(text)
        if kind == "Boolean":
            low = text.strip().lower()
            if low not in ("true", "false"):
                raise ValueError(text)
            return low == "true"
        value = json.loads(text)
        if not isinstance(value, list if kind == "List" else dict):
            raise ValueError(text)
        return value
    except OSError as e:
        raise ConfigError(f"--arg {name}: cannot read {text[1:]!r} ({e.strerror})") from None
    except ValueError:
        what = {
            "Integer": "an integer",
            "Float": "a number",
            "Boolean": "true or false",
            "List": "a JSON list",
            "Dict": "a JSON object",
        }[kind]
        raise ConfigError(f"--arg {name}={text!r}: expected {what}") from None


def resolve_token(token: str | None) -> str | None:
    """``--token``, else ``$KFP_TOKEN``, else the in-cluster service-account token file."""
    if token:
        return token
    if os.environ.get("KFP_TOKEN"):
        return os.environ["KFP_TOKEN"]
    path = Path(os.environ.get(_SA_TOKEN_ENV) or _SA_TOKEN_DEFAULT)
    if path.is_file():
        return path.read_text().strip() or None
    return None


def submit(
    *,
    host: str,
    namespace: str | None = None,
    experiment: str = "cyclegan",
    run_name: str | None = None,
    token: str | None = None,
    arguments: Sequence[str] = (),
) -> str:
    """Compile and submit a run to the KFP API at ``host``; print and return the run's URL."""
    import kfp

    args = parse_arguments(arguments, pipeline_parameters())
    if int(args.get("num_nodes", 1)) > 1 and not args.get("pvc_name"):
        raise ConfigError(
            "num_nodes > 1 needs a shared volume",
            "add --arg pvc_name=NAME (a ReadWriteMany PVC in the run's namespace)",
        )
    if not _sets_tracking_uri(args):
        log.warning(
            "no MLflow server given: each step would log to a SQLite file inside its own pod "
            "(add --arg mlflow_tracking_uri=http://...)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "cyclegan_pipeline.yaml", image=args.get("image"))
        try:
            with warnings.catch_warnings():  # "only works with KFP 2.0.0-beta.2 and later"
                warnings.simplefilter("ignore", FutureWarning)
                client = kfp.Client(
                    host=host,
                    namespace=namespace or "kubeflow",
                    existing_token=resolve_token(token),
                )
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=args,
                run_name=run_name,
                experiment_name=experiment,
                namespace=namespace,
            )
        except CycleGANError:
            raise
        except Exception as e:  # kfp raises urllib3, ApiException, ValueError... for one cause
            raise CycleGANError(
                f"submitting to {host} failed: {_first_line(e)}",
                "check --host (the KFP API endpoint), --namespace and the token",
            ) from None
    url = f"{host.rstrip('/')}/#/runs/details/{result.run_id}"
    print(url)
    return url


def _sets_tracking_uri(args: Mapping[str, Any]) -> bool:
    if args.get("mlflow_tracking_uri"):
        return True
    if any(str(o).startswith("mlflow.tracking_uri=") for o in args.get("overrides", [])):
        return True
    params = yaml.safe_load(args.get("params") or "") or {}
    return isinstance(params, dict) and bool((params.get("mlflow") or {}).get("tracking_uri"))


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # kfp.local colours its messages
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
