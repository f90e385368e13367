"""Variance-preserving (VP) noise schedules.

Forward process: x_t = alpha_t * x0 + sigma_t * eps with alpha_t^2 + sigma_t^2 = 1.

Two time kinds:

* ``discrete``: integer t in 0..T-1 (T = ``num_timesteps``), alpha_t^2 = prod_{i<=t} (1 - beta_i).
  Index t = 0 is DDPM's first noising step (sigma_0 = sqrt(beta_0), not 0), so the data itself is
  *not* a grid point; samplers end at t = 0 as DDIM does.
  Samplers may query non-integer t (log-SNR grids, DPM-Solver). Those values are defined by
  piecewise-linear interpolation of log(alpha_t) between neighbouring integers, the same
  convention DPM-Solver uses for discrete-time models. At integer t the interpolation returns the
  table value exactly, so training (integer t only) never sees interpolated values.
* ``continuous``: t in [0, 1] with closed forms. For linear/quadratic, beta(s) is the discrete
  beta sequence rescaled by T (beta_min = T * beta_start, beta_max = T * beta_end) and
  log alpha_t = -1/2 * integral_0^t beta(s) ds, so the discrete index k matches continuous time
  (k + 1) / T up to O(1/T) discretisation error (index k has already applied k + 1 betas).

Everything is computed in float64 (the tables are products of 1000 numbers close to 1, and
log-SNR inversion near t = 0 is ill-conditioned in float32) and cast to the requested dtype only at
the end; default output dtype is float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

SCHEDULE_KINDS = ("linear", "quadratic", "cosine")
TIME_KINDS = ("discrete", "continuous")

# Continuous cosine: alpha_1 = 0 exactly, so log-SNR is -inf at t = 1. Like DPM-Solver we stop at
# t = 0.9946, where the closed form still has a finite, usable log-SNR (about -4.8).
_COSINE_CONTINUOUS_T_MAX = 0.9946


def _cosine_f(t: torch.Tensor, s: float) -> torch.Tensor:
    # Nichol & Dhariwal: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2).
    return torch.cos((t + s) / (1.0 + s) * (math.pi / 2.0)) ** 2


def discrete_betas(kind: str, num_timesteps: int, beta_start: float, beta_end: float,
                   cosine_s: float) -> torch.Tensor:
    """The T betas of a discrete schedule, float64."""
    T = num_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "quadratic":
        # DDPM's "quad": linear in sqrt(beta).
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2
    if kind == "cosine":
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = _cosine_f(steps, cosine_s)
        # Clipping keeps the last beta below 1 so alpha_bar stays positive (finite log-SNR).
        return torch.clamp(1.0 - f[1:] / f[:-1], max=0.999)
    raise ValueError(f"diffusion.schedule must be one of {SCHEDULE_KINDS}, got {kind!r}")


@dataclass(frozen=True, eq=False)
class Schedule:
    """A VP schedule. Build it with :func:`make_schedule`.

    ``log_alpha_table`` holds log(alpha_t) for t = 0..T-1 (float64, CPU) in discrete time and is
    None in continuous time.
    """

    kind: str
    time: str
    num_timesteps: int
    beta_start: float
    beta_end: float
    cosine_s: float
    continuous_t_min: float
    log_alpha_table: Optional[torch.Tensor]
    # Per-device copies of the table, so GPU calls do not copy it host-to-device every time.
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    # ----------------------------------------------------------------- time range
    @property
    def t_min(self) -> float:
        """Smallest time samplers go down to (discrete: 0; continuous: ``continuous_t_min``,
        since at t = 0 sigma = 0 and log-SNR is infinite)."""
        return 0.0 if self.time == "discrete" else self.continuous_t_min

    @property
    def t_max(self) -> float:
        if self.time == "discrete":
            return float(self.num_timesteps - 1)
        return _COSINE_CONTINUOUS_T_MAX if self.kind == "cosine" else 1.0

    @property
    def is_discrete(self) -> bool:
        return self.time == "discrete"

    # ----------------------------------------------------------------- core: log alpha in fp64
    def _table(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self.log_alpha_table.to(device)
        return self._tables[key]

    def _check_range(self, t64: torch.Tensor) -> None:
        hi = float(self.num_timesteps - 1) if self.is_discrete else 1.0
        # One combined reduction: a single host sync per call on GPU.
        if t64.numel() and bool(((t64 < 0) | (t64 > hi)).any()):
            raise ValueError(
                f"t out of range for {self.time} time: allowed [0, {hi:g}], got "
                f"[{float(t64.min()):g}, {float(t64.max()):g}]")

    def log_alpha64(self, t) -> torch.Tensor:
        """log(alpha_t) in float64 (on t's device)."""
        t64 = torch.as_tensor(t).to(torch.float64)
        self._check_range(t64)
        if self.is_discrete:
            table = self._table(t64.device)
            T = self.num_timesteps
            # Piecewise-linear interpolation; w == 0 at integers, so integer t is exact.
            i0 = torch.floor(t64).clamp(max=T - 2).long()
            w = t64 - i0.to(torch.float64)
            return torch.lerp(table[i0], table[i0 + 1], w) if T > 1 else table[i0]
        T = self.num_timesteps
        if self.kind == "linear":
            b0, b1 = self.beta_start * T, self.beta_end * T
            return -0.25 * t64 ** 2 * (b1 - b0) - 0.5 * t64 * b0
        if self.kind == "quadratic":
            a0, a1 = math.sqrt(self.beta_start * T), math.sqrt(self.beta_end * T)
            d = a1 - a0
            # integral_0^t (a0 + s d)^2 ds = ((a0 + t d)^3 - a0^3) / (3 d); written so d -> 0 is safe.
            u = t64 * d
            integral = t64 * (a0 ** 2 + a0 * u + u ** 2 / 3.0)
            return -0.5 * integral
        # cosine
        s = self.cosine_s
        lc0 = math.log(math.cos(s / (1.0 + s) * math.pi / 2.0))
        return torch.log(torch.cos((t64 + s) / (1.0 + s) * (math.pi / 2.0))) - lc0

    # ----------------------------------------------------------------- public accessors
    def alpha(self, t, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.exp(self.log_alpha64(t)).to(dtype)

    def sigma(self, t, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        la = self.log_alpha64(t)
        # sqrt(1 - alpha^2) via expm1: exact near t = 0 where alpha^2 ~ 1.
        return torch.sqrt(-torch.expm1(2.0 * la)).to(dtype)

    def log_snr(self, t, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """lambda_t = log(alpha_t / sigma_t)."""
        la = self.log_alpha64(t)
        return (la - 0.5 * torch.log(-torch.expm1(2.0 * la))).to(dtype)

    def t_from_log_snr(self, lam, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Inverse of :meth:`log_snr`. Default dtype is float64 because the result feeds sampler
        grids. Values of lambda outside [log_snr(t_max), log_snr(0)] saturate at the ends of the
        time domain (0 or T-1 / 1)."""
        lam64 = torch.as_tensor(lam).to(torch.float64)
        # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -1/2 softplus(-2 lambda).
        la = -0.5 * torch.nn.functional.softplus(-2.0 * lam64)
        if self.is_discrete:
            table = self._table(lam64.device)
            T = self.num_timesteps
            neg = -table  # increasing in t
            idx = torch.searchsorted(neg, (-la).contiguous()).clamp(1, T - 1)
            lo, hi = table[idx - 1], table[idx]
            t = (idx - 1).to(torch.float64) + (la - lo) / (hi - lo)
            return t.clamp(0.0, float(T - 1)).to(dtype)
        T = self.num_timesteps
        tmp = -2.0 * la  # = integral_0^t beta(s) ds  (>= 0)
        if self.kind == "linear":
            b0, b1 = self.beta_start * T, self.beta_end * T
            # root of 1/2 (b1-b0) t^2 + b0 t - tmp = 0, in the cancellation-free form.
            t = 2.0 * tmp / (b0 + torch.sqrt(b0 ** 2 + 2.0 * (b1 - b0) * tmp))
        elif self.kind == "quadratic":
            a0, a1 = math.sqrt(self.beta_start * T), math.sqrt(self.beta_end * T)
            d = a1 - a0
            if abs(d) < 1e-12:
                t = tmp / a0 ** 2
            else:
                t = (torch.pow(a0 ** 3 + 3.0 * d * tmp, 1.0 / 3.0) - a0) / d
        else:
            s = self.cosine_s
            lc0 = math.log(math.cos(s / (1.0 + s) * math.pi / 2.0))
            c = torch.exp((la + lc0).clamp(max=0.0))
            t = torch.arccos(c) * (2.0 * (1.0 + s) / math.pi) - s
        return t.clamp(0.0, 1.0).to(dtype)

    def q_sample(self, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps with per-sample t of shape [B] (or a scalar).

        Coefficients are float32 (float64 if x0 is float64); the result has x0's dtype."""
        cdt = torch.float64 if x0.dtype == torch.float64 else torch.float32
        t = torch.as_tensor(t, device=x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1) if t.dim() > 0 else ()
        la = self.log_alpha64(t)
        a = torch.exp(la).to(cdt).reshape(shape)
        s = torch.sqrt(-torch.expm1(2.0 * la)).to(cdt).reshape(shape)
        return (a * x0.to(cdt) + s * eps.to(cdt)).to(x0.dtype)


def make_schedule(kind: str = "linear", time: str = "discrete", num_timesteps: int = 1000,
                  beta_start: float = 1e-4, beta_end: float = 0.02, cosine_s: float = 0.008,
                  continuous_t_min: float = 1e-3) -> Schedule:
    """Build a :class:`Schedule`, validating every field.

    ``continuous_t_min`` is where continuous-time samplers stop (DPM-Solver's default 1e-3)."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"diffusion.schedule must be one of {SCHEDULE_KINDS}, got {kind!r}")
    if time not in TIME_KINDS:
        raise ValueError(f"diffusion.time must be one of {TIME_KINDS}, got {time!r}")
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"diffusion.num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    if kind in ("linear", "quadratic") and not (0.0 < beta_start <= beta_end < 1.0):
        raise ValueError("diffusion.beta_start / diffusion.beta_end must satisfy "
                         f"0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    if kind == "cosine" and not cosine_s > 0.0:
        raise ValueError(f"diffusion.cosine_s must be > 0, got {cosine_s}")
    if time == "continuous" and not (0.0 < continuous_t_min < 0.5):
        raise ValueError(f"make_schedule(continuous_t_min=...) must be in (0, 0.5), got {continuous_t_min}")
    table = None
    if time == "discrete":
        betas = discrete_betas(kind, num_timesteps, beta_start, beta_end, cosine_s)
        # log alpha_t = 1/2 sum log(1 - beta): a cumulative sum of logs is more accurate than the
        # log of a cumulative product.
        table = 0.5 * torch.cumsum(torch.log1p(-betas), dim=0)
    return Schedule(kind=kind, time=time, num_timesteps=num_timesteps, beta_start=float(beta_start),
                    beta_end=float(beta_end), cosine_s=float(cosine_s),
                    continuous_t_min=float(continuous_t_min), log_alpha_table=table)
