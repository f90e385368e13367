"""Lipschitz-in-time and perturbation diagnostics for any eps model (paper Fig. 1b / Fig. 2 analogues).

All functions are pure (no training state, no global RNG): the noise used to draw x_t and the input
perturbations are either passed in or drawn from a generator the caller seeds.

Two forms of the time-Lipschitz constant are reported, and every result says which in ``"form"``:

* ``"network_time_input"`` -- the raw network as a function of its time *input* c, over the
  conditions it is trained on. For a grid of true times t_0 < t_1 < ... the conditions are
  c_j = cond_fn(t_j); consecutive duplicates are merged (E-TSDM: 0, 20, 40, 60, 80, then every step
  >= t_tilde; DDPM: every step). For consecutive distinct conditions
      K_i = E_x ||net(x, c_{i+1}) - net(x, c_i)|| / |c_{i+1} - c_i|
  with the SAME x = x_{t(c_i)} in both terms, drawn at the true time whose condition is c_i (the
  left end of E-TSDM's sub-interval). The step |c_{i+1} - c_i| is measured in true-time units
  (network input divided by ``time_scale``), so discrete and continuous results compare directly.
  This is what the paper's Figure 1b plots: how fast the learnt function moves between the time
  conditions it actually has to represent.
* ``"wrapped_true_t"`` -- the model as the samplers see it, eps_hat(x, t) = net(x, f(t)), as a
  function of the TRUE t on the grid:
      K_i = E_x ||m(x, t_{i+1}) - m(x, t_i)|| / (t_{i+1} - t_i),    x = x_{t_i}.
  For E-TSDM this is exactly zero inside each shared sub-interval (same condition => bit-identical
  output) with a jump at each boundary, because f is piecewise constant there.

Each result is summarised over the whole range and over intervals whose left end t_i < t_tilde.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

FORM_NETWORK = "network_time_input"
FORM_WRAPPED = "wrapped_true_t"

# Rows (samples x grid points) evaluated per model call: bounds memory, amortises call overhead.
_MAX_ROWS = 1 << 16


def _as_grid(t_grid) -> torch.Tensor:
    t = torch.as_tensor(t_grid, dtype=torch.float64).reshape(-1)
    if t.numel() < 2 or bool((t[1:] <= t[:-1]).any()):
        raise ValueError("t_grid must hold >= 2 strictly increasing times")
    return t


def _time_like(t64: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Times travel in the data's float dtype (float32 represents integer timesteps exactly).
    return t64.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _noise_for(x0: torch.Tensor, noise: Optional[torch.Tensor],
               generator: Optional[torch.Generator]) -> torch.Tensor:
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    return noise.to(x0.dtype)


def _summary(t_left: np.ndarray, K: np.ndarray, t_tilde: Optional[float]) -> dict:
    def stats(v):
        return {"mean": float(v.mean()), "max": float(v.max()), "count": int(v.size)} if v.size \
            else {"mean": None, "max": None, "count": 0}
    out = {"all": stats(K)}
    if t_tilde is not None:
        out["below_t_tilde"] = stats(K[t_left < t_tilde])
    return out


@torch.no_grad()
def _pair_diffs(fn: Callable, x0: torch.Tensor, schedule, noise: torch.Tensor,
                t_x: torch.Tensor, u_a: torch.Tensor, u_b: torch.Tensor) -> np.ndarray:
    """mean_n ||fn(x_i, u_b[i]) - fn(x_i, u_a[i])|| for x_i = q_sample(x0, t_x[i], noise)."""
    N = x0.shape[0]
    m = t_x.numel()
    per = max(1, _MAX_ROWS // max(N, 1))
    out = np.empty(m, dtype=np.float64)
    for s in range(0, m, per):
        e = min(m, s + per)
        g = e - s
        # One q_sample call with a per-row time: row block i is x0 noised at t_x[s + i].
        tx = _time_like(t_x[s:e], x0).repeat_interleave(N)
        xs = schedule.q_sample(x0.repeat(g, *([1] * (x0.dim() - 1))), tx,
                               noise.repeat(g, *([1] * (x0.dim() - 1))))
        ua = u_a[s:e].repeat_interleave(N)
        ub = u_b[s:e].repeat_interleave(N)
        d = (fn(xs, ub).to(torch.float64) - fn(xs, ua).to(torch.float64)).reshape(g * N, -1)
        out[s:e] = d.norm(dim=1).reshape(g, N).mean(1).cpu().numpy()
    return out


def lipschitz_wrapped_true_t(model_fn: Callable, x0: torch.Tensor, schedule, t_grid, *,
                             t_tilde: Optional[float] = None, noise: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None) -> dict:
    """Form (b): K of ``model_fn(x, t_true)`` over consecutive points of ``t_grid``."""
    t = _as_grid(t_grid)
    noise = _noise_for(x0, noise, generator)
    fn = lambda x, u: model_fn(x, _time_like(u, x))  # noqa: E731
    diffs = _pair_diffs(fn, x0, schedule, noise, t[:-1], t[:-1], t[1:])
    tl = t[:-1].numpy()
    K = diffs / (t[1:] - t[:-1]).numpy()
    return {"form": FORM_WRAPPED, "t_left": tl.tolist(), "t_right": t[1:].numpy().tolist(),
            "K": K.tolist(), "t_tilde": t_tilde, "num_samples": int(x0.shape[0]),
            "summary": _summary(tl, K, t_tilde)}


def lipschitz_network_input(net_fn: Callable, cond_fn: Callable, x0: torch.Tensor, schedule,
                            t_grid, *, time_scale: float = 1.0, t_tilde: Optional[float] = None,
                            noise: Optional[torch.Tensor] = None,
                            generator: Optional[torch.Generator] = None) -> dict:
    """Form (a): K of the raw ``net_fn(x, c)`` between the distinct trained conditions.

    ``cond_fn(t_true) -> c`` maps true times to network inputs (E-TSDM's time_scale * f(t)); each
    distinct condition is represented by the first grid time that maps to it, which is where its
    x is drawn."""
    t = _as_grid(t_grid)
    noise = _noise_for(x0, noise, generator)
    c = torch.as_tensor(cond_fn(t.to(torch.float32) if x0.dtype != torch.float64 else t))
    c = c.to(torch.float64).reshape(-1)
    keep = torch.ones_like(c, dtype=torch.bool)
    keep[1:] = c[1:] != c[:-1]
    t_rep, c_u = t[keep], c[keep]
    if c_u.numel() < 2:
        raise ValueError("the grid maps to fewer than two distinct conditions")
    fn = lambda x, u: net_fn(x, u.to(torch.float32))  # noqa: E731  (networks take fp32 times)
    diffs = _pair_diffs(fn, x0, schedule, noise, t_rep[:-1], c_u[:-1], c_u[1:])
    step = ((c_u[1:] - c_u[:-1]) / float(time_scale)).abs().numpy()
    K = diffs / step
    tl = t_rep[:-1].numpy()
    return {"form": FORM_NETWORK, "t_left": tl.tolist(), "t_right": t_rep[1:].numpy().tolist(),
            "cond_left": c_u[:-1].numpy().tolist(), "cond_right": c_u[1:].numpy().tolist(),
            "K": K.tolist(), "t_tilde": t_tilde, "time_scale": float(time_scale),
            "num_samples": int(x0.shape[0]), "summary": _summary(tl, K, t_tilde)}


def conditioned_parts(model) -> tuple:
    """(net_fn, cond_fn, time_scale) of an :class:`~etsdm_dist.diffusion.etsdm.ConditionedModel`, for
    :func:`lipschitz_network_input`. cond_fn returns what the network sees (time_scale * f(t))."""
    net = model.net
    scale = float(model.time_scale)

    def cond_fn(t):
        tc = model.settings.apply(torch.as_tensor(t))
        return tc if scale == 1.0 else tc * scale

    # eps_at_condition: the network's output itself for an eps model, its eps for a v model.
    eps_at = getattr(model, "eps_at_condition", None)
    return (eps_at if eps_at is not None else (lambda x, c: net(x, c))), cond_fn, scale


@torch.no_grad()
def perturbation_error(model_fn: Callable, x0: torch.Tensor, schedule, ts: Sequence[float], *,
                       scale: float = 0.2, noise: Optional[torch.Tensor] = None,
                       delta: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None,
                       t_tilde: Optional[float] = None) -> dict:
    """Relative output change under an input perturbation, per time t:

        rel(t) = sum_n ||m(x_n + scale * z_n, t) - m(x_n, t)|| / sum_n ||m(x_n, t)||

    with x_n = q_sample(x0_n, t, noise_n) and z_n ~ N(0, I). The same noise and the same z are used
    at every t (fixed seeds), so curves of two models differ only through the models. A ratio of
    sums is used rather than a mean of per-sample ratios, which would be dominated by the few x
    where ||m(x)|| happens to be near zero."""
    noise = _noise_for(x0, noise, generator)
    if delta is None:
        delta = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    delta = delta.to(x0.dtype)
    if delta.shape != x0.shape:
        raise ValueError("delta must have x0's shape")
    N = x0.shape[0]
    rel = []
    for tv in ts:
        tt = _time_like(torch.tensor(float(tv), dtype=torch.float64), x0).expand(N)
        x = schedule.q_sample(x0, tt, noise)
        base = model_fn(x, tt).to(torch.float64).reshape(N, -1)
        pert = model_fn(x + scale * delta, tt).to(torch.float64).reshape(N, -1)
        rel.append(float((pert - base).norm(dim=1).sum() / base.norm(dim=1).sum()))
    t_np, r_np = np.asarray([float(v) for v in ts]), np.asarray(rel)
    return {"metric": "relative_change", "scale": float(scale), "t": t_np.tolist(),
            "rel_error": rel, "num_samples": int(N), "t_tilde": t_tilde,
            "summary": _summary(t_np, r_np, t_tilde)}


def fit_power_law(t, K, t_lo: float, t_hi: float) -> dict:
    """Least-squares fit log K = p log t + b over t in [t_lo, t_hi]; returns the exponent p,
    the intercept b, R^2 and the number of points. Points with K <= 0 are skipped (log undefined)."""
    t, K = np.asarray(t, dtype=np.float64), np.asarray(K, dtype=np.float64)
    sel = (t >= t_lo) & (t <= t_hi) & (K > 0) & (t > 0)
    if sel.sum() < 3:
        return {"exponent": None, "intercept": None, "r2": None, "num_points": int(sel.sum()),
                "t_range": [t_lo, t_hi]}
    lt, lk = np.log(t[sel]), np.log(K[sel])
    p, b = np.polyfit(lt, lk, 1)
    resid = lk - (p * lt + b)
    ss = ((lk - lk.mean()) ** 2).sum()
    r2 = 1.0 - float((resid ** 2).sum() / ss) if ss > 0 else 1.0
    return {"exponent": float(p), "intercept": float(b), "r2": r2, "num_points": int(sel.sum()),
            "t_range": [t_lo, t_hi]}


def log_grid(t_lo: float, t_hi: float, num: int) -> torch.Tensor:
    """``num`` log-spaced times in [t_lo, t_hi], float64."""
    if not 0 < t_lo < t_hi:
        raise ValueError("need 0 < t_lo < t_hi")
    return torch.logspace(math.log10(t_lo), math.log10(t_hi), num, dtype=torch.float64)
