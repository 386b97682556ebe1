"""Inception features by image content: each distinct image embedded once per run, and the
real test images' features kept on disk across runs.

What Inception sees decides the key: an image's key is the sha256 of its decoded ``H x W x 3``
uint8 pixels and shape, so a re-encoded but identical PNG hits and any changed pixel misses.
Features also depend on the network and how it runs, so the cache is split by a *context*
(:attr:`FIDInception.feature_context`: the weights' sha256, the preprocessing version, the
backend and torch version); another context never sees these files.

Storage: one file per cached image set, ``<folder>/<context hash>/<set hash>.npz``, holding
the set's per-image keys (``N x 32`` bytes), its features (``N x 2048``, float32 when that
is lossless, which it is for the network's float32 output) and a small JSON header with the
context and a sha256 of the stored bytes. A set seen before is one file read; an image set
that changed in part reuses every image any file holds, so adding one image embeds one image.

Reading never unpickles (``allow_pickle=False``) and trusts nothing: a file that does not
open, lacks a member, has a wrong shape, dtype, context or checksum, or holds a non-finite
value is a miss, reported in one warning naming the file, and deleted so that it is
recomputed and rewritten. Writes go to a temporary file in the same folder and are renamed
into place, so a reader sees a whole file or none, and two evaluations running at once at
worst both write the same content. At most :data:`MAX_FILES` set files are kept per context;
the least recently used go first. Trouble writing only warns: the cache never fails a run.

The checksum detects corruption and edits; it is not a signature (anyone who can write the
folder can also write the code that reads it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cyclegan.fsio import atomic_write, remove_stale_temp_files

log = logging.getLogger("cyclegan.evaluate")

FORMAT = 1
KEY_BYTES = 32
MAX_FILES = 32


def image_key(img: np.ndarray) -> bytes:
    """sha256 of an ``H x W x 3`` uint8 image's pixels and shape (what Inception sees)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected H x W x 3 uint8, got {img.dtype} {img.shape}")
    h = hashlib.sha256(b"%d,%d,%d;" % img.shape)
    h.update(np.ascontiguousarray(img).data)
    return h.digest()


def _set_name(keys: Sequence[bytes]) -> str:
    return hashlib.sha256(b"".join(keys)).hexdigest()[:32] + ".npz"


def _checksum(context: str, keys: np.ndarray, features: np.ndarray) -> str:
    h = hashlib.sha256(context.encode())
    h.update(keys.tobytes())
    h.update(str(features.dtype).encode())
    h.update(features.tobytes())
    return h.hexdigest()


class _Invalid(Exception):
    """A cache file that must not be used (the message says why)."""


class FeatureCache:
    """Features of image sets on disk, for one context (see the module docstring).

    ``folder`` is the cache's root (e.g. ``.cyclegan/cache/fid``); ``context`` says what
    produced the features; ``dim`` is the feature length.
    """

    def __init__(self, folder: Path, context: str, dim: int) -> None:
        self.context = context
        self.dim = dim
        self.folder = Path(folder) / hashlib.sha256(context.encode()).hexdigest()[:16]
        self._bad: set[str] = set()  # files already reported in this run
        self._unwritable = False  # reported once; later sets are not tried

    # -- reading ------------------------------------------------------------------------------

    def lookup(self, sets: Sequence[Sequence[bytes]]) -> tuple[dict[bytes, np.ndarray], set[int]]:
        """Cached features for the images of ``sets`` (lists of :func:`image_key`).

        Returns the rows found (key -> float64 vector) and the indices of the sets stored
        whole (those need no rewrite). Each set's own file is tried first; images still
        missing are looked for in the other files.
        """
        rows: dict[bytes, np.ndarray] = {}
        whole: set[int] = set()
        used: set[Path] = set()
        for i, keys in enumerate(sets):
            path = self.folder / _set_name(keys)
            if not keys or not path.is_file():
                continue
            got = self._read(path)
            if got is not None and got[0] == list(keys):
                rows.update(zip(got[0], got[1], strict=True))
                whole.add(i)
                used.add(path)
        wanted = {k for keys in sets for k in keys} - rows.keys()
        for path in self._files() if wanted else []:
            if path in used:
                continue
            keys_in_file = self._read_keys(path)
            if keys_in_file is None or wanted.isdisjoint(keys_in_file):
                continue
            got = self._read(path)
            if got is None:
                continue
            for k, row in zip(got[0], got[1], strict=True):
                if k in wanted:
                    rows[k] = row
                    wanted.discard(k)
            used.add(path)
            if not wanted:
                break
        for path in used:  # least recently *used* is what pruning removes
            with contextlib.suppress(OSError):
                os.utime(path)
        return rows, whole

    def _files(self) -> list[Path]:
        """Set files, most recently used first (they are the likeliest to hold the images)."""
        try:
            entries = [p for p in self.folder.glob("*.npz") if not p.name.startswith(".")]
            stamped = []
            for p in entries:
                with contextlib.suppress(OSError):  # removed by a concurrent prune
                    stamped.append((p.stat().st_mtime, p))
        except OSError:
            return []
        return [p for _, p in sorted(stamped, key=lambda t: t[0], reverse=True)]

    def _read_keys(self, path: Path) -> set[bytes] | None:
        """Only the keys member of a file (cheap), or None if it cannot be used."""
        if str(path) in self._bad:
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = z["keys"]
            if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != KEY_BYTES:
                raise _Invalid(f"keys are {keys.dtype} {keys.shape}")
        except FileNotFoundError:
            return None  # pruned by another evaluation meanwhile: simply not there
        except Exception as e:
            self._reject(path, e)
            return None
        return {bytes(k) for k in keys}

    def _read(self, path: Path) -> tuple[list[bytes], np.ndarray] | None:
        """A whole file, verified: (keys, float64 features), or None (a miss)."""
        if str(path) in self._bad:
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if set(z.files) != {"keys", "features", "meta"}:
                    raise _Invalid(f"members {sorted(z.files)}")
                keys, features, meta_raw = z["keys"], z["features"], z["meta"]
            if meta_raw.dtype != np.uint8 or meta_raw.ndim != 1:
                raise _Invalid("header is not bytes")
            meta = json.loads(meta_raw.tobytes().decode())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise _Invalid(f"format {meta.get('format') if isinstance(meta, dict) else meta}")
            if meta.get("context") != self.context:
                raise _Invalid("written for other weights or preprocessing")
            n = len(keys)
            if keys.dtype != np.uint8 or keys.shape != (n, KEY_BYTES) or n == 0:
                raise _Invalid(f"keys are {keys.dtype} {keys.shape}")
            if features.dtype not in (np.float32, np.float64):
                raise _Invalid(f"features are {features.dtype}")
            if features.shape != (n, self.dim):
                raise _Invalid(f"features are {features.shape}, expected ({n}, {self.dim})")
            if meta.get("sha256") != _checksum(self.context, keys, features):
                raise _Invalid("checksum mismatch")
            if not np.isfinite(features).all():
                raise _Invalid("non-finite features")
        except FileNotFoundError:
            return None
        except Exception as e:
            self._reject(path, e)
            return None
        return [bytes(k) for k in keys], features.astype(np.float64)

    def _reject(self, path: Path, e: Exception) -> None:
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        log.warning("ignoring the damaged feature cache file %s (%s); recomputing it", path, why)
        self._bad.add(str(path))
        with contextlib.suppress(OSError):
            path.unlink()  # so it is rewritten, and reported once rather than every run

    # -- writing ------------------------------------------------------------------------------

    def store(self, keys: Sequence[bytes], features: np.ndarray) -> None:
        """Write one set's features (``len(keys) x dim``, row i for keys[i]); only warns on
        failure."""
        f = np.asarray(features, dtype=np.float64)
        if self._unwritable or not keys or not np.isfinite(f).all():
            return  # nothing to keep, or a broken number that must not outlive this run
        k = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        f32 = f.astype(np.float32)
        # The network computes in float32: stored so, the cache is half the size and exact.
        stored: np.ndarray = f32 if np.array_equal(f32.astype(np.float64), f) else f
        meta = {
            "format": FORMAT,
            "context": self.context,
            "sha256": _checksum(self.context, k, stored),
        }
        meta_raw = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        try:
            atomic_write(
                self.folder / _set_name(keys),
                lambda fh: np.savez(fh, keys=k, features=stored, meta=meta_raw),
            )
            self._prune()
        except OSError as e:  # DiskFullError included: a cache never fails the run
            self._unwritable = True
            log.warning(
                "could not write the feature cache in %s (%s); the next evaluation embeds "
                "these images again",
                self.folder,
                e,
            )

    def _prune(self) -> None:
        for path in self._files()[MAX_FILES:]:
            with contextlib.suppress(OSError):
                path.unlink()
        remove_stale_temp_files(self.folder)  # left by a writer that died


@dataclass(frozen=True)
class EmbedCounts:
    """How a run's features were obtained: distinct images, embedded now, read from disk."""

    distinct: int
    embedded: int
    from_cache: int


class FeatureTable:
    """Features by image content, filled by :func:`collect_features`; calling it with a list
    of images returns their ``N x D`` features (the callable ``compute_metrics`` takes)."""

    def __init__(self, rows: dict[bytes, np.ndarray]) -> None:
        self._rows = rows

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([self._rows[image_key(img)] for img in images])


def collect_features(
    sets: Sequence[tuple[Sequence[np.ndarray], bool]],
    embed: Callable[[list[np.ndarray]], np.ndarray],
    cache: FeatureCache | None,
) -> tuple[FeatureTable, EmbedCounts]:
    """Features of every image of ``sets``, each distinct image embedded at most once.

    ``sets`` are ``(images, cacheable)`` pairs: a cacheable set (real images, which do not
    depend on the model) is looked up in ``cache`` first and stored there afterwards.
    ``embed`` is called once, with every image still missing (in order of first appearance),
    or not at all.
    """
    keyed = [([image_key(img) for img in images], images, cacheable) for images, cacheable in sets]
    cached_sets = [keys for keys, _, cacheable in keyed if cacheable]
    rows: dict[bytes, np.ndarray] = {}
    whole: set[int] = set()
    if cache is not None and cached_sets:
        rows, whole = cache.lookup(cached_sets)
    from_cache = len(rows)

    todo: dict[bytes, np.ndarray] = {}
    for keys, images, _ in keyed:
        for k, img in zip(keys, images, strict=True):
            if k not in rows and k not in todo:
                todo[k] = img
    if todo:
        feats = embed(list(todo.values()))
        if feats.shape[0] != len(todo):
            raise ValueError(f"embedded {len(todo)} images, got {feats.shape[0]} features")
        rows.update(zip(todo.keys(), feats, strict=True))

    if cache is not None:
        written: set[str] = set()
        for i, keys in enumerate(cached_sets):
            name = _set_name(keys)
            if i not in whole and name not in written:
                cache.store(keys, np.stack([rows[k] for k in keys]))
                written.add(name)
    return FeatureTable(rows), EmbedCounts(
        distinct=len(rows), embedded=len(todo), from_cache=from_cache
    )
