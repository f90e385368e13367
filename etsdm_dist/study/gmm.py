"""Closed forms for an isotropic Gaussian-mixture data set under a VP diffusion.

Data: x0 ~ sum_k w_k N(mu_k, s_k^2 I) in d dimensions. Because q(x_t | x0) = N(alpha x0, sigma^2 I)
is Gaussian, the marginal at time t is again a mixture,

    p_t(x) = sum_k w_k N(x; alpha mu_k, v_k I),      v_k = alpha^2 s_k^2 + sigma^2,

so its score is  grad log p_t(x) = -sum_k r_k(x) (x - alpha mu_k) / v_k  with posterior
responsibilities r_k(x) = w_k N(x; alpha mu_k, v_k I) / p_t(x), and the ideal (MMSE) noise predictor
is

    eps*(x, t) = E[eps | x_t = x] = -sigma grad log p_t(x) = sigma sum_k r_k(x) (x - alpha mu_k) / v_k.

Why it is singular in t (continuous time): as t -> 0, v_k -> s_k^2 > 0 and r_k stays smooth, so
eps* ~ sigma_t g(x) with g bounded; d eps*/dt ~ (d sigma_t/dt) g(x), and for a VP schedule with
beta(0) > 0, sigma_t ~ sqrt(beta(0) t), hence |d eps*/dt| ~ sqrt(beta(0)) / (2 sqrt(t)) -> infinity.
That 1/sqrt(t) law only holds while sigma_t << s_k; for s_k << sigma_t << 1 the modes look like
points and eps* ~ (x - alpha mu_k)/sigma, whose t-derivative at fixed x grows like 1/t instead.

Everything is computed in float64: responsibilities use log-sum-exp, and near t = 0 the variances
are tiny.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

_F64 = torch.float64


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Isotropic mixture. ``means`` [K, d], ``stds`` [K], ``weights`` [K] (normalised here)."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        means = torch.as_tensor(self.means, dtype=_F64)
        stds = torch.as_tensor(self.stds, dtype=_F64).reshape(-1)
        w = torch.as_tensor(self.weights, dtype=_F64).reshape(-1)
        if means.dim() != 2 or stds.shape[0] != means.shape[0] or w.shape[0] != means.shape[0]:
            raise ValueError("means must be [K, d]; stds and weights [K]")
        if bool((stds <= 0).any()) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError("stds must be > 0 and weights >= 0 with a positive sum")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", w / w.sum())

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_modes(self) -> int:
        return int(self.means.shape[0])

    # ------------------------------------------------------------------ data
    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        return (self.means[k] + self.stds[k, None] * z).to(dtype)

    # ------------------------------------------------------------------ marginals at time t
    def _terms(self, x: torch.Tensor, alpha, sigma):
        """Per-component log(w_k N(x; alpha mu_k, v_k I)) [N, K], diff x - alpha mu_k [N, K, d],
        and v_k broadcast to [N, K]. alpha / sigma: scalars or [N]."""
        x = torch.as_tensor(x).to(_F64)
        a = torch.as_tensor(alpha, dtype=_F64).reshape(-1, 1)  # [N or 1, 1]
        s = torch.as_tensor(sigma, dtype=_F64).reshape(-1, 1)
        v = a ** 2 * self.stds[None, :] ** 2 + s ** 2  # [N or 1, K]
        diff = x[:, None, :] - a[:, :, None] * self.means[None, :, :]  # [N, K, d]
        sq = (diff ** 2).sum(-1)
        d = self.dim
        logc = torch.log(self.weights)[None, :] - 0.5 * d * torch.log(2 * math.pi * v) - 0.5 * sq / v
        return logc, diff, v.expand_as(logc)

    def log_prob(self, x: torch.Tensor, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """log p_t(x) [N] (alpha=1, sigma=0 gives the data density)."""
        logc, _, _ = self._terms(x, alpha, sigma)
        return torch.logsumexp(logc, dim=1)

    def responsibilities(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        logc, _, _ = self._terms(x, alpha, sigma)
        return torch.softmax(logc, dim=1)

    def score(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """grad_x log p_t(x) [N, d], float64."""
        logc, diff, v = self._terms(x, alpha, sigma)
        r = torch.softmax(logc, dim=1)
        return -((r / v)[:, :, None] * diff).sum(1)

    def eps(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Ideal noise prediction E[eps | x_t = x] = -sigma * score, float64 [N, d].

        Written as sigma * sum_k r_k diff_k / v_k rather than via score() only for clarity; it is
        the same expression."""
        s = torch.as_tensor(sigma, dtype=_F64).reshape(-1, 1)
        return -s * self.score(x, alpha, sigma)

    def eps_model(self, schedule) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """model_fn(x, t_true) -> exact eps in x's dtype, using ``schedule``'s alpha_t / sigma_t
        (discrete schedules interpolate log alpha between integers, as the samplers do)."""

        def model_fn(x: torch.Tensor, t) -> torch.Tensor:
            t = torch.as_tensor(t, dtype=_F64)
            if t.dim() == 0:
                t = t.expand(x.shape[0])
            a = schedule.alpha(t, _F64)
            s = schedule.sigma(t, _F64)
            return self.eps(x, a, s).to(x.dtype)

        return model_fn

    def posterior_mean_x0_mc(self, x: torch.Tensor, alpha: float, sigma: float, num: int,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Monte-Carlo E[x0 | x_t = x] by self-normalised importance sampling from the prior.

        Independent of the closed form above (used to test it): draws ``num`` prior samples and
        weights each by the Gaussian likelihood N(x; alpha x0, sigma^2 I). Accurate only when sigma
        is not tiny compared with the spread of the data (otherwise the weights degenerate)."""
        x0 = self.sample(num, generator=generator, dtype=_F64)  # [M, d]
        x = torch.as_tensor(x).to(_F64)
        sq = ((x[:, None, :] - alpha * x0[None, :, :]) ** 2).sum(-1)  # [N, M]
        w = torch.softmax(-0.5 * sq / sigma ** 2, dim=1)
        return w @ x0


def ring_mixture(num_modes: int = 8, radius: float = 1.0, std: float = 0.1, dim: int = 2,
                 weights: Optional[torch.Tensor] = None) -> GaussianMixture:
    """``num_modes`` equal-weight modes on a circle of ``radius`` in the first two coordinates."""
    if dim < 2:
        raise ValueError("ring_mixture needs dim >= 2")
    ang = torch.arange(num_modes, dtype=_F64) * (2 * math.pi / num_modes)
    means = torch.zeros(num_modes, dim, dtype=_F64)
    means[:, 0], means[:, 1] = radius * torch.cos(ang), radius * torch.sin(ang)
    w = torch.ones(num_modes, dtype=_F64) if weights is None else weights
    return GaussianMixture(means, torch.full((num_modes,), float(std), dtype=_F64), w)


# ---------------------------------------------------------------------- two-sample distances
def rbf_self_term(y: torch.Tensor, bandwidth: float) -> float:
    """Mean off-diagonal kernel value of y with itself: the y-y term of :func:`mmd2_rbf`, so a
    fixed reference set can be scored against many sample sets at the cost of the x terms only."""
    y = torch.as_tensor(y).to(_KDT)
    m = y.shape[0]
    k = _rbf(y, y, bandwidth)
    return (float(k.sum(dtype=_F64)) - float(k.diagonal().sum(dtype=_F64))) / (m * (m - 1))


# Kernel matrices are evaluated in float32 (sums accumulate in float64): they dominate the toy's
# run time, and a kernel value's float32 error (~1e-7) is far below the MMD^2 values that matter.
_KDT = torch.float32


def _rbf(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    # ||a||^2 + ||b||^2 - 2 a.b (one matmul; cdist is several times slower here), clamped at 0
    # against cancellation for nearly equal points.
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return torch.exp((-0.5 / bandwidth ** 2) * d2.clamp_(min=0.0))


def mmd2_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float,
             y_self: Optional[float] = None) -> float:
    """Unbiased MMD^2 between samples x [N, d] and y [M, d] with the fixed-bandwidth kernel
    k(a, b) = exp(-||a - b||^2 / (2 bandwidth^2)).

    A fixed bandwidth (not the median heuristic) keeps numbers comparable across models and
    seeds. Unbiased means E[estimate] = 0 for equal distributions, so small negative values occur
    and are reported as they are. ``y_self``: precomputed ``rbf_self_term(y, bandwidth)``."""
    x, y = torch.as_tensor(x).to(_KDT), torch.as_tensor(y).to(_KDT)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("mmd2_rbf needs at least two samples on each side")
    sxx = rbf_self_term(x, bandwidth)
    syy = rbf_self_term(y, bandwidth) if y_self is None else y_self
    return sxx + syy - 2.0 * float(_rbf(x, y, bandwidth).sum(dtype=_F64)) / (n * m)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 128,
                       seed: int = 0, num_quantiles: int = 512) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of W2^2
    between the 1-D projections, each computed from matching quantiles (so N != M is allowed).
    The directions come from ``seed``, so every comparison uses the same projections."""
    x, y = torch.as_tensor(x).to(_F64), torch.as_tensor(y).to(_F64)
    gen = torch.Generator().manual_seed(int(seed))
    th = torch.randn(x.shape[1], num_projections, generator=gen, dtype=_F64)
    th = th / th.norm(dim=0, keepdim=True)
    q = (torch.arange(num_quantiles, dtype=_F64) + 0.5) / num_quantiles
    px = torch.quantile(x @ th, q, dim=0)
    py = torch.quantile(y @ th, q, dim=0)
    return float(((px - py) ** 2).mean().sqrt())
