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


class _Recorder:
    """The step's model, recording what the loss feeds it (x_t = alpha x0 + sigma eps, t)."""

    def __init__(self, model):
        self.model, self.settings = model, model.settings
        self.prediction = getattr(model, "prediction", "eps")
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, t, y=None, output=None):
        self.seen.append((x.detach().clone(), t.clone()))
        return self.model(x, t, y) if output is None else self.model(x, t, y, output=output)


def _positional_micro_batches(b: int, images: torch.Tensor):
    """The loader's contract on one rank: micro-batches of b consecutive global positions, the
    image at position p being images[p]."""
    for start in range(0, len(images), b):
        yield {"images": images[start:start + b], "labels": torch.full((b,), -1, dtype=torch.long),
               "positions": torch.arange(start, start + b), "valid": torch.ones(b, dtype=torch.bool)}


def test_micro_batch_split_does_not_change_the_draws_or_the_first_loss():
    """One global batch of 8 as 1x8, 2x4 and 4x2 micro-batches (stratified t over the global
    batch): every sample sees the same t and x_t, so the same noise, and the first step's loss is
    bit-identical; the second step differs only by the first update's summation order."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8, generator=g)
    got = {}
    for b in (8, 4, 2):
        cfg = config_mod.load(H.CI_CONFIG, ["train.batch_images=8", f"train.micro_batch_images={b}",
                                            "diffusion.stratified_t=true", "optim.warmup_kimg=0"])
        step = _step(cfg)
        step.model = rec = _Recorder(step.model)
        batches = _positional_micro_batches(b, images)
        results = [step(batches) for _ in range(2)]
        assert step.accum == 8 // b
        xs = torch.cat([x for x, _ in rec.seen])
        ts = torch.cat([t for _, t in rec.seen])
        got[b] = (xs, ts, [r.loss for r in results])
    x8, t8, l8 = got[8]
    assert len(set(t8[:8].tolist())) > 1
    for b in (4, 2):
        xb, tb, lb = got[b]
        assert torch.equal(tb, t8) and torch.equal(xb, x8), b
        assert lb[0] == l8[0]
        assert lb[1] == pytest.approx(l8[1], rel=1e-5)
