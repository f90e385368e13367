"""E-TSDM: the map from true time t to the network's time condition.

[0, t_tilde) is split into n equal sub-intervals; inside sub-interval i the network is conditioned
on its left end i * t_tilde / n. For t >= t_tilde the condition is t itself:

    f(t) = floor(t * n / t_tilde) * (t_tilde / n)   if t < t_tilde,   else t.

Only the *condition* changes: the forward process, the loss target and every sampler coefficient use
the true t. :class:`ConditionedModel` is the single place where f is applied; the loss and every
sampler call the network through it.

Exactness. The boundaries b_i = i * t_tilde / n are computed as exact rationals (t_tilde is read
through its shortest decimal repr, so 0.1 means 1/10) and rounded once to float64. Membership is then
decided by comparing t against the boundaries rounded to t's own dtype, so the float a user writes for a
boundary (e.g. ``torch.tensor(0.02)`` in float32) lands on that boundary, never one sub-interval to the
left as a naive float ``floor(t * n / t_tilde)`` can. The output is the float64 boundary rounded to
float32.

Discrete rule: t_tilde and n are integers with n dividing t_tilde (sub-intervals contain whole
timesteps), 1 <= n, 0 < t_tilde <= T. With n == t_tilde every sub-interval is a single timestep, so f
is the identity and the model is plain DDPM; that case returns t untouched (also for non-integer
sampler times, where a floor would otherwise move them), making the baseline bit-identical.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Optional

import torch

from etsdm_dist.diffusion import prediction as P
from etsdm_dist.diffusion.settings import DEFAULT_N, TIME_KINDS, check_etsdm, default_t_tilde

__all__ = ["TIME_KINDS", "CONTINUOUS_TIME_SCALE", "validate", "condition_time", "EtsdmSettings",
           "ConditionedModel"]

# The network's sinusoidal embedding is designed for t in [0, 1000); continuous t in [0, 1] is
# scaled up so both time kinds present the same range to it.
CONTINUOUS_TIME_SCALE = 1000.0


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    # No-op (same tensor object) for float32 input: the disabled path must not round-trip values.
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def validate(*, enabled: bool, t_tilde: float, n: int, time: str,
             num_timesteps: Optional[int] = None) -> None:
    """Raise ValueError naming the offending config field (``etsdm.*``, ``diffusion.*``).

    The rules live in :func:`etsdm_dist.diffusion.settings.check_etsdm`, shared with the config."""
    check_etsdm(enabled=enabled, t_tilde=t_tilde, n=n, time=time, num_timesteps=num_timesteps)


@functools.lru_cache(maxsize=64)
def _boundaries64(t_tilde: float, n: int, device: str) -> torch.Tensor:
    """b_0..b_n = i * t_tilde / n as float64, each the correctly rounded exact rational.
    Cached per device so GPU calls do not copy host-to-device each step (callers must not mutate)."""
    tt = Fraction(repr(float(t_tilde)))
    return torch.tensor([float(tt * i / n) for i in range(n + 1)], dtype=torch.float64, device=device)


def condition_time(t: torch.Tensor, *, enabled: bool, t_tilde: float, n: int,
                   time: str) -> torch.Tensor:
    """The network's time condition f(t) for true time t (any shape, int or float dtype).

    Returns float32. With ``enabled=False`` (or discrete n == t_tilde) t is returned as is when it is
    already float32, otherwise it is cast to float32 exactly once (integer timesteps are exact).
    Values of t are not range-checked here (that would force a device sync per call)."""
    validate(enabled=enabled, t_tilde=t_tilde, n=n, time=time)
    t = torch.as_tensor(t)
    if not enabled or (time == "discrete" and int(n) == int(t_tilde)):
        return _as_fp32(t)
    b64 = _boundaries64(float(t_tilde), int(n), str(t.device))
    if t.dtype in (torch.float32, torch.float64):
        tc, bc = t, b64.to(t.dtype)
    elif t.is_floating_point():
        # Half types: round the boundaries to t's dtype first (compare in t's precision), then
        # upcast both exactly to float32 for searchsorted.
        tc, bc = t.float(), b64.to(t.dtype).float()
    else:
        tc, bc = t.to(torch.float64), b64  # integer timesteps are exact in float64
    # k = index of the last boundary <= t; k < n means t lies in sub-interval k of [0, t_tilde).
    k = torch.searchsorted(bc, tc.contiguous(), right=True) - 1
    inside = k < int(n)
    left_end = b64.to(torch.float32)[k.clamp(0, int(n))]
    return torch.where(inside, left_end, _as_fp32(t))


@dataclass(frozen=True)
class EtsdmSettings:
    """The resolved E-TSDM rule a model applies: the `etsdm` config section with t_tilde's default
    filled in (EtsdmConfig.t_tilde_for) and the time kind from `diffusion.time`."""

    enabled: bool = True
    t_tilde: float = default_t_tilde("discrete")
    n: int = DEFAULT_N
    time: str = "discrete"

    def __post_init__(self) -> None:
        validate(enabled=self.enabled, t_tilde=self.t_tilde, n=self.n, time=self.time)

    @staticmethod
    def defaults_for(time: str, enabled: bool = True) -> "EtsdmSettings":
        """The paper's defaults for a time kind (discrete t_tilde=100, continuous 0.1; n=5)."""
        return EtsdmSettings(enabled=enabled, t_tilde=default_t_tilde(time), n=DEFAULT_N, time=time)

    def with_(self, **changes) -> "EtsdmSettings":
        return replace(self, **changes)

    def check_schedule(self, schedule) -> None:
        """Cross-check against a :class:`~etsdm_dist.diffusion.schedule.Schedule`."""
        if schedule.time != self.time:
            raise ValueError(f"diffusion.time: the E-TSDM settings are for {self.time!r} time but the "
                             f"schedule is {schedule.time!r}")
        validate(enabled=self.enabled, t_tilde=self.t_tilde, n=self.n, time=self.time,
                 num_timesteps=schedule.num_timesteps if self.time == "discrete" else None)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return condition_time(t, enabled=self.enabled, t_tilde=self.t_tilde, n=self.n, time=self.time)

    @property
    def time_scale(self) -> float:
        return CONTINUOUS_TIME_SCALE if self.time == "continuous" else 1.0


class ConditionedModel(torch.nn.Module):
    """eps_hat(x, t, y) from net(x, time_scale * f(t), y), with the TRUE t as input.

    ``net(x, t_cond, y=None)`` receives float32 times of shape [B]. ``y`` is passed only when given,
    so unconditional networks need not accept it.

    ``prediction`` (`diffusion.prediction`) is what the network outputs: "eps", or "v" (needs the
    variance-preserving ``schedule``; see prediction.py). ``forward(..., output=)`` chooses what the
    caller gets, so nothing outside this class has to know the network's parametrisation:

    * "eps" (default): the noise prediction, converted from v at the true t.
    * "prediction": the network's own output, in the units of its training target (the loss).
    * "denoise": what the samplers take. An eps model gives eps (the samplers derive x0 as before,
      bit for bit); a v model gives the pair (eps, x0) with x0 = alpha x - sigma v computed
      directly, never through a division by alpha."""

    OUTPUTS = ("eps", "prediction", "denoise")

    def __init__(self, net: torch.nn.Module, settings: EtsdmSettings,
                 time_scale: Optional[float] = None, *, prediction: str = "eps", schedule=None) -> None:
        super().__init__()
        self.net = net
        self.settings = settings
        self.time_scale = float(settings.time_scale if time_scale is None else time_scale)
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        self.prediction = P.check_prediction(prediction)
        if prediction != "eps":
            if schedule is None:
                raise ValueError(f"diffusion.prediction={prediction} needs the noise schedule to "
                                 "convert the network's output to eps and x0")
            P.check_vp(schedule, prediction)
            settings.check_schedule(schedule)
        self.schedule = schedule

    def condition(self, t: torch.Tensor, batch: int, device) -> torch.Tensor:
        """The float32 [B] time tensor the network sees."""
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(batch)
        tc = self.settings.apply(t)
        # Scale 1 is skipped so the discrete baseline is bit-identical to feeding t directly.
        return tc if self.time_scale == 1.0 else tc * self.time_scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                output: str = "eps"):
        if output not in self.OUTPUTS:
            raise ValueError(f"ConditionedModel output must be one of {self.OUTPUTS}, got {output!r}")
        tc = self.condition(t, x.shape[0], x.device)
        raw = self.net(x, tc) if y is None else self.net(x, tc, y)
        if self.prediction == "eps" or output == "prediction":
            return raw
        return self._from_v(x, raw, t, both=output == "denoise")

    def _from_v(self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, *, both: bool):
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        a, s = P.coefficients(self.schedule, t, x)
        v = v.to(a.dtype)
        xf = x.to(a.dtype)
        eps = P.eps_from_v(xf, v, a, s).to(x.dtype)
        return (eps, P.x0_from_v(xf, v, a, s).to(x.dtype)) if both else eps

    def eps_at_condition(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The eps the network represents at its time INPUT c (for the time-Lipschitz estimate of
        the network between its trained conditions). The true time used by the v -> eps map is
        c / time_scale, which is a trained condition's own time (a sub-interval's left end inside
        [0, t_tilde)). An eps model returns the network's output itself."""
        raw = self.net(x, c)
        if self.prediction == "eps":
            return raw
        return self._from_v(x, raw, torch.as_tensor(c, dtype=torch.float64) / self.time_scale, both=False)
