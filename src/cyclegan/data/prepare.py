"""The ``prepare`` stage: source -> validated, converted, resized dataset plus manifest.

1. Fetch or generate the source into ``data/raw`` (:mod:`cyclegan.data.sources`); the
   synthetic default is generated there and then read like any folder source.
2. Decode every image fully, convert to 8-bit RGB, resize once to ``data.load_size`` (bicubic,
   square, as the reference's resize) and write lossless PNGs
   (:mod:`cyclegan.data.images`), in a process pool of ``data.num_workers``.
3. Write ``manifest.json``: the source, the parameters that shape the output, counts per
   split, a sha256 per file, and every rejected or ignored file with its reason.

The output is built in a hidden sibling folder and swapped in at the end, so an interrupted
run never leaves a half-written ``data/prepared``. It is deterministic: the same source and
parameters give byte-identical files and manifest (no timestamps, sorted keys, results
independent of the worker count). Raw data is only read.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL

from cyclegan.config import Config, DataConfig
from cyclegan.data import sources, synthetic
from cyclegan.data.images import ImageRejected, convert_file, sha256_bytes
from cyclegan.errors import DataError
from cyclegan.log import progress_enabled, redact_values
from cyclegan.paths import Paths

log = logging.getLogger("cyclegan.data")

REQUIRED_SPLITS = ("trainA", "trainB", "testA", "testB")
GT_SPLITS = {"testA_gt": "testA", "testB_gt": "testB"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Below this many jobs per worker a pool costs more to start than it saves.
MIN_JOBS_PER_WORKER = 64
RESIZE = "bicubic"
ALPHA = "composited on white"


def prepare(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Fetch/generate ``cfg.data.source`` into ``paths.raw``, prepare it into
    ``paths.prepared`` (reference layout + ``manifest.json``) and return the manifest.

    Raises :class:`~cyclegan.errors.DataError` for a bad source, a checksum mismatch, an
    unsafe archive, S3 without credentials, an empty required split, or more rejected files
    than ``data.max_reject_fraction``."""
    dc = cfg.data
    source = sources.resolve(dc.source)
    started = time.monotonic()
    paths.raw.mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing is fetched
    with Workers(resolve_workers(dc.num_workers)) as workers:
        fetched = sources.fetch(source, dc, paths.raw, workers.map)
        _refuse_overlap(fetched.root, paths.prepared)
        plan = plan_splits(fetched.root)
        manifest = _build(plan, fetched, source, dc, paths.prepared, workers)
    log.info(
        "prepared %s in %.1fs: %s; %d rejected",
        paths.prepared,
        time.monotonic() - started,
        ", ".join(f"{k} {v}" for k, v in manifest["counts"].items()),
        len(manifest["rejected"]),
    )
    return manifest


# ---------------------------------------------------------------------------------------------
# Planning: which file goes where
# ---------------------------------------------------------------------------------------------


@dataclass
class SplitPlan:
    """The files of one split: ``jobs`` maps an output name to its source file."""

    name: str
    jobs: dict[str, Path]
    ignored: list[dict[str, str]]


def plan_splits(root: Path) -> dict[str, SplitPlan]:
    """Scan ``root``'s split folders. A required split folder that is missing is an error;
    hidden files are skipped silently; sub-folders and files without an image suffix are
    listed as ignored (they do not count as rejects)."""
    missing = [s for s in REQUIRED_SPLITS if not (root / s).is_dir()]
    if missing:
        raise DataError(
            f"the source {root} has no {', '.join(m + '/' for m in missing)} folder",
            "a dataset needs trainA/ trainB/ testA/ testB/ of images",
        )
    plans = {}
    for split in (*REQUIRED_SPLITS, *GT_SPLITS):
        folder = root / split
        if folder.is_dir():
            plans[split] = _plan_split(split, folder)
    return plans


def _plan_split(split: str, folder: Path) -> SplitPlan:
    ignored: list[dict[str, str]] = []
    candidates: list[Path] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        rel = f"{split}/{p.name}"
        if p.is_dir():
            ignored.append({"file": rel, "reason": "a sub-folder (only top-level files are read)"})
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append({"file": rel, "reason": "not an image file name"})
        else:
            candidates.append(p)
    # Outputs are NAME.png; when two sources share a stem (a.jpg, a.png) keep both apart.
    stems: dict[str, int] = {}
    for p in candidates:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    jobs = {}
    for p in candidates:
        out = f"{p.stem}.png" if stems[p.stem] == 1 else f"{p.stem}_{p.suffix[1:].lower()}.png"
        jobs[out] = p
    return SplitPlan(split, jobs, ignored)


def _refuse_overlap(root: Path, prepared: Path) -> None:
    r, p = root.resolve(), prepared.resolve()
    if r == p or r.is_relative_to(p) or p.is_relative_to(r):
        raise DataError(
            f"data.source {root} overlaps the output folder {prepared}",
            "point data.source at the raw data, not at the prepared folder",
        )


# ---------------------------------------------------------------------------------------------
# Conversion and the manifest
# ---------------------------------------------------------------------------------------------


def _convert_job(job: tuple[str, str, str, int, int]) -> tuple[str, str | None, str | None]:
    """Worker: ``(rel, src, dst, load_size, max_pixels)`` -> ``(rel, sha256, reject reason)``."""
    rel, src, dst, load_size, max_pixels = job
    try:
        data = convert_file(src, load_size, max_pixels)
    except ImageRejected as e:
        return rel, None, str(e)
    except Exception as e:  # never let one odd file stop the whole stage
        return rel, None, f"could not be converted: {type(e).__name__}: {e}"[:300]
    # Outside the try: a failing write (a full disk) is our problem, not the file's.
    Path(dst).write_bytes(data)
    return rel, sha256_bytes(data), None


def _build(
    plan: dict[str, SplitPlan],
    fetched: sources.Fetched,
    source: sources.Source,
    dc: DataConfig,
    out: Path,
    workers: Workers,
) -> dict[str, Any]:
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        jobs = []
        for split, sp in plan.items():
            (tmp / split).mkdir()
            for name, src in sp.jobs.items():
                rel = f"{split}/{name}"
                jobs.append((rel, str(src), str(tmp / rel), dc.load_size, dc.max_image_pixels))
        files: dict[str, str] = {}
        rejected: list[dict[str, str]] = []
        src_rel = {j[0]: _source_rel(Path(j[1]), fetched.root) for j in jobs}
        for rel, digest, reason in _progress(workers.map(_convert_job, jobs), len(jobs)):
            if digest is not None:
                files[rel] = digest
            else:
                rejected.append({"file": src_rel[rel], "reason": str(reason)})
        warnings = _match_ground_truth(plan, files, rejected, tmp)
        _check_counts(plan, files, rejected, len(jobs), dc)
        manifest = _manifest(plan, files, rejected, warnings, fetched, source, dc)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _source_rel(src: Path, root: Path) -> str:
    try:
        return src.relative_to(root).as_posix()
    except ValueError:
        return str(src)


def _match_ground_truth(
    plan: dict[str, SplitPlan],
    files: dict[str, str],
    rejected: list[dict[str, str]],
    tmp: Path,
) -> list[str]:
    """Drop ground-truth images whose test image is missing (evaluation pairs by name) and
    report test images without ground truth."""
    warnings = []
    for gt, test in GT_SPLITS.items():
        if gt not in plan:
            continue
        test_names = {r.split("/", 1)[1] for r in files if r.startswith(f"{test}/")}
        gt_names = {r.split("/", 1)[1] for r in files if r.startswith(f"{gt}/")}
        for name in sorted(gt_names - test_names):
            rel = f"{gt}/{name}"
            del files[rel]
            (tmp / rel).unlink()
            rejected.append({"file": rel, "reason": f"no matching {test}/ image"})
        lacking = sorted(test_names - gt_names)
        if lacking:
            warnings.append(f"{len(lacking)} {test} images have no {gt} image: {lacking[:5]}")
            log.warning("%s", warnings[-1])
    return warnings


def _check_counts(
    plan: dict[str, SplitPlan],
    files: dict[str, str],
    rejected: list[dict[str, str]],
    n_jobs: int,
    dc: DataConfig,
) -> None:
    for r in rejected[:10]:
        log.warning("rejected %s: %s", r["file"], r["reason"])
    if len(rejected) > 10:
        log.warning("... and %d more rejected files (see the manifest)", len(rejected) - 10)
    for split in REQUIRED_SPLITS:
        n = sum(1 for r in files if r.startswith(f"{split}/"))
        if n == 0:
            bad = [r for r in rejected if r["file"].startswith(f"{split}/")]
            detail = f" ({len(bad)} files rejected, e.g. {bad[0]['reason']})" if bad else ""
            raise DataError(
                f"split {split} has no usable images{detail}",
                f"add images to {split}/ of the source",
            )
    if n_jobs and len(rejected) / n_jobs > dc.max_reject_fraction:
        raise DataError(
            f"{len(rejected)} of {n_jobs} files rejected ({100 * len(rejected) / n_jobs:.1f}%), "
            f"more than data.max_reject_fraction={dc.max_reject_fraction}; first: "
            f"{rejected[0]['file']}: {rejected[0]['reason']}",
            "fix or remove the bad files, or raise data.max_reject_fraction",
        )


def _manifest(
    plan: dict[str, SplitPlan],
    files: dict[str, str],
    rejected: list[dict[str, str]],
    warnings: list[str],
    fetched: sources.Fetched,
    source: sources.Source,
    dc: DataConfig,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "load_size": dc.load_size,
        "max_image_pixels": dc.max_image_pixels,
        "max_reject_fraction": dc.max_reject_fraction,
        "resize": RESIZE,
        "alpha": ALPHA,
        "format": "png",
    }
    if source.kind == "synthetic":
        params["seed"] = dc.seed
        params["synthetic"] = {
            "image_size": dc.synthetic.image_size,
            "n_train_a": dc.synthetic.n_train_a,
            "n_train_b": dc.synthetic.n_train_b,
            "n_test": dc.synthetic.n_test,
            "fingerprint": synthetic.fingerprint(dc.synthetic, dc.seed),
        }
    counts = {split: sum(1 for r in files if r.startswith(f"{split}/")) for split in plan}
    return {
        "format": MANIFEST_FORMAT,
        # Redacted: a signed URL's token must not land in a versioned file.
        "source": redact_values({"kind": source.kind, "spec": source.spec, **fetched.info}),
        "params": params,
        "software": {"pillow": PIL.__version__},
        "counts": counts,
        "files": dict(sorted(files.items())),
        "rejected": sorted(rejected, key=lambda r: r["file"]),
        "ignored": sorted((i for sp in plan.values() for i in sp.ignored), key=lambda r: r["file"]),
        "warnings": warnings,
    }


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with two renames (the old copy is removed afterwards)."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    try:
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except OSError:
        # ``out`` may be a mount point (a Kubeflow artifact volume) that cannot be renamed:
        # replace its contents instead.
        out.mkdir(parents=True, exist_ok=True)
        for child in list(out.iterdir()):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        for child in sorted(tmp.iterdir()):
            shutil.move(str(child), str(out / child.name))
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(prepared: Path) -> dict[str, Any]:
    """The manifest of a prepared folder (a :class:`DataError` if there is none)."""
    path = prepared / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {prepared}", "run `cyclegan prepare`")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Parallelism and progress
# ---------------------------------------------------------------------------------------------


def resolve_workers(num_workers: int | str) -> int:
    """``data.num_workers`` as a number: ``auto`` is the CPUs this process may use."""
    if num_workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
    return max(1, int(num_workers))


class Workers:
    """A process pool started on first use, and only for batches big enough to pay for it.

    Uses the ``forkserver`` start method where available: forking a process that may hold
    threads (boto3, tqdm) is unsafe, and spawn would re-run the caller's ``__main__``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._pool: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[Any]:
        """``map(fn, jobs)`` in order, in parallel when worth it."""
        workers = min(self.n, len(jobs) // MIN_JOBS_PER_WORKER)
        if workers <= 1:
            return map(fn, jobs)
        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            self._pool = cf.ProcessPoolExecutor(max_workers=self.n, mp_context=ctx)
        chunk = max(1, len(jobs) // (self.n * 16))
        return self._pool.map(fn, jobs, chunksize=chunk)


def _progress(items: Iterable[Any], total: int, desc: str = "prepare") -> Iterator[Any]:
    """tqdm on a terminal, else a log line every 10 seconds."""
    if progress_enabled():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit="img", file=sys.stderr)
        return
    last = time.monotonic()
    for i, item in enumerate(items, 1):
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log.info("  %s: %d/%d images", desc, i, total)
        yield item
