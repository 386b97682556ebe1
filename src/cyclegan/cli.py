"""The ``cyclegan`` command: a thin front end that parses arguments and calls the library.

Stages (each reads ``params.yaml`` or ``--params FILE`` plus ``--set section.key=value``)::

    cyclegan prepare | train | evaluate | register
    cyclegan translate --model M --direction A2B --input DIR --output DIR
    cyclegan pipeline compile | run-local | submit
    cyclegan params            # every parameter with its default and meaning
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cyclegan import __version__
from cyclegan.config import Config, describe_parameters, load_config
from cyclegan.errors import CycleGANError, NotAvailableError
from cyclegan.log import setup_logging
from cyclegan.paths import Paths

log = logging.getLogger("cyclegan")


def _lazy(module: str, attr: str, issue: str) -> Callable[..., Any]:
    """Import a stage implementation on first use, so ``cyclegan --help`` stays instant and a
    stage that has not landed yet says so instead of failing with an ImportError."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise NotAvailableError(
                f"this command is not available yet ({module} is missing)", f"see {issue}"
            ) from None
        raise
    if not hasattr(mod, attr):
        raise NotAvailableError(f"this command is not available yet ({module}.{attr})", issue)
    return getattr(mod, attr)


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

    p = sub.add_parser("params", help="list every parameter with its default and meaning")

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
    return load_config(args.params, args.overrides, required=args.params is not None)


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
    cfg = _config(args)
    prepare = _lazy("cyclegan.data.prepare", "prepare", "the data issue")
    prepare(cfg, _paths(args))
    return 0


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    cfg = _config(args)
    launch = _lazy("cyclegan.train.launch", "launch_if_needed", "the training issue")
    code = launch(cfg, argv)
    if code is not None:  # torchrun was started and has finished
        return code
    train = _lazy("cyclegan.train.trainer", "train", "the training issue")
    train(cfg, _paths(args))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    evaluate = _lazy("cyclegan.evaluate.evaluate", "evaluate", "the evaluation issue")
    _print_json(evaluate(cfg, _paths(args)))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    cfg = _config(args)
    register = _lazy("cyclegan.registry", "register", "the evaluation issue")
    _print_json(register(cfg, _paths(args)))
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    translate = _lazy("cyclegan.translate", "translate", "the evaluation issue")
    translate(
        args.model,
        direction=args.direction,
        input_path=args.input,
        output_dir=args.output,
        device=args.device,
        batch_size=args.batch_size,
    )
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    # The Kubeflow front end lives beside the library (pipeline/), not inside it.
    if args.pipeline_command == "compile":
        fn = _lazy("pipeline.cli", "compile_pipeline", "the Kubeflow issue")
        fn(args.output, image=args.image)
    elif args.pipeline_command == "run-local":
        fn = _lazy("pipeline.cli", "run_local", "the Kubeflow issue")
        fn(_config(args), args.workdir)
    else:
        fn = _lazy("pipeline.cli", "submit", "the Kubeflow issue")
        fn(
            host=args.host,
            namespace=args.namespace,
            experiment=args.experiment,
            run_name=args.run_name,
            token=args.token,
            arguments=args.args,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cyclegan`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.command == "params":
            print(describe_parameters())
            return 0
        if args.command == "train":
            return cmd_train(args, argv)
        handlers = {
            "prepare": cmd_prepare,
            "evaluate": cmd_evaluate,
            "register": cmd_register,
            "translate": cmd_translate,
            "pipeline": cmd_pipeline,
        }
        return handlers[args.command](args)
    except CycleGANError as e:
        print(f"cyclegan {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"cyclegan {args.command}: interrupted", file=sys.stderr)
        return 130
