"""Writing files so that a crash, a kill or a full disk never leaves half a file behind.

Every output of the project (checkpoints, model folders, metrics, manifests, the run file) is
written through :func:`atomic_write`: a temporary file in the same folder, flushed and
fsynced, then renamed over the target. A reader sees the old file or the complete new one.
Temporary files are named ``.<name>.<pid>-<random>.tmp``, so :func:`remove_stale_temp_files`
can clear what a killed writer left (they can be checkpoint-sized).

Files get the usual permissions for new files (0666 less the umask, i.e. 0644 normally):
``tempfile.mkstemp`` would make them 0600, readable by nobody else on a shared volume.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cyclegan.errors import CycleGANError

log = logging.getLogger("cyclegan")

# .<name>.<pid>-<random>.tmp (and the older .<name>.<pid>.tmp)
_TEMP = re.compile(r"^\..+\.(\d+)(?:-[0-9a-f]+)?\.tmp$")


class DiskFullError(CycleGANError):
    """No space left (or quota exceeded) while writing an output; the previous file is kept."""


class NotWritableError(CycleGANError):
    """An output folder that cannot be written (permissions, a read-only mount)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path(path: Path) -> Path:
    """A temporary name for ``path`` in its folder: the writer's pid (so a leftover can be
    told from a write in progress) and a random part (threads of one process write too)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_write(
    path: str | Path,
    data: bytes | str | Callable[[IO[bytes]], Any] | Callable[[str], Any],
    *,
    by_name: bool = False,
) -> Path:
    """Write ``path`` atomically and durably.

    ``data`` is bytes, text (UTF-8), or a function that writes into the open binary file
    (``by_name=False``) or into the temporary path it is given (``by_name=True``, for
    libraries that only write to a file name, like safetensors). On ENOSPC/EDQUOT a
    :class:`DiskFullError` names the file and the free space; the previous file stays.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if by_name:
            data(str(tmp))  # type: ignore[operator,arg-type]
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        else:
            with open(tmp, "wb") as fh:
                if isinstance(data, str):
                    fh.write(data.encode())
                elif isinstance(data, (bytes, bytearray, memoryview)):
                    fh.write(data)
                else:
                    data(fh)  # type: ignore[arg-type]
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as e:
        if _disk_full(e):
            raise DiskFullError(
                f"no space left on the device while writing {path} "
                f"({_free(path.parent)} free); the previous file is kept",
                "free some space (old checkpoints: train.keep_checkpoints) and run again",
            ) from None
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise NotWritableError(
                f"cannot write {path}: {e.strerror}",
                "choose a folder this user may write to (a container needs it mounted "
                "writable for its user)",
            ) from None
        raise
    finally:
        with contextlib.suppress(OSError):  # a read-only folder holds no temporary file
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def _disk_full(e: BaseException | None) -> bool:
    """ENOSPC/EDQUOT anywhere in an error's chain: torch.save reports a full disk as a
    RuntimeError raised while handling the OSError, safetensors as an error of its own that
    quotes the OS message."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(e) for m in ("No space left on device", "Disk quota exceeded")):
            return True
        e = e.__cause__ or e.__context__
    return False


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented, key-sorted JSON with a final newline, atomically."""
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (not possible on every filesystem)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete temporary files of :func:`atomic_write` whose writer process is gone.

    Returns how many were removed. Called when a stage starts (holding the project lock),
    so a write in progress elsewhere is never touched: its process is still alive.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if not m or not p.is_file() or _writer_alive(int(m.group(1)), p):
            continue
        try:
            size = p.stat().st_size
            p.unlink()
        except OSError:
            continue
        removed += 1
        log.info("removed %s (%s) left by an interrupted write", p, _size(size))
    return removed


def _writer_alive(pid: int, path: Path) -> bool:
    if pid == os.getpid():
        # Ours: a write in progress in another thread, unless the file is older than this
        # process (a previous process with the same pid, e.g. PID 1 of an earlier pod).
        try:
            return path.stat().st_mtime >= _process_start()
        except OSError:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def _free(folder: Path) -> str:
    try:
        return _size(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
