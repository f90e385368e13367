"""Epsilon-prediction training loss and per-timestep loss statistics.

E-TSDM changes nothing here: t is drawn, x0 is noised at the TRUE t and the target is the true eps.
The only E-TSDM effect is inside the :class:`~etsdm_dist.diffusion.etsdm.ConditionedModel`, which conditions
the network on f(t).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from etsdm_dist.diffusion.schedule import Schedule


def sample_timesteps(batch: int, schedule: Schedule, *, device=None,
                     generator: Optional[torch.Generator] = None, stratified: bool = False,
                     t_eps: float = 1e-5) -> torch.Tensor:
    """Training times: int64 in 0..T-1 (discrete) or float32 in [t_eps, 1] (continuous).

    ``stratified``: u_i = (i + U_i) / B, one draw in each of B equal strata of [0, 1), then shuffled
    so strata are not tied to batch positions. The marginal of each t stays uniform, only the
    batch-level variance drops."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if schedule.time == "continuous" and not (0.0 <= t_eps < 1.0):
        raise ValueError(f"loss.t_eps must be in [0, 1), got {t_eps}")
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    if stratified:
        idx = torch.arange(batch, device=device, dtype=torch.float64)
        u = (idx + u) / batch
        u = u[torch.randperm(batch, generator=generator, device=device)]
    if schedule.time == "discrete":
        T = schedule.num_timesteps
        # floor(u T) with u in [0, 1); the clamp only guards float rounding of u*T up to T.
        return torch.floor(u * T).long().clamp_(0, T - 1)
    return (t_eps + (1.0 - t_eps) * u).to(torch.float32)


def diffusion_loss(model, x0: torch.Tensor, schedule: Schedule, *, y: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None, stratified: bool = False,
                   t_eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample eps-MSE.

    ``model(x_t, t, y)`` takes the TRUE t (a :class:`ConditionedModel`). Returns
    ``(per_sample_loss [B] float32, t [B])``; the loss is averaged over all non-batch dims and
    computed in float32 even when the model outputs bf16."""
    settings = getattr(model, "settings", None)
    if settings is not None:
        settings.check_schedule(schedule)
    B = x0.shape[0]
    t = sample_timesteps(B, schedule, device=x0.device, generator=generator, stratified=stratified,
                         t_eps=t_eps)
    noise_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=noise_dtype)
    x_t = schedule.q_sample(x0, t, eps)
    pred = model(x_t, t, y)
    if pred.shape != eps.shape:
        raise ValueError(f"model output shape {tuple(pred.shape)} != input shape {tuple(eps.shape)}")
    err = (pred.to(noise_dtype) - eps) ** 2
    per_sample = err.reshape(B, -1).mean(dim=1)
    return per_sample.to(torch.float32) if noise_dtype == torch.float32 else per_sample, t


class BucketStats(NamedTuple):
    """Loss sums/counts per equal-width time bucket, plus the early region [0, t_tilde).

    All float64 tensors on the loss's device (so they can be all-reduced as is):
    ``sums``/``counts`` [num_buckets], ``early_sum``/``early_count`` scalars, ``edges``
    [num_buckets + 1] (bucket i is [edges[i], edges[i+1]))."""

    sums: torch.Tensor
    counts: torch.Tensor
    early_sum: torch.Tensor
    early_count: torch.Tensor
    edges: torch.Tensor


def bucket_losses(per_sample_loss: torch.Tensor, t: torch.Tensor, schedule: Schedule,
                  t_tilde: float, num_buckets: int = 10,
                  weight: torch.Tensor | None = None) -> BucketStats:
    """Pure helper for training stats; mean loss of bucket i is sums[i] / counts[i].

    `weight` (0/1 per sample, e.g. the loader's `valid` mask) leaves samples out without boolean
    indexing, which would force a host-device sync every micro-step on a GPU."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if per_sample_loss.shape != t.shape or t.dim() != 1:
        raise ValueError("per_sample_loss and t must both have shape [B]")
    loss = per_sample_loss.detach().to(torch.float64)
    dev = loss.device
    w = torch.ones_like(loss) if weight is None else weight.to(device=dev, dtype=torch.float64)
    loss = torch.where(w > 0, loss, torch.zeros_like(loss)) * w  # a NaN of a left-out sample stays out
    if schedule.time == "discrete":
        T = schedule.num_timesteps
        # Integer arithmetic: bucket edges i*T/num_buckets need not be integers.
        b = (t.to(device=dev, dtype=torch.float64).floor().long() * num_buckets) // T
        span = float(T)
    else:
        b = torch.floor(t.to(device=dev, dtype=torch.float64) * num_buckets).long()
        span = 1.0
    b = b.clamp_(0, num_buckets - 1)
    sums = torch.zeros(num_buckets, dtype=torch.float64, device=dev).index_add_(0, b, loss)
    counts = torch.zeros(num_buckets, dtype=torch.float64, device=dev).index_add_(0, b, w)
    early = (t.to(device=dev, dtype=torch.float64) < float(t_tilde)).to(torch.float64) * w
    edges = torch.linspace(0.0, span, num_buckets + 1, dtype=torch.float64, device=dev)
    return BucketStats(sums, counts, (loss * early).sum(), early.sum(), edges)
