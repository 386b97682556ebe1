"""One logging configuration for every entry point: quiet by default, rank 0 only."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

# user:password@ (or token@) in any URI, and secret-looking query parameters.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(
    r"([?&][^=&\s]*(?:token|password|passwd|secret|signature|credential|key)[^=&\s]*=)[^&\s]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with credentials removed from every URI in it: ``https://alice:pw@host`` ->
    ``https://***@host``; ``?token=abc`` -> ``?token=***``. Used for every message, log line,
    MLflow tag and file that may hold a URI (the URI itself still connects with them)."""
    if "://" not in text and "=" not in text:
        return text
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def redact_values(obj: Any) -> Any:
    """``obj`` (nested dicts and lists) with :func:`redact` applied to every string in it:
    for what is written to files, e.g. a config whose data.source is a signed URL."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_values(v) for v in obj)
    return obj


class _RedactFilter(logging.Filter):
    """Redacts every record our handler prints, whichever library logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a library's broken format string: print it as it is
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact_logger(name: str) -> None:
    """Redact what a library prints through handlers of its own: MLflow gives its "mlflow"
    logger its own stderr handler (not propagating to ours) when it is imported, and its
    warnings name the tracking URI, user:password included."""
    for handler in logging.getLogger(name).handlers:
        if not any(isinstance(f, _RedactFilter) for f in handler.filters):
            handler.addFilter(_RedactFilter())


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
    handler.addFilter(_RedactFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if not verbose else logging.INFO)
    logging.getLogger("cyclegan").setLevel(level)
    # MLflow and friends are chatty at INFO; keep them at WARNING unless debugging. MLflow
    # configures its loggers when it is first imported (later, lazily): tell it through its
    # own variable too.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if verbose > 1 else "WARNING")
    for noisy in ("mlflow", "alembic", "urllib3", "botocore", "git", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


def progress_enabled() -> bool:
    """Progress bars only on rank 0 and only on a terminal; plain periodic lines otherwise."""
    return is_main_process() and sys.stderr.isatty()
