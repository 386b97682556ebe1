"""MLflow calls that could not be sent, kept on disk until the server answers again.

A tracking server lost mid-run must not lose the run's record. Whatever could not be sent
(metrics, params, tags, artifact uploads - the model folder included - and the run's final
status) is appended to ``.cyclegan/spool/<run_id>.jsonl`` in the project folder, with copies
of the files to upload beside it. The spool is replayed, in order, as soon as the server
answers: by the training's own logger during the run, or by the next ``cyclegan`` command
in that folder (or ``cyclegan sync``).

The spool holds the tracking URI without credentials; a replay uses the URI (and credentials)
of the command that replays it, and only for spools recorded against the same server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cyclegan.fsio import atomic_write
from cyclegan.log import redact

log = logging.getLogger("cyclegan.tracking")

_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100  # MLflow's limits per log_batch


@dataclass
class Pending:
    """What one run's spool still holds."""

    run_id: str
    uri: str
    metrics: int = 0
    params: int = 0
    tags: int = 0
    uploads: int = 0
    status: str | None = None

    def describe(self) -> str:
        parts = [
            f"{n} {what}"
            for n, what in (
                (self.metrics, "metric values"),
                (self.params, "params"),
                (self.tags, "tags"),
                (self.uploads, "uploads"),
            )
            if n
        ]
        if self.status:
            parts.append(f"the run's end ({self.status})")
        return ", ".join(parts) or "nothing"


class Spool:
    """The spool of one run: append operations, replay them through an MlflowClient."""

    def __init__(self, folder: str | Path, run_id: str, uri: str) -> None:
        self.folder = Path(folder)
        self.run_id = run_id
        self.uri = redact(uri)
        self.file = self.folder / f"{run_id}.jsonl"
        self.files = self.folder / run_id

    # -- recording ----------------------------------------------------------------------------

    def log_batch(
        self,
        metrics: list[tuple[str, float, int, int]] = (),  # type: ignore[assignment]
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Keep metrics ``(key, value, timestamp_ms, step)``, params and tags for later."""
        self._append(
            {
                "op": "log_batch",
                "metrics": [list(m) for m in metrics],
                "params": dict(params or {}),
                "tags": dict(tags or {}),
            }
        )

    def upload(self, local: str | Path, artifact_path: str | None, move: bool = False) -> None:
        """Keep a copy of ``local`` (a file or folder) to upload under ``artifact_path``."""
        local = Path(local)
        if not local.exists():
            return
        # A folder of its own per upload (the op list keeps the order): names never collide,
        # also after sent uploads were removed.
        dest = self.files / f"{time.time_ns():x}-{secrets.token_hex(3)}" / local.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            shutil.move(str(local), dest)
        elif local.is_dir():
            shutil.copytree(local, dest)
        else:
            shutil.copy2(local, dest)
        self._append(
            {
                "op": "upload",
                "path": str(dest.relative_to(self.folder)),
                "artifact_path": artifact_path,
            }
        )

    def terminate(self, status: str, end_time_ms: int | None = None) -> None:
        """Keep the run's final status (sent last, after everything recorded before it)."""
        self._append({"op": "terminate", "status": status, "end_time": end_time_ms or _now_ms()})

    def _append(self, op: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        op = {"uri": self.uri, "run_id": self.run_id, **op}
        with _locked(self.file), open(self.file, "a") as fh:
            fh.write(json.dumps(op) + "\n")

    # -- replay ------------------------------------------------------------------------------

    def pending(self) -> Pending:
        """A summary of what is waiting."""
        info = Pending(self.run_id, self.uri)
        for op in _read_ops(self.file):
            if op["op"] == "log_batch":
                info.metrics += len(op["metrics"])
                info.params += len(op["params"])
                info.tags += len(op["tags"])
            elif op["op"] == "upload":
                info.uploads += 1
            elif op["op"] == "terminate":
                info.status = op["status"]
        return info

    def empty(self) -> bool:
        return not self.file.is_file() or self.file.stat().st_size == 0

    def replay(self, client: Any) -> bool:
        """Send what is spooled, in order. Stops at the first failure, keeping the rest;
        True when everything went out (the spool is then deleted)."""
        if not self.file.is_file():
            return True
        with _locked(self.file):
            ops = _read_ops(self.file)
            done = 0
            try:
                for op in ops:
                    _send(client, self.run_id, op, self.folder)
                    done += 1
            except Exception as e:
                log.debug("MLflow replay of run %s stopped: %s", self.run_id, e)
                rest = "".join(json.dumps(op) + "\n" for op in ops[done:])
                atomic_write(self.file, rest)
                _remove_sent_files(self.folder, ops[:done])
                return False
            self.file.unlink(missing_ok=True)
            shutil.rmtree(self.files, ignore_errors=True)
        return True


def _send(client: Any, run_id: str, op: dict[str, Any], folder: Path) -> None:
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "log_batch":
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op["metrics"]]
        params = [Param(k, v) for k, v in op["params"].items()]
        tags = [RunTag(k, v) for k, v in op["tags"].items()]
        for i in range(0, len(metrics), _MAX_METRICS):
            client.log_batch(run_id, metrics=metrics[i : i + _MAX_METRICS])
        for i in range(0, len(params), _MAX_PARAMS):
            client.log_batch(run_id, params=params[i : i + _MAX_PARAMS])
        for i in range(0, len(tags), _MAX_TAGS):
            client.log_batch(run_id, tags=tags[i : i + _MAX_TAGS])
    elif kind == "upload":
        local = folder / op["path"]
        if local.is_dir():
            client.log_artifacts(run_id, str(local), op["artifact_path"])
        elif local.is_file():
            client.log_artifact(run_id, str(local), op["artifact_path"])
    elif kind == "terminate":
        client.set_terminated(run_id, op["status"], int(op["end_time"]))
    else:
        raise ValueError(f"unknown spooled operation {kind!r}")


def _remove_sent_files(folder: Path, sent: list[dict[str, Any]]) -> None:
    for op in sent:
        if op["op"] == "upload":
            shutil.rmtree((folder / op["path"]).parent, ignore_errors=True)


def _read_ops(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    ops = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            ops.append(json.loads(line))
    return ops


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``<spool>.lock``: the training's logger thread and another command replaying the
    same spool never interleave (a separate file, because a replay replaces the spool)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _now_ms() -> int:
    return int(time.time() * 1000)


def spools(folder: str | Path) -> list[Spool]:
    """Every run's spool in ``folder`` (oldest first)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for f in sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
        ops = _read_ops(f)
        if not ops:
            continue
        found.append(Spool(folder, ops[0]["run_id"], ops[0]["uri"]))
    return found


def replay_all(
    folder: str | Path, uri: str, connect: Callable[[], Any], *, quiet: bool = False
) -> list[Pending]:
    """Replay every spool in ``folder`` recorded against ``uri``; returns what is still
    pending (for this server, and for other servers, which are left alone)."""
    left: list[Pending] = []
    client = None
    for sp in spools(folder):
        what = sp.pending()
        if sp.uri != redact(uri):
            log.warning(
                "MLflow records of run %s wait for %s (this command uses %s): %s",
                sp.run_id,
                sp.uri,
                redact(uri),
                what.describe(),
            )
            left.append(what)
            continue
        if client is None:
            client = connect()
        if sp.replay(client):
            (log.debug if quiet else log.info)(
                "MLflow: sent the pending records of run %s (%s)", sp.run_id, what.describe()
            )
        else:
            left.append(sp.pending())
    return left
