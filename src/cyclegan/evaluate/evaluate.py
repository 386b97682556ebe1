"""The ``evaluate`` stage: translate the test splits, score them, record the numbers.

Reads the model folder (``G_A`` = A->B, ``G_B`` = B->A) and ``testA/``, ``testB/`` (plus
``testA_gt/``, ``testB_gt/`` when the dataset has ground truth). Writes:

- ``metrics/eval.json`` (a DVC metrics file, numbers only): the contract's ``fid_A2B``,
  ``fid_B2A``, ``kid_A2B``, ``kid_B2A``, ``num_images_A2B``, ``num_images_B2A`` and, with ground
  truth, ``psnr_A2B``, ``ssim_A2B``, ``psnr_B2A``, ``ssim_B2A``; and baselines that make those
  readable (see :func:`compute_metrics`).
- ``metrics/eval_details.json``: what the numbers depend on (the Inception weights' sha256,
  KID settings, device, MLflow run) and how many images were embedded or read from the
  feature cache.
- ``plots/eval_samples.png``: input | translation | ground truth, per direction.

Every distinct image is embedded once per run, whatever roles it plays (testA is both an input
and a target). The real images' features are kept in ``paths.cache / "fid"`` across runs
(``evaluate.feature_cache``), so re-evaluating a retrained model embeds only its translations
(see :mod:`cyclegan.evaluate.feature_cache`).

Then logs the metrics, the weights' hash (tag ``fid_weights_sha256``) and those files into
the training's MLflow run (``run.json`` in the model folder). MLflow trouble after the files
are written only warns: the metrics are never lost to a tracking failure.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cyclegan import tracking
from cyclegan.config import Config
from cyclegan.data.dataset import list_images, load_rgb
from cyclegan.errors import DataError
from cyclegan.evaluate.feature_cache import FeatureCache, collect_features
from cyclegan.evaluate.fid import fid_from_features, kernel_inception_distance
from cyclegan.evaluate.inception import FEATURE_DIM, PREPROCESSING, FIDInception
from cyclegan.evaluate.metrics import PSNR_CAP_DB, mean_psnr_ssim
from cyclegan.fsio import write_json
from cyclegan.hardware import apply_threads, resolve_device
from cyclegan.log import progress_enabled, redact
from cyclegan.models.io import load_generator, read_model_json
from cyclegan.paths import Paths
from cyclegan.translate import translate_arrays

log = logging.getLogger("cyclegan.evaluate")

EVAL_FILE = "eval.json"
FEATURE_CACHE_DIR = "fid"  # under Paths.cache
DETAILS_FILE = "eval_details.json"
SAMPLES_FILE = "eval_samples.png"
KID_SEED = 0
CONTRACT_KEYS = ("fid_A2B", "fid_B2A", "kid_A2B", "kid_B2A", "num_images_A2B", "num_images_B2A")
GT_KEYS = ("psnr_A2B", "ssim_A2B", "psnr_B2A", "ssim_B2A")


@dataclass
class TestSplit:
    """One direction's test images: inputs, the other domain's real images, ground truth."""

    names: list[str]
    inputs: list[np.ndarray]
    targets: list[np.ndarray]  # real images of the output domain (unpaired)
    ground_truth: list[np.ndarray] | None  # the input rendered in the output domain


def load_split(prepared: Path, src: str, dst: str, max_images: int | None) -> TestSplit:
    """``test{src}`` as inputs, ``test{dst}`` as the real target domain, ``test{src}_gt``."""
    inputs = list_images(prepared / f"test{src}")[:max_images]
    targets = list_images(prepared / f"test{dst}")[:max_images]
    for folder, files in ((f"test{src}", inputs), (f"test{dst}", targets)):
        if len(files) < 2:
            raise DataError(
                f"{prepared / folder} has {len(files)} images; FID and KID need at least 2",
                "run `cyclegan prepare` (or check --prepared-dir)",
            )
    gt_dir = prepared / f"test{src}_gt"
    ground_truth = None
    if gt_dir.is_dir():
        missing = [p.name for p in inputs if not (gt_dir / p.name).is_file()]
        if missing:
            raise DataError(
                f"{gt_dir} lacks the ground truth of {len(missing)} test{src} images "
                f"(e.g. {missing[0]})",
                "re-run `cyclegan prepare`; ground truth must share the input's file name",
            )
        ground_truth = [load_rgb(gt_dir / p.name) for p in inputs]
    return TestSplit(
        names=[p.name for p in inputs],
        inputs=[load_rgb(p) for p in inputs],
        targets=[load_rgb(p) for p in targets],
        ground_truth=ground_truth,
    )


class _Progress:
    """A tqdm bar on a terminal, otherwise a log line about every 10%."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self._next = max(1, total // 10)
        self._bar = None
        if progress_enabled():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="img")

    def __call__(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.done >= self._next or self.done == self.total:
            log.info("%s: %d/%d images", self.desc, self.done, self.total)
            self._next = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def compute_metrics(
    splits: dict[str, TestSplit],
    translations: dict[str, list[np.ndarray]],
    features: Callable[[Sequence[np.ndarray]], np.ndarray],
    kid_subsets: int,
    kid_subset_size: int,
) -> dict[str, float | int]:
    """All numbers of ``eval.json`` for directions ``"A2B"``/``"B2A"``.

    Per direction D (A2B: G_A(testA) against testB / testA_gt):

    - ``fid_D``, ``kid_D`` (+ ``kid_D_std`` over subsets), ``num_images_D``;
    - ``fid_D_identity``, ``kid_D_identity``: the untranslated inputs against the targets,
      what doing nothing scores;
    - with ground truth: ``psnr_D``, ``ssim_D`` against it, ``psnr_D_identity``,
      ``ssim_D_identity`` (inputs against ground truth), and ``fid_D_gt``, ``kid_D_gt``: the
      ground truth against the targets, what a perfect translator scores at this test-set size
      (FID is biased upward at small N).
    """
    feats: dict[int, np.ndarray] = {}

    def f(images: list[np.ndarray]) -> np.ndarray:
        # Each list is asked for once, even when it serves several metrics (``evaluate``
        # passes a lookup by content, so equal images in other lists are not embedded again).
        if id(images) not in feats:
            feats[id(images)] = features(images)
        return feats[id(images)]

    def kid(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        return kernel_inception_distance(a, b, kid_subsets, kid_subset_size, seed=KID_SEED)

    out: dict[str, float | int] = {}
    for d, split in splits.items():
        fake, target = f(translations[d]), f(split.targets)
        out[f"fid_{d}"] = fid_from_features(fake, target)
        out[f"kid_{d}"], out[f"kid_{d}_std"] = kid(fake, target)
        out[f"num_images_{d}"] = len(split.inputs)
        ident = f(split.inputs)
        out[f"fid_{d}_identity"] = fid_from_features(ident, target)
        out[f"kid_{d}_identity"] = kid(ident, target)[0]
        if split.ground_truth is not None:
            out[f"psnr_{d}"], out[f"ssim_{d}"] = mean_psnr_ssim(translations[d], split.ground_truth)
            out[f"psnr_{d}_identity"], out[f"ssim_{d}_identity"] = mean_psnr_ssim(
                split.inputs, split.ground_truth
            )
            gt = f(split.ground_truth)
            out[f"fid_{d}_gt"] = fid_from_features(gt, target)
            out[f"kid_{d}_gt"] = kid(gt, target)[0]
    return out


def sample_grid(sections: dict[str, list[list[np.ndarray]]], cell: int = 128) -> Image.Image:
    """Sections side by side, each a titled column block: one row per sample, cells
    input | translation | ground truth (when present). Small images are enlarged by an integer
    factor (nearest neighbour, so pixels stay visible)."""
    gap, title_h = 4, 14
    all_imgs = [img for rows in sections.values() for row in rows for img in row]
    side = max(max(img.shape[0], img.shape[1]) for img in all_imgs)
    k = max(1, cell // side)
    cw = ch = side * k
    blocks = []
    for title, rows in sections.items():
        cols = max(len(r) for r in rows)
        w = cols * cw + (cols - 1) * gap
        h = title_h + len(rows) * (ch + gap)
        block = Image.new("RGB", (w, h), (255, 255, 255))
        ImageDraw.Draw(block).text((2, 1), title, fill=(0, 0, 0))
        for r, row in enumerate(rows):
            for c, img in enumerate(row):
                im = Image.fromarray(img)
                im = im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)
                block.paste(im, (c * (cw + gap), title_h + r * (ch + gap)))
        blocks.append(block)
    width = sum(b.width for b in blocks) + gap * 4 * (len(blocks) - 1)
    grid = Image.new("RGB", (width, max(b.height for b in blocks)), (255, 255, 255))
    x = 0
    for b in blocks:
        grid.paste(b, (x, 0))
        x += b.width + gap * 4
    return grid


def evaluate(cfg: Config, paths: Paths) -> dict[str, float | int]:
    """Run the stage (see the module docstring); returns the contents of ``eval.json``."""
    ecfg = cfg.evaluate
    device = resolve_device(ecfg.device)
    t0 = time.perf_counter()
    # Weights first: a missing Inception should fail before minutes of translation.
    inception = FIDInception.load(ecfg.fid_weights, str(device))
    # The CPUs this process may use (affinity, cgroup quota), not the load of the moment:
    # the numbers must be the same whatever else the machine is doing.
    apply_threads(ecfg.num_threads, load_aware=False)
    meta = read_model_json(paths.model)
    splits = {
        "A2B": load_split(paths.prepared, "A", "B", ecfg.max_images),
        "B2A": load_split(paths.prepared, "B", "A", ecfg.max_images),
    }
    translations = {}
    for d, split in splits.items():
        net = load_generator(paths.model, d, device)  # type: ignore[arg-type]
        translations[d] = list(translate_arrays(net, split.inputs, device, ecfg.batch_size))
        del net
    t_translate = time.perf_counter() - t0

    t1 = time.perf_counter()
    cache = (
        FeatureCache(paths.cache / FEATURE_CACHE_DIR, inception.feature_context, FEATURE_DIM)
        if ecfg.feature_cache
        else None
    )
    # Real images (cacheable: they do not depend on the model), then the translations.
    sets = [(imgs, True) for s in splits.values() for imgs in (s.inputs, s.targets)]
    sets += [(s.ground_truth, True) for s in splits.values() if s.ground_truth is not None]
    sets += [(imgs, False) for imgs in translations.values()]

    t_network = 0.0

    def embed(images: list[np.ndarray]) -> np.ndarray:
        nonlocal t_network
        progress = _Progress(len(images), "FID Inception")
        t = time.perf_counter()
        try:
            return inception.features(images, ecfg.batch_size, progress)
        finally:
            t_network += time.perf_counter() - t
            progress.close()

    table, counts = collect_features(sets, embed, cache)
    t_embed = time.perf_counter() - t1
    img_per_s = counts.embedded / t_network if counts.embedded and t_network > 0 else None
    log.info(
        "FID Inception: embedded %d images%s, %d from the feature cache%s",
        counts.embedded,
        f" ({img_per_s:.1f} img/s)" if img_per_s else "",
        counts.from_cache,
        f" ({cache.folder})" if cache else " (evaluate.feature_cache is off)",
    )
    t2 = time.perf_counter()
    metrics = compute_metrics(splits, translations, table, ecfg.kid_subsets, ecfg.kid_subset_size)
    t_score = time.perf_counter() - t2
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"metric {k} is {v}")  # a bug: every metric here is finite

    paths.metrics.mkdir(parents=True, exist_ok=True)
    paths.plots.mkdir(parents=True, exist_ok=True)
    eval_file = paths.metrics / EVAL_FILE
    samples_file = paths.plots / SAMPLES_FILE
    write_json(eval_file, metrics)
    n = ecfg.num_samples
    sections = {}
    for d, split in splits.items():
        rows = []
        for i in range(min(n, len(split.inputs))):
            row = [split.inputs[i], translations[d][i]]
            if split.ground_truth is not None:
                row.append(split.ground_truth[i])
            rows.append(row)
        cols = "input | translation" + (" | ground truth" if split.ground_truth else "")
        sections[f"{d}: {cols}"] = rows
    sample_grid(sections).save(samples_file)

    details: dict[str, Any] = {
        "fid_weights_sha256": inception.weights.sha256,
        "fid_weights_source": inception.weights.source,
        "fid_preprocessing": PREPROCESSING,
        "kid": {
            "subsets": ecfg.kid_subsets,
            "subset_size": {
                d: min(ecfg.kid_subset_size, len(s.inputs), len(s.targets))
                for d, s in splits.items()
            },
            "seed": KID_SEED,
        },
        "psnr_cap_db": PSNR_CAP_DB,
        "ground_truth": {d: s.ground_truth is not None for d, s in splits.items()},
        "device": str(device),
        "seconds": {
            "translate": round(t_translate, 2),
            "inception": round(t_embed, 2),
            "metrics": round(t_score, 2),
        },
        # Images that went through the network in this run, over the network's time alone.
        "inception_img_per_s": round(img_per_s, 2) if img_per_s else None,
        "inception_images": {
            "distinct": counts.distinct,
            "embedded": counts.embedded,
            "from_cache": counts.from_cache,
        },
        "feature_cache": str(cache.folder) if cache else None,
        "model_dir": str(paths.model),
        "prepared": str(paths.prepared),
    }
    log_to_mlflow(cfg, paths, metrics, details, [eval_file, samples_file], meta)
    log.info(
        "fid_A2B %.2f (untranslated %.2f), fid_B2A %.2f; %d + %d images",
        metrics["fid_A2B"],
        metrics["fid_A2B_identity"],
        metrics["fid_B2A"],
        metrics["num_images_A2B"],
        metrics["num_images_B2A"],
    )
    return metrics


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------


def _final_step(meta: dict[str, Any]) -> int:
    """The training's last step from model.json, so eval metrics sit at the end of the
    loss curves in the UI; 0 if training did not record it."""
    for key in ("step", "global_step", "steps"):
        value = meta.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def log_to_mlflow(
    cfg: Config,
    paths: Paths,
    metrics: dict[str, float | int],
    details: dict[str, Any],
    files: list[Path],
    meta: dict[str, Any],
) -> str | None:
    """Write eval_details.json (with the run id) and log the metrics, the Inception weights'
    hash and ``files`` into the training's run. The files are written first, so nothing is
    lost to MLflow trouble: an unreachable server keeps the records in the project's spool
    (sent by the next command), with a warning. Returns the run id (None if none is known)."""
    from cyclegan.spool import Spool

    uri = tracking.use(cfg.mlflow)
    details_file = paths.metrics / DETAILS_FILE
    c, created = None, False
    run_id = (tracking.read_run_file(paths.run_file) or {}).get("run_id")
    if tracking.is_reachable(uri, timeout=5):
        c = tracking.client(uri)
        run_id, created = tracking.stage_run(c, cfg, paths, "evaluation")
    details["mlflow_run_id"] = run_id
    write_json(details_file, details)
    if not run_id:
        log.warning(
            "MLflow at %s is unreachable and no training run is known: the evaluation is in "
            "%s only",
            redact(uri),
            paths.metrics,
        )
        return None
    ts, step = int(time.time() * 1000), _final_step(meta)
    spool = Spool(paths.spool, run_id, uri)
    sent = tracking.log_or_spool(
        c,
        run_id,
        spool,
        metrics=[(k, float(v), ts, step) for k, v in metrics.items()],
        tags={
            "fid_weights_sha256": details["fid_weights_sha256"],
            "fid_weights_source": details["fid_weights_source"],
        },
        files=[(f, "evaluation") for f in (*files, details_file)],
    )
    if created and c is not None:
        if sent:
            c.set_terminated(run_id)
        else:
            spool.terminate("FINISHED")
    return run_id
