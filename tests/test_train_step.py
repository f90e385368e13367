"""The training step in process (train.step.TrainStep, the one the loop and `etsdm bench train`
call), on a real 1-rank DeepSpeed engine (gloo, fp32):

- it reproduces the launched 2-rank loop's losses bit for bit (the shared reference run), so the
  step the tests and the benchmark drive is the step that trains;
- a step whose optimizer update DeepSpeed skips (fp16 overflow in production; here a NaN gradient
  under fp32 ZeRO-2 with clipping, which DeepSpeed skips the same way) leaves the EMA alone.
"""
from __future__ import annotations

import pytest
import torch

import train_harness as H
from ds_worker import init_single_rank
from etsdm_dist import config as config_mod
from etsdm_dist.diffusion.build import build_model, build_schedule
from etsdm_dist.train.ema import EMA
from etsdm_dist.train.step import TrainStep, make_engine


def _step(cfg) -> TrainStep:
    init_single_rank()
    torch.manual_seed(cfg.train.seed)  # the loop's initialisation
    model = build_model(cfg)
    engine = make_engine(cfg, model, 1)
    return TrainStep(cfg, engine, EMA.from_config(engine, cfg), build_schedule(cfg),
                     device=torch.device("cpu"))


def _fixed_batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = {"images": torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=g),
             "labels": torch.full((n,), -1, dtype=torch.long), "positions": torch.arange(n),
             "valid": torch.ones(n, dtype=torch.bool)}
    return iter(lambda: batch, None)


def _first_losses(data: str, steps: int) -> list[tuple[int, float]]:
    from etsdm_dist.data.loader import make_loader

    # 1 rank with the reference's global batch of 16 in micro-batches of 8: the same noise keys.
    cfg = config_mod.load(H.CI_CONFIG, [*H.REF_OVERRIDES, f"data.url={data}", "train.micro_batch_images=8"])
    step = _step(cfg)
    assert step.accum == 2
    loader = make_loader(cfg.data, seed=cfg.train.seed, start_position=0, batch_images=16, world_size=1,
                         rank=0, micro_batch_images=8)
    try:
        return [(r.images, r.loss) for r in (step(loader) for _ in range(steps))]
    finally:
        loader.close()


@pytest.mark.slow
def test_in_process_step_reproduces_the_launched_loop(data, reference):
    # In a fresh interpreter, like the launched ranks. In the pytest process, after any other
    # engine was built there (even a ZeRO-0 one), step 3 differed in the 8th digit: process state
    # outside the step (allocator / kernel choices), not the step, which is the same code.
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got = pool.apply(_first_losses, (str(data), 4))
    assert got == reference.steps[:4]  # bit for bit: float equality of every loss


def test_skipped_optimizer_step_leaves_the_ema_alone():
    cfg = config_mod.load(H.CI_CONFIG, ["train.zero_stage=2", "optim.grad_clip=1.0", "optim.warmup_kimg=0"])
    step = _step(cfg)
    batches = _fixed_batches(cfg.train.batch_images)
    first = step(batches)
    assert first.applied and first.nonfinite_ranks == 0 and step.ema.num_updates == 1
    # After one applied step the EMA differs from the weights, so an update would move it.
    ema_before = step.ema.full_state()
    weights_before = {k: v.detach().clone() for k, v in step.engine.module.state_dict().items()}
    assert any(not torch.equal(ema_before[k], weights_before[k]) for k in ema_before)

    model = step.model
    step.model = lambda *a: model(*a) * float("nan")  # NaN output -> NaN gradients
    step.model.settings = model.settings
    skipped = step(batches)
    step.model = model
    assert not skipped.applied and skipped.nonfinite_ranks == 1 and skipped.images == 32
    assert step.engine.skipped_steps == 1  # DeepSpeed did skip it
    weights_after = step.engine.module.state_dict()
    assert all(torch.equal(weights_after[k], v) for k, v in weights_before.items())
    ema_after = step.ema.full_state()
    assert step.ema.num_updates == 1
    assert all(torch.equal(ema_after[k], v) for k, v in ema_before.items())

    clean = step(batches)  # and the next applied step updates it again
    assert clean.applied and step.ema.num_updates == 2 and step.ema.images == 48
    assert any(not torch.equal(step.ema.full_state()[k], v) for k, v in ema_after.items())
