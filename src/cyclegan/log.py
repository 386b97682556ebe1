"""One logging configuration for every entry point: quiet by default, rank 0 only."""

from __future__ import annotations

import logging
import os
import sys


def rank() -> int:
    """This process's global rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0, the only rank that logs and writes files."""
    return rank() == 0


def setup_logging(verbose: int = 0) -> None:
    """INFO for our messages (DEBUG with -v), WARNING for libraries; silent on ranks > 0
    except for errors, so a failing rank still says why."""
    level = logging.DEBUG if verbose else logging.INFO
    if not is_main_process():
        level = logging.ERROR
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
    if not is_main_process():
        fmt = f"[rank {rank()}] " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if not verbose else logging.INFO)
    logging.getLogger("cyclegan").setLevel(level)
    # MLflow and friends are chatty at INFO; keep them at WARNING unless debugging.
    for noisy in ("mlflow", "alembic", "urllib3", "botocore", "git", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


def progress_enabled() -> bool:
    """Progress bars only on rank 0 and only on a terminal; plain periodic lines otherwise."""
    return is_main_process() and sys.stderr.isatty()
