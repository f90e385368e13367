"""The training loss (eps or v target), its per-sample random draws, and per-timestep statistics.

E-TSDM changes nothing here: t is drawn, x0 is noised at the TRUE t and the target is the true eps
(or v = alpha eps - sigma x0 at the true t, `diffusion.prediction: v`). The only E-TSDM effect is
inside the :class:`~etsdm_dist.diffusion.etsdm.ConditionedModel`, which conditions the network on f(t).

Training draws each sample's t and eps from its own stream, seeded by (run seed, its global
position) (:func:`per_sample_draws`), like the sampling job's per-image seeds: a sample's draws do
not depend on which rank or micro-batch holds it, so the trajectory does not depend on the layout.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from etsdm_dist.diffusion import prediction as P
from etsdm_dist.diffusion.schedule import Schedule
from etsdm_dist.seeds import seed63

# Stream tags: a training sample's stream, a global batch's strata permutation and a micro-batch's
# dropout stay unrelated to each other and to the sampling job's image streams (samplers.image_seed).
SAMPLE_TAG = 0x7E5D
STRATA_TAG = 0x57A7
DROPOUT_TAG = 0xD7


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
    return _times_from_uniform(u, schedule, t_eps)


def _times_from_uniform(u: torch.Tensor, schedule: Schedule, t_eps: float) -> torch.Tensor:
    if schedule.time == "discrete":
        T = schedule.num_timesteps
        # floor(u T) with u in [0, 1); the clamp only guards float rounding of u*T up to T.
        return torch.floor(u * T).long().clamp_(0, T - 1)
    return (t_eps + (1.0 - t_eps) * u).to(torch.float32)


def sample_seed(seed: int, position: int) -> int:
    """The seed of the training stream of the sample at global `position` in a run seeded `seed`."""
    return seed63(seed, position, SAMPLE_TAG)


def dropout_seed(seed: int, position: int) -> int:
    """The global RNG's seed for the dropout of the micro-batch whose first sample is at `position`."""
    return seed63(seed, position, DROPOUT_TAG)


def per_sample_draws(positions: Sequence[int] | torch.Tensor, sample_shape: Sequence[int],
                     schedule: Schedule, *, seed: int, batch_start: int, batch_images: int,
                     stratified: bool = False, t_eps: float = 1e-5, device=None,
                     dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(t [B], eps [B, *sample_shape]) for the samples at global `positions` of the global batch
    [batch_start, batch_start + batch_images).

    Sample i draws u_i ~ U[0, 1) (float64) and then its noise from one generator seeded by
    (seed, positions[i]): a pure function of the position, so any split of a global batch over
    ranks, micro-batches and accumulation steps gives every sample the same t and eps.
    ``stratified``: the strata are those of the GLOBAL batch, u = (pi(j) + u_j) / batch_images for
    the sample in slot j = position - batch_start, where pi is a permutation seeded by
    (seed, batch_start) that every rank computes whole and indexes with its own slots."""
    if batch_images < 1:
        raise ValueError(f"train.batch_images must be >= 1, got {batch_images}")
    if schedule.time == "continuous" and not (0.0 <= t_eps < 1.0):
        raise ValueError(f"loss.t_eps must be in [0, 1), got {t_eps}")
    pos = [int(p) for p in (positions.tolist() if torch.is_tensor(positions) else positions)]
    u = torch.empty(len(pos), device=device, dtype=torch.float64)
    eps = torch.empty((len(pos), *sample_shape), device=device, dtype=dtype)
    for i, p in enumerate(pos):
        g = torch.Generator(device=device).manual_seed(sample_seed(seed, p))
        u[i:i + 1].uniform_(generator=g)
        eps[i].normal_(generator=g)
    if stratified:
        g = torch.Generator(device=device).manual_seed(seed63(seed, batch_start, STRATA_TAG))
        perm = torch.randperm(batch_images, generator=g, device=device)
        # A placeholder micro-batch of a failed read carries positions outside the batch; its
        # samples are masked out, so any slot will do (the modulo only keeps the index valid).
        slots = torch.tensor([(p - batch_start) % batch_images for p in pos], device=device)
        u = (perm[slots].to(torch.float64) + u) / batch_images
    return _times_from_uniform(u, schedule, t_eps), eps


def diffusion_loss(model, x0: torch.Tensor, schedule: Schedule, *, y: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None, stratified: bool = False,
                   t_eps: float = 1e-5, draws: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample MSE of the model's prediction against its target: eps, or v = alpha eps - sigma x0
    for a model whose ``prediction`` attribute is "v".

    ``model(x_t, t, y)`` takes the TRUE t. A model with a ``prediction`` attribute (a
    :class:`ConditionedModel`, the training step's engine wrapper) is called with
    ``output="prediction"`` and returns the network's own output; a plain callable is an eps model.
    t and eps come from ``draws`` = (t [B], eps like x0) when given (:func:`per_sample_draws`),
    else from ``generator`` (``stratified`` over this batch). Returns
    ``(per_sample_loss [B] float32, t [B])``; the loss is averaged over all non-batch dims and
    computed in float32 even when the model outputs bf16."""
    settings = getattr(model, "settings", None)
    if settings is not None:
        settings.check_schedule(schedule)
    prediction = getattr(model, "prediction", None)
    B = x0.shape[0]
    noise_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    if draws is None:
        t = sample_timesteps(B, schedule, device=x0.device, generator=generator, stratified=stratified,
                             t_eps=t_eps)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=noise_dtype)
    else:
        t, eps = draws
        if tuple(t.shape) != (B,) or eps.shape != x0.shape:
            raise ValueError(f"draws: t {tuple(t.shape)} and eps {tuple(eps.shape)} do not fit a batch "
                             f"of shape {tuple(x0.shape)}")
        eps = eps.to(noise_dtype)
    x_t = schedule.q_sample(x0, t, eps)
    pred = model(x_t, t, y) if prediction is None else model(x_t, t, y, output="prediction")
    if pred.shape != eps.shape:
        raise ValueError(f"model output shape {tuple(pred.shape)} != input shape {tuple(eps.shape)}")
    if prediction in (None, "eps"):
        target = eps
    else:
        P.check_prediction(prediction)
        target = P.v_target(x0.to(noise_dtype), eps, *P.coefficients(schedule, t, eps))
    err = (pred.to(noise_dtype) - target) ** 2
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
