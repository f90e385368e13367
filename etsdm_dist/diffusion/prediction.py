"""What the network predicts (`diffusion.prediction`): the noise eps, or v (Salimans & Ho 2022).

For a variance-preserving process x_t = a x0 + s eps with a^2 + s^2 = 1 (every schedule in
schedule.py: sigma is defined as sqrt(1 - alpha^2)):

    v   = a eps - s x0        the training target of a v model
    eps = s x_t + a v
    x0  = a x_t - s v

Why v: an eps model's data prediction x0 = (x_t - s eps) / a divides the network's eps error by a,
which is 0.0064 at t = T-1 of the linear schedule (156x). From v both eps and x0 are sums with
coefficients in [0, 1], so neither amplifies the network's error anywhere on [0, T).

E-TSDM is orthogonal to this choice: the network is conditioned on f(t) either way; only the
target, and the maps above at the TRUE t, change. All functions here are pure.
"""
from __future__ import annotations

from typing import Tuple

import torch

PREDICTIONS = ("eps", "v")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def check_vp(schedule, prediction: str = "v") -> None:
    """The maps above hold only for a variance-preserving schedule: refuse any other, naming the field."""
    ts = torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)
    a, s = schedule.alpha(ts, torch.float64), schedule.sigma(ts, torch.float64)
    if not bool(((a * a + s * s - 1.0).abs() < 1e-9).all()):
        raise ValueError(f"diffusion.prediction={prediction} needs a variance-preserving schedule "
                         f"(alpha^2 + sigma^2 = 1); diffusion.schedule={schedule.kind!r} is not")


def coefficients(schedule, t: torch.Tensor, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) at the true times t [B] (or a scalar), shaped to broadcast against `like`
    [B, ...], in like's dtype when it is float64, else float32."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    t = torch.as_tensor(t, device=like.device)
    shape = (-1,) + (1,) * (like.dim() - 1) if t.dim() > 0 else ()
    return (schedule.alpha(t, dtype).reshape(shape), schedule.sigma(t, dtype).reshape(shape))


def v_target(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return a * eps - s * x0


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return s * x_t + a * v


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return a * x_t - s * v
