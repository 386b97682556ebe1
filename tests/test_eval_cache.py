"""The real images are scored once: Inception features of the test sets are computed once per
run and reused across runs from ``.cyclegan/cache/fid``, keyed by the images' pixels and the
weights' sha256; damaged cache files are recomputed, never used.

The stage tests run the real evaluation (real FID Inception on CPU, tiny generators, 3 images
per split at 32 px) and count the images that reach the network by wrapping
``FIDInception.features`` from here. The unit tests drive :mod:`feature_cache` directly with
a small deterministic feature function in place of Inception, which is all that module sees.
The last tests check that the maths a warm run still does (KID, SSIM), made cheaper, gives the
numbers of the straightforward computation.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cyclegan.config import Config
from cyclegan.evaluate import fid
from cyclegan.evaluate.evaluate import evaluate
from cyclegan.evaluate.feature_cache import FeatureCache, collect_features, image_key
from cyclegan.evaluate.fid import kernel_inception_distance
from cyclegan.evaluate.inception import PACKAGED_SHA256, FIDInception, packaged_weights_path
from cyclegan.evaluate.metrics import mean_psnr_ssim, ssim
from cyclegan.models import GeneratorSpec, init_weights, save_generators
from cyclegan.paths import Paths
from tests.servers import free_port
from tests.test_eval_stage import make_project

N = 3  # images per split: 6 sets (testA, testB, two ground truths, two translations) of 3
CACHE_WARNING = "feature cache file"


def project_paths(root: Path) -> Paths:
    """The layout make_project writes, with the project's state folder inside ``root``."""
    return Paths(
        prepared=root / "data" / "prepared",
        model=root / "models" / "cyclegan",
        metrics=root / "m",
        plots=root / "p",
        state=root / ".cyclegan",
    )


def config(feature_cache: bool = True, fid_weights: str | None = None) -> Config:
    cfg = Config()
    # A refused port: MLflow logging fails at once with a warning, and is not what is tested.
    cfg.mlflow.tracking_uri = f"http://127.0.0.1:{free_port()}"
    cfg.evaluate.device = "cpu"
    cfg.evaluate.kid_subsets = 5
    cfg.evaluate.num_samples = 2
    cfg.evaluate.feature_cache = feature_cache
    cfg.evaluate.fid_weights = fid_weights
    return cfg


class Counted:
    """Every image list that reached ``FIDInception.features``, while installed."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.calls: list[list[np.ndarray]] = []
        real = FIDInception.features

        def counting(inception: FIDInception, images: Any, *args: Any, **kwargs: Any) -> np.ndarray:
            self.calls.append(list(images))
            return real(inception, images, *args, **kwargs)

        mp.setattr(FIDInception, "features", counting)

    @property
    def images(self) -> int:
        return sum(len(c) for c in self.calls)


def run(paths: Paths, cfg: Config) -> tuple[dict, dict, Counted]:
    """One evaluation; its metrics, eval_details.json and what Inception was given."""
    with pytest.MonkeyPatch.context() as mp:
        counted = Counted(mp)
        metrics = evaluate(cfg, paths)
    details = json.loads((paths.metrics / "eval_details.json").read_text())
    return metrics, details, counted


def cache_files(paths: Paths) -> list[Path]:
    return sorted((paths.cache / "fid").glob("*/*.npz"))


def new_generators(paths: Paths, seed: int) -> None:
    """What a retrain leaves in the model folder: other generator weights."""
    spec = GeneratorSpec(ngf=8, n_blocks=1)
    g = torch.Generator().manual_seed(seed)
    nets = [spec.build(), spec.build()]
    for net in nets:
        init_weights(net, generator=g)
    save_generators(paths.model, nets[0], nets[1], spec, extra={"step": 456})


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Counted]:
    """A project evaluated once with the cache on (cold): its root, metrics and counts."""
    root = tmp_path_factory.mktemp("warm")
    make_project(root, n=N)
    metrics, _, counted = run(project_paths(root), config())
    return root, metrics, counted


@pytest.fixture
def project(warm: tuple[Path, dict, Counted], tmp_path: Path) -> Paths:
    """A copy of the warm project (model, data and cache), for one test to change."""
    shutil.copytree(warm[0], tmp_path / "project")
    return project_paths(tmp_path / "project")


@pytest.mark.slow
def test_a_cold_run_embeds_each_distinct_set_once_and_caches_the_real_ones(
    warm: tuple[Path, dict, Counted],
) -> None:
    root, _, counted = warm
    # testA and testB each play two roles (input, target) but are embedded once: 6 sets.
    assert [len(c) for c in counted.calls] == [6 * N]
    details = json.loads((root / "m" / "eval_details.json").read_text())
    assert details["inception_images"] == {"distinct": 6 * N, "embedded": 6 * N, "from_cache": 0}
    assert len(cache_files(project_paths(root))) == 4  # testA, testB, testA_gt, testB_gt


@pytest.mark.slow
def test_after_a_retrain_only_the_translations_are_embedded_with_identical_numbers(
    project: Paths,
) -> None:
    new_generators(project, seed=1)
    warm_metrics, details, counted = run(project, config())
    assert counted.images == 2 * N  # G_A(testA) and G_B(testB); every real image from disk
    assert details["inception_images"] == {
        "distinct": 6 * N,
        "embedded": 2 * N,
        "from_cache": 4 * N,
    }

    # The same evaluation without the cache embeds everything and gives the same numbers, to
    # the last bit: the cached features are the ones Inception computes.
    shutil.rmtree(project.cache)
    off_metrics, off_details, off_counted = run(project, config(feature_cache=False))
    assert off_counted.images == 6 * N
    assert off_details["inception_images"]["from_cache"] == 0
    assert off_details["feature_cache"] is None
    assert not project.cache.exists()  # cache off: nothing read, nothing written
    assert warm_metrics == off_metrics


@pytest.mark.slow
def test_the_cache_holds_exactly_what_inception_computes(project: Paths) -> None:
    testb = [
        np.asarray(Image.open(p).convert("RGB")) for p in sorted(project.prepared.glob("testB/*"))
    ]
    keys = [image_key(img) for img in testb]
    stored = None
    for path in cache_files(project):
        with np.load(path, allow_pickle=False) as z:
            if [bytes(k) for k in z["keys"]] == keys:
                stored = z["features"].astype(np.float64)
    assert stored is not None, "no cache file holds testB"
    fresh = FIDInception.load(device="cpu").features(testb)
    assert np.array_equal(stored, fresh)


@pytest.mark.slow
def test_a_changed_image_in_testB_is_embedded_again(project: Paths) -> None:
    changed = np.full((32, 32, 3), 77, dtype=np.uint8)
    Image.fromarray(changed).save(project.prepared / "testB" / "001.png")
    _, details, counted = run(project, config())
    # The changed image, and the two translations (one of them is of the changed image).
    assert counted.images == 1 + 2 * N
    assert details["inception_images"]["from_cache"] == 4 * N - 1
    assert sum(np.array_equal(img, changed) for c in counted.calls for img in c) == 1


@pytest.mark.slow
def test_other_weights_miss_the_cache(project: Paths) -> None:
    # The same network saved again is another file with another sha256: nothing is reused.
    other = project.state / "other_inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.save(torch.jit.load(str(packaged_weights_path())), str(other))
    _, details, counted = run(project, config(fid_weights=str(other)))
    assert details["fid_weights_sha256"] != PACKAGED_SHA256
    assert counted.images == 6 * N
    assert details["inception_images"]["from_cache"] == 0


def _edit(path: Path) -> None:
    """Change one feature and write a well-formed file with the original header."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["features"][0, 0] += 1.0
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_edit, _truncate], ids=["edited", "truncated"])
def test_a_damaged_cache_file_warns_once_and_is_recomputed_not_used(
    project: Paths,
    warm: tuple[Path, dict, Counted],
    damage: Callable[[Path], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    victim = cache_files(project)[0]
    with np.load(victim, allow_pickle=False) as z:
        original = z["features"].copy()
    damage(victim)

    with caplog.at_level(logging.WARNING, logger="cyclegan"):
        metrics, details, counted = run(project, config())

    warnings = [r.getMessage() for r in caplog.records if CACHE_WARNING in r.getMessage()]
    assert len(warnings) == 1 and str(victim) in warnings[0], warnings
    assert counted.images == N + 2 * N  # that set again, and the translations
    assert details["inception_images"]["from_cache"] == 3 * N
    assert metrics == warm[1]  # the damaged values played no part
    with np.load(victim, allow_pickle=False) as z:  # rewritten, whole again
        assert np.array_equal(z["features"], original)


# ---------------------------------------------------------------------------------------------
# feature_cache on its own
# ---------------------------------------------------------------------------------------------


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


class Embed:
    """A deterministic stand-in for Inception (4 features per image) that records its calls."""

    dim = 4

    def __init__(self) -> None:
        self.calls: list[list[np.ndarray]] = []

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        self.calls.append(images)
        return np.stack([np.r_[img.mean(axis=(0, 1)), img.std()] for img in images])


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[FeatureCache]:
    yield FeatureCache(tmp_path / "fid", "weights aaaa; test", Embed.dim)


def test_a_grown_set_embeds_only_the_new_image(cache: FeatureCache) -> None:
    old, new = _images(4, 0), _images(1, 1)[0]
    embed = Embed()
    collect_features([(old, True)], embed, cache)

    grown = [img.copy() for img in old] + [new]  # equal pixels, other arrays: still hits
    table, counts = collect_features([(grown, True)], embed, cache)
    assert len(embed.calls) == 2 and len(embed.calls[1]) == 1
    assert np.array_equal(embed.calls[1][0], new)
    assert (counts.embedded, counts.from_cache) == (1, 4)
    assert np.array_equal(table(grown), Embed()(grown))

    table, counts = collect_features([(grown, True)], embed, cache)
    assert len(embed.calls) == 2 and counts.from_cache == 5  # the grown set is stored whole


def test_equal_images_are_embedded_once_whatever_their_roles(tmp_path: Path) -> None:
    a, b, fake = _images(3, 0), _images(3, 1), _images(3, 2)
    embed = Embed()
    sets = [(a, True), (b, True), ([img.copy() for img in a], True), (fake, False)]
    table, counts = collect_features(sets, embed, None)
    assert [len(c) for c in embed.calls] == [9]
    assert (counts.distinct, counts.embedded, counts.from_cache) == (9, 9, 0)
    assert np.array_equal(table(a), Embed()(a))


def test_translations_are_not_written_to_the_cache(cache: FeatureCache) -> None:
    collect_features([(_images(3, 0), True), (_images(3, 1), False)], Embed(), cache)
    assert len(list(cache.folder.glob("*.npz"))) == 1


def test_another_context_sees_nothing(cache: FeatureCache, tmp_path: Path) -> None:
    imgs = _images(3, 0)
    collect_features([(imgs, True)], Embed(), cache)
    other = FeatureCache(tmp_path / "fid", "weights bbbb; test", Embed.dim)
    embed = Embed()
    _, counts = collect_features([(imgs, True)], embed, other)
    assert counts.from_cache == 0 and len(embed.calls[0]) == 3


def test_a_pickled_cache_file_is_refused_not_unpickled(
    cache: FeatureCache, caplog: pytest.LogCaptureFixture
) -> None:
    imgs = _images(3, 0)
    collect_features([(imgs, True)], Embed(), cache)
    (path,) = cache.folder.glob("*.npz")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["features"] = np.array([object()] * 3, dtype=object)  # only loads via pickle
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)

    embed = Embed()
    with caplog.at_level(logging.WARNING, logger="cyclegan"):
        table, counts = collect_features(
            [(imgs, True)], embed, FeatureCache(cache.folder.parent, cache.context, Embed.dim)
        )
    assert [r.getMessage() for r in caplog.records if CACHE_WARNING in r.getMessage()]
    assert counts.from_cache == 0 and np.array_equal(table(imgs), Embed()(imgs))


def test_concurrent_writers_and_readers_see_whole_files_only(
    cache: FeatureCache, caplog: pytest.LogCaptureFixture
) -> None:
    imgs = _images(6, 0)
    expected = Embed()(imgs)
    keys = [image_key(img) for img in imgs]
    done = threading.Event()
    wrong: list[str] = []

    def write() -> None:
        for _ in range(30):
            cache.store(keys, expected)

    def read() -> None:
        reader = FeatureCache(cache.folder.parent, cache.context, Embed.dim)
        while not done.is_set():
            rows, _ = reader.lookup([keys])
            # A miss is allowed (the file is not there yet); anything but the whole set is not.
            if rows and not (
                rows.keys() == set(keys)
                and np.array_equal(np.stack([rows[k] for k in keys]), expected)
            ):
                wrong.append("partial or wrong features read")

    with caplog.at_level(logging.WARNING, logger="cyclegan"):
        writers = [threading.Thread(target=write) for _ in range(2)]
        reader = threading.Thread(target=read)
        reader.start()
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        done.set()
        reader.join()
    assert not wrong
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert list(cache.folder.glob(".tmp-*")) == []


def test_a_cache_that_cannot_be_written_warns_once_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")  # the cache's parent is a file: every write fails
    cache = FeatureCache(blocker / "fid", "weights aaaa; test", Embed.dim)
    a, b = _images(3, 0), _images(3, 1)
    with caplog.at_level(logging.WARNING, logger="cyclegan"):
        table, counts = collect_features([(a, True), (b, True)], Embed(), cache)
    assert len([r for r in caplog.records if "could not write" in r.getMessage()]) == 1
    assert counts.embedded == 6 and np.array_equal(table(b), Embed()(b))


# ---------------------------------------------------------------------------------------------
# The maths a warm run still does, made cheap: same numbers as the straightforward way
# ---------------------------------------------------------------------------------------------


def test_kid_from_kernel_matrices_equals_kid_per_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 64)), rng.random((50, 64)) * 1.1
    fast = kernel_inception_distance(x, y, num_subsets=20, subset_size=30)
    monkeypatch.setattr(fid, "KID_GRAM_MAX_ENTRIES", 0)  # forces the per-subset products
    slow = kernel_inception_distance(x, y, num_subsets=20, subset_size=30)
    assert fast == pytest.approx(slow, rel=1e-12, abs=1e-15)


def test_batched_ssim_equals_ssim_image_by_image() -> None:
    rng = np.random.default_rng(0)
    sizes = [16, 16, 16, 24, 16, 9]  # runs of one size are batched, other sizes on their own
    xs = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in sizes]
    ys = [
        np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8) for x in xs
    ]
    _, mean_ssim = mean_psnr_ssim(xs, ys)
    assert mean_ssim == pytest.approx(
        np.mean([ssim(x, y) for x, y in zip(xs, ys, strict=True)]), rel=1e-14
    )
