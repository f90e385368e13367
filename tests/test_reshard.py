"""reshard.py through checkpoint.load: resume under another ZeRO stage AND another world size.

Real runs: a checkpoint written by W1 ranks under ZeRO-s1 is resumed by W2 ranks under ZeRO-s2.
Right after `load` the fp32 masters, both Adam moments, the Adam step of every parameter and
the EMAs must equal the writer's state bit for bit; after one more step the whole state must
equal the writer's own next step bit for bit.

Why the next step can be exact across layouts: every rank trains on the same PER_RANK samples,
so the global mean gradient is the per-rank gradient whatever the world size ((g + g) / 2 == g
in floating point), with no gradient clipping and a constant LR. What remains is elementwise
(Adam, EMA), and the restored state decides it.

Also run as a script: the rank worker (`save` writes sources, `resume` resumes them).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from ds_worker import TinyNet, batch, init_single_rank, launch  # noqa: E402
from etsdm_dist.train import checkpoint as C  # noqa: E402
from etsdm_dist import config as config_mod  # noqa: E402
from etsdm_dist.train import engine as E  # noqa: E402
from etsdm_dist.train import reshard  # noqa: E402
from etsdm_dist.train.ema import EMA  # noqa: E402

STEPS = 2  # optimizer steps before the checkpoint
PER_RANK = 4  # samples per rank per step (no gradient accumulation)
KEYS = ("exp_avg", "exp_avg_sq")


def make_cfg(run_dir: str, stage: int, precision: str, world: int) -> config_mod.Config:
    return config_mod.from_dict({
        "optim": {"lr": 1e-2, "grad_clip": 0.0, "warmup_kimg": 0.0, "weight_decay": 0.1},
        "train": {"run_dir": run_dir, "batch_images": PER_RANK * world, "checkpoint_kimg": 0.008,
                  "total_kimg": 1.0, "ema_decays": [0.9, 0.5], "zero_stage": stage,
                  "precision": precision, "keep_last": 1}})


def train_step(engine, ema, cfg, k: int) -> None:
    x, y = batch(k, PER_RANK)  # the same samples on every rank
    images = (k + 1) * cfg.train.batch_images
    E.set_lr(engine, E.lr_at(cfg, images))
    dtype = next(engine.module.parameters()).dtype
    loss = (engine(x.to(dtype)).float() - y).pow(2).mean()
    assert E.engine_micro_step(engine, loss)
    ema.update(images)


# --------------------------------------------------------------------------- reading engine state


def _steps(engine) -> dict[str, float]:
    """Adam step per parameter, wherever this layout keeps it (test-side, independent of reshard)."""
    opt, names = engine.optimizer, {id(p): n for n, p in engine.module.named_parameters()}
    f = lambda st: float(st["step"])  # noqa: E731
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return {names[id(p)]: f(opt.optimizer.state[opt.fp32_partitioned_groups_flat[i]])
                for i, group in enumerate(opt.fp16_groups) for p in group}
    if hasattr(opt, "bit16_groups") or hasattr(opt, "bf16_groups"):  # ZeRO-1/2, BF16_Optimizer
        groups = getattr(opt, "bit16_groups", None) or opt.bf16_groups
        return {names[id(p)]: f(opt.optimizer.state[opt.optimizer.param_groups[g]["params"][0]])
                for g, group in enumerate(groups) for p in group}
    if hasattr(opt, "fp32_groups"):  # ZeRO-0, fp16/bf16 unfused wrapper
        return {names[id(lp)]: f(opt.optimizer.state[hp])
                for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
    return {n: f(opt.state[p]) for n, p in engine.module.named_parameters()}  # ZeRO-0 fp32


def _zero0_master(engine, p):
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups"):
        for lps, hps in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, hp in zip(lps, hps):
                if lp is p:
                    return hp, opt.optimizer.state[hp]
    return p, opt.state[p]


def snapshot(engine, ema) -> dict:
    """Full fp32 masters, Adam moments and steps, low-precision weights and EMAs (collective)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"fp32": {}, "lp": {}, **{k: {} for k in KEYS}}
    for n, p in engine.module.named_parameters():
        v = safe_get_full_fp32_param(p)
        if v is None:  # ZeRO-0: no DeepSpeed fragment API
            hp, st = _zero0_master(engine, p)
            out["fp32"][n] = hp.detach().float().clone()
            for k in KEYS:
                out[k][n] = st[k].detach().clone()
        else:
            out["fp32"][n] = v.detach().float().clone()
            for k in KEYS:
                out[k][n] = safe_get_full_optimizer_state(p, k).detach().clone()
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        out["lp"] = {n: p.detach().clone() for n, p in params}
    out["step"] = _steps(engine)
    out["ema"] = ema.state_dict()["ema"]
    out["buffers"] = {n: b.detach().clone() for n, b in engine.module.named_buffers()}
    return out


def compare(want: dict, got: dict, what: str, lp: bool = True) -> list[str]:
    """Bitwise differences between two snapshots, as messages."""
    bad = []
    for part in ("fp32", *KEYS, "step", "buffers") + (("lp",) if lp else ()):
        for n, t in want[part].items():
            g = got[part][n]
            same = torch.equal(t, g) if torch.is_tensor(t) else t == g
            if not same:
                bad.append(f"{what}: {part} {n} differs")
    for i, e in enumerate(want["ema"]):
        for n, t in e.items():
            if not torch.equal(t, got["ema"][i][n]):
                bad.append(f"{what}: ema[{i}] {n} differs")
    return bad


# --------------------------------------------------------------------------- the two roles


def _rank() -> int:
    return torch.distributed.get_rank()


def write_source(root: str, stage: int, precision: str) -> str:
    """Train STEPS steps, checkpoint, record the state there and after one more step."""
    world = torch.distributed.get_world_size()
    name = f"w{world}-z{stage}-{precision}"
    cfg = make_cfg(os.path.join(root, name), stage, precision, world)
    engine = E.build_engine(cfg, TinyNet(), world)
    ema = EMA.from_config(engine, cfg)
    for k in range(STEPS):
        train_step(engine, ema, cfg, k)
    C.save(engine, ema, cfg, images=STEPS * cfg.train.batch_images)
    ref = {"at": snapshot(engine, ema)}
    train_step(engine, ema, cfg, STEPS)
    ref["next"] = snapshot(engine, ema)
    if _rank() == 0:
        torch.save(ref, os.path.join(root, f"{name}.ref.pt"))
    torch.distributed.barrier()
    return name


def resume(root: str, source: str, stage: int, precision: str) -> dict:
    """Resume `source` under (this world size, `stage`, `precision`); states at load and after
    one more step. The network starts from other weights, so anything not restored shows."""
    world = torch.distributed.get_world_size()
    (path, man), _ = C.find_resume(os.path.join(root, source))
    cfg = make_cfg(os.path.join(root, f"resumed-{source}-w{world}-z{stage}-{precision}"), stage,
                   precision, world)
    universal = C.needs_universal(man, cfg, world)
    engine = E.build_engine(cfg, TinyNet(seed=7), world, load_universal=universal)
    ema = EMA.from_config(engine, cfg)
    state = C.load(engine, ema, path, man, cfg, world)
    out = {"universal": state["universal"], "global_steps": engine.global_steps,
           "at": snapshot(engine, ema)}
    train_step(engine, ema, cfg, STEPS)
    out["next"] = snapshot(engine, ema)
    return out


def main(argv: list[str]) -> int:
    """`save ROOT stage:precision,...` or `resume ROOT source:stage:precision,...` (all ranks)."""
    mode, root, specs = argv[0], argv[1], argv[2].split(",")
    from etsdm_dist import dist

    dist.init()  # plain torch.distributed; deepspeed.initialize wraps that group
    results = {}
    for spec in specs:
        if mode == "save":
            stage, precision = spec.split(":")
            write_source(root, int(stage), precision)
        else:
            source, stage, precision = spec.split(":")
            results[spec] = resume(root, source, int(stage), precision)
    if mode == "resume" and _rank() == 0:
        torch.save(results, os.path.join(root, f"resumed-w{torch.distributed.get_world_size()}.pt"))
    torch.distributed.barrier()
    return 0


# --------------------------------------------------------------------------- tests


def _ref(root, source) -> dict:
    return torch.load(os.path.join(root, f"{source}.ref.pt"), weights_only=True)


def _check(root, source, dst, got, *, exact_next=True, lp=True) -> None:
    ref = _ref(root, source)
    assert got["universal"] != (source.endswith("z0-fp32") and dst == 0)  # 0 -> 0 loads directly
    bad = compare(ref["at"], got["at"], "at load", lp=lp)
    if exact_next:
        bad += compare(ref["next"], got["next"], "after one more step")
    assert not bad, "\n".join(bad[:20])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One 2-rank launch writes every source: ZeRO-0/1/2/3 in fp32 and ZeRO-1 in bf16."""
    d = tmp_path_factory.mktemp("reshard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ETSDM_CACHE_DIR", str(d / "cache"))  # launches inherit it
        launch(2, ["save", str(d), "0:fp32,1:fp32,2:fp32,3:fp32,1:bf16"], script=__file__)
        yield str(d)


@pytest.mark.parametrize("src,dst", [(s, d) for s in range(4) for d in range(4)],
                         ids=[f"z{s}-to-z{d}" for s in range(4) for d in range(4)])
def test_two_ranks_to_one_every_stage_pair(root, src, dst):
    init_single_rank()
    source = f"w2-z{src}-fp32"
    got = resume(root, source, dst, "fp32")
    _check(root, source, dst, got)
    assert got["global_steps"] == STEPS
    assert not os.listdir(os.environ["ETSDM_CACHE_DIR"])  # conversion cache cleaned up


def test_one_rank_to_two(root):
    """1-rank sources of every stage resumed by 2 ranks under another stage (one launch), and
    DeepSpeed's unfused bf16 ZeRO-0 optimizer (per-parameter fp32 masters) as a source."""
    init_single_rank()
    for stage, precision in ((0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16")):
        write_source(root, stage, precision)
    cases = ["w1-z3-fp32:2:fp32", "w1-z0-fp32:3:fp32", "w1-z2-fp32:1:fp32", "w1-z1-fp32:0:fp32",
             "w1-z0-bf16:3:bf16"]
    launch(2, ["resume", root, ",".join(cases)], script=__file__)
    results = torch.load(os.path.join(root, "resumed-w2.pt"), weights_only=True)
    for case in cases:
        source, dst, _ = case.split(":")
        _check(root, source, int(dst), results[case])


@pytest.mark.parametrize("dst,precision", [(3, "bf16"), (0, "bf16"), (2, "fp32")])
def test_bf16_masters_are_exact(root, dst, precision):
    """bf16 ZeRO-1 on 2 ranks -> 1 rank: fp32 masters, moments, steps and EMAs exact at load, the
    bf16 weights are the rounded masters. In bf16 the next step is exact too (identical per-rank
    data makes the bf16 gradient average exact); into fp32 it only has to move the weights."""
    init_single_rank()
    source = "w2-z1-bf16"
    got = resume(root, source, dst, precision)
    _check(root, source, dst, got, exact_next=(precision == "bf16"), lp=(precision == "bf16"))
    for n, master in got["at"]["fp32"].items():
        assert torch.equal(got["at"]["lp"][n], master.to(got["at"]["lp"][n].dtype)), n
    for n, t in got["next"]["fp32"].items():
        assert torch.isfinite(t).all() and not torch.equal(t, got["at"]["fp32"][n]), n


def test_a_missed_state_is_caught(root, monkeypatch):
    """The comparison has teeth: a restore that drops exp_avg_sq fails it."""
    init_single_rank()
    original = reshard._Source.state

    def drop(self, name, shape):
        out = original(self, name, shape)
        out["exp_avg_sq"] = torch.zeros(shape)
        return out

    monkeypatch.setattr(reshard._Source, "state", drop)
    source = "w2-z3-fp32"
    got = resume(root, source, 2, "fp32")
    bad = compare(_ref(root, source)["at"], got["at"], "at load")
    assert bad and all("exp_avg_sq" in b for b in bad)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
