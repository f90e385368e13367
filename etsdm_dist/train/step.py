"""One training step: the unit that the training loop, `etsdm bench train` and the in-process tests
share, so that what is benchmarked and tested is what trains.

A step is one global batch. On every rank: `accum` micro-batches of forward (the eps or v loss at
the true t, the network conditioned on E-TSDM's shared t), backward and DeepSpeed's optimizer step at the
accumulation boundary; then the EMA, only if that optimizer step was applied (fp16 overflow skips
it); then ONE all-reduce of [stop requested, non-finite loss, data failure, loss sum, sample count],
so every rank sees the same StepResult and takes the same decision after the same step.

Randomness comes from positions (DESIGN.md): each sample's timestep and noise from its own
generator seeded by (run seed, its global position), the stratified-t permutation from (run seed,
the global batch's first position), dropout from (run seed, the micro-batch's first position). So
with dropout 0 the fp32 trajectory does not depend on the ZeRO stage, the rank count, the
micro-batch / accumulation split or a resume (up to the summation order of the gradient over a
different split: bit-identical when the micro-batch is unchanged); with dropout > 0 it is exact
only for an unchanged micro-batch, whose masks depend on its shape. No RNG state needs saving.

Collective: every rank must call `TrainStep.__call__` for every step (DeepSpeed's gradient
reduction inside backward/step, then the flag all-reduce). Nothing else here communicates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from etsdm_dist import config as config_mod
from etsdm_dist import dist
from etsdm_dist.data.decode import to_model_input
from etsdm_dist.diffusion.loss import bucket_losses, diffusion_loss, dropout_seed, per_sample_draws
from etsdm_dist.train import engine as engine_mod
from etsdm_dist.train.stats import LossAccumulator

LOSS_BUCKETS = 10  # per-timestep loss buckets over [0, T) in the reports


def param_dtype(precision: str) -> torch.dtype:
    """The engine's parameter dtype for train.precision."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class EngineModel:
    """model(x_t, t, y) for diffusion_loss: casts inputs to the engine's parameter dtype and runs
    the DeepSpeed engine's forward (required under ZeRO-3, whose hooks gather parameters). It
    returns the network's own output (eps or v, `prediction`): what the loss compares."""

    def __init__(self, engine, settings, dtype: torch.dtype, prediction: str = "eps"):
        self.engine, self.settings, self.dtype, self.prediction = engine, settings, dtype, prediction

    def __call__(self, x, t, y=None, output: str = "prediction"):
        return self.engine(x.to(self.dtype), t, y, output=output)


def make_engine(cfg, model, world_size: int, *, load_universal: bool = False):
    """The DeepSpeed engine for `model` (a diffusion.build.build_model result): its stored dtypes
    made fit for ZeRO's flat buffers, deepspeed.initialize, then torch.compile when asked."""
    if param_dtype(cfg.train.precision) != torch.float32 and cfg.train.zero_stage >= 1:
        # ZeRO-1/2/3 need one parameter dtype: they flatten parameter groups with torch.cat (a
        # mixed bf16+fp32 group is promoted to fp32, and every weight then trains in fp32) or
        # assert one dtype (ZeRO-3). DeepSpeed casts parameters one by one and then calls
        # module.to(device), whose TimeEmbedding._apply would turn the time MLP back to fp32, so
        # the time path is stored in the training dtype too. It still computes in fp32
        # (TimeEmbedding up-casts its weights) and its fp32 masters live in the optimizer like
        # every other parameter's. ZeRO-0 keeps one fp32 copy per parameter and copes with mixed
        # dtypes, so there the time path stays stored in fp32.
        model.net.keep_time_path_fp32(False)
    engine = engine_mod.build_engine(cfg, model, world_size, load_universal=load_universal)
    if cfg.network.compile:
        # DeepSpeed's own compile keeps parameter names (checkpoints stay loadable either way) and
        # knows ZeRO-3's gather hooks; the first steps pay the compilation time.
        engine.compile()
    return engine


def invalid_micro_batch(micro: int, channels: int, resolution: int, position: int) -> dict:
    """A micro-batch of the right shape with every sample invalid and `failed` set: what a rank
    whose data failed trains on, so it stays in step with the other ranks' collectives until the
    flag all-reduce stops them all."""
    return {"images": torch.zeros(micro, channels, resolution, resolution, dtype=torch.uint8),
            "labels": torch.full((micro,), -1, dtype=torch.long),
            "positions": torch.arange(position, position + micro),
            "valid": torch.zeros(micro, dtype=torch.bool),
            "failed": True}


@dataclass(frozen=True)
class StepResult:
    """What every rank knows after a step (the same on all ranks: it comes from the all-reduce)."""

    images: int  # the image counter after this step
    loss: float  # mean loss over every rank's valid samples; nan when there were none
    applied: bool  # the optimizer step was applied (False: fp16 overflow skipped it, EMA untouched)
    stop_ranks: int  # ranks asked to stop (SIGTERM / SIGUSR1)
    nonfinite_ranks: int  # ranks with a non-finite loss on a valid sample
    data_failure_ranks: int  # ranks whose loader raised (see invalid_micro_batch)


def _never() -> bool:
    return False


class TrainStep:
    """The step, with the state it advances: the image counter, the EMA, the report's loss sums.

    `step(micro_batches)` consumes `accum` micro-batches from the iterator, each a loader batch
    dict (`images` uint8 [b,C,H,W], `labels`, `positions`, `valid`; `failed` on a placeholder
    for a failed read), and returns the StepResult. Public attributes (read by the loop and by
    test hooks): images, batch_images, micro_batch_images, accum, rank, world, model, losses.
    """

    def __init__(self, cfg, engine, ema, schedule, *, device: torch.device, images: int = 0):
        self.cfg, self.engine, self.ema, self.schedule, self.device = cfg, engine, ema, schedule, device
        self.rank, self.world = dist.rank(), dist.world_size()
        self.batch_images = cfg.train.batch_images
        self.micro_batch_images, self.accum = config_mod.batch_layout(
            self.batch_images, self.world, cfg.train.micro_batch_images)
        self.images = int(images)
        self.model = EngineModel(engine, engine.module.settings, param_dtype(cfg.train.precision),
                                 engine.module.prediction)
        self.losses = LossAccumulator(LOSS_BUCKETS, device)
        self.t_tilde = config_mod.etsdm_t_tilde(cfg)

    def __call__(self, micro_batches: Iterator[dict],
                 stop_requested: Callable[[], bool] = _never) -> StepResult:
        cfg, device, seed = self.cfg, self.device, self.cfg.train.seed
        target = self.images + self.batch_images
        engine_mod.set_lr(self.engine, engine_mod.lr_at(cfg, target))
        # Device-side sums (a Python bool or float here would sync host and GPU every micro-step):
        # [valid-sample loss sum, valid count, non-finite count]
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        failed = applied = False
        for _ in range(self.accum):
            batch = next(micro_batches)
            failed |= bool(batch.get("failed", False))
            x0 = to_model_input(batch["images"], device, torch.float32)
            valid = batch["valid"].to(device)
            # Invalid (skipped) samples carry label -1; they are masked out, any class will do.
            y = batch["labels"].to(device).clamp(min=0) if cfg.data.use_labels else None
            positions = batch["positions"]
            torch.manual_seed(dropout_seed(seed, int(positions[0])))  # reproducible on resume
            draws = per_sample_draws(positions, x0.shape[1:], self.schedule, seed=seed,
                                     batch_start=self.images, batch_images=self.batch_images,
                                     stratified=cfg.diffusion.stratified_t, device=device,
                                     dtype=x0.dtype)
            per_sample, t = diffusion_loss(self.model, x0, self.schedule, y=y, draws=draws)
            # Skipped (invalid) samples contribute neither loss nor gradient.
            vf = valid.to(per_sample.dtype)
            loss = (per_sample * vf).sum() / vf.sum().clamp(min=1.0)
            applied |= engine_mod.engine_micro_step(self.engine, loss)
            detached = per_sample.detach()
            sums[0] += torch.where(valid, detached.double(), 0.0).sum()
            sums[1] += vf.double().sum()
            sums[2] += (~torch.isfinite(detached) & valid).sum()
            self.losses.add(bucket_losses(detached, t, self.schedule, self.t_tilde, weight=vf))
        if applied:
            self.ema.update(target)
        self.images = target

        # The one collective of the step outside DeepSpeed: every rank learns the same decision.
        flags = torch.tensor([float(stop_requested()), 0.0, float(failed)], dtype=torch.float64,
                             device=device)
        flags[1] = (sums[2] > 0).to(torch.float64)
        agreed = dist.all_reduce(torch.cat([flags, sums[:2]]), "sum").cpu()
        return StepResult(images=target,
                          loss=float(agreed[3] / agreed[4]) if agreed[4] > 0 else float("nan"),
                          applied=applied, stop_ranks=int(agreed[0]), nonfinite_ranks=int(agreed[1]),
                          data_failure_ranks=int(agreed[2]))
