"""MLflow tracking shared by every stage.

Training opens one run and writes its id to ``run.json`` in the model folder; evaluate and
register log into that same run. Metrics go out in batches (``MlflowClient.log_batch``; one
call per metric is ~100x slower), and a tracking server lost mid-run never kills training:
calls are retried, failures are warned about, and what could not be sent is reported at the
end.

Credentials never pass through here: MLflow and boto3 read them from the environment, and
nothing from the environment is logged as a parameter or tag.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from cyclegan.config import Config, MlflowConfig
from cyclegan.errors import TrackingError

log = logging.getLogger("cyclegan.tracking")
T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
_MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
_MAX_PARAMS = 100  # ... and on params per call


def tracking_uri(cfg: MlflowConfig) -> str:
    """``mlflow.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the local SQLite."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def redact_uri(uri: str) -> str:
    """The URI without any user:password part, for messages and tags."""
    p = urlparse(uri)
    if p.password or p.username:
        netloc = p.hostname or ""
        if p.port:
            netloc += f":{p.port}"
        return p._replace(netloc=netloc).geturl()
    return uri


def ensure_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail before any work if the tracking store cannot be used, naming the URI."""
    p = urlparse(uri)
    if p.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status >= 400:
                    raise TrackingError(f"MLflow server {redact_uri(uri)} answered {r.status}")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {redact_uri(uri)} is unreachable ({reason})",
                "start it, or set MLFLOW_TRACKING_URI / mlflow.tracking_uri to a reachable one",
            ) from None
    elif p.scheme == "sqlite":
        db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if db is not None and not db.parent.exists():
            raise TrackingError(f"MLflow store {uri}: folder {db.parent} does not exist")
    elif p.scheme in ("databricks", "file", "") or p.scheme.startswith(("postgresql", "mysql")):
        return
    else:
        raise TrackingError(f"unsupported MLflow tracking URI {redact_uri(uri)!r}")


def with_retry(fn: Callable[[], T], what: str, attempts: int = 4, base_delay: float = 1.0) -> T:
    """Call ``fn``; on a network/server error retry with exponential backoff, then re-raise."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # MLflow raises many types for a lost server
            if i == attempts - 1:
                raise
            delay = base_delay * 2**i
            log.warning("MLflow %s failed (%s); retrying in %.0fs", what, _short(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (imported lazily: mlflow is slow to import)."""
    from mlflow.tracking import MlflowClient

    # The registry URI too: otherwise registry calls go to the process-wide default store.
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_or_create_experiment(c: Any, name: str) -> str:
    """The experiment id for ``name``, creating the experiment if needed."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        # Tell the MLflow 3 UI this is model training, not GenAI: it then opens on the runs
        # table (losses, FID, compare) instead of the traces overview.
        return c.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------------------------------------
# Provenance tags
# ---------------------------------------------------------------------------------------------


def git_commit(cwd: str | Path = ".") -> str:
    """The current commit (with ``-dirty`` if the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return os.environ.get("GIT_COMMIT", "unknown")
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIT_COMMIT", "unknown")


def data_version(prepared: str | Path, dvc_lock: str | Path = "dvc.lock") -> str:
    """DVC's hash of the prepared data (from ``dvc.lock``), else a hash of its manifest.

    Under ``dvc repro`` the prepare stage's entry in dvc.lock names the exact data version;
    elsewhere (Kubeflow) the manifest's sha256 identifies the same content.
    """
    prepared = Path(prepared)
    lock = Path(dvc_lock)
    if lock.is_file():
        try:
            import yaml

            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
            for out in stages.get("prepare", {}).get("outs", []):
                if Path(out.get("path", "")) == prepared and out.get("md5"):
                    return f"dvc:{out['md5']}"
        except Exception as e:  # a malformed lock must not stop training
            log.debug("could not read %s: %s", lock, e)
    manifest = prepared / "manifest.json"
    if manifest.is_file():
        return "manifest:" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:32]
    return "unknown"


def provenance_tags(prepared: str | Path) -> dict[str, str]:
    """The contract's tags: git_commit, data_version, dvc_exp_name."""
    return {
        "git_commit": git_commit(),
        "data_version": data_version(prepared),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
    }


# ---------------------------------------------------------------------------------------------
# The run file: training's run, reused by evaluate and register
# ---------------------------------------------------------------------------------------------


def write_run_file(path: str | Path, run_id: str, experiment_id: str, uri: str) -> None:
    """Record the training run so later stages log into it (no credentials in the URI)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": redact_uri(uri)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_run_file(path: str | Path) -> dict[str, str] | None:
    """The training run recorded by :func:`write_run_file`, or None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def params_of(cfg: Config) -> dict[str, str]:
    """Every parameter as an MLflow param (flattened ``section.key``), values as strings."""
    return {k: "" if v is None else str(v) for k, v in cfg.flat().items()}


def log_params(c: Any, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches of MLflow's maximum size."""
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), _MAX_PARAMS):
        chunk = items[i : i + _MAX_PARAMS]
        with_retry(lambda chunk=chunk: c.log_batch(run_id, params=chunk), "log params")


class MetricBuffer:
    """Collects ``(step, name, value)`` and sends them in batches.

    ``flush()`` never raises: if the server is gone the metrics stay buffered (bounded) and
    the next flush retries; :meth:`close` reports anything finally lost.
    """

    def __init__(self, c: Any, run_id: str, max_buffer: int = 200_000) -> None:
        self._client, self._run_id = c, run_id
        self._pending: list[Any] = []
        self._max = max_buffer
        self.dropped = 0
        self.failures = 0

    def add(self, step: int, values: Mapping[str, float], timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), ts, int(step)) for k, v in values.items())
        overflow = len(self._pending) - self._max
        if overflow > 0:  # keep the newest; a dead server must not eat all memory
            del self._pending[:overflow]
            self.dropped += overflow

    @property
    def pending(self) -> int:
        """Metric values not sent yet."""
        return len(self._pending)

    def flush(self) -> bool:
        """Send what is pending; True if everything went out."""
        while self._pending:
            chunk = self._pending[:_MAX_BATCH]
            try:
                with_retry(
                    lambda chunk=chunk: self._client.log_batch(self._run_id, metrics=chunk),
                    "log metrics",
                    attempts=2,
                    base_delay=0.5,
                )
            except Exception as e:
                self.failures += 1
                log.warning(
                    "MLflow unreachable; %d metric values kept to send later (%s)",
                    len(self._pending),
                    _short(e),
                )
                return False
            del self._pending[: len(chunk)]
        return True

    def close(self) -> None:
        """Final flush (with a longer retry); warn about anything that could not be sent."""
        if self._pending:
            try:
                with_retry(self._final_flush, "final metric flush", attempts=5)
            except Exception as e:
                self.dropped += len(self._pending)
                log.warning(
                    "could not send %d metric values to MLflow (%s)", len(self._pending), _short(e)
                )
                self._pending.clear()
        if self.dropped:
            log.warning("%d metric values were not recorded in MLflow", self.dropped)

    def _final_flush(self) -> None:
        if not self.flush():
            raise TrackingError("metrics still pending")


def log_artifacts_safely(
    c: Any, run_id: str, paths: Iterable[tuple[str | Path, str | None]]
) -> int:
    """Upload ``(local_path, artifact_dir)`` pairs with retries; warn (not raise) on failure.

    Returns the number of uploads that failed.
    """
    failed = 0
    for local, artifact_path in paths:
        local = Path(local)
        if not local.exists():
            continue
        fn = c.log_artifacts if local.is_dir() else c.log_artifact
        try:
            with_retry(
                lambda fn=fn, local=local, ap=artifact_path: fn(run_id, str(local), ap),
                f"upload {local.name}",
            )
        except Exception as e:
            failed += 1
            log.warning("could not upload %s to MLflow (%s)", local, _short(e))
    return failed


class BackgroundLogger:
    """Sends metrics, artifacts and other MLflow calls from one daemon thread, in order.

    The training loop only enqueues, so a slow or lost tracking server (MLflow's own HTTP
    retries can block a call for minutes) never stalls a step. :meth:`close` waits for the
    queue to drain - long while the server answers, briefly once it has stopped answering -
    and reports what could not be sent.
    """

    def __init__(self, c: Any, run_id: str) -> None:
        self.client, self.run_id = c, run_id
        self.metrics = MetricBuffer(c, run_id)
        self.failed_uploads = 0
        self.failed_calls = 0
        self.healthy = True
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        """Queue metric values for ``step`` (timestamped now)."""
        self._queue.put(("metrics", (int(step), dict(values), int(time.time() * 1000))))

    def log_artifacts(
        self, pairs: Iterable[tuple[str | Path, str | None]], remove_after: bool = False
    ) -> None:
        """Queue uploads of ``(local_path, artifact_dir)``; optionally delete the local files
        once sent (for temporary copies)."""
        self._queue.put(("artifacts", (list(pairs), remove_after)))

    def call(self, fn: Callable[[], Any], what: str) -> None:
        """Queue any other client call (e.g. ending the run), retried like the rest."""
        self._queue.put(("call", (fn, what)))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self.metrics.close()
                return
            kind, payload = item
            if kind == "metrics":
                step, values, ts = payload
                self.metrics.add(step, values, ts)
                if self._queue.empty():  # batch whatever piled up while we were busy
                    self.healthy = self.metrics.flush()
            elif kind == "artifacts":
                pairs, remove_after = payload
                failed = log_artifacts_safely(self.client, self.run_id, pairs)
                self.failed_uploads += failed
                self.healthy = failed == 0
                if remove_after:
                    for local, _ in pairs:
                        Path(local).unlink(missing_ok=True)
            else:
                fn, what = payload
                try:
                    with_retry(fn, what)
                    self.healthy = True
                except Exception as e:
                    self.failed_calls += 1
                    self.healthy = False
                    log.warning("MLflow %s failed (%s)", what, _short(e))

    def close(self, timeout: float = 600.0, unhealthy_timeout: float = 30.0) -> dict[str, int]:
        """Send everything still queued, then stop. Waits up to ``timeout`` seconds, or
        ``unhealthy_timeout`` once the server has failed to answer. Returns what was lost."""
        self._queue.put(None)
        start = time.monotonic()
        while self._thread.is_alive():
            waited = time.monotonic() - start
            if waited > timeout or (not self.healthy and waited > unhealthy_timeout):
                log.warning(
                    "MLflow still not answering after %.0fs; giving up on %d queued items",
                    waited,
                    self._queue.qsize(),
                )
                return {
                    "metrics_lost": self.metrics.dropped + self.metrics.pending,
                    "uploads_failed": self.failed_uploads,
                    "calls_failed": self.failed_calls,
                    "abandoned": self._queue.qsize(),
                }
            self._thread.join(0.2)
        return {
            "metrics_lost": self.metrics.dropped,
            "uploads_failed": self.failed_uploads,
            "calls_failed": self.failed_calls,
            "abandoned": 0,
        }
