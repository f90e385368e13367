"""engine.py: the generated DeepSpeed JSON, the LR schedule, and DeepSpeed steps vs plain torch."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from ds_worker import TinyNet, batch, init_single_rank, make_cfg
from etsdm_dist.train import engine as E
from etsdm_dist.config import ConfigError, from_dict


def cfg_with(**sections):
    return from_dict(sections)


@pytest.mark.parametrize("world,batch_images,micro,want_micro,want_accum", [
    (1, 128, None, 128, 1), (2, 128, None, 64, 1), (4, 128, 8, 8, 4), (8, 64, 2, 2, 4), (3, 96, 16, 16, 2)])
def test_batch_math(world, batch_images, micro, want_micro, want_accum):
    cfg = cfg_with(train={"batch_images": batch_images, "micro_batch_images": micro, "checkpoint_kimg": 0,
                          "report_kimg": 0})
    ds = E.deepspeed_config(cfg, world, cpu=True)
    assert ds["train_batch_size"] == batch_images
    assert ds["train_micro_batch_size_per_gpu"] == want_micro
    assert ds["gradient_accumulation_steps"] == want_accum
    assert want_micro * want_accum * world == batch_images


def test_batch_that_does_not_split_names_the_field():
    cfg = cfg_with(train={"batch_images": 128, "micro_batch_images": 48})
    with pytest.raises(ConfigError, match="train.micro_batch_images=48"):
        E.deepspeed_config(cfg, 2, cpu=True)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_stage_and_precision_sections(stage, precision):
    cfg = cfg_with(train={"zero_stage": stage, "precision": precision}, optim={"grad_clip": 0.0})
    ds = E.deepspeed_config(cfg, 2, cpu=True)
    assert ds["zero_optimization"] == {"stage": stage}
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    if precision == "fp16":  # dynamic loss scaling
        assert ds["fp16"]["loss_scale"] == 0
        assert {"initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"} <= set(ds["fp16"])
    assert ds["gradient_clipping"] == 0.0
    assert ds["steps_per_print"] >= 2**30 and ds["wall_clock_breakdown"] is False
    assert "checkpoint" not in ds


def test_optimizer_offload_and_accelerator():
    cfg = cfg_with(train={"zero_stage": 2}, optim={"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-6,
                                                   "weight_decay": 0.01, "offload": True})
    cpu, gpu = E.deepspeed_config(cfg, 1, cpu=True), E.deepspeed_config(cfg, 1, cpu=False)
    assert cpu["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-6,
                                                            "weight_decay": 0.01, "torch_adam": True}}
    assert gpu["optimizer"]["params"]["torch_adam"] is False
    assert cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert E.deepspeed_config(cfg, 1, cpu=True, load_universal=True)["checkpoint"] == {"load_universal": True}
    with pytest.raises(ConfigError, match="optim.offload"):
        E.deepspeed_config(cfg_with(train={"zero_stage": 0}, optim={"offload": True}), 1, cpu=True)


@pytest.mark.parametrize("extra,where,owner", [
    ({"train_batch_size": 64}, "train.deepspeed_extra.train_batch_size", "train.batch_images=128"),
    ({"zero_optimization": {"stage": 3}}, "train.deepspeed_extra.zero_optimization.stage", "train.zero_stage=2"),
    ({"bf16": {"enabled": True}}, "train.deepspeed_extra.bf16.enabled", "train.precision='fp32'"),
    ({"optimizer": {"params": {"lr": 1.0}}}, "train.deepspeed_extra.optimizer.params.lr", "optim.lr=0.0002"),
    ({"gradient_clipping": 0}, "train.deepspeed_extra.gradient_clipping", "optim.grad_clip=1.0"),
    ({"scheduler": {"type": "WarmupLR"}}, "train.deepspeed_extra.scheduler", "optim.warmup_kimg"),
])
def test_extra_conflicts_name_both_fields(extra, where, owner):
    cfg = cfg_with(train={"deepspeed_extra": extra})
    with pytest.raises(ConfigError) as e:
        E.deepspeed_config(cfg, 2, cpu=True)
    assert where in str(e.value) and owner in str(e.value), str(e.value)


def test_extra_additions_are_deep_merged():
    extra = {"zero_optimization": {"overlap_comm": True, "stage": 2},  # same value: fine
             "flops_profiler": {"enabled": False}, "train_batch_size": 128}
    cfg = cfg_with(train={"deepspeed_extra": extra})
    before = copy.deepcopy(extra)
    ds = E.deepspeed_config(cfg, 2, cpu=True)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["flops_profiler"] == {"enabled": False}
    assert extra == before  # the config tree is not mutated


def test_lr_at_warmup_in_images():
    cfg = cfg_with(optim={"lr": 1e-3, "warmup_kimg": 2.0})
    assert E.lr_at(cfg, 0) == 0.0
    assert E.lr_at(cfg, 500) == pytest.approx(2.5e-4)
    assert E.lr_at(cfg, 2000) == pytest.approx(1e-3)
    assert E.lr_at(cfg, 10**9) == pytest.approx(1e-3)
    assert E.lr_at(cfg_with(optim={"lr": 1e-3}), 0) == 1e-3  # no warm-up


def _reference(cfg, steps, micro):
    """Plain torch: the same AdamW, accumulation, clipping and LR schedule without DeepSpeed."""
    net = TinyNet()
    o = cfg.optim
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    norms = []
    for step in range(steps):
        x, y = batch(step, cfg.train.batch_images)
        accum = cfg.train.batch_images // micro
        for m in range(accum):
            xs, ys = x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro]
            ((net(xs) - ys).pow(2).mean() / accum).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip or float("inf"))))
        for g in opt.param_groups:
            g["lr"] = E.lr_at(cfg, (step + 1) * cfg.train.batch_images)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in net.named_parameters()}, norms


@pytest.mark.parametrize("stage,clip", [(0, True), (2, True), (3, True), (0, False)])
def test_engine_steps_match_plain_torch(stage, clip):
    """Accumulation boundaries, clipping, the LR set from the image counter and the reported grad
    norm all agree with a plain torch loop (fp32, 1 rank, 4 micro batches per step)."""
    from ds_worker import full_params
    from etsdm_dist.train.ema import EMA

    init_single_rank()
    cfg = make_cfg(zero_stage=stage, micro_batch_images=2)
    if not clip:  # ZeRO-0 without clipping: the loop computes the reported norm itself
        cfg.optim.grad_clip = 0.0
    engine = E.build_engine(cfg, TinyNet(), 1)
    ema = EMA.from_config(engine, cfg)
    norms = []
    for step in range(3):
        from ds_worker import train

        train(engine, ema, cfg, range(step, step + 1))  # asserts the boundary pattern
        norms.append(E.grad_norm(engine))
        assert E.current_lr(engine) == pytest.approx(E.lr_at(cfg, (step + 1) * 8))
    want, want_norms = _reference(cfg, 3, 2)
    got = full_params(engine)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
    assert norms == pytest.approx(want_norms, rel=1e-5)
    if clip:
        assert max(want_norms) > cfg.optim.grad_clip  # clipping was exercised
    assert E.loss_scale(engine) == 1.0 and E.skipped_steps(engine) == 0


def test_keep_freed_host_memory_stops_refaulting_large_blocks():
    """With the allocator setting, a partition-sized temporary freed and allocated again reuses
    mapped pages; without it glibc unmaps it and every step page-faults it in again."""
    import subprocess
    import sys

    code = """
import resource, sys, torch
from etsdm_dist.train import engine as E
if sys.argv[1] == "on":
    assert E.keep_freed_host_memory()
for _ in range(6):  # glibc settles within a few rounds (seen: 4); the steady state is measured
    t = torch.ones(1 << 24); del t  # 64 MiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    t = torch.ones(1 << 24); del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        faults[mode] = int(out.stdout.split()[-1])
    pages = 4 * (64 << 20) // 4096
    assert faults["off"] > pages // 2, faults  # glibc's default: unmapped on free, faulted again
    assert faults["on"] < pages // 20, faults
