"""ema.py: EMA math against a reference loop, the start threshold, state round trips, fp32 masters."""
from __future__ import annotations

import pytest
import torch

from ds_worker import TinyNet, init_single_rank, make_cfg, train
from etsdm_dist.train.ema import EMA


def _perturb(net, step):
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_two_decays_match_reference_loop_with_start():
    net = TinyNet()
    decays, batch, start = [0.9, 0.5], 8, 24  # steps ending at 8, 16, 24 copy; 32.. average
    ema = EMA(net, decays, start_images=start)
    ref = [{n: p.detach().clone() for n, p in net.named_parameters()} for _ in decays]
    for step in range(6):
        _perturb(net, step)
        images = (step + 1) * batch
        ema.update(images)
        for d, r in zip(decays, ref):
            for n, p in net.named_parameters():
                r[n] = p.detach().clone() if images <= start else d * r[n] + (1 - d) * p.detach()
        if images <= start:  # before the start the EMA *is* the weights
            for i in range(2):
                for n, p in net.named_parameters():
                    assert torch.equal(ema.full_state(i)[n], p.detach())
    for i in range(2):
        got = ema.full_state(i)
        for n in ref[i]:
            torch.testing.assert_close(got[n], ref[i][n], rtol=1e-6, atol=1e-7)
    # and the two decays really differ (an index mix-up would not pass the loop above anyway)
    assert not torch.allclose(ema.full_state(0)["a.weight"], ema.full_state(1)["a.weight"])
    assert torch.equal(ema.full_state(0)["scale"], torch.tensor([1.5]))  # buffers ride along


def test_state_dict_round_trip_and_copy_to():
    net = TinyNet()
    ema = EMA(net, [0.9, 0.99])
    for step in range(3):
        _perturb(net, step)
        ema.update((step + 1) * 8)
    sd = ema.state_dict()
    assert sd["decays"] == [0.9, 0.99] and sd["num_updates"] == 3 and sd["images"] == 24
    other = EMA(TinyNet(seed=5), [0.9, 0.99])
    other.load_state_dict(sd)
    for i in range(2):
        for n, t in ema.full_state(i).items():
            assert torch.equal(other.full_state(i)[n], t)
    fresh = TinyNet(seed=7)
    ema.copy_to(fresh, 1)
    assert torch.equal(fresh.b.weight, ema.full_state(1)["b.weight"])
    with pytest.raises(ValueError, match="train.ema_decays"):
        EMA(TinyNet(), [0.5]).load_state_dict(sd)


@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_ema_follows_fp32_master_weights_not_bf16_params(stage):
    """bf16 (ZeRO-0: DeepSpeed's unfused fp16/bf16 optimizer; ZeRO-1: fp32 master fragments): the
    EMA must average the fp32 masters; the bf16 module params are rounded copies of them.
    channels_last is on: build_engine must keep DeepSpeed working with it."""
    from deepspeed.utils import safe_get_full_fp32_param

    init_single_rank()
    cfg = make_cfg(zero_stage=stage, precision="bf16", ema_start_kimg=1.0)  # tracking: EMA == master
    cfg.network.channels_last = True
    from etsdm_dist.train import engine as E

    engine = E.build_engine(cfg, TinyNet(), 1)
    ema = EMA.from_config(engine, cfg)
    train(engine, ema, cfg, range(2))
    state = ema.full_state(0)
    rounded = 0
    masters = {}
    if stage == 0:
        for lps, hps in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups):
            masters.update({id(lp): hp for lp, hp in zip(lps, hps)})
    for n, p in engine.module.named_parameters():
        master = masters[id(p)] if stage == 0 else safe_get_full_fp32_param(p)
        assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
        assert torch.equal(state[n], master), n
        rounded += int((p.float() != master).sum())
    assert rounded > 0  # the bf16 params differ from the masters, so the test can tell them apart


def test_zero3_single_rank_state_is_the_full_weights():
    from ds_worker import full_params
    from etsdm_dist.train import engine as E

    init_single_rank()
    cfg = make_cfg(zero_stage=3, ema_start_kimg=0.016)
    engine = E.build_engine(cfg, TinyNet(), 1)
    ema = EMA.from_config(engine, cfg)
    train(engine, ema, cfg, range(2))  # 16 images: still tracking
    full = full_params(engine)
    for n, t in full.items():
        assert torch.equal(ema.full_state(1)[n], t)
    before = {n: t.clone() for n, t in ema.full_state(1).items()}
    train(engine, ema, cfg, range(2, 3))  # 24 images: averaging with decay 0.5
    after, now = ema.full_state(1), full_params(engine)
    for n in full:
        torch.testing.assert_close(after[n], 0.5 * before[n] + 0.5 * now[n], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- EDM ramp-up


def _independent_beta(decay, batch, images, ratio):
    """EDM's formula written out again: half-life in images, capped, back to a per-step beta."""
    import math

    half_life = batch * math.log(0.5) / math.log(decay)
    return 0.5 ** (batch / max(min(half_life, ratio * images), 1e-8))


def test_rampup_decay_formula():
    from etsdm_dist.train.ema import rampup_decay

    d, B, r = 0.999, 64, 0.05  # half-life 44,329 images; the cap binds below 886,580 images
    assert rampup_decay(d, B, 10**7, None) is d and rampup_decay(d, B, 64, None) is d
    assert rampup_decay(d, B, 10**7, r) == d  # cap not binding: the configured decay, exactly
    assert rampup_decay(d, B, 0, r) == 0.0  # nothing trained yet: the EMA is the weights
    # at images = k * B the capped half-life is r*k*B, so beta = 0.5 ** (1 / (r*k))
    for k in (1, 10, 100, 1000):
        assert rampup_decay(d, B, k * B, r) == pytest.approx(0.5 ** (1 / (r * k)), rel=1e-12)
    betas = [rampup_decay(d, B, k * B, r) for k in range(1, 20000, 97)]
    assert all(a < b for a, b in zip(betas, betas[1:]) if b < d)  # grows until it reaches d
    assert max(betas) == d and min(betas) < 1e-6


def test_short_run_follows_the_ramp_and_none_is_the_fixed_decay():
    net = TinyNet()
    # half-lives 52.6 (0.9) and 551.7 (0.99) images: the cap (= images) binds for 0.9's first
    # 6 steps and for all 8 of 0.99's
    B, ratio, decays = 8, 1.0, [0.9, 0.99]
    ramped = EMA(net, decays, batch_images=B, rampup_ratio=ratio)
    fixed = EMA(net, decays, batch_images=B)  # ratio None
    loose = EMA(net, decays, batch_images=B, rampup_ratio=1e9)  # a cap that never binds
    ref = [{n: p.detach().clone() for n, p in net.named_parameters()} for _ in decays]
    fixed_ref = [{n: p.detach().clone() for n, p in net.named_parameters()} for _ in decays]
    seen = []
    for step in range(8):
        _perturb(net, step)
        images = (step + 1) * B
        for e in (ramped, fixed, loose):
            e.update(images)
        seen.append(ramped.decays_at(images))
        for i, d in enumerate(decays):
            beta = _independent_beta(d, B, images, ratio)
            assert seen[-1][i] == pytest.approx(beta, rel=1e-12)
            for n, p in net.named_parameters():
                ref[i][n] = torch.lerp(p.detach(), ref[i][n], beta)
                fixed_ref[i][n] = torch.lerp(fixed_ref[i][n], p.detach(), 1.0 - d)
    assert [s[0] for s in seen[6:]] == [0.9] * 2 and seen[5][0] < 0.9  # 0.9 reached at 56 images
    assert all(a[1] < b[1] < 0.99 for a, b in zip(seen, seen[1:]))  # 0.99 still ramping
    for i in range(2):
        got, plain, unbound = ramped.full_state(i), fixed.full_state(i), loose.full_state(i)
        for n in ref[i]:
            torch.testing.assert_close(got[n], ref[i][n], rtol=1e-5, atol=1e-6)
            assert torch.equal(plain[n], fixed_ref[i][n]), n  # None: the fixed decay, bit for bit
            assert torch.equal(unbound[n], plain[n]), n
            assert not torch.allclose(got[n], plain[n])  # the ramp changed the average


def test_rampup_from_config_and_bad_ratio():
    cfg = make_cfg(ema_rampup_ratio=0.05, batch_images=4)
    ema = EMA.from_config(TinyNet(), cfg)
    assert (ema.rampup_ratio, ema.batch_images) == (0.05, 4)
    assert EMA.from_config(TinyNet(), make_cfg()).rampup_ratio is None
    with pytest.raises(ValueError, match="train.ema_rampup_ratio"):
        EMA(TinyNet(), [0.9], batch_images=8, rampup_ratio=0.0)
    with pytest.raises(ValueError, match="train.batch_images"):
        EMA(TinyNet(), [0.9], rampup_ratio=0.05)
