"""MLflow tracking shared by every stage: where the store is, and how calls reach it.

:func:`use` is the one place that resolves the tracking store - ``mlflow.tracking_uri`` in the
params, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db`` in the project folder - and
points MLflow's tracking *and* registry at it (``models:/`` URIs resolve through the registry
URI; left unset, MLflow opens a stray ``mlflow.db``). Every command and component calls it.

Training opens one run and writes its id to ``run.json`` in the model folder; evaluate and
register log into that same run. Metrics go out in batches (``MlflowClient.log_batch``; one
call per metric is ~100x slower) from a background thread, so a slow server never stalls a
step; what cannot be sent waits in the project's spool (:mod:`cyclegan.spool`) and goes out
when the server answers again.

Credentials never pass through here: MLflow and boto3 read them from the environment or the
URI, and every message, tag and file gets the URI through :func:`cyclegan.log.redact`.
"""

from __future__ import annotations

import base64
import fcntl
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
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from cyclegan.config import Config, MlflowConfig
from cyclegan.errors import TrackingError
from cyclegan.fsio import write_json
from cyclegan.log import redact, redact_logger
from cyclegan.spool import Pending, Spool

log = logging.getLogger("cyclegan.tracking")

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
_MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
_MAX_PARAMS = 100  # ... and on params per call
# MLflow's HTTP client retries a dead server for minutes by default (7 retries, backoff 2,
# 120 s timeout). The spool makes a lost call cheap, so fail fast instead; the user's own
# settings of these variables win.
# MLflow's client also prints "View run ... at: URL" to stdout when a run ends: the URL
# carries the URI's user:password, and stdout is where evaluate and register print JSON.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
_initialised: set[str] = set()


def tracking_uri(cfg: MlflowConfig) -> str:
    """``mlflow.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the project's SQLite
    file ``mlruns.db``.

    "The project" is the working directory, except in a DVC experiment run from the queue
    (``dvc exp run --queue``): DVC runs those in a temporary copy of the project and names the
    real one in ``$DVC_ROOT``, whose store the runs must land in to be compared there.
    """
    if cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return cfg.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    root = os.environ.get("DVC_ROOT")
    if root and Path(root).resolve() != Path.cwd().resolve():
        return f"sqlite:///{Path(root).resolve() / 'mlruns.db'}"
    return DEFAULT_TRACKING_URI


def use(cfg: MlflowConfig) -> str:
    """Resolve the tracking store of ``cfg`` and point MLflow at it (:func:`use_uri`)."""
    return use_uri(tracking_uri(cfg))


def use_uri(uri: str) -> str:
    """Point MLflow's tracking and registry URIs at ``uri`` (models:/ URIs resolve through the
    registry URI), bound MLflow's HTTP retries and, for a SQLite store, create its tables under
    a file lock, so two commands starting at once on a new store do not race (MLflow's
    migrations are not safe to run twice concurrently). Returns ``uri``. Idempotent."""
    import mlflow

    for k, v in _HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    redact_logger("mlflow")  # its own handler prints the URI (credentials included)
    if uri.startswith("sqlite:///") and uri not in _initialised:
        _init_sqlite(uri)
    _initialised.add(uri)
    return uri


def _init_sqlite(uri: str) -> None:
    db = Path(uri[len("sqlite:///") :])
    if not db.parent.is_dir():
        return  # ensure_reachable names the missing folder
    # flock on the database file itself: SQLite's own locks are fcntl byte ranges, which are
    # independent of flock on Linux, so this serialises store creation and nothing else.
    with open(db, "ab") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            c = client(uri)
            c.search_experiments(max_results=1)
            c.search_registered_models(max_results=1)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _auth_header(uri: str) -> dict[str, str]:
    """HTTP auth for ``uri`` the way MLflow's client sends it: user:password in the URI, or
    MLFLOW_TRACKING_USERNAME/PASSWORD, or MLFLOW_TRACKING_TOKEN."""
    p = urlparse(uri)
    user = unquote(p.username) if p.username else os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = unquote(p.password) if p.password else os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return {}


def _without_userinfo(uri: str) -> str:
    p = urlparse(uri)
    netloc = p.hostname or ""
    if p.port:
        netloc += f":{p.port}"
    return p._replace(netloc=netloc).geturl()


def ensure_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the URI, if the tracking store cannot be used: every command
    checks before any work (MLflow's own client would retry for minutes)."""
    p = urlparse(uri)
    if p.scheme in ("http", "https"):
        url = _without_userinfo(uri).rstrip("/") + "/health"
        req = urllib.request.Request(url, headers=_auth_header(uri))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                if r.status >= 400:
                    raise TrackingError(f"MLflow server {redact(uri)} answered {r.status}")
        except urllib.error.HTTPError as e:
            raise TrackingError(
                f"MLflow server {redact(uri)} answered {e.code} {e.reason}",
                "check the URI and the credentials (MLFLOW_TRACKING_USERNAME/PASSWORD)",
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} is unreachable ({redact(str(reason))})",
                "start it, or set MLFLOW_TRACKING_URI / mlflow.tracking_uri to a reachable one",
            ) from None
    elif p.scheme == "sqlite":
        db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if db is not None and not db.parent.exists():
            raise TrackingError(
                f"MLflow store {uri}: folder {db.parent} does not exist",
                "create it, or set mlflow.tracking_uri",
            )
    elif p.scheme in ("databricks", "file", "") or p.scheme.startswith(("postgresql", "mysql")):
        return
    else:
        raise TrackingError(
            f"unsupported MLflow tracking URI {redact(uri)!r}",
            "use http(s)://, sqlite:///, postgresql://, mysql:// or databricks",
        )


def is_reachable(uri: str, timeout: float = 3.0) -> bool:
    """:func:`ensure_reachable` as a yes/no."""
    try:
        ensure_reachable(uri, timeout)
    except TrackingError:
        return False
    return True


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return redact(text)[:200]


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
        return c.create_experiment(
            name,
            artifact_location=_artifact_location(c.tracking_uri),
            tags={"mlflow.experimentKind": "custom_model_development"},
        )
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts in ``mlruns/`` beside the database file (absolute). MLflow
    would put them under the *working directory* of whichever process creates the experiment:
    a container's own folder, or a DVC queue's temporary copy of the project, both deleted
    afterwards, while the registry keeps pointing at them. Servers decide for themselves."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :]).resolve()
    return (db.parent / "mlruns").as_uri()


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
    write_json(
        path, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": redact(uri)}
    )


def read_run_file(path: str | Path) -> dict[str, str] | None:
    """The training run recorded by :func:`write_run_file`, or None if there is none (or it
    is unreadable: a later stage then opens a run of its own, with a warning)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError, UnicodeDecodeError):
        log.warning("%s is not readable JSON; ignoring it", path)
        return None
    return data if isinstance(data, dict) else None


def run_link(uri: str, run: Mapping[str, str]) -> str:
    """Where a person finds the run: its page in the MLflow UI for a server, else the run id
    and the store (open with ``mlflow ui --backend-store-uri ...``)."""
    run_id, exp = run.get("run_id"), run.get("experiment_id")
    if not run_id:
        return "none (no MLflow run was recorded)"
    if uri.startswith(("http://", "https://")) and exp:
        return f"{redact(uri).rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
    return f"run `{run_id}` in `{redact(uri)}`"


def params_of(cfg: Config, data_params: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every parameter as an MLflow param (flattened ``section.key``), values as strings.

    ``data_params`` (the ``data`` section that ``prepare`` recorded in the dataset's manifest)
    replace this config's own ``data.*``: a run is described by the data it really used.
    """
    flat = cfg.flat()
    if data_params:
        flat = {k: v for k, v in flat.items() if not k.startswith("data.")}
        flat.update(_flatten_prefixed(data_params, "data."))
    return {k: "" if v is None else str(v) for k, v in flat.items()}


def _flatten_prefixed(d: Mapping[str, Any], prefix: str) -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _flatten_prefixed(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def log_params(c: Any, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches of MLflow's maximum size."""
    from mlflow.entities import Param

    items = [Param(k, redact(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), _MAX_PARAMS):
        chunk = items[i : i + _MAX_PARAMS]
        c.log_batch(run_id, params=chunk)


def open_run(c: Any, run_id: str | None) -> Any | None:
    """The run ``run_id`` if this store has it and it is not deleted, else None: the one
    rule for "log into the run that training opened, or start a new one"."""
    if not run_id:
        return None
    try:
        run = c.get_run(run_id)
    except Exception:  # not in this store (another server, a wiped database)
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


def stage_run(c: Any, cfg: Config, paths: Any, stage: str) -> tuple[str, bool]:
    """The run a later stage (evaluate, register) logs into: training's, from ``run.json``,
    if this store has it; else a new run named after the stage (with a warning). Returns the
    run id and whether it was created here (the caller then ends it)."""
    info = read_run_file(paths.run_file) or {}
    run_id = info.get("run_id")
    if open_run(c, run_id) is not None:
        return str(run_id), False
    if run_id:
        log.warning(
            "run %s from %s is not in the MLflow store %s (or deleted); the %s is logged to a "
            "new run",
            run_id,
            paths.run_file,
            redact(tracking_uri(cfg.mlflow)),
            stage,
        )
    else:
        log.warning("no %s: the %s is logged to a new MLflow run", paths.run_file, stage)
    exp_id = get_or_create_experiment(c, cfg.mlflow.experiment)
    tags = {**provenance_tags(paths.prepared), "cyclegan.stage": stage}
    run = c.create_run(exp_id, tags=tags, run_name=stage)
    return run.info.run_id, True


def log_or_spool(
    c: Any,
    run_id: str,
    spool: Spool,
    *,
    metrics: Iterable[tuple[str, float, int, int]] = (),
    tags: Mapping[str, str] | None = None,
    files: Iterable[tuple[str | Path, str | None]] = (),
) -> bool:
    """Log metrics ``(key, value, timestamp_ms, step)``, tags and file uploads into a run now;
    whatever fails from the first failure on is kept in ``spool`` instead. True if all was
    sent. For one-shot logging (evaluate); training uses :class:`BackgroundLogger`."""
    from mlflow.entities import Metric, RunTag

    metrics, files = list(metrics), list(files)
    tags = {k: redact(v) for k, v in (tags or {}).items()}
    try:
        if c is None:
            raise TrackingError(f"{redact(spool.uri)} is unreachable")
        if not spool.empty():
            raise TrackingError("older records of this run are still waiting")
        for i in range(0, max(len(metrics), 1), _MAX_BATCH):
            c.log_batch(
                run_id,
                metrics=[Metric(*m) for m in metrics[i : i + _MAX_BATCH]],
                tags=[RunTag(k, v) for k, v in tags.items()] if i == 0 else [],
            )
        metrics, tags = [], {}
        while files:
            local, artifact_path = files[0]
            local = Path(local)
            if local.is_dir():
                c.log_artifacts(run_id, str(local), artifact_path)
            elif local.is_file():
                c.log_artifact(run_id, str(local), artifact_path)
            files.pop(0)
        return True
    except Exception as e:
        log.warning(
            "MLflow: could not log to run %s (%s); kept in %s until the server answers",
            run_id,
            _short(e),
            spool.folder,
        )
        if metrics or tags:
            spool.log_batch(metrics, tags=dict(tags))
        for local, artifact_path in files:
            spool.upload(local, artifact_path)
        return False


class BackgroundLogger:
    """Sends a run's metrics, uploads and final status from one thread, in order.

    The training loop only enqueues, so a slow or lost tracking server never stalls a step.
    What cannot be sent goes to the run's :class:`~cyclegan.spool.Spool`; while the server is
    down, new items go straight there and the server is probed every ``probe_every``
    seconds; once it answers, the spool is replayed and logging carries on directly.
    """

    def __init__(
        self,
        c: Any,
        run_id: str,
        spool: Spool,
        uri: str,
        probe_every: float = 10.0,
    ) -> None:
        self.client, self.run_id, self.spool, self.uri = c, run_id, spool, uri
        self.probe_every = probe_every
        self.healthy = spool.empty()
        self._last_probe = 0.0 if self.healthy else time.monotonic() - probe_every
        self._metrics: list[tuple[str, float, int, int]] = []
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    # -- what the training loop calls ---------------------------------------------------------

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        """Queue metric values for ``step`` (timestamped now)."""
        ts = int(time.time() * 1000)
        self._queue.put(("metrics", [(k, float(v), ts, int(step)) for k, v in values.items()]))

    def log_artifacts(
        self, pairs: Iterable[tuple[str | Path, str | None]], remove_after: bool = False
    ) -> None:
        """Queue uploads of ``(local_path, artifact_dir)``; with ``remove_after`` the local
        files are temporary copies, deleted once sent (or moved into the spool)."""
        self._queue.put(("artifacts", (list(pairs), remove_after)))

    def terminate(self, status: str) -> None:
        """Queue the run's end (FINISHED, FAILED or KILLED), stamped now."""
        self._queue.put(("terminate", (status, int(time.time() * 1000))))

    def close(self, timeout: float = 600.0) -> Pending | None:
        """Send everything queued, then stop. Returns what is left in the spool (None when
        everything reached the server)."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            # A call hangs (a server that accepts but does not answer): keep everything still
            # queued in the spool instead of waiting for it, so a stop stays within a pod's
            # grace period and nothing queued is lost.
            self.healthy = False
            kept = self._spool_queued()
            log.warning(
                "MLflow did not finish sending within %.0fs; %d queued item(s) kept in %s",
                timeout,
                kept,
                self.spool.folder,
            )
        return None if self.spool.empty() else self.spool.pending()

    def _spool_queued(self) -> int:
        n = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return n
            if item is None:
                continue
            kind, payload = item
            n += 1
            if kind == "metrics":
                self.spool.log_batch(payload)
            elif kind == "artifacts":
                pairs, remove_after = payload
                for local, artifact_path in pairs:
                    self.spool.upload(local, artifact_path, move=remove_after)
            else:
                self.spool.terminate(*payload)

    # -- the thread --------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.probe_every)
            except queue.Empty:
                self._recover()
                continue
            if item is None:
                self._flush_metrics()
                self._recover(force=True)
                return
            kind, payload = item
            if kind == "metrics":
                self._metrics.extend(payload)
                if self._queue.empty():  # batch whatever piled up while we were busy
                    self._flush_metrics()
            else:
                self._flush_metrics()  # keep the order: metrics before what follows them
                if kind == "artifacts":
                    self._upload(*payload)
                else:
                    self._terminate(*payload)
            self._recover()

    def _attempt(self, fn: Callable[[], Any], what: str) -> bool:
        if not self.healthy:
            return False
        try:
            fn()
            return True
        except Exception as e:  # MLflow raises many types for a lost server
            self.healthy = False
            self._last_probe = time.monotonic()
            log.warning(
                "MLflow %s failed (%s); keeping it and what follows in %s until the server answers",
                what,
                _short(e),
                self.spool.folder,
            )
            return False

    def _flush_metrics(self) -> None:
        from mlflow.entities import Metric

        if not self._metrics:
            return
        batch, self._metrics = self._metrics, []

        def send() -> None:
            for i in range(0, len(batch), _MAX_BATCH):
                chunk = [Metric(k, v, ts, st) for k, v, ts, st in batch[i : i + _MAX_BATCH]]
                self.client.log_batch(self.run_id, metrics=chunk)

        if not self._attempt(send, "log metrics"):
            self.spool.log_batch(batch)

    def _upload(self, pairs: list[tuple[str | Path, str | None]], remove_after: bool) -> None:
        for local, artifact_path in pairs:
            local = Path(local)
            if not local.exists():
                continue
            fn: Callable[..., Any] = (
                self.client.log_artifacts if local.is_dir() else self.client.log_artifact
            )
            sent = self._attempt(
                partial(fn, self.run_id, str(local), artifact_path), f"upload of {local.name}"
            )
            if not sent:
                self.spool.upload(local, artifact_path, move=remove_after)
            elif remove_after:
                local.unlink(missing_ok=True)

    def _terminate(self, status: str, end_ms: int) -> None:
        if not self._attempt(
            lambda: self.client.set_terminated(self.run_id, status, end_ms), "end of run"
        ):
            self.spool.terminate(status, end_ms)

    def _recover(self, force: bool = False) -> None:
        """While unhealthy: probe the server now and then; when it answers, replay."""
        if self.healthy:
            return
        if not force and time.monotonic() - self._last_probe < self.probe_every:
            return
        self._last_probe = time.monotonic()
        if is_reachable(self.uri) and self.spool.replay(self.client):
            self.healthy = True
            log.info("MLflow at %s answers again; the kept records were sent", redact(self.uri))


# ---------------------------------------------------------------------------------------------
# The training run: opened (or resumed) by rank 0, fed by the loop, ended with a status
# ---------------------------------------------------------------------------------------------


def run_name(cfg: Config, manifest: Mapping[str, Any]) -> str:
    """A name a person can tell runs apart by: ``mlflow.run_name``, else the DVC experiment's
    name, else ``<dataset> <netG> lr=<lr> <date time>``."""
    if cfg.mlflow.run_name:
        return cfg.mlflow.run_name
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    dataset = dataset_name(manifest)
    tc = cfg.train
    return f"{dataset} {tc.netG} lr={tc.lr:g} {time.strftime('%Y-%m-%d %H:%M:%S')}"


def read_manifest(prepared: str | Path) -> dict[str, Any]:
    """``manifest.json`` of the prepared dataset, or {} if there is none."""
    path = Path(prepared) / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def dataset_name(manifest: Mapping[str, Any]) -> str:
    """The dataset's short name: ``synthetic``, a known dataset's name, a folder's name..."""
    source = manifest.get("source") or {}
    spec = str(source.get("spec") or "unknown")
    name = spec.rstrip("/").rsplit("/", 1)[-1] or spec
    for suffix in (".tar.gz", ".tgz", ".zip", ".tar"):
        name = name.removesuffix(suffix)
    return redact(name) or "dataset"


def data_params(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data.*`` parameters that prepare really used (source and preparation)."""
    source = manifest.get("source") or {}
    if not source:
        return {}
    return {"source": redact(str(source.get("spec", ""))), **(manifest.get("params") or {})}


def dataset_input(manifest: Mapping[str, Any], prepared: str | Path, version: str) -> Any | None:
    """An MLflow dataset entity for the runs table's Dataset column: name, DVC hash
    (``version``, the run's data_version tag), source, and the split counts as its profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    if not manifest:
        return None
    source = manifest.get("source") or {}
    digest = version.partition(":")[2][:36] or version[:36]
    counts = manifest.get("counts") or {}
    dataset = Dataset(
        name=dataset_name(manifest),
        digest=digest,
        source_type=str(source.get("kind", "local")),
        source=json.dumps({"uri": redact(str(source.get("spec", ""))), "prepared": str(prepared)}),
        profile=json.dumps({"num_images": sum(counts.values()), **counts}),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


class TrainingRun:
    """Rank 0's MLflow run: every parameter, the provenance tags, the dataset, system
    metrics, and a :class:`BackgroundLogger` for what the loop produces."""

    def __init__(self, c: Any, run_id: str, experiment_id: str, uri: str, spool: Spool) -> None:
        import tempfile

        self.client, self.run_id, self.experiment_id, self.uri = c, run_id, experiment_id, uri
        self.logger = BackgroundLogger(c, run_id, spool, uri)
        self.tmpdir = tempfile.TemporaryDirectory(prefix="cyclegan-samples-")
        self.monitor: Any = None

    @property
    def ids(self) -> dict[str, str]:
        """What a checkpoint records to resume into the same run."""
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": redact(self.uri),
        }

    @classmethod
    def open(
        cls, cfg: Config, paths: Any, uri: str, previous: Mapping[str, str], fingerprint: str
    ) -> TrainingRun:
        """A new run, or - resuming - the run the checkpoint names if this store has it."""
        c = client(uri)
        exp_id = get_or_create_experiment(c, cfg.mlflow.experiment)
        existing = open_run(c, previous.get("run_id"))
        if previous.get("run_id") and existing is None:
            log.warning(
                "MLflow run %s of the checkpoint is not in %s; starting a new run",
                previous["run_id"],
                redact(uri),
            )
        manifest = read_manifest(paths.prepared)
        provenance = provenance_tags(paths.prepared)
        commit = provenance["git_commit"]
        tags = {
            **provenance,
            "cyclegan.fingerprint": fingerprint,
            "mlflow.source.name": "cyclegan train",
            "mlflow.source.type": "JOB" if os.environ.get("KFP_POD_NAME") else "LOCAL",
            "mlflow.user": os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown",
        }
        if commit != "unknown":
            tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
        params = params_of(cfg, data_params(manifest))
        if existing is None:
            run = c.create_run(exp_id, run_name=run_name(cfg, manifest), tags=tags)
            run_id, resumed = run.info.run_id, False
            log_params(c, run_id, params)
            inputs = dataset_input(manifest, paths.prepared, provenance["data_version"])
            if inputs is not None:
                c.log_inputs(run_id, datasets=[inputs])
        else:
            run_id, exp_id, resumed = existing.info.run_id, existing.info.experiment_id, True
            c.update_run(run_id, status="RUNNING")
            c.log_batch(run_id, tags=[_tag(k, v) for k, v in tags.items()])
            # MLflow refuses to change a logged param: add only new ones (the changed ones
            # are bookkeeping settings outside the fingerprint, e.g. log_every).
            old = existing.data.params
            log_params(c, run_id, {k: v for k, v in params.items() if k not in old})
        log.info("MLflow run %s in %s", run_id, redact(uri))
        self = cls(c, run_id, exp_id, uri, Spool(paths.spool, run_id, uri))
        if cfg.mlflow.system_metrics:
            self.monitor = _system_metrics(run_id, uri, resumed)
        return self

    def end(self, status: str) -> None:
        """End the run with ``status``: stop system metrics, send everything queued; what
        could not be sent is kept in the spool, and the user is told."""
        self.logger.terminate(status)  # queued first: it must not wait for the monitor
        if self.monitor is not None:
            # Its finish() joins a thread that may sit in a call to a dead server: bounded.
            stopper = threading.Thread(target=self._finish_monitor, daemon=True)
            stopper.start()
            stopper.join(10.0)
        # A stop (KILLED, or FAILED) must fit in a pod's grace period (30 s by default): what
        # a hanging server has not taken by then waits in the spool.
        pending = self.logger.close(timeout=600.0 if status == "FINISHED" else 10.0)
        self.tmpdir.cleanup()
        if pending is not None:
            log.warning(
                "MLflow at %s did not answer: %s of run %s wait in %s and are sent by the next "
                "cyclegan command in this folder (or `cyclegan sync`)",
                redact(self.uri),
                pending.describe(),
                self.run_id,
                self.logger.spool.folder,
            )

    def _finish_monitor(self) -> None:
        try:
            self.monitor.finish()
        except Exception as e:  # the monitor's own last upload to a dead server
            log.debug("system metrics monitor: %s", e)


def _tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(key, redact(str(value)))


def _system_metrics(run_id: str, uri: str, resumed: bool) -> Any | None:
    """MLflow's system metrics monitor (CPU, memory, disk, network; GPU with nvidia-ml-py)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, tracking_uri=uri, resume_logging=resumed)
        monitor.start()
        return monitor
    except Exception as e:  # psutil missing, or the server gone already
        log.warning("system metrics are not recorded (%s)", _short(e))
        return None
