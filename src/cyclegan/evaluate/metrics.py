"""Ground-truth metrics: PSNR and SSIM on 8-bit RGB images.

Both compare ``H x W x 3`` uint8 images on the [0, 255] scale (data range L = 255), image by
image; a test set's number is the mean over its images (the usual convention in papers).

- **PSNR** = ``10 log10(L^2 / MSE)`` over all pixels and channels. Identical images have
  MSE 0 and infinite PSNR, which JSON cannot hold: each image's PSNR is capped at
  :data:`PSNR_CAP_DB` (100 dB; one grey level of error everywhere is 48.13 dB).
- **SSIM** (Wang et al. 2004, the standard settings): an 11x11 Gaussian window with sigma 1.5,
  ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, population (1/N-weighted) moments, computed per
  channel over the window positions that fit inside the image (no padding, as the authors'
  MATLAB ``ssim_index``), averaged over positions and channels. torchmetrics 1.9 instead pads
  by reflection and averages over the padded border too, which differs in the 4th-5th digit;
  its SSIM map without the 5-pixel border equals ours. Images smaller than 11 pixels use the
  largest odd window that fits (with the same sigma). Identical images give exactly 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0
DATA_RANGE = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_BATCH_ELEMENTS = 1 << 22  # pixels x channels per batch: 32 MB per float64 tensor


def _as_float(img: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``1 x 3 x H x W`` float64 on [0, 255]."""
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"expected an H x W x C uint8 image, got {img.dtype} {img.shape}")
    return torch.tensor(img, dtype=torch.float64).permute(2, 0, 1)[None]  # copies: read-only ok


def _check_pair(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    """PSNR in dB between two uint8 images, capped at :data:`PSNR_CAP_DB`."""
    _check_pair(x, y)
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(DATA_RANGE**2 / mse))


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM between two uint8 images (see the module docstring for the settings)."""
    _check_pair(x, y)
    return float(_ssim_batch(_as_float(x), _as_float(y))[0])


def _ssim_batch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair in two ``N x C x H x W`` float64 batches of one size."""
    channels, h, w = a.shape[1:]
    size = min(SSIM_WINDOW, h, w)
    size -= 1 - size % 2  # odd, so the window has a centre pixel
    win = _gaussian_window(size, SSIM_SIGMA, channels)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=channels)  # valid positions only

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.mean(dim=(1, 2, 3))


def mean_psnr_ssim(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> tuple[float, float]:
    """Mean PSNR (dB) and mean SSIM over pairs of images."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need equal, non-zero numbers of images, got {len(xs)} and {len(ys)}")
    p = [psnr(x, y) for x, y in zip(xs, ys, strict=True)]
    # Consecutive pairs of one size go through the convolutions together: one image at a time,
    # a test set of small images spent seconds in per-call overhead.
    s: list[float] = []
    i = 0
    while i < len(xs):
        _check_pair(xs[i], ys[i])
        per_batch = max(1, SSIM_BATCH_ELEMENTS // xs[i].size)
        j = i + 1
        while j < len(xs) and j - i < per_batch and xs[j].shape == xs[i].shape:
            _check_pair(xs[j], ys[j])
            j += 1
        a = torch.cat([_as_float(x) for x in xs[i:j]])
        b = torch.cat([_as_float(y) for y in ys[i:j]])
        s.extend(_ssim_batch(a, b).tolist())
        i = j
    return float(np.mean(p)), float(np.mean(s))
