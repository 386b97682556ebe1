"""One writer per project folder.

A stage that writes (prepare, train, evaluate, register, a local pipeline run) holds an
exclusive ``flock`` on ``.cyclegan/lock`` in the project folder for as long as it runs. A
second one is refused at once, in one line naming the holder (pid, host, command, since
when). The kernel drops the lock when its holder dies, however it dies, so a lock left by a
killed process is simply taken over (with a message saying whose it was).

Processes that a holder starts itself (torchrun's ranks, kfp.local's step subprocesses) run
inside the holder's lock: a process whose ancestor holds it does not lock again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cyclegan.errors import LockedError
from cyclegan.log import redact

log = logging.getLogger("cyclegan")


def _ancestors() -> set[int]:
    pids, pid = set(), os.getppid()
    try:
        import psutil

        proc = psutil.Process(pid)
        while proc is not None:
            pids.add(proc.pid)
            proc = proc.parent()
    except Exception:  # psutil missing or a parent gone: the direct parent is enough
        pids.add(pid)
    return pids


def _read_holder(fh: IO[str]) -> dict[str, Any]:
    fh.seek(0)
    try:
        data = json.loads(fh.read() or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"`{holder.get('command', '?')}`, since {when}"
    )


@contextlib.contextmanager
def project_lock(path: str | Path, command: str | None = None) -> Iterator[None]:
    """Hold the project folder's writer lock at ``path`` for the block.

    Raises :class:`~cyclegan.errors.LockedError` if a live process (other than an ancestor of
    this one) holds it. The lock file stays; only its ``flock`` matters.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 - held open for the whole block
    except OSError as e:
        raise LockedError(
            f"cannot write in the project folder {path.parent.parent.resolve()} "
            f"({e.strerror}: {path})",
            "run from a folder you can write to (a container needs the folder mounted "
            "writable for its user)",
        ) from None
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held_elsewhere = False
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            held_elsewhere = True
        if held_elsewhere:
            holder = _read_holder(fh)
            deadline = time.monotonic() + 1.0
            while not holder and time.monotonic() < deadline:  # locked, its details not yet
                time.sleep(0.02)
                holder = _read_holder(fh)
            if holder.get("pid") in _ancestors() and holder.get("host") == socket.gethostname():
                yield  # started by the holder: part of its run
                return
            raise LockedError(
                f"another cyclegan command is writing in {path.parent.parent.resolve()} "
                f"({_describe(holder)})",
                "wait for it to finish, or stop it; one writer per project folder",
            ) from None
        previous = _read_holder(fh)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            log.info(
                "taking over the project lock left by %s (no longer running)", _describe(previous)
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            # Redacted: a --set value may be a URI with a password or a signed URL.
            "command": redact(command or " ".join(["cyclegan", *sys.argv[1:]]))[:200],
            "since": time.time(),
        }
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(me))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()  # an empty file: nobody holds it
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()
