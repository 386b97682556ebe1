"""FID and KID from Inception features (float64 throughout).

FID (Heusel et al. 2017) between Gaussians fitted to two feature sets::

    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)

The trace term is computed from eigenvalues rather than a matrix square root:
``tr((S1 S2)^1/2) = sum sqrt(eig(R S2 R))`` with ``R = S1^1/2`` (both symmetric, so
``numpy.linalg.eigh`` applies and the eigenvalues are real; round-off negatives are clipped
to 0). ``eig(S1 S2) = eig(R S2 R)`` because the two products are similar. As accurate as
``scipy.linalg.sqrtm`` and several times faster.

With fewer images than feature dimensions (every test set here: 64 images, 2048 features)
the covariances have rank < N and the same eigenvalues come from an ``N1 x N2`` matrix: with
``S1 = P'P`` and ``S2 = Q'Q`` (``P``, ``Q`` the centred features over ``sqrt(N - 1)``), the
non-zero eigenvalues of ``S1 S2`` are the squared singular values of ``P Q'``, so
``tr((S1 S2)^1/2)`` is the sum of those singular values. Exact, and milliseconds instead of
two 2048 x 2048 eigendecompositions; :func:`fid_from_features` picks this route when it is
the smaller problem.

KID (Binkowski et al. 2018): the unbiased MMD^2 estimator with the cubic polynomial kernel
``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets. Unlike FID it is unbiased, so
it is comparable across test-set sizes; it can be slightly negative when the sets match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Up to this many kernel entries ((N1 + N2)^2, 128 MB of float64) KID computes each set's
# kernel matrix once and indexes it per subset, rather than multiplying again per subset.
KID_GRAM_MAX_ENTRIES = 1 << 24


@dataclass(frozen=True)
class Statistics:
    """Mean and covariance of a feature set (float64), and how many samples made them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def sqrt_sigma(self) -> np.ndarray:
        """The symmetric square root of ``sigma`` (PSD up to round-off)."""
        return _sqrt_psd(self.sigma)


def statistics(features: np.ndarray) -> Statistics:
    """Mean and (unbiased, ``n - 1``) covariance of ``N x D`` features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors (N x D), got shape {f.shape}")
    return Statistics(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), n=len(f))


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    s1: Statistics, s2: Statistics, sqrt_sigma1: np.ndarray | None = None
) -> float:
    """FID between two :class:`Statistics`; pass ``sqrt_sigma1`` to reuse ``S1^1/2``."""
    if s1.mu.shape != s2.mu.shape:
        raise ValueError(f"feature sizes differ: {s1.mu.shape} vs {s2.mu.shape}")
    r = _sqrt_psd(s1.sigma) if sqrt_sigma1 is None else sqrt_sigma1
    m = r @ s2.sigma @ r
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = s1.mu - s2.mu
    return float(diff @ diff + np.trace(s1.sigma) + np.trace(s2.sigma) - 2.0 * tr_covmean)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two ``N x D`` feature sets (float64; exact for any N, see module doc)."""
    x = np.asarray(f1, dtype=np.float64)
    y = np.asarray(f2, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need two N x D feature sets, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(x)} and {len(y)}")
    d = x.shape[1]
    if max(len(x), len(y)) > d:
        return frechet_distance(statistics(x), statistics(y))
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    p = (x - mu_x) / np.sqrt(len(x) - 1)
    q = (y - mu_y) / np.sqrt(len(y) - 1)
    tr_covmean = float(np.linalg.svd(p @ q.T, compute_uv=False).sum())
    diff = mu_x - mu_y
    # tr(S) = squared Frobenius norm of the centred, scaled features.
    return float(diff @ diff + (p * p).sum() + (q * q).sum() - 2.0 * tr_covmean)


def kernel_inception_distance(
    f1: np.ndarray,
    f2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over subsets) between two ``N x D`` feature sets.

    Each subset draws ``m = min(subset_size, N1, N2)`` vectors from each set without
    replacement; the seed makes the number reproducible.
    """
    x_all = np.asarray(f1, dtype=np.float64)
    y_all = np.asarray(f2, dtype=np.float64)
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x_all)}, {len(y_all)}")
    d = x_all.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    # Three matrix products in all instead of three per subset: on a busy CPU the per-subset
    # products cost seconds (measured: 1.6 s against 0.08 s for 100 subsets of 64 images).
    gram = (len(x_all) + len(y_all)) ** 2 <= KID_GRAM_MAX_ENTRIES
    if gram:
        kxx_all = (x_all @ x_all.T / d + 1.0) ** 3
        kyy_all = (y_all @ y_all.T / d + 1.0) ** 3
        kxy_all = (x_all @ y_all.T / d + 1.0) ** 3
    for i in range(num_subsets):
        ix = rng.choice(len(x_all), m, replace=False)
        iy = rng.choice(len(y_all), m, replace=False)
        if gram:
            kxx, kyy, kxy = (
                kxx_all[np.ix_(ix, ix)],
                kyy_all[np.ix_(iy, iy)],
                kxy_all[np.ix_(ix, iy)],
            )
        else:
            x, y = x_all[ix], y_all[iy]
            kxx = (x @ x.T / d + 1.0) ** 3
            kyy = (y @ y.T / d + 1.0) ** 3
            kxy = (x @ y.T / d + 1.0) ** 3
        # Unbiased: the diagonals k(x_i, x_i) are left out of the within-set means.
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = within - 2.0 * kxy.mean()
    return float(values.mean()), float(values.std())
