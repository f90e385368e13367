"""FID and KID from features or their moments: pure float64 numpy, no I/O, no torch.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace of the square root is
computed as the sum of sqrt(eigenvalues) of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which
has the same eigenvalues as S1 S2: two symmetric eigendecompositions, no complex intermediate
values and no failure on singular covariances (always the case with fewer images than the 2048
feature dimensions, the usual situation on a CPU). scipy.linalg.sqrtm of the non-symmetric
product, the usual route, needs an epsilon on the diagonal there and can return complex parts.

KID (Binkowski et al. 2018): the unbiased estimate of the squared MMD with the polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets of equal size from both sets; its
standard deviation over the subsets is reported too. Unlike FID it has no bias at small N, which
is what a CPU run can afford.
"""
from __future__ import annotations

import numpy as np


def sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues
    from rounding are clipped to 0)."""
    a = np.asarray(a, dtype=np.float64)
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for symmetric PSD sigma1, sigma2."""
    s1h = sqrt_psd(sigma1)
    m = s1h @ np.asarray(sigma2, dtype=np.float64) @ s1h
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID on Inception moments)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"moment shapes disagree: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
    # A squared Wasserstein-2 distance: >= 0 exactly; only rounding can push it below.
    return max(fd, 0.0)


def moments_from_sums(n: int, total: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) from n, sum of rows and sum of row outer products (float64).
    The same estimator as np.cov(x, rowvar=False), which pytorch-fid and clean-fid use."""
    if n < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {n}")
    total = np.asarray(total, np.float64)
    mu = total / n
    sigma = (np.asarray(outer, np.float64) - np.outer(total, mu)) / (n - 1)
    return mu, (sigma + sigma.T) / 2


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased squared MMD from the kernel blocks of two sets of equal size m."""
    m = kxx.shape[0]
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2.0 * kxy.mean())


def kid(x: np.ndarray, y: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> dict:
    """KID between feature sets x [n, d] and y [m, d]: mean and standard deviation over `subsets`
    random pairs of subsets of size min(subset_size, n, m), drawn without replacement by a
    seeded generator (so the same features give the same KID). Kernels in float64.

    The kernel matrices are computed once over all rows when that costs less than computing each
    subset's blocks (n^2 + m^2 + n m < 3 * subsets * size^2), and indexed per subset."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sets must be [n, d] with the same d, got {x.shape} and {y.shape}")
    size = min(int(subset_size), len(x), len(y))
    if size < 2 or subsets < 1:
        raise ValueError(f"KID needs >= 2 rows per set and >= 1 subset (got {len(x)}, {len(y)} rows, "
                         f"subset size {subset_size}, {subsets} subsets)")
    rng = np.random.default_rng(seed)
    whole = len(x) ** 2 + len(y) ** 2 + len(x) * len(y) < 3 * subsets * size ** 2
    if whole:
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    values = np.empty(subsets)
    for s in range(subsets):
        i = rng.choice(len(x), size, replace=False)
        j = rng.choice(len(y), size, replace=False)
        if whole:
            values[s] = mmd2_unbiased(kxx[np.ix_(i, i)], kyy[np.ix_(j, j)], kxy[np.ix_(i, j)])
        else:
            a, b = x[i], y[j]
            values[s] = mmd2_unbiased(_poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b))
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if subsets > 1 else 0.0,
            "subset_size": size, "subsets": int(subsets), "seed": int(seed)}
