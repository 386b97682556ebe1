"""``cyclegan pipeline compile | run-local | submit``: the Kubeflow front end of the CLI."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
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

    from cyclegan_kfp.components import IMAGE
    from cyclegan_kfp.pipeline import cyclegan_pipeline

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


def check_variants(
    variants: Any, params: str = "", overrides: Sequence[str] = ()
) -> list[list[str]]:
    """The ``variants`` pipeline parameter, checked before anything runs: a non-empty list of
    override lists, each of which makes valid parameters together with ``params`` and
    ``overrides``. A variant may also be given as one string of space-separated overrides."""
    from cyclegan.config import config_from_yaml

    if not isinstance(variants, list) or not variants:
        raise ConfigError(
            "variants is empty: nothing would be trained",
            'give at least one variant, e.g. [["train.lr=0.0001"], ["train.lr=0.0002"]], '
            "or leave it out for one run",
        )
    out: list[list[str]] = []
    for i, v in enumerate(variants, 1):
        items = v.split() if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ConfigError(
                f"variant {i} is {str(v)[:60]!r}, not a list of section.key=value strings",
                'e.g. ["train.lr=0.0001", "train.lambda_A=5"]',
            )
        config_from_yaml(params, [*overrides, *items], flag=f"variant {i}")
        out.append(items)
    return out


def run_local(cfg: Config, workdir: Path, variants: Sequence[Sequence[str]] | None = None) -> Path:
    """Run the whole pipeline on this machine (``kfp.local``, one subprocess per step) with
    ``cfg`` and the sweep ``variants`` (each a list of overrides; None: one run);
    artifacts go under ``workdir``, runs and the registered model to MLflow."""
    from kfp import local

    from cyclegan_kfp.pipeline import build_pipeline

    params = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    sweep = check_variants([list(v) for v in variants] if variants else [[]], params)

    cyclegan_pipeline = build_pipeline(retries=0)  # a local failure does not pass by itself
    workdir = Path(workdir).resolve()
    root = workdir / "pipeline_root"
    root.mkdir(parents=True, exist_ok=True)
    uri = local_tracking_uri(cfg)
    started = time.time()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    log.info("running the pipeline locally; artifacts under %s, MLflow at %s", root, uri)
    try:
        cyclegan_pipeline(
            params=params,
            mlflow_tracking_uri=uri,
            num_nodes=1,
            gpus_per_node=0,  # train.nproc_per_node decides, as in `dvc repro`
            variants=sweep,
        )
    except RuntimeError as e:  # kfp.local's "finished with status FAILURE"
        raise CycleGANError(
            f"the local pipeline run failed: {_first_line(e)}",
            f"the failing step's log is above; its files are under {root}",
        ) from None
    log.info("done: artifacts in %s; %s", root, _registration_outcome(cfg, root, started, uri))
    return root


def _registration_outcome(cfg: Config, root: Path, since: float, uri: str) -> str:
    """What this run's register steps decided, from the register.json files they wrote (none:
    the pipeline's gate kept them from running), and which version is the champion."""
    from cyclegan.log import redact

    written = sorted(
        (p for p in root.rglob("register.json") if p.stat().st_mtime >= since),
        key=lambda p: p.stat().st_mtime,
    )
    if not written:
        return (
            f"not registered: {cfg.register.metric} did not pass register.threshold, so no "
            "register step ran"
        )
    results = [json.loads(p.read_text()) for p in written]
    decisions = "; ".join(str(r.get("reason", r.get("decision"))) for r in results)
    name, alias = cfg.register.model_name, cfg.register.alias
    champions = [r for r in results if r.get("registered")]
    if champions:
        return (
            f"models:/{name}@{alias} is version {champions[-1].get('version')} in "
            f"{redact(uri)} ({decisions})"
        )
    return f"not registered: {decisions}"


# ---------------------------------------------------------------------------------------------
# submit
# ---------------------------------------------------------------------------------------------


def pipeline_parameters() -> dict[str, str]:
    """The pipeline's parameters and their KFP types (``String``, ``Integer``, ``Float``,
    ``Boolean``, ``List``, ``Dict``)."""
    from cyclegan_kfp.pipeline import cyclegan_pipeline

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


_KFP_TYPES: dict[str, tuple[Any, str]] = {
    "Integer": (int, "an integer"),
    "Float": (float, "a number"),
    "Boolean": (bool, "true or false"),
    "List": (list, "a JSON list"),
    "Dict": (dict, "a JSON object"),
}


def _convert(name: str, text: str, kind: str) -> Any:
    """``text`` as a value of the KFP parameter type ``kind``, by the params' own rules (the
    text is YAML, of which JSON is a part; :func:`cyclegan.config.coerce` checks the type)."""
    from cyclegan.config import coerce, parse_yaml

    if kind == "String":
        if not text.startswith("@"):
            return text
        try:
            return Path(text[1:]).read_text()
        except OSError as e:
            raise ConfigError(f"--arg {name}: cannot read {text[1:]!r} ({e.strerror})") from None
    tp, what = _KFP_TYPES[kind]
    try:
        value = parse_yaml(text, f"--arg {name}")
    except ConfigError:
        raise ConfigError(f"--arg {name}={text!r}: expected {what}") from None
    ok, value = (isinstance(value, tp), value) if tp in (list, dict) else coerce(tp, value)
    if not ok:
        raise ConfigError(f"--arg {name}={text!r}: expected {what}")
    return value


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
    if "variants" in args:
        args["variants"] = check_variants(
            args["variants"], args.get("params", ""), args.get("overrides", [])
        )
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
