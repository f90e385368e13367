"""Samplers with one signature: ``fn(model_fn, x_T, schedule, ts, *, generator=None, **opts) -> x``.

* ``model_fn(x, t) -> eps_hat`` takes the TRUE time as a tensor [B] (float64 grid values). Wrap a
  network in :class:`~etsdm_dist.diffusion.etsdm.ConditionedModel` so E-TSDM's f(t) is applied in one place.
  A model that predicts the data directly (a v model: x0 = alpha x - sigma v) returns the pair
  ``(eps_hat, x0_hat)`` instead (ConditionedModel's ``output="denoise"``); wherever a sampler needs
  x0 it then takes that x0, never (x - sigma eps) / alpha, which divides by alpha ~ 0.006 at t_max.
* ``ts`` is a decreasing grid of steps + 1 times from :func:`time_grid`. A sampler makes ``steps``
  transitions ts[i] -> ts[i+1] and returns x at ts[-1]. Multistep samplers evaluate the model once
  per transition; singlestep DPM-Solver-k evaluates it k times per transition.
* ``denoise_to_zero=True`` adds one more evaluation at ts[-1] and returns the Tweedie estimate
  (x - sigma eps) / alpha: the final noise-free jump to the data of DDIM's code (its last step goes to
  alpha = 1) and DPM-Solver's ``denoise_to_zero``. Without it the result still carries sigma(ts[-1])
  of noise (0.01 at discrete t = 0 of the linear schedule); sampling jobs turn it on.
* ``clip_denoised`` clamps every predicted x0 to [-1, 1] (guided-diffusion's default for pixel
  models); ``thresholding`` is Imagen's dynamic thresholding as DPM-Solver applies it (per sample,
  s = max(quantile(|x0|, ratio), max_val), x0 -> clamp(x0, -s, s) / s). Either one acts on x0 and
  hands the sampler the eps consistent with the limited x0, so it works the same in every sampler.
* ``generator``: None, one ``torch.Generator`` for the whole batch, or a sequence with one generator
  per image. With per-image generators an image's noise never depends on its batch neighbours, so
  a job's images are the same for any batch size or number of ranks (see :func:`image_generators`).
* The state is float32 (float64 if x_T is float64); coefficients are computed in float64 from the
  schedule and applied as Python floats. Model outputs (possibly bf16) are cast to the state dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Sequence, Union

import numpy as np
import torch

from etsdm_dist.diffusion.schedule import Schedule
from etsdm_dist.seeds import seed63

GRID_KINDS = ("uniform", "quadratic", "logsnr", "time_uniform", "ddim_quad")
DPM_VARIANTS = ("dpm_solver", "dpm_solver++")
DPM_METHODS = ("multistep", "singlestep")
SOLVER_TYPES = ("dpmsolver", "taylor")
Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


# --------------------------------------------------------------------------- grids
def time_grid(schedule: Schedule, steps: int, kind: str = "uniform") -> torch.Tensor:
    """Decreasing float64 grid of ``steps + 1`` times.

    * uniform / quadratic (t = t_min + (t_max - t_min) (k/steps)^2, dense near the data): from
      t_max to t_min, integer-valued in discrete time (strictly decreasing, so steps <= T - 1).
    * time_uniform: uniform in t and NOT rounded (DPM-Solver's recommendation for high-resolution
      data); in discrete time the model sees interpolated times (see schedule.py).
    * logsnr: uniform in lambda, not rounded.
    * ddim_quad: DDIM's own "quad" skip, `int(linspace(0, sqrt(0.8 T), steps + 1) ** 2)` (numpy's
      linspace, truncated like DDIM's code), discrete time only. It stops at 0.8 T: the start is not
      t_max. DDIM's `--timesteps S --skip_type quad` is ``steps = S - 1`` with denoise_to_zero.
      Repeated timesteps are kept once, so a long ddim_quad grid may have fewer than steps + 1 times."""
    if kind not in GRID_KINDS:
        raise ValueError(f"sample.grid must be one of {GRID_KINDS}, got {kind!r}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"sample.steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    if kind == "ddim_quad":
        return _ddim_quad(schedule, steps)
    lo, hi = schedule.t_min, schedule.t_max
    k = torch.arange(steps + 1, dtype=torch.float64) / steps  # 0..1, ascending
    if kind == "logsnr":
        # lambda is decreasing in t: k = 0 (t_min) is the largest lambda.
        lam_at_min, lam_at_max = (float(v) for v in schedule.log_snr(torch.tensor([lo, hi], dtype=torch.float64), torch.float64))
        ts = schedule.t_from_log_snr(lam_at_min + (lam_at_max - lam_at_min) * k)
    elif kind in ("uniform", "time_uniform"):
        ts = lo + (hi - lo) * k
    else:
        ts = lo + (hi - lo) * k ** 2
    ts[0], ts[-1] = lo, hi  # exact endpoints (inversion / rounding must not move them)
    if schedule.is_discrete and kind in ("uniform", "quadratic"):
        if steps > schedule.num_timesteps - 1:
            raise ValueError(f"sample.steps must be <= diffusion.num_timesteps - 1 "
                             f"({schedule.num_timesteps - 1}) for integer {kind!r} grids, got {steps}")
        ts = torch.round(ts)
        # Rounding can merge neighbours near t_min (quadratic grids); push them apart, bottom-up.
        for i in range(1, steps + 1):
            if ts[i] <= ts[i - 1]:
                ts[i] = ts[i - 1] + 1
        if ts[-1] > hi:
            raise ValueError("internal: integer grid overflowed t_max")
    return ts.flip(0).contiguous()


def _ddim_quad(schedule: Schedule, steps: int) -> torch.Tensor:
    if not schedule.is_discrete:
        raise ValueError("sample.grid 'ddim_quad' is DDIM's discrete-time skip; use 'quadratic' "
                         "for continuous time")
    seq = [int(s) for s in np.linspace(0, np.sqrt(schedule.num_timesteps * 0.8), steps + 1) ** 2]
    # Truncation repeats small timesteps when steps is large (0, 0, 1, ...). A step from t to the
    # same t is the identity in DDIM (x0 and eps recombine to x, no noise), so each is kept once.
    return torch.tensor(sorted(set(seq), reverse=True), dtype=torch.float64)


# --------------------------------------------------------------------------- per-image noise
def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a job seeded ``seed``: a hash, so neighbouring (seed, index)
    pairs give unrelated streams (the tag keeps them apart from training's noise streams)."""
    return seed63(seed, index, 0x1A6E)


def image_generators(seed: int, indices, device="cpu") -> list:
    """One generator per image, seeded by (seed, index): pass as ``generator`` and to :func:`noise`."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, int(i))) for i in indices]


def noise(shape, generator: Generators = None, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape``. With a sequence of generators, row i is drawn from
    generator i straight into a preallocated batch, so each row depends on its own stream only."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"{len(gens)} per-image generators for a batch of {shape[0]}")
    out = torch.empty(shape, device=device, dtype=dtype)
    for row, g in zip(out, gens):
        row.normal_(generator=g)
    return out


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


def _call(model_fn, x: torch.Tensor, t: float):
    tt = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
    return model_fn(x, tt)


def _eval(model_fn, x: torch.Tensor, t: float) -> torch.Tensor:
    """eps_hat at (x, t)."""
    out = _call(model_fn, x, t)
    return (out[0] if isinstance(out, tuple) else out).to(x.dtype)


def _as_pair(out, x: torch.Tensor, a, s) -> tuple:
    """(eps, x0) from a model_fn output: its own x0 when it gives one, else (x - s eps) / a."""
    if isinstance(out, tuple):
        eps, x0 = out
        return eps.to(x.dtype), x0.to(x.dtype)
    eps = out.to(x.dtype)
    return eps, (x - s * eps) / a


def _denoise(model_fn, x: torch.Tensor, t: float, a: float, s: float) -> tuple:
    """(eps_hat, x0_hat) at (x, t) with alpha_t = a, sigma_t = s."""
    return _as_pair(_call(model_fn, x, t), x, a, s)


def _finish(model_fn, x, t_last, c: _Coefs, denoise_to_zero: bool) -> torch.Tensor:
    if not denoise_to_zero:
        return x
    return _denoise(model_fn, x, t_last, c.alpha[-1], c.sigma[-1])[1]


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_val: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding per sample: s = max(quantile(|x0|, ratio), max_val)."""
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1).float(), ratio, dim=1).to(x0.dtype)
    s = torch.clamp(s, min=max_val).view(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _prepare(model_fn: Callable, schedule: Schedule, ts, **x0_limits):
    """What every sampler starts with: the checked grid, its coefficients, the x0-limited model."""
    ts = _check_grid(ts)
    return ts, _Coefs(schedule, ts), limit_x0(model_fn, schedule, **x0_limits)


def limit_x0(model_fn: Callable, schedule: Schedule, *, clip_denoised: bool = False,
             thresholding: bool = False, thresholding_ratio: float = 0.995,
             thresholding_max_val: float = 1.0) -> Callable:
    """``model_fn`` giving (eps, x0) with x0 clipped / thresholded and eps the one consistent with it;
    ``model_fn`` itself when both are off (no round trip, so results stay bit-identical)."""
    if clip_denoised and thresholding:
        raise ValueError("sample.clip_denoised and sample.thresholding are exclusive: choose one")
    if not 0.0 < thresholding_ratio <= 1.0:
        raise ValueError(f"sample.thresholding_ratio must be in (0, 1], got {thresholding_ratio!r}")
    if not thresholding_max_val > 0:
        raise ValueError(f"sample.thresholding_max_val must be > 0, got {thresholding_max_val!r}")
    if not (clip_denoised or thresholding):
        return model_fn

    def limited(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        a = schedule.alpha(t, torch.float64).to(x.dtype).reshape(shape)
        s = schedule.sigma(t, torch.float64).to(x.dtype).reshape(shape)
        _, x0 = _as_pair(model_fn(x, t), x, a, s)
        x0 = x0.clamp(-1.0, 1.0) if clip_denoised else dynamic_threshold(
            x0, thresholding_ratio, thresholding_max_val)
        return (x - a * x0) / s, x0

    return limited


# --------------------------------------------------------------------------- DDPM / DDIM
def ddpm(model_fn: Callable, x_T: torch.Tensor, schedule: Schedule, ts, *,
         generator: Generators = None, variance: str = "beta_tilde",
         denoise_to_zero: bool = False, clip_denoised: bool = False, thresholding: bool = False,
         thresholding_ratio: float = 0.995, thresholding_max_val: float = 1.0) -> torch.Tensor:
    """Ancestral sampling. On any grid the step s -> t uses the grid's own
    beta = 1 - abar_s / abar_t, so skipping steps is the DDPM posterior of the coarser chain.
    ``variance``: "beta_tilde" (posterior variance) or "beta" (DDPM's upper choice)."""
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"sample.variance must be 'beta' or 'beta_tilde', got {variance!r}")
    ts, c, model_fn = _prepare(model_fn, schedule, ts, clip_denoised=clip_denoised, thresholding=thresholding,
                               thresholding_ratio=thresholding_ratio, thresholding_max_val=thresholding_max_val)
    x = x_T.to(_state_dtype(x_T))
    for i in range(len(ts) - 1):
        a_s, s_s, a_t, s_t = c.alpha[i], c.sigma[i], c.alpha[i + 1], c.sigma[i + 1]
        eps = _eval(model_fn, x, float(ts[i]))
        # beta = 1 - abar_s / abar_t computed as -expm1(2 (log a_s - log a_t)) for accuracy.
        beta = -math.expm1(2.0 * (math.log(a_s) - math.log(a_t)))
        mean = (x - (beta / s_s) * eps) / math.sqrt(1.0 - beta)
        var = beta * (s_t ** 2) / (s_s ** 2) if variance == "beta_tilde" else beta
        z = noise(x.shape, generator, device=x.device, dtype=x.dtype)
        x = mean + math.sqrt(var) * z
    return _finish(model_fn, x, float(ts[-1]), c, denoise_to_zero)


def ddim(model_fn: Callable, x_T: torch.Tensor, schedule: Schedule, ts, *,
         generator: Generators = None, eta: float = 0.0,
         denoise_to_zero: bool = False, clip_denoised: bool = False, thresholding: bool = False,
         thresholding_ratio: float = 0.995, thresholding_max_val: float = 1.0) -> torch.Tensor:
    """DDIM; eta = 0 is the deterministic probability-flow discretisation, eta = 1 matches DDPM's
    beta_tilde variance."""
    if not eta >= 0:
        raise ValueError(f"sample.eta must be >= 0, got {eta!r}")
    ts, c, model_fn = _prepare(model_fn, schedule, ts, clip_denoised=clip_denoised, thresholding=thresholding,
                               thresholding_ratio=thresholding_ratio, thresholding_max_val=thresholding_max_val)
    x = x_T.to(_state_dtype(x_T))
    for i in range(len(ts) - 1):
        a_s, s_s, a_t, s_t = c.alpha[i], c.sigma[i], c.alpha[i + 1], c.sigma[i + 1]
        eps, x0 = _denoise(model_fn, x, float(ts[i]), a_s, s_s)
        beta = -math.expm1(2.0 * (math.log(a_s) - math.log(a_t)))
        noise_sd = eta * math.sqrt(beta) * s_t / s_s
        dir_sd = math.sqrt(max(s_t ** 2 - noise_sd ** 2, 0.0))
        x = a_t * x0 + dir_sd * eps
        if noise_sd > 0:
            x = x + noise_sd * noise(x.shape, generator, device=x.device, dtype=x.dtype)
    return _finish(model_fn, x, float(ts[-1]), c, denoise_to_zero)


# --------------------------------------------------------------------------- DPM-Solver
def _exp_step(variant: str, x, a_s, s_s, a_t, s_t, h, m, d1=None, d2=None):
    """The exponential-integrator step over log-SNR increment h with m(lambda_s + u) expanded as
    m + u d1 + u^2/2 d2 (d1, d2 = None: those terms dropped). m is eps for ``dpm_solver`` and the
    x0 prediction for ``dpm_solver++``; integrating the Taylor terms exactly gives
      noise:  x_t = (a_t/a_s) x - s_t [ (e^h-1) m + (e^h-1-h) d1 + (e^h-1-h-h^2/2) d2 ]
      data:   x_t = (s_t/s_s) x + a_t [ (1-e^-h) m + (h-1+e^-h) d1 + (h^2/2-h+1-e^-h) d2 ]"""
    if variant == "dpm_solver":
        e = math.expm1(h)
        k0, k1, k2, scale = e, e - h, e - h - h * h / 2.0, -s_t
        out = (a_t / a_s) * x
    else:
        em = -math.expm1(-h)  # 1 - e^-h
        k0, k1, k2, scale = em, h - em, h * h / 2.0 - h + em, a_t
        out = (s_t / s_s) * x
    out = out + (scale * k0) * m
    if d1 is not None:
        out = out + (scale * k1) * d1
    if d2 is not None:
        out = out + (scale * k2) * d2
    return out


def _k0(variant: str, h: float) -> float:
    return math.expm1(h) if variant == "dpm_solver" else -math.expm1(-h)


def _multistep(variant, solver_type, order, x, hist, i, c: _Coefs):
    """One multistep update from grid point i to i+1 from the last ``order`` (lambda, m) pairs.

    Derivatives come from divided differences of the stored m's (exact for polynomials of degree
    order-1, giving global order ``order``). ``solver_type="dpmsolver"`` (DPM-Solver's default) writes
    the second-order correction as 1/2 (e^h-1) h m' in the noise form (1/2 (1-e^-h) h m' for data)
    instead of the Taylor coefficient; order 3 has the Taylor form only, as in DPM-Solver."""
    lam_s = c.lam[i]
    h = c.lam[i + 1] - lam_s
    args = (variant, x, c.alpha[i], c.sigma[i], c.alpha[i + 1], c.sigma[i + 1], h, hist[-1][1])
    if order == 1:
        return _exp_step(*args)
    l1, m1 = hist[-2]
    f01 = (hist[-1][1] - m1) / (lam_s - l1)  # first divided difference ~ m'
    if order == 2:
        if solver_type == "taylor":
            return _exp_step(*args, d1=f01)
        # 1/2 k0 h f01 == k1 f01 + O(h^3 m'): the same order, the official default form.
        return _exp_step(*args) + ((-c.sigma[i + 1] if variant == "dpm_solver" else c.alpha[i + 1])
                                   * 0.5 * _k0(variant, h) * h) * f01
    l2, m2 = hist[-3]
    f12 = (m1 - m2) / (l1 - l2)
    f012 = (f01 - f12) / (lam_s - l2)  # second divided difference ~ m''/2
    # Derivatives at lambda_s of the interpolating quadratic.
    return _exp_step(*args, d1=f01 + f012 * (lam_s - l1), d2=2.0 * f012)


def _singlestep(variant, solver_type, order, model_fn, x, m0, i, c: _Coefs, schedule: Schedule):
    """DPM-Solver-2 (r1 = 1/2) / -3 (r1 = 1/3, r2 = 2/3) from grid point i to i+1 (Lu et al. 2022,
    Algorithms 1 and 2), evaluating the model at intermediate log-SNRs lambda_s + r h.
    ``dpmsolver``: the paper's update; ``taylor``: m' (and m'') from the intermediate values."""
    lam_s, a_s, s_s = c.lam[i], c.alpha[i], c.sigma[i]
    h = c.lam[i + 1] - lam_s
    a_t, s_t = c.alpha[i + 1], c.sigma[i + 1]
    rs = (0.5,) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)
    t_mid = schedule.t_from_log_snr(torch.tensor([lam_s + r * h for r in rs], dtype=torch.float64))
    a_mid = schedule.alpha(t_mid, torch.float64).tolist()
    s_mid = schedule.sigma(t_mid, torch.float64).tolist()
    t_mid = t_mid.tolist()

    def m_at(k: int, d1=None):
        u = _exp_step(variant, x, a_s, s_s, a_mid[k], s_mid[k], rs[k] * h, m0, d1)
        return _to_m(variant, model_fn, u, t_mid[k], a_mid[k], s_mid[k])

    m1 = m_at(0)
    first = _exp_step(variant, x, a_s, s_s, a_t, s_t, h, m0)
    scale = -s_t if variant == "dpm_solver" else a_t
    if order == 2:
        r1 = rs[0]
        if solver_type == "dpmsolver":
            return first + (scale * _k0(variant, h) * 0.5 / r1) * (m1 - m0)
        return _exp_step(variant, x, a_s, s_s, a_t, s_t, h, m0, d1=(m1 - m0) / (r1 * h))
    r1, r2 = rs
    m2 = m_at(1, d1=(m1 - m0) / (r1 * h))
    if solver_type == "dpmsolver":
        k1 = _exp_step_k1(variant, h)
        return first + (scale * k1 / (r2 * h)) * (m2 - m0)
    u1, u2 = r1 * h, r2 * h
    f01 = (m1 - m0) / u1
    f012 = ((m2 - m1) / (u2 - u1) - f01) / u2
    return _exp_step(variant, x, a_s, s_s, a_t, s_t, h, m0, d1=f01 - f012 * u1, d2=2.0 * f012)


def _exp_step_k1(variant: str, h: float) -> float:
    return math.expm1(h) - h if variant == "dpm_solver" else h + math.expm1(-h)


def _to_m(variant, model_fn, x, t: float, a: float, s: float):
    if variant == "dpm_solver":
        return _eval(model_fn, x, t)
    return _denoise(model_fn, x, t, a, s)[1]


def dpm_solver(model_fn: Callable, x_T: torch.Tensor, schedule: Schedule, ts, *,
               generator: Generators = None, order: int = 2,
               variant: str = "dpm_solver++", method: str = "multistep",
               solver_type: str = "dpmsolver", lower_order_final: bool = True,
               lower_order_final_below: int = 15, denoise_to_zero: bool = False,
               clip_denoised: bool = False, thresholding: bool = False,
               thresholding_ratio: float = 0.995, thresholding_max_val: float = 1.0) -> torch.Tensor:
    """DPM-Solver (Lu et al. 2022) of order 1..3.

    ``variant="dpm_solver"`` integrates with the noise prediction, ``"dpm_solver++"`` with the data
    prediction x0 (the model's own, else (x - sigma eps) / alpha). ``method="multistep"`` (one
    evaluation per step): step j (0-based) uses order min(order, j+1) since only j+1 evaluations exist; with
    ``lower_order_final`` and fewer than ``lower_order_final_below`` steps, the last steps also drop
    order (min(order, steps - j)), which DPM-Solver found more stable for very few steps.
    ``method="singlestep"``: every transition is one DPM-Solver-``order`` step (``order``
    evaluations, NFE = steps * order). ``solver_type``: "dpmsolver" (DPM-Solver's default form of
    the second-order corrections) or "taylor". ``generator`` is unused (deterministic)."""
    if isinstance(order, bool) or int(order) != order or not 1 <= order <= 3:
        raise ValueError(f"sample.order must be 1, 2 or 3, got {order!r}")
    if variant not in DPM_VARIANTS:
        raise ValueError(f"dpm_solver variant must be one of {DPM_VARIANTS}, got {variant!r}")
    if method not in DPM_METHODS:
        raise ValueError(f"sample.method must be one of {DPM_METHODS}, got {method!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"sample.solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    ts, c, model_fn = _prepare(model_fn, schedule, ts, clip_denoised=clip_denoised, thresholding=thresholding,
                               thresholding_ratio=thresholding_ratio, thresholding_max_val=thresholding_max_val)
    if not all(math.isfinite(v) for v in c.lam):
        raise ValueError("dpm_solver needs finite log-SNR on the whole grid (do not end at sigma=0)")
    steps = len(ts) - 1
    x = x_T.to(_state_dtype(x_T))
    hist = []
    for j in range(steps):
        m = _to_m(variant, model_fn, x, float(ts[j]), c.alpha[j], c.sigma[j])
        if method == "singlestep":
            x = (_exp_step(variant, x, c.alpha[j], c.sigma[j], c.alpha[j + 1], c.sigma[j + 1],
                           c.lam[j + 1] - c.lam[j], m) if order == 1 else
                 _singlestep(variant, solver_type, int(order), model_fn, x, m, j, c, schedule))
            continue
        hist = (hist + [(c.lam[j], m)])[-3:]
        step_order = min(order, j + 1)
        if lower_order_final and steps < lower_order_final_below:
            step_order = min(step_order, steps - j)
        x = _multistep(variant, solver_type, step_order, x, hist, j, c)
    return _finish(model_fn, x, float(ts[-1]), c, denoise_to_zero)


SAMPLERS: Dict[str, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpm_solver": functools.partial(dpm_solver, variant="dpm_solver"),
    "dpm_solver++": functools.partial(dpm_solver, variant="dpm_solver++"),
}
# Options each sampler takes besides the shared ones (generator, denoise_to_zero, x0 limits).
SAMPLER_OPTIONS: Dict[str, tuple] = {
    "ddpm": ("variance",),
    "ddim": ("eta",),
    "dpm_solver": ("order", "method", "solver_type", "lower_order_final"),
    "dpm_solver++": ("order", "method", "solver_type", "lower_order_final"),
}


def sample(name: str, model_fn: Callable, x_T: torch.Tensor, schedule: Schedule, steps: int,
           grid: str = "uniform", **opts) -> torch.Tensor:
    """Build the grid and run sampler ``name`` (one of SAMPLERS)."""
    if name not in SAMPLERS:
        raise ValueError(f"sample.sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](model_fn, x_T, schedule, time_grid(schedule, steps, grid), **opts)
