"""Samplers with one signature: ``fn(model_fn, x_T, schedule, ts, *, generator=None, **opts) -> x``.

* ``model_fn(x, t) -> eps_hat`` takes the TRUE time as a tensor [B] (float64 grid values). Wrap a
  network in :class:`~etsdm_dist.diffusion.etsdm.ConditionedModel` so E-TSDM's f(t) is applied in one place.
* ``ts`` is a decreasing grid of steps + 1 times from :func:`time_grid`. A sampler makes ``steps``
  transitions ts[i] -> ts[i+1], evaluating the model at ts[0..steps-1], and returns x at ts[-1].
  ``denoise_to_zero=True`` adds one more evaluation at ts[-1] and returns the Tweedie estimate
  (x - sigma eps) / alpha, i.e. the DDIM convention of a final jump to the data.
* The state is float32 (float64 if x_T is float64); coefficients are computed in float64 from the
  schedule and applied as Python floats. Model outputs (possibly bf16) are cast to the state dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional

import torch

from etsdm_dist.diffusion.schedule import Schedule

GRID_KINDS = ("uniform", "quadratic", "logsnr")
DPM_VARIANTS = ("dpm_solver", "dpm_solver++")


# --------------------------------------------------------------------------- grids
def time_grid(schedule: Schedule, steps: int, kind: str = "uniform") -> torch.Tensor:
    """Decreasing float64 grid of ``steps + 1`` times from t_max to t_min.

    uniform / quadratic (t = t_min + (t_max - t_min) (k/steps)^2, dense near the data) are
    integer-valued in discrete time (strictly decreasing, so steps <= T - 1); logsnr is uniform in
    lambda and may hit non-integer discrete times (interpolated, see schedule.py)."""
    if kind not in GRID_KINDS:
        raise ValueError(f"sampler.grid must be one of {GRID_KINDS}, got {kind!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"sampler.steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    lo, hi = schedule.t_min, schedule.t_max
    k = torch.arange(steps + 1, dtype=torch.float64) / steps  # 0..1, ascending
    if kind == "logsnr":
        # lambda is decreasing in t: k = 0 (t_min) is the largest lambda.
        lam_at_min, lam_at_max = (float(v) for v in schedule.log_snr(torch.tensor([lo, hi], dtype=torch.float64), torch.float64))
        ts = schedule.t_from_log_snr(lam_at_min + (lam_at_max - lam_at_min) * k)
    elif kind == "uniform":
        ts = lo + (hi - lo) * k
    else:
        ts = lo + (hi - lo) * k ** 2
    ts[0], ts[-1] = lo, hi  # exact endpoints (inversion / rounding must not move them)
    if schedule.is_discrete and kind != "logsnr":
        if steps > schedule.num_timesteps - 1:
            raise ValueError(f"sampler.steps must be <= schedule.num_timesteps - 1 "
                             f"({schedule.num_timesteps - 1}) for integer {kind!r} grids, got {steps}")
        ts = torch.round(ts)
        # Rounding can merge neighbours near t_min (quadratic grids); push them apart, bottom-up.
        for i in range(1, steps + 1):
            if ts[i] <= ts[i - 1]:
                ts[i] = ts[i - 1] + 1
        if ts[-1] > hi:
            raise ValueError("internal: integer grid overflowed t_max")
    return ts.flip(0).contiguous()


# --------------------------------------------------------------------------- helpers
def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_grid(ts: torch.Tensor) -> torch.Tensor:
    ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError("ts must be a 1-D grid with at least 2 times")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("ts must be strictly decreasing (t_max first)")
    return ts


class _Coefs:
    """Float64 alpha, sigma, lambda on the grid, as Python floats."""

    def __init__(self, schedule: Schedule, ts: torch.Tensor) -> None:
        self.alpha = schedule.alpha(ts, torch.float64).tolist()
        self.sigma = schedule.sigma(ts, torch.float64).tolist()
        self.lam = schedule.log_snr(ts, torch.float64).tolist()


def _eval(model_fn, x: torch.Tensor, t: float) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
    return model_fn(x, tt).to(x.dtype)


def _finish(model_fn, x, t_last, c: _Coefs, denoise_to_zero: bool) -> torch.Tensor:
    if not denoise_to_zero:
        return x
    eps = _eval(model_fn, x, t_last)
    return (x - c.sigma[-1] * eps) / c.alpha[-1]


# --------------------------------------------------------------------------- DDPM / DDIM
def ddpm(model_fn: Callable, x_T: torch.Tensor, schedule: Schedule, ts, *,
         generator: Optional[torch.Generator] = None, variance: str = "beta_tilde",
         denoise_to_zero: bool = False) -> torch.Tensor:
    """Ancestral sampling. On any grid the step s -> t uses the grid's own
    beta = 1 - abar_s / abar_t, so skipping steps is the DDPM posterior of the coarser chain.
    ``variance``: "beta_tilde" (posterior variance) or "beta" (DDPM's upper choice)."""
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"sampler.variance must be 'beta' or 'beta_tilde', got {variance!r}")
    ts = _check_grid(ts)
    c = _Coefs(schedule, ts)
    x = x_T.to(_state_dtype(x_T))
    for i in range(len(ts) - 1):
        a_s, s_s, a_t, s_t = c.alpha[i], c.sigma[i], c.alpha[i + 1], c.sigma[i + 1]
        eps = _eval(model_fn, x, float(ts[i]))
        # beta = 1 - abar_s / abar_t computed as -expm1(2 (log a_s - log a_t)) for accuracy.
        beta = -math.expm1(2.0 * (math.log(a_s) - math.log(a_t)))
        mean = (x - (beta / s_s) * eps) / math.sqrt(1.0 - beta)
        var = beta * (s_t ** 2) / (s_s ** 2) if variance == "beta_tilde" else beta
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean + math.sqrt(var) * z
    return _finish(model_fn, x, float(ts[-1]), c, denoise_to_zero)


def ddim(model_fn: Callable, x_T: torch.Tensor, schedule: Schedule, ts, *,
         generator: Optional[torch.Generator] = None, eta: float = 0.0,
         denoise_to_zero: bool = False) -> torch.Tensor:
    """DDIM; eta = 0 is the deterministic probability-flow discretisation, eta = 1 matches DDPM's
    beta_tilde variance."""
    if not eta >= 0:
        raise ValueError(f"sampler.eta must be >= 0, got {eta!r}")
    ts = _check_grid(ts)
    c = _Coefs(schedule, ts)
    x = x_T.to(_state_dtype(x_T))
    for i in range(len(ts) - 1):
        a_s, s_s, a_t, s_t = c.alpha[i], c.sigma[i], c.alpha[i + 1], c.sigma[i + 1]
        eps = _eval(model_fn, x, float(ts[i]))
        x0 = (x - s_s * eps) / a_s
        beta = -math.expm1(2.0 * (math.log(a_s) - math.log(a_t)))
        noise_sd = eta * math.sqrt(beta) * s_t / s_s
        dir_sd = math.sqrt(max(s_t ** 2 - noise_sd ** 2, 0.0))
        x = a_t * x0 + dir_sd * eps
        if noise_sd > 0:
            x = x + noise_sd * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return _finish(model_fn, x, float(ts[-1]), c, denoise_to_zero)


# --------------------------------------------------------------------------- DPM-Solver
def _dpm_step(variant: str, order: int, x, hist, i: int, c: _Coefs):
    """One multistep update from grid point i to i+1 (derived from the exponential integrator).

    ``hist`` holds (lambda_j, m_j) for the last ``order`` evaluated points, newest last; m is eps
    (dpm_solver) or the x0 prediction (dpm_solver++). With u = lambda - lambda_i and the Taylor
    expansion m(u) = m + u m' + u^2/2 m'':
      noise:  x_t = (a_t/a_s) x - s_t [ (e^h-1) m + (e^h-1-h) m' + (e^h-1-h-h^2/2) m'' ]
      data:   x_t = (s_t/s_s) x + a_t [ (1-e^-h) m + (h-1+e^-h) m' + (h^2/2-h+1-e^-h) m'' ]
    where the derivatives come from divided differences of the stored m's (exact for polynomials
    of degree order-1, giving global order `order`)."""
    lam_s, lam_t = c.lam[i], c.lam[i + 1]
    h = lam_t - lam_s
    m0 = hist[-1][1]
    d1 = d2 = None
    if order >= 2:
        l1, m1 = hist[-2]
        f01 = (m0 - m1) / (lam_s - l1)  # first divided difference ~ m'
        d1 = f01
        if order >= 3:
            l2, m2 = hist[-3]
            f12 = (m1 - m2) / (l1 - l2)
            f012 = (f01 - f12) / (lam_s - l2)  # second divided difference ~ m''/2
            # Derivatives at lambda_s of the interpolating quadratic:
            d1 = f01 + f012 * (lam_s - l1)
            d2 = 2.0 * f012
    if variant == "dpm_solver":
        e = math.expm1(h)
        k0, k1, k2 = e, e - h, e - h - h * h / 2.0
        a_s, s_t = c.alpha[i], c.sigma[i + 1]
        out = (c.alpha[i + 1] / a_s) * x - s_t * k0 * m0
        if d1 is not None:
            out = out - s_t * k1 * d1
        if d2 is not None:
            out = out - s_t * k2 * d2
        return out
    em = -math.expm1(-h)  # 1 - e^-h
    k0, k1, k2 = em, h - em, h * h / 2.0 - h + em
    a_t = c.alpha[i + 1]
    out = (c.sigma[i + 1] / c.sigma[i]) * x + a_t * k0 * m0
    if d1 is not None:
        out = out + a_t * k1 * d1
    if d2 is not None:
        out = out + a_t * k2 * d2
    return out


def dpm_solver(model_fn: Callable, x_T: torch.Tensor, schedule: Schedule, ts, *,
               generator: Optional[torch.Generator] = None, order: int = 2,
               variant: str = "dpm_solver++", lower_order_final: bool = True,
               lower_order_final_below: int = 15, denoise_to_zero: bool = False) -> torch.Tensor:
    """Multistep DPM-Solver (Lu et al. 2022) of order 1..3.

    ``variant="dpm_solver"`` integrates with the noise prediction, ``"dpm_solver++"`` with the data
    prediction x0 = (x - sigma eps) / alpha. Warm-up: step j (0-based) uses order min(order, j+1)
    since only j+1 evaluations exist. With ``lower_order_final`` and fewer than
    ``lower_order_final_below`` steps, the last steps also drop order (min(order, steps - j)), which
    DPM-Solver found more stable for very few steps. ``generator`` is unused (deterministic)."""
    if int(order) != order or not 1 <= order <= 3:
        raise ValueError(f"sampler.order must be 1, 2 or 3, got {order!r}")
    if variant not in DPM_VARIANTS:
        raise ValueError(f"sampler.variant must be one of {DPM_VARIANTS}, got {variant!r}")
    ts = _check_grid(ts)
    c = _Coefs(schedule, ts)
    if not all(math.isfinite(v) for v in c.lam):
        raise ValueError("dpm_solver needs finite log-SNR on the whole grid (do not end at sigma=0)")
    steps = len(ts) - 1
    x = x_T.to(_state_dtype(x_T))
    hist = []
    for j in range(steps):
        eps = _eval(model_fn, x, float(ts[j]))
        m = eps if variant == "dpm_solver" else (x - c.sigma[j] * eps) / c.alpha[j]
        hist = (hist + [(c.lam[j], m)])[-3:]
        step_order = min(order, j + 1)
        if lower_order_final and steps < lower_order_final_below:
            step_order = min(step_order, steps - j)
        x = _dpm_step(variant, step_order, x, hist, j, c)
    return _finish(model_fn, x, float(ts[-1]), c, denoise_to_zero)


SAMPLERS: Dict[str, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpm_solver": functools.partial(dpm_solver, variant="dpm_solver"),
    "dpm_solver++": functools.partial(dpm_solver, variant="dpm_solver++"),
}


def sample(name: str, model_fn: Callable, x_T: torch.Tensor, schedule: Schedule, steps: int,
           grid: str = "uniform", **opts) -> torch.Tensor:
    """Build the grid and run sampler ``name`` (one of SAMPLERS)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler.name must be one of {tuple(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](model_fn, x_T, schedule, time_grid(schedule, steps, grid), **opts)
