"""Where the unpaired images come from: ``data.source`` resolved, fetched into ``data/raw``.

``data.source`` may be:

- ``synthetic`` — the built-in dataset, generated into ``data/raw/synthetic/``;
- a local folder in the reference layout (``trainA/ trainB/ testA/ testB/``, optionally
  ``testA_gt/ testB_gt/``), read in place and never modified;
- a local archive (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``),
  extracted safely into ``data/raw/extracted/<name>/``;
- a dataset name from the reference's list (``horse2zebra``, ``maps``, ...), downloaded from
  the Berkeley server (or ``$CYCLEGAN_DATASETS_URL``) with its published size and sha256
  checked;
- an ``http(s)://`` URL of an archive (checked against ``data.sha256`` when given);
- ``s3://bucket/prefix`` (a layout, or one archive object) through boto3, with the standard
  AWS variables and ``data.s3_endpoint_url`` / ``$AWS_ENDPOINT_URL`` for any S3-compatible
  store.

Downloads stream to ``NAME.part`` and are renamed only after size and sha256 match, so a
partial file is never taken for a finished one; an interrupted download resumes (HTTP
Range) on the next run, and a verified one is reused instead of fetched again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from cyclegan.config import DataConfig
from cyclegan.data import synthetic
from cyclegan.data.images import sha256_file
from cyclegan.errors import DataError
from cyclegan.fsio import atomic_write
from cyclegan.log import progress_enabled

log = logging.getLogger("cyclegan.data")

#: Base URL of the reference's dataset archives (``NAME.zip``); the environment variable
#: overrides it (a mirror, or a local server in tests).
DATASETS_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets"
DATASETS_URL_ENV = "CYCLEGAN_DATASETS_URL"

#: Published size (bytes) and sha256 of each archive, as listed in tensorflow/datasets'
#: ``url_checksums/cycle_gan.txt`` (recorded there for the same files at the older
#: people.eecs.berkeley.edu/~taesung_park/CycleGAN/datasets address).
KNOWN_DATASETS: dict[str, tuple[int, str]] = {
    "apple2orange": (78456409, "845a191e9af8926408ea597001cd03a452e3300a1f44a79fe329b3d59f6e3eb8"),
    "summer2winter_yosemite": (
        132640856,
        "167fe1726807a9d22bd106b4a6c0bd7953b688af924ac1bf967439c4961e49f9",
    ),
    "horse2zebra": (116867962, "a74d9d392eecca9966b51287a76ca126af473d9de4f3e8fc0e9cda08fa1730a1"),
    "monet2photo": (305231073, "88f91b00fc228f97c9411fbf1880ec1d119c98f1722e4cfcfaa2fb35fac05b04"),
    "cezanne2photo": (
        279885071,
        "3a6c10ca21f9485862f1cbd707744b9dc258954a04631271d23a3605eeb63cff",
    ),
    "ukiyoe2photo": (292946532, "02a2a2fb5ecf425ca1bf86aca7304377da64a2a1d3b86df54eb65e4068bf3b08"),
    "vangogh2photo": (
        306590349,
        "362c3473e70be0944bda08d49d660eafdc2854df55d697835b8186d1d79caaff",
    ),
    "maps": (1476754427, "639534f69dbf9f36bef8d6292a7698006361221f83f0285d7c9ca78afe6e8a9e"),
    "facades": (35135868, "9a31ebf3a31b9b5cd195dd5bf62e9308e00cb94604d1019e3889ac84248695c0"),
    "iphone2dslr_flower": (
        339964458,
        "8fcb5e374d631b107e1d961b8c4cd0a186aa2a4ff3e279923f4c426128de7113",
    ),
}

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
LAYOUT_SPLITS = ("trainA", "trainB", "testA", "testB", "testA_gt", "testB_gt")
#: Where a project keeps its own datasets: dvc.yaml's ``prepare`` depends on this folder
#: (relative to the project root), so DVC sees changes to the sources in it.
TRACKED_SOURCES = Path("data/sources")
CHUNK = 1 << 20
HTTP_TIMEOUT_S = 60

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


@dataclass(frozen=True)
class Source:
    """A resolved ``data.source``: its kind and the text the user wrote."""

    kind: str  # synthetic | folder | archive | dataset | url | s3
    spec: str


@dataclass
class Fetched:
    """A source made available locally: ``root`` holds the reference layout; ``info`` is
    recorded in the manifest (no timestamps, no credentials)."""

    root: Path
    info: dict[str, Any] = field(default_factory=dict)


def is_archive_name(name: str) -> bool:
    """True if ``name`` ends with an archive suffix this module extracts."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def resolve(spec: str) -> Source:
    """Classify ``data.source``; raises :class:`DataError` for something unusable.

    A known dataset name wins over a local folder of the same name: write ``./horse2zebra``
    for the folder."""
    text = spec.strip()
    if not text:
        raise DataError("data.source is empty", "set it to synthetic, a folder, an archive, ...")
    if text == "synthetic":
        return Source("synthetic", text)
    if text.startswith("s3://"):
        return Source("s3", text)
    if re.match(r"^https?://", text):
        return Source("url", text)
    if text in KNOWN_DATASETS:
        return Source("dataset", text)
    path = Path(text).expanduser()
    if path.is_dir():
        _warn_if_dvc_blind(path)
        return Source("folder", text)
    if path.is_file():
        if is_archive_name(path.name):
            _warn_if_dvc_blind(path)
            return Source("archive", text)
        raise DataError(
            f"data.source {text!r} is a file but not an archive",
            f"use a folder or an archive ending in {', '.join(ARCHIVE_SUFFIXES)}",
        )
    if re.match(r"^[a-z]+://", text):
        raise DataError(f"data.source {text!r}: unsupported scheme", "use http(s):// or s3://")
    if "/" in text or text.startswith(("~", ".")):
        raise DataError(
            f"data.source {text!r}: no such folder or archive",
            "check the path, relative to the project root; a dataset versioned with DVC "
            "arrives with `dvc pull`",
        )
    raise DataError(
        f"data.source {text!r} is not a folder, an archive, a URL, s3:// or a known dataset",
        f"known datasets: synthetic, {', '.join(sorted(KNOWN_DATASETS))}",
    )


def _warn_if_dvc_blind(path: Path) -> None:
    """Under ``dvc repro`` (DVC sets DVC_STAGE and DVC_ROOT), a local source outside
    :data:`TRACKED_SOURCES` is no dependency of the stage: changes to it would go unseen."""
    root = os.environ.get("DVC_ROOT")
    if not os.environ.get("DVC_STAGE") or not root:
        return
    tracked = (Path(root) / TRACKED_SOURCES).resolve()
    if not path.resolve().is_relative_to(tracked):
        log.warning(
            "data.source %s is outside %s/, so dvc status and dvc repro do not see changes "
            "to it; move it there and `dvc add` it (docs/data.md)",
            path,
            TRACKED_SOURCES,
        )


def fetch(source: Source, cfg: DataConfig, raw: Path, map_fn: MapFn | None = None) -> Fetched:
    """Make ``source`` available under ``raw`` (downloads and extractions are kept and
    reused) and return the folder that holds its reference layout."""
    raw.mkdir(parents=True, exist_ok=True)
    if source.kind == "synthetic":
        out = synthetic.generate(raw / "synthetic", cfg.synthetic, cfg.seed, map_fn)
        info = {"generator_version": synthetic.GENERATOR_VERSION, "seed": cfg.seed}
        return Fetched(out, info)
    if source.kind == "folder":
        return Fetched(find_layout_root(Path(source.spec).expanduser()))
    if source.kind == "archive":
        archive = Path(source.spec).expanduser()
        digest = sha256_file(archive)
        if cfg.sha256 and digest != cfg.sha256.lower():
            raise _checksum_error(archive.name, cfg.sha256, digest, deleted=False)
        out = extract_cached(archive, raw / "extracted" / _archive_stem(archive.name), digest, cfg)
        return Fetched(find_layout_root(out), {"sha256": digest})
    if source.kind == "dataset":
        size, digest = KNOWN_DATASETS[source.spec]
        base = os.environ.get(DATASETS_URL_ENV, DATASETS_URL).rstrip("/")
        url = f"{base}/{source.spec}.zip"
        archive = download(
            url,
            raw / "downloads" / f"{source.spec}.zip",
            size=size,
            sha256=digest,
            limit=cfg.max_archive_bytes,
        )
        out = extract_cached(archive, raw / "extracted" / source.spec, digest, cfg)
        return Fetched(find_layout_root(out), {"url": url, "sha256": digest, "size": size})
    if source.kind == "url":
        name = _url_filename(source.spec)
        expected = cfg.sha256.lower() if cfg.sha256 else None
        if expected is None:
            log.warning("no data.sha256 for %s: its integrity is not verified", source.spec)
        archive = download(
            source.spec,
            raw / "downloads" / name,
            size=None,
            sha256=expected,
            limit=cfg.max_archive_bytes,
        )
        digest = expected or sha256_file(archive)
        out = extract_cached(archive, raw / "extracted" / _archive_stem(name), digest, cfg)
        return Fetched(find_layout_root(out), {"url": source.spec, "sha256": digest})
    if source.kind == "s3":
        return fetch_s3(source.spec, cfg, raw)
    raise AssertionError(f"unknown source kind {source.kind}")  # a bug, not user input


# ---------------------------------------------------------------------------------------------
# The reference layout
# ---------------------------------------------------------------------------------------------


def find_layout_root(folder: Path) -> Path:
    """``folder`` if it holds ``trainA/`` etc., or its single sub-folder that does (the
    Berkeley zips wrap everything in ``horse2zebra/``)."""
    if not folder.is_dir():
        raise DataError(f"data source folder {folder} does not exist", "check data.source")
    if _has_layout(folder):
        return folder
    subdirs = [
        p
        for p in sorted(folder.iterdir())
        if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX"
    ]
    if len(subdirs) == 1 and _has_layout(subdirs[0]):
        return subdirs[0]
    found = ", ".join(p.name + "/" for p in subdirs[:8]) or "no folders"
    raise DataError(
        f"{folder} is not in the reference layout (found {found})",
        "expected trainA/ trainB/ testA/ testB/ of images",
    )


def _has_layout(folder: Path) -> bool:
    return any((folder / s).is_dir() for s in LAYOUT_SPLITS[:4])


# ---------------------------------------------------------------------------------------------
# HTTP(S) downloads
# ---------------------------------------------------------------------------------------------


def _url_filename(url: str) -> str:
    name = url.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if not name or not is_archive_name(name):
        raise DataError(
            f"data.source URL {url!r} does not name an archive",
            f"point it at a file ending in {', '.join(ARCHIVE_SUFFIXES)}",
        )
    return name


def _archive_stem(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)] or "archive"
    return name


def _checksum_error(name: str, expected: str, got: str, *, deleted: bool) -> DataError:
    what = "; the download was deleted" if deleted else ""
    return DataError(
        f"checksum mismatch for {name}: expected sha256 {expected}, got {got}{what}",
        "check the source (or data.sha256) and run prepare again",
    )


def _sidecar(path: Path) -> Path:
    """``NAME.sha256``: the digest of a download that had no published one, recorded when it
    completed, so reusing it later still checks it is the same complete file."""
    return path.with_name(path.name + ".sha256")


def _verified(path: Path, size: int | None, sha256: str | None) -> bool:
    if not path.is_file():
        return False
    if size is not None and path.stat().st_size != size:
        return False
    if sha256 is None:
        recorded = _sidecar(path)
        if not recorded.is_file():
            return False  # never known complete (e.g. an older, interrupted download)
        sha256 = recorded.read_text().strip()
    return sha256_file(path) == sha256


def download(
    url: str, dest: Path, *, size: int | None, sha256: str | None, limit: int | None = None
) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there.

    Bytes go to ``dest.part``; only a complete file whose size (and sha256, when known)
    match is renamed to ``dest``. A short ``.part`` is resumed with an HTTP Range request;
    a wrong one is deleted. ``limit`` bounds the bytes accepted whether or not the server
    sends a Content-Length (``data.max_archive_bytes``)."""
    if size is not None and limit is not None and size > limit:
        raise _too_large(url, size, limit)
    if _verified(dest, size, sha256):
        log.info("using the verified download %s", dest)
        return dest
    if dest.exists():
        log.warning("%s does not match its expected size/sha256; downloading it again", dest)
        dest.unlink()
        _sidecar(dest).unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    if size is None or offset < size:
        _http_fetch(url, part, offset, size, limit)
    got_size = part.stat().st_size
    if size is not None and got_size != size:
        # Short: keep the .part so the next run resumes; it is never renamed to dest.
        raise DataError(
            f"download of {url} is incomplete ({got_size} of {size} bytes)",
            "run prepare again to resume it",
        )
    got = sha256_file(part)
    if sha256 is not None and got != sha256:
        part.unlink()
        raise _checksum_error(dest.name, sha256, got, deleted=True)
    if sha256 is None:
        atomic_write(_sidecar(dest), got + "\n")
    part.replace(dest)
    log.info("downloaded %s (%d bytes)", dest, got_size)
    return dest


def _too_large(url: str, size: int, limit: int) -> DataError:
    return DataError(
        f"{url} is larger than data.max_archive_bytes={limit} ({size} bytes or more)",
        "raise data.max_archive_bytes if the source is trusted",
    )


def _http_fetch(
    url: str, part: Path, offset: int, size: int | None, limit: int | None = None
) -> None:
    headers = {"User-Agent": "cyclegan-pipeline"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our .part is no prefix the server knows: restart
            part.unlink()
            return _http_fetch(url, part, 0, size, limit)
        raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"cannot download {url}: {reason}", "check the URL and network") from None
    with resp:
        resumed = offset > 0 and resp.status == 206
        if offset and not resumed:
            log.info("server ignored the resume request; downloading %s from the start", url)
            offset = 0
        length = resp.headers.get("Content-Length")
        total = size if size is not None else (offset + int(length) if length else None)
        if limit is not None and total is not None and total > limit:
            raise _too_large(url, total, limit)
        log.info("downloading %s%s", url, f" (from byte {offset})" if resumed else "")
        try:
            with open(part, "ab" if resumed else "wb") as fh:
                _copy_stream(resp, fh, offset, total, part.name, limit)
        except _LimitExceeded as e:
            part.unlink(missing_ok=True)  # never kept, never resumed, never "verified"
            raise _too_large(url, e.done, limit or 0) from None
        except (OSError, urllib.error.URLError) as e:
            raise DataError(
                f"download of {url} was interrupted: {e}", "run prepare again to resume it"
            ) from None
        if size is None and total is not None and part.stat().st_size != total:
            raise DataError(
                f"download of {url} is incomplete ({part.stat().st_size} of {total} bytes)",
                "run prepare again to resume it",
            )
    return None


class _LimitExceeded(Exception):
    def __init__(self, done: int) -> None:
        self.done = done


def _copy_stream(
    src: BinaryIO, dst: BinaryIO, done: int, total: int | None, name: str, limit: int | None = None
) -> None:
    bar = None
    if progress_enabled():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=name, file=sys.stderr)
    last = time.monotonic()
    try:
        while block := src.read(CHUNK):
            dst.write(block)
            done += len(block)
            if limit is not None and done > limit:
                raise _LimitExceeded(done)
            if total is not None and done > total:
                raise OSError(f"server sent more than the expected {total} bytes")
            if bar is not None:
                bar.update(len(block))
            elif time.monotonic() - last > 10:
                last = time.monotonic()
                pct = f" ({100 * done / total:.0f}%)" if total else ""
                log.info("  %s: %d bytes%s", name, done, pct)
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------------------------
# Safe archive extraction
# ---------------------------------------------------------------------------------------------


def extract_cached(archive: Path, dest: Path, digest: str, cfg: DataConfig) -> Path:
    """Extract ``archive`` into ``dest`` unless ``dest`` already holds this archive's
    extraction (recorded by sha256 in ``dest/.extracted.json``)."""
    marker = dest / ".extracted.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("sha256") == digest:
                log.info("using the extracted %s", dest)
                return dest
        except (OSError, ValueError):
            pass
    extract_archive(archive, dest, cfg.max_archive_bytes)
    marker.write_text(json.dumps({"archive": archive.name, "sha256": digest}) + "\n")
    return dest


def _unsafe(where: str, entry: str, why: str) -> DataError:
    return DataError(
        f"unsafe {where}: entry {entry!r} {why}; refusing to extract it",
        "use plain files with relative paths",
    )


def _check_name(where: str, name: str) -> list[str]:
    """The path components of a member name (of an archive or an S3 listing, ``where``),
    refusing absolute paths and ``..``."""
    norm = name.replace("\\", "/")
    if "\x00" in norm:
        raise _unsafe(where, name, "has a NUL byte in its name")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise _unsafe(where, name, "has an absolute path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(where, name, "escapes the target folder (..)")
    return parts


@dataclass
class _Member:
    parts: list[str]
    is_dir: bool
    size: int
    handle: Any  # ZipInfo or TarInfo


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> list[_Member]:
    out = []
    for info in zf.infolist():
        parts = _check_name(f"archive {archive.name}", info.filename)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            raise _unsafe(f"archive {archive.name}", info.filename, "is a symbolic link")
        # Unix-made zips carry the file type; 0 means "not recorded" (a DOS-style entry).
        if kind and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise _unsafe(f"archive {archive.name}", info.filename, "is a device or special file")
        if parts:
            out.append(_Member(parts, info.is_dir(), info.file_size, info))
    return out


def _tar_members(archive: Path, tf: tarfile.TarFile) -> list[_Member]:
    out = []
    for m in tf.getmembers():
        parts = _check_name(f"archive {archive.name}", m.name)
        if m.issym() or m.islnk():
            raise _unsafe(f"archive {archive.name}", m.name, "is a link")
        if not (m.isreg() or m.isdir()):
            raise _unsafe(f"archive {archive.name}", m.name, "is a device or special file")
        if parts:
            out.append(_Member(parts, m.isdir(), m.size, m))
    return out


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> None:
    """Extract a zip or tar archive into ``dest`` (replacing it) after checking every entry:
    no absolute paths, no ``..``, no links or device files, at most ``max_bytes`` in all
    (checked on declared sizes first, then on the bytes actually written). Extraction goes
    to a temporary sibling, so a refused or interrupted one leaves nothing behind."""
    tmp = dest.with_name(f".{dest.name}.extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = _zip_members(archive, zf)
                _check_total(archive, members, max_bytes)
                _write_members(archive, tmp, members, zf.open, max_bytes)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                members = _tar_members(archive, tf)
                _check_total(archive, members, max_bytes)
                _write_members(archive, tmp, members, tf.extractfile, max_bytes)
        else:
            raise DataError(
                f"{archive.name} is not a zip or tar archive", "check the file or data.source"
            )
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"cannot extract {archive.name}: {e}", "the archive may be corrupt"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def _check_total(archive: Path, members: list[_Member], max_bytes: int) -> None:
    total = sum(m.size for m in members if not m.is_dir)
    if total > max_bytes:
        raise DataError(
            f"archive {archive.name} would extract to {total} bytes, more than "
            f"data.max_archive_bytes={max_bytes}",
            "raise data.max_archive_bytes if the archive is trusted",
        )


def _write_members(
    archive: Path,
    tmp: Path,
    members: list[_Member],
    opener: Callable[[Any], IO[bytes] | None],
    max_bytes: int,
) -> None:
    tmp.mkdir(parents=True)
    root = tmp.resolve()
    written = 0
    for m in members:
        target = tmp.joinpath(*m.parts)
        # Belt and braces: the checked name must still land inside the target folder.
        if not target.resolve().is_relative_to(root):
            raise _unsafe(f"archive {archive.name}", "/".join(m.parts), "escapes the target folder")
        if m.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        src = opener(m.handle)
        if src is None:
            continue
        with src, open(target, "wb") as dst:
            # Declared sizes can lie (zip bombs): count what is really written.
            while block := src.read(CHUNK):
                written += len(block)
                if written > max_bytes:
                    raise DataError(
                        f"archive {archive.name} expands beyond data.max_archive_bytes={max_bytes}",
                        "raise data.max_archive_bytes if the archive is trusted",
                    )
                dst.write(block)


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    # S3 bucket naming rules (also keeps the local mirror path inside data/raw/s3/).
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket) or ".." in bucket:
        raise DataError(f"data.source {uri!r} has no valid bucket name", "use s3://bucket/prefix")
    _check_name(f"S3 URI {uri}", prefix)
    return bucket, prefix.strip("/")


def _s3_client(cfg: DataConfig, uri: str) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise DataError(
            f"no AWS credentials to read {uri}",
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); "
            "for a non-AWS store also AWS_ENDPOINT_URL or data.s3_endpoint_url",
        )
    endpoint = cfg.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    return session.client(
        "s3",
        endpoint_url=endpoint or None,
        config=BotoConfig(
            retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60
        ),
    )


def _s3_error(uri: str, e: Exception) -> DataError:
    from botocore.exceptions import ClientError, EndpointConnectionError

    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "?")
        hint = {
            "NoSuchBucket": "check the bucket name",
            "AccessDenied": "check the credentials' permissions",
            "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID",
            "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY",
        }.get(code, "check the URI, credentials and endpoint")
        return DataError(f"cannot read {uri}: S3 error {code}", hint)
    if isinstance(e, EndpointConnectionError):
        return DataError(f"cannot reach the S3 endpoint for {uri}: {e}", "check the endpoint URL")
    return DataError(f"cannot read {uri}: {e}", "check the URI, credentials and endpoint")


def fetch_s3(uri: str, cfg: DataConfig, raw: Path) -> Fetched:
    """Mirror ``s3://bucket/prefix`` into ``raw/s3/bucket/prefix`` (objects whose ETag and
    size are unchanged are not fetched again; local files gone from S3 are removed), or
    download and extract it when it names one archive object."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(uri)
    client = _s3_client(cfg, uri)
    try:
        if is_archive_name(prefix):
            return _fetch_s3_archive(client, uri, bucket, prefix, cfg, raw)
        local = raw.joinpath("s3", bucket, *_check_name(f"S3 URI {uri}", prefix))
        objects = list(_s3_list(client, bucket, f"{prefix}/" if prefix else ""))
        if not objects:
            raise DataError(f"no objects under {uri}", "check the bucket and prefix")
        _s3_sync(client, uri, bucket, prefix, objects, local)
    except (ClientError, BotoCoreError) as e:
        raise _s3_error(uri, e) from None
    return Fetched(find_layout_root(local), {"uri": uri, "objects": len(objects)})


def _s3_list(client: Any, bucket: str, prefix: str) -> Iterator[tuple[str, str, int]]:
    """``(relative key, etag, size)`` of every object under ``prefix``."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/"):  # folder placeholder objects
                continue
            yield key[len(prefix) :], obj.get("ETag", "").strip('"'), int(obj.get("Size", 0))


def _s3_sync(
    client: Any,
    uri: str,
    bucket: str,
    prefix: str,
    objects: list[tuple[str, str, int]],
    local: Path,
) -> None:
    index_file = local / ".s3-index.json"
    try:
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    except (OSError, ValueError):
        index = {}
    wanted: dict[str, str] = {}
    fetched = 0
    for rel, etag, size in objects:
        parts = _check_name(f"S3 listing of {uri}", rel)
        if not parts:
            continue
        target = local.joinpath(*parts)
        rel_key = "/".join(parts)
        wanted[rel_key] = etag
        if index.get(rel_key) == etag and target.is_file() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        key = f"{prefix}/{rel}" if prefix else rel
        client.download_file(bucket, key, str(part))
        part.replace(target)
        fetched += 1
    # Mirror deletions, so raw/ matches the prefix exactly.
    for path in sorted(local.rglob("*"), reverse=True):
        rel_key = path.relative_to(local).as_posix()
        if path.is_file() and path != index_file and rel_key not in wanted:
            path.unlink()
    index_file.write_text(json.dumps(wanted, indent=1, sort_keys=True) + "\n")
    log.info(
        "s3: %d objects under %s, %d fetched, %d up to date",
        len(objects),
        uri,
        fetched,
        len(objects) - fetched,
    )


def _fetch_s3_archive(
    client: Any, uri: str, bucket: str, key: str, cfg: DataConfig, raw: Path
) -> Fetched:
    name = key.rsplit("/", 1)[-1]
    dest = raw / "downloads" / name
    head = client.head_object(Bucket=bucket, Key=key)
    size = int(head["ContentLength"])
    if size > cfg.max_archive_bytes:
        raise _too_large(uri, size, cfg.max_archive_bytes)
    expected = cfg.sha256.lower() if cfg.sha256 else None
    if not _verified(dest, size, expected):
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(name + ".part")
        client.download_file(bucket, key, str(part))
        if part.stat().st_size != size:
            part.unlink()
            raise DataError(f"download of {uri} is incomplete", "run prepare again")
        got = sha256_file(part)
        if expected is not None and got != expected:
            part.unlink()
            raise _checksum_error(name, expected, got, deleted=True)
        if expected is None:
            atomic_write(_sidecar(dest), got + "\n")
        part.replace(dest)
    digest = expected or sha256_file(dest)
    out = extract_cached(dest, raw / "extracted" / _archive_stem(name), digest, cfg)
    return Fetched(find_layout_root(out), {"uri": uri, "sha256": digest})
