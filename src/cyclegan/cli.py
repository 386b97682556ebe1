"""The ``cyclegan`` command: a thin front end that parses arguments and calls the library.

Stages (each reads ``params.yaml`` or ``--params FILE`` plus ``--set section.key=value``)::

    cyclegan prepare | train | evaluate | register
    cyclegan translate --model M --direction A2B --input DIR --output DIR
    cyclegan pipeline compile | run-local | submit
    cyclegan params            # every parameter with its default and meaning
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cyclegan import __version__
from cyclegan.config import Config, describe_parameters, load_config
from cyclegan.errors import CycleGANError, Stopped
from cyclegan.log import redact, setup_logging
from cyclegan.paths import Paths

log = logging.getLogger("cyclegan")


class _Terminated(BaseException):
    """SIGTERM outside training (which stops gracefully by itself): like Ctrl-C."""


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------


def _add_params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params",
        type=Path,
        default=None,
        metavar="FILE",
        help="parameters (default: params.yaml)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter (repeatable), e.g. --set train.lr=0.0001",
    )


def _add_path_args(p: argparse.ArgumentParser, *names: str) -> None:
    defaults = Paths()
    helps = {
        "raw": "fetched/generated source data",
        "prepared": "prepared dataset (trainA/ trainB/ testA/ testB/ ...)",
        "checkpoints": "training checkpoints (resume)",
        "model": "final model folder (generators, model.json, run.json)",
        "metrics": "metrics folder",
        "plots": "plots folder",
    }
    for name in names:
        p.add_argument(
            f"--{name}-dir",
            dest=f"{name}_dir",
            type=Path,
            default=getattr(defaults, name),
            metavar="DIR",
            help=f"{helps[name]} (default: {getattr(defaults, name)})",
        )


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="cyclegan",
        description="CycleGAN experiment pipeline: prepare -> train -> evaluate -> register.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prepare", help="fetch, validate and prepare the unpaired dataset")
    _add_params_args(p)
    _add_path_args(p, "raw", "prepared")

    p = sub.add_parser(
        "train",
        help="train CycleGAN (one process, a torchrun rank, or launches torchrun itself)",
        description="Train CycleGAN. Under torchrun each process is one DDP rank and "
        "train.batch_size is per rank; with train.nproc_per_node > 1 (or auto) this command "
        "starts torchrun itself.",
    )
    _add_params_args(p)
    _add_path_args(p, "prepared", "checkpoints", "model", "metrics", "plots")

    p = sub.add_parser("evaluate", help="FID/KID (+ PSNR/SSIM with ground truth) on the test set")
    _add_params_args(p)
    _add_path_args(p, "prepared", "model", "metrics", "plots")

    p = sub.add_parser(
        "register", help="register the generators in MLflow if they beat the champion"
    )
    _add_params_args(p)
    _add_path_args(p, "model", "metrics")

    p = sub.add_parser("translate", help="translate a folder of images with a trained generator")
    p.add_argument(
        "--model",
        required=True,
        help="a model folder, a checkpoint, or an MLflow URI (models:/NAME@champion, runs:/...)",
    )
    p.add_argument("--direction", choices=["A2B", "B2A"], default="A2B")
    p.add_argument("--input", required=True, type=Path, help="folder of images (or one image)")
    p.add_argument("--output", required=True, type=Path, help="folder for the translations")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files in --output that translate did not write",
    )
    _add_params_args(p)  # for the MLflow store that models:/ URIs resolve in

    p = sub.add_parser(
        "export",
        help="export the generators (G_A, G_B) to ONNX with dynamic height and width",
        description="Write G_A.onnx and G_B.onnx: float32 N x 3 x H x W in [-1, 1] in, the same "
        "out, any H and W (the graph pads and crops). Each is checked against PyTorch in "
        "onnxruntime before it is kept.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a model folder, a checkpoint, or an MLflow URI (models:/NAME@champion, runs:/...)",
    )
    p.add_argument("--format", default="onnx", help="onnx (the only format for now)")
    p.add_argument("--output", required=True, type=Path, help="folder for the exported files")
    _add_params_args(p)  # for the MLflow store that models:/ URIs resolve in

    p = sub.add_parser(
        "params",
        help="check the parameters and print every key with its value and meaning",
        description="Validate params.yaml (or --params FILE) with the --set overrides and print "
        "the resulting parameters as YAML, each with its meaning.",
    )
    _add_params_args(p)

    p = sub.add_parser(
        "sync",
        help="send MLflow records kept while the tracking server was unreachable",
        description="Training and evaluation keep what they could not send to MLflow in "
        ".cyclegan/spool; every command sends it when the server answers. This command does "
        "only that, and says what is still pending.",
    )
    _add_params_args(p)

    p = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit")
    psub = p.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)
    pc = psub.add_parser("compile", help="write the pipeline YAML")
    pc.add_argument("-o", "--output", type=Path, default=Path("cyclegan_pipeline.yaml"))
    pc.add_argument(
        "--image", default=None, help="project image for every step (default: $CYCLEGAN_IMAGE)"
    )
    pr = psub.add_parser("run-local", help="run the whole pipeline under kfp.local")
    _add_params_args(pr)
    pr.add_argument("--workdir", type=Path, default=Path("kfp_local_outputs"))
    pr.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help='one run of a sweep: space-separated overrides, e.g. --variant "train.lr=0.0001" '
        '--variant "train.lr=0.0002 train.lambda_A=5" (repeatable; the best is champion)',
    )
    ps = psub.add_parser("submit", help="compile and submit to a Kubeflow Pipelines endpoint")
    ps.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. https://kubeflow/pipeline"
    )
    ps.add_argument("--namespace", default=None)
    ps.add_argument("--experiment", default="cyclegan")
    ps.add_argument("--run-name", default=None)
    ps.add_argument(
        "--token",
        default=None,
        help="bearer token (default: $KFP_TOKEN, or in-cluster service account)",
    )
    ps.add_argument(
        "--arg",
        dest="args",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline parameter (repeatable)",
    )
    return parser


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    """The command's validated parameters (loaded once, before any work or lock)."""
    cfg = getattr(args, "loaded_config", None)
    if cfg is None:
        cfg = load_config(args.params, args.overrides, required=args.params is not None)
        args.loaded_config = cfg
    return cfg


def _paths(args: argparse.Namespace) -> Paths:
    kwargs = {
        name: getattr(args, f"{name}_dir")
        for name in ("raw", "prepared", "checkpoints", "model", "metrics", "plots")
        if hasattr(args, f"{name}_dir")
    }
    return Paths(**kwargs)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def cmd_prepare(args: argparse.Namespace) -> int:
    from cyclegan.data.prepare import prepare

    prepare(_config(args), _paths(args))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cyclegan.train import launch

    launch.run(_config(args), _paths(args))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cyclegan.evaluate.evaluate import evaluate

    _print_json(evaluate(_config(args), _paths(args)))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from cyclegan.registry import register

    _print_json(register(_config(args), _paths(args)))
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from cyclegan.translate import translate

    translate(
        args.model,
        direction=args.direction,
        input_path=args.input,
        output_dir=args.output,
        device=args.device,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        mlflow_cfg=_config(args).mlflow,  # the store models:/ URIs resolve in
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cyclegan.export import export

    mlflow_cfg = _config(args).mlflow  # the store models:/ URIs resolve in
    _print_json(export(args.model, args.output, fmt=args.format, mlflow_cfg=mlflow_cfg))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    print(describe_parameters(_config(args)))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    left = _send_pending(_config(args), quiet=False)
    if left:
        for p in left:
            log.warning("run %s: still pending for %s: %s", p.run_id, p.uri, p.describe())
        return 1
    log.info("nothing pending for MLflow")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    # The Kubeflow front end lives beside the library (pipeline/), not inside it.
    from cyclegan_kfp import cli as pipeline_cli

    if args.pipeline_command == "compile":
        pipeline_cli.compile_pipeline(args.output, image=args.image)
    elif args.pipeline_command == "run-local":
        variants = [v.split() for v in args.variants] or None
        pipeline_cli.run_local(_config(args), args.workdir, variants)
    else:
        pipeline_cli.submit(
            host=args.host,
            namespace=args.namespace,
            experiment=args.experiment,
            run_name=args.run_name,
            token=args.token,
            arguments=args.args,
        )
    return 0


# Commands that write in the project folder: one at a time (the project lock).
_WRITERS = {"prepare", "train", "evaluate", "register", "sync", "pipeline run-local"}
# Commands after which MLflow records kept from an outage are sent, if the server answers.
_SENDS_PENDING = {"prepare", "train", "evaluate", "register", "translate", "pipeline run-local"}


def _send_pending(cfg: Config, quiet: bool = True) -> list[Any]:
    """Send the project's spooled MLflow records if the server answers; what is left."""
    from cyclegan import spool, tracking

    folder = Paths().spool
    if not spool.spools(folder):
        return []
    uri = tracking.use(cfg.mlflow)
    if not tracking.is_reachable(uri):
        left = [s.pending() for s in spool.spools(folder)]
        for p in left:
            log.warning(
                "MLflow at %s is unreachable; run %s still has %s waiting in %s",
                redact(uri),
                p.run_id,
                p.describe(),
                folder,
            )
        return left
    return spool.replay_all(folder, uri, lambda: tracking.client(uri), quiet=quiet)


def _run(name: str, args: argparse.Namespace, handler: Callable[[], int]) -> int:
    from cyclegan.lock import project_lock

    has_params = hasattr(args, "overrides")
    if has_params:
        _config(args)  # bad parameters fail here, before anything is written
    rank0 = os.environ.get("RANK", "0") == "0"
    if name in _WRITERS and rank0:
        with project_lock(Paths().lock_file):
            if name in _SENDS_PENDING and has_params:
                _send_pending(_config(args))
            return handler()
    if name in _SENDS_PENDING and rank0 and has_params:
        _send_pending(_config(args))
    return handler()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cyclegan`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    name = args.command
    if name == "pipeline":
        name = f"pipeline {args.pipeline_command}"
    handlers: dict[str, Callable[[], int]] = {
        "prepare": lambda: cmd_prepare(args),
        "train": lambda: cmd_train(args),
        "evaluate": lambda: cmd_evaluate(args),
        "register": lambda: cmd_register(args),
        "translate": lambda: cmd_translate(args),
        "export": lambda: cmd_export(args),
        "params": lambda: cmd_params(args),
        "sync": lambda: cmd_sync(args),
    }
    handler = handlers.get(args.command) or (lambda: cmd_pipeline(args))
    main_thread = threading_is_main()
    if main_thread:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)  # training installs its own
    try:
        return _run(name, args, handler)
    except Stopped as e:
        if str(e) and os.environ.get("RANK", "0") == "0":  # rank 0 speaks for the job
            print(f"cyclegan {name}: {redact(str(e))}", file=sys.stderr)
        return e.exit_code
    except CycleGANError as e:
        print(f"cyclegan {name}: error: {redact(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"cyclegan {name}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"cyclegan {name}: stopped by SIGTERM", file=sys.stderr)
        return 143
    except Exception:
        # A bug: keep the traceback, but never print a credential that a message carried.
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1
    finally:
        if main_thread:
            # Done: a late SIGTERM (torchrun's agent stopping a rank that has already failed)
            # ends the process as usual instead of raising into the interpreter's exit.
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)


def threading_is_main() -> bool:
    """Signal handlers can only be installed from the main thread (not when embedded)."""
    import threading

    return threading.current_thread() is threading.main_thread()
