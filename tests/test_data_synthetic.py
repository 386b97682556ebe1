"""The built-in dataset: an exactly invertible mapping, a hard-looking but learnable
problem (fixed palette, fixed areas), unpaired train splits, determinism."""

from __future__ import annotations

import numpy as np

from cyclegan.config import SyntheticConfig
from cyclegan.data import synthetic
from cyclegan.data.dataset import load_rgb


def _pairs(split: str, n: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    imgs, gts = zip(*(synthetic.scene(seed, split, i, size) for i in range(n)), strict=True)
    return np.stack(imgs), np.stack(gts)


def _gamut_colours() -> np.ndarray:
    axes = [np.arange(lo, hi + 1, dtype=np.uint8) for lo, hi in synthetic.A_GAMUT]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1)


def test_mapping_is_exact_on_the_a_gamut_and_not_an_involution() -> None:
    a = _gamut_colours()  # every domain-A colour there can be
    b = synthetic.to_b(a)
    assert np.array_equal(synthetic.to_a(b), a)
    # A pure shift, never clipped: every pixel moves by exactly SHIFT.
    assert (b.astype(int) - a.astype(int) == np.array(synthetic.SHIFT)).all()
    assert not np.array_equal(synthetic.to_b(b), a)  # A->B and B->A differ


def test_scenes_stay_in_the_gamut_and_ground_truth_round_trips() -> None:
    a, a_gt = _pairs("testA", 32)
    b, b_gt = _pairs("testB", 32)
    for ch, (lo, hi) in enumerate(synthetic.A_GAMUT):
        assert a[..., ch].min() >= lo and a[..., ch].max() <= hi
        assert b_gt[..., ch].min() >= lo and b_gt[..., ch].max() <= hi
    assert np.array_equal(synthetic.to_a(a_gt), a)
    assert np.array_equal(synthetic.to_b(b_gt), b)


def test_untranslated_psnr_is_low_on_the_defaults() -> None:
    d = SyntheticConfig()
    a, a_gt = _pairs("testA", d.n_test, size=d.image_size)
    b, b_gt = _pairs("testB", d.n_test, size=d.image_size)
    # The mapping must change the pixels a lot, so "do nothing" scores badly (8.1 dB).
    assert synthetic.psnr(a, a_gt) < 12.0
    assert synthetic.psnr(b, b_gt) < 12.0


def test_every_scene_shows_each_shape_whole_at_its_fixed_area() -> None:
    # Same colours in the same proportions in every image is what keeps the mapping
    # learnable under instance norm: no overlaps, nothing cut off, areas as designed.
    side = synthetic.BAR_HALF_LENGTH, synthetic.BAR_HALF_WIDTH
    nominal = {
        "bar": 4 * side[0] * side[1],
        "disc": np.pi * synthetic.DISC_RADIUS**2,
        "square": 4 * synthetic.SQUARE_HALF_SIDE**2,
        "triangle": 3 * np.sqrt(3) * synthetic.TRIANGLE_INRADIUS**2,
    }
    assert len(set(np.round(list(nominal.values()), 3))) == 4  # distinct areas
    for i in range(40):
        placed = synthetic.layout(np.random.default_rng([0, 2, i]), 32)
        assert [k for k, _ in placed] == list(synthetic.SHAPES)
        cover = sum(m.astype(int) for _, m in placed)
        assert cover.max() == 1  # no overlaps
        ss = cover.shape[0] // 32
        assert cover[:ss].sum() == cover[-ss:].sum() == 0  # clear of the border
        assert cover[:, :ss].sum() == cover[:, -ss:].sum() == 0
        for kind, mask in placed:
            assert abs(mask.mean() / nominal[kind] - 1) < 0.1, kind


def test_every_image_shows_all_palette_colours() -> None:
    """Every scene shows every palette colour (the blur softens edges; the smallest shape's
    centre stays within 32 of 255 levels of its colour)."""
    palette = np.array(list(synthetic.PALETTE.values()), dtype=float)
    a, _ = _pairs("testA", 64)
    for img in a:
        px = img.reshape(-1, 1, 3).astype(float)
        nearest = np.abs(px - palette[None]).max(axis=2).min(axis=0)
        assert (nearest <= 32).all(), nearest


def test_train_domains_are_unpaired_and_deterministic() -> None:
    a1, _ = synthetic.scene(0, "trainA", 3, 32)
    a2, _ = synthetic.scene(0, "trainA", 3, 32)
    b, _ = synthetic.scene(0, "trainB", 3, 32)
    assert np.array_equal(a1, a2)
    # B's scene number 3 is not the B rendering of A's scene number 3 (independent streams).
    assert not np.array_equal(b, synthetic.to_b(a1))
    assert not np.array_equal(synthetic.scene(1, "trainA", 3, 32)[0], a1)
    # The B image really is in domain B: its corner (always background) maps back to the
    # A background colour.
    back = synthetic.to_a(b)[0, 0].astype(int)
    assert np.abs(back - synthetic.PALETTE["background"]).max() <= 8


def test_generate_writes_the_layout_and_reuses_it(tmp_path) -> None:
    cfg = SyntheticConfig(image_size=16, n_train_a=5, n_train_b=4, n_test=3)
    out = synthetic.generate(tmp_path / "synthetic", cfg, seed=7)
    counts = {p.name: len(list(p.iterdir())) for p in out.iterdir() if p.is_dir()}
    assert counts == {
        "trainA": 5,
        "trainB": 4,
        "testA": 3,
        "testB": 3,
        "testA_gt": 3,
        "testB_gt": 3,
    }
    gt = load_rgb(out / "testA_gt" / "00002.png")
    assert gt.shape == (16, 16, 3)
    assert np.array_equal(synthetic.to_a(gt), load_rgb(out / "testA" / "00002.png"))
    before = (out / "trainA" / "00000.png").stat().st_mtime_ns
    synthetic.generate(tmp_path / "synthetic", cfg, seed=7)
    assert (out / "trainA" / "00000.png").stat().st_mtime_ns == before  # reused, not rewritten
    synthetic.generate(tmp_path / "synthetic", cfg, seed=8)  # other settings: regenerated
    assert not np.array_equal(load_rgb(out / "testA_gt" / "00002.png"), gt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no temp left
