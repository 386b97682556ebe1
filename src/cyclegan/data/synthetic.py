"""The built-in unpaired dataset: procedurally generated scenes in two colour domains.

Why a synthetic dataset
    The embedded default must run offline in minutes and must let us *prove* that training
    works. FID alone cannot do that; ground truth can. Every test image therefore comes with
    its exact rendering in the other domain (``testA_gt/``, ``testB_gt/``), so evaluation can
    report PSNR/SSIM of the translations.

Scenes
    A flat background with four shapes, one of each kind: a bar, a disc, a square and a
    triangle, each at a random position and angle, fully inside the image and not
    overlapping, anti-aliased by supersampling and softened by a small Gaussian blur
    (:data:`BLUR_SIGMA`, 1.6 px at 32 px; see :func:`_soften`), under a mild linear lighting gradient
    (brightness x0.96..x1.04) in a random direction. No noise. Each kind, and the background,
    always has its own colour from a fixed five-colour palette (:data:`PALETTE`), and each
    kind has a fixed size, all different (bar 8.4% of the image, disc 5.3%, square 4.0%,
    triangle 2.9%, background the remaining ~79%).

The mapping A -> B (:func:`to_b`)
    A fixed shift of every pixel's colour, in 8-bit units::

        B = A + (+100, -100, +100)          inverse (:func:`to_a`): A = B - (+100, -100, +100)

    Domain-A colours live in the box r, b <= 155, g >= 100 (:data:`A_GAMUT`), so the shift
    never clips and ``to_a(to_b(a)) == a`` exactly: green-toned scenes become pink/violet
    ones (sand-green background -> lilac, ochre disc -> crimson, teal square -> violet, ...).
    Every pixel moves by 100 in each channel, so the untranslated PSNR of testA against
    testA_gt is 20*log10(255/100) = 8.1 dB whatever the scene.

Why it is learnable by a CycleGAN with instance normalisation
    InstanceNorm removes each feature map's per-image mean and scale, so a generator cannot
    recover the absolute colour of a flat image (a random background colour per image is not
    learnable). Here (1) every scene shows the same five palette colours in the same
    proportions, so per-image statistics are the same for every image and normalisation
    loses nothing the generator needs; (2) a constant colour shift is invisible to the first
    normalised layer (a conv of ``x + t`` differs from a conv of ``x`` by a constant per
    feature map), so A and B scenes look alike to the generator and it only has to paint the
    structure it sees in the target domain's palette; the identity loss itself teaches that.

Why it is a real unpaired problem with one right answer
    Train scenes of A and of B are drawn from independent random streams: no B image is the
    rendering of any A scene. From unpaired data alone, any one-to-one matching of the A
    palette onto the B palette is consistent with cycle consistency; what decides is the
    discriminator (each colour has its own shape and area) and the generator's preference for
    small colour changes. A shift makes the true matching the one with the smallest total
    squared colour change (for any other matching the cost grows by the squared distances
    between the swapped colours), so both pull the same way. Trials with a channel
    permutation (sand -> sky blue, ...) and shapes of random size and overlap showed the
    failure this avoids: CycleGAN swapped the colours of two similar shapes and stalled at
    ~14 dB PSNR.

Everything is deterministic for ``(seed, split, index)``, independent of worker count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cyclegan.config import SyntheticConfig
from cyclegan.data.images import encode_png

log = logging.getLogger("cyclegan.data")

# Bump when rendering changes, so a stale raw/synthetic folder is regenerated.
GENERATOR_VERSION = 3
#: Gaussian blur of every scene, in pixels at 32 px (scaled with the image size).
BLUR_SIGMA = 1.6

#: The A->B colour shift, in 8-bit units per channel.
SHIFT: tuple[int, int, int] = (100, -100, 100)
#: Per-channel (min, max) of every domain-A pixel: the shift keeps them inside 0..255.
A_GAMUT: tuple[tuple[int, int], ...] = (
    (0, 255 - SHIFT[0]),
    (-SHIFT[1], 255),
    (0, 255 - SHIFT[2]),
)
#: Domain-A palette (8-bit RGB), one colour per role.
PALETTE: dict[str, tuple[int, int, int]] = {
    "background": (133, 230, 128),  # sage green     -> B (233, 130, 228) lilac
    "bar": (13, 153, 20),  # deep green             -> B (113, 53, 120) plum
    "disc": (143, 115, 13),  # ochre                -> B (243, 15, 113) crimson
    "square": (13, 115, 140),  # teal               -> B (113, 15, 240) violet
    "triangle": (77, 242, 13),  # lime              -> B (177, 142, 113) tan
}
#: Shape kinds in placement order (largest first, so rejection sampling rarely retries),
#: with their fixed sizes as fractions of the image side.
SHAPES: tuple[str, ...] = ("bar", "disc", "square", "triangle")
BAR_HALF_LENGTH, BAR_HALF_WIDTH = 0.30, 0.07
DISC_RADIUS = 0.13
SQUARE_HALF_SIDE = 0.10
TRIANGLE_INRADIUS = 0.075
SHADING = 0.04  # at most +-4% brightness across the image
_MAX_TRIES = 500

# Split name -> (random-stream id, the domain the split's images are in).
_SPLITS: dict[str, tuple[int, str]] = {
    "trainA": (0, "A"),
    "trainB": (1, "B"),
    "testA": (2, "A"),
    "testB": (3, "B"),
}


def to_b(a: np.ndarray) -> np.ndarray:
    """The A->B mapping on a uint8 ``...x3`` image: add :data:`SHIFT`. Exact (no clipping)
    for colours in :data:`A_GAMUT`, which every domain-A scene stays in."""
    return _shift(a, SHIFT)


def to_a(b: np.ndarray) -> np.ndarray:
    """The B->A mapping, the exact inverse of :func:`to_b`: subtract :data:`SHIFT`."""
    return _shift(b, tuple(-c for c in SHIFT))


def _shift(img: np.ndarray, by: Sequence[int]) -> np.ndarray:
    out = np.asarray(img, dtype=np.int16) + np.asarray(by, dtype=np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


def _supersample(size: int) -> int:
    # Anti-aliasing factor: smooth edges at the embedded sizes, bounded cost at large ones.
    return 4 if size <= 64 else 2 if size <= 256 else 1


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside a shape, in the shape's own (rotated, centred) coordinates."""
    if kind == "bar":
        return (np.abs(u) <= BAR_HALF_LENGTH) & (np.abs(v) <= BAR_HALF_WIDTH)
    if kind == "disc":
        return u * u + v * v <= DISC_RADIUS**2
    if kind == "square":
        return (np.abs(u) <= SQUARE_HALF_SIDE) & (np.abs(v) <= SQUARE_HALF_SIDE)
    # Equilateral triangle: inside the three edge half-planes.
    mask = np.ones(u.shape, dtype=bool)
    for k in range(3):
        t = 2 * np.pi * k / 3
        mask &= u * np.cos(t) + v * np.sin(t) <= TRIANGLE_INRADIUS
    return mask


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates in units of the image side (size-independent
    geometry)."""
    n = size * _supersample(size)
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return x, y


def layout(rng: np.random.Generator, size: int) -> list[tuple[str, np.ndarray]]:
    """Place one shape of each kind: ``[(kind, mask on the supersampled grid), ...]``.
    Shapes are rejection-sampled until they neither overlap nor touch the outermost pixel
    row, so every scene shows each colour at its fixed area."""
    x, y = _grid(size)
    ss = _supersample(size)
    blocked = np.ones(x.shape, dtype=bool)
    blocked[ss:-ss, ss:-ss] = False  # one output pixel of margin: nothing is cut off
    placed = []
    for kind in SHAPES:
        for _ in range(_MAX_TRIES):
            cx, cy = rng.uniform(0.1, 0.9, size=2)
            angle = rng.uniform(0.0, np.pi)
            c, s = np.cos(angle), np.sin(angle)
            mask = _shape_mask(kind, (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c)
            if not (mask & blocked).any():
                break
        else:  # not reached at the default sizes; keep the scene valid but say so
            log.debug("could not place a %s without overlap; keeping the last try", kind)
        blocked |= mask
        placed.append((kind, mask))
    return placed


def _soften(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (reflect borders). Soft edges keep the task about colour: at
    32 px a ResNet generator's few-pixel edge errors would otherwise dominate FID, which is
    blind to the colour mapping but sensitive to crisp-vs-blurred edges. A convex
    combination of in-gamut colours, so to_b stays exact."""
    if sigma <= 0:
        return img
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(r, r) if a == axis else (0, 0) for a in range(3)]
        padded = np.pad(img, pad, mode="reflect")
        img = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), axis, padded)
    return img


def render_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """One random domain-A scene as a ``size x size x 3`` uint8 image."""
    ss = _supersample(size)
    x, y = _grid(size)
    img = np.empty((*x.shape, 3), dtype=np.float64)
    img[:] = np.asarray(PALETTE["background"], dtype=np.float64) / 255.0
    for kind, mask in layout(rng, size):
        img[mask] = np.asarray(PALETTE[kind], dtype=np.float64) / 255.0

    # Mild linear lighting gradient in a random direction: smooth, no noise.
    theta = rng.uniform(0.0, 2 * np.pi)
    strength = rng.uniform(0.0, SHADING)
    shade = 1.0 + strength * 2 * ((x - 0.5) * np.cos(theta) + (y - 0.5) * np.sin(theta))
    img *= shade[..., None]

    if ss > 1:  # box-filter the supersampled image: anti-aliased edges
        img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    img = _soften(img, BLUR_SIGMA * size / 32)
    out = np.rint(img * 255.0)
    for ch, (lo, hi) in enumerate(A_GAMUT):  # a no-op for the palette above; keeps to_b exact
        out[..., ch] = np.clip(out[..., ch], lo, hi)
    return out.astype(np.uint8)


def scene(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of ``split`` as ``(image, ground truth)``: the image in the split's
    domain and its rendering in the other domain (uint8 arrays)."""
    stream, domain = _SPLITS[split]
    a = render_scene(np.random.default_rng([seed, stream, index]), size)
    b = to_b(a)
    return (a, b) if domain == "A" else (b, a)


def _counts(cfg: SyntheticConfig) -> dict[str, int]:
    return {
        "trainA": cfg.n_train_a,
        "trainB": cfg.n_train_b,
        "testA": cfg.n_test,
        "testB": cfg.n_test,
    }


def _stamp(cfg: SyntheticConfig, seed: int) -> dict[str, object]:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": cfg.image_size,
        "counts": _counts(cfg),
    }


def _render_job(job: tuple[str, int, int, int, str]) -> None:
    """Render one scene and write it (and its ground truth for test splits)."""
    split, index, seed, size, out = job
    img, gt = scene(seed, split, index, size)
    root = Path(out)
    name = f"{index:05d}.png"
    (root / split / name).write_bytes(encode_png(img))
    if split.startswith("test"):
        (root / f"{split}_gt" / name).write_bytes(encode_png(gt))


MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


def generate(out_dir: Path, cfg: SyntheticConfig, seed: int, map_fn: MapFn | None = None) -> Path:
    """Write the dataset in the reference layout (with ``testA_gt/``, ``testB_gt/``) to
    ``out_dir``, unless it already holds exactly this dataset (a stamp file records the
    settings). Built in a temporary sibling and renamed, so an interrupted run leaves no half
    folder. ``map_fn(fn, jobs)`` may run the jobs in parallel (default: in this process)."""
    stamp = _stamp(cfg, seed)
    stamp_file = out_dir / "synthetic.json"
    if stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                log.info("synthetic dataset already in %s (seed %d), reusing it", out_dir, seed)
                return out_dir
        except (OSError, ValueError):
            pass  # unreadable stamp: regenerate
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in (*_SPLITS, "testA_gt", "testB_gt"):
        (tmp / split).mkdir(parents=True)
    jobs = [
        (split, i, seed, cfg.image_size, str(tmp))
        for split, n in _counts(cfg).items()
        for i in range(n)
    ]
    log.info("generating the synthetic dataset: %d scenes at %dpx", len(jobs), cfg.image_size)
    for _ in (map_fn or map)(_render_job, jobs):
        pass
    (tmp / "synthetic.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)
    return out_dir


def fingerprint(cfg: SyntheticConfig, seed: int) -> str:
    """A short hash of the settings that determine the dataset (for logs and the manifest)."""
    blob = json.dumps(_stamp(cfg, seed), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    """PSNR in dB between two uint8 images (or stacks of them), peak 255."""
    mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
