"""deepspeed_adapter.py: one test per DeepSpeed internal the adapter relies on, on real tiny engines
(1 rank, CPU, every ZeRO stage in fp32, plus the bf16 layouts of ZeRO-0 and ZeRO-1).

A DeepSpeed upgrade that renames or reshapes one of these fails here, naming the internal, and not
deep inside a resume. When one fails: adapt deepspeed_adapter.py, then widen SUPPORTED and the
pin in pyproject.toml together.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from ds_worker import TinyNet, init_single_rank, make_cfg, train
from etsdm_dist.train import deepspeed_adapter as A
from etsdm_dist.train import engine as E

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (1, "bf16")]
IDS = [f"z{s}-{p}" for s, p in LAYOUTS]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """One engine per layout, trained 2 steps (optimizer state exists), and its checkpoint dir."""
    init_single_rank()
    out = {}
    for stage, precision in LAYOUTS:
        cfg = make_cfg(zero_stage=stage, precision=precision, micro_batch_images=4)
        engine = E.build_engine(cfg, TinyNet(), 1)
        train(engine, _NoEMA(), cfg, range(2))
        folder = tmp_path_factory.mktemp(f"z{stage}{precision}")
        engine.save_checkpoint(str(folder), tag="t", save_latest=False)
        out[(stage, precision)] = (engine, str(folder / "t"))
    return out


class _NoEMA:
    def update(self, images):
        pass


def _names(engine):
    return {id(p): n for n, p in engine.module.named_parameters()}


# --------------------------------------------------------------------------- version


def test_supported_range_is_pyproject_pin_and_installed():
    import deepspeed

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"deepspeed{A.SUPPORTED}" in deps, deps
    assert A.check_version() == deepspeed.__version__ == A.TESTED


@pytest.mark.parametrize("version", ["0.18.9", "0.19.7", "0.20.0", "0.20.0rc1", "0.19.8rc1", "junk"])
def test_unsupported_version_is_named_with_the_fix(version):
    with pytest.raises(A.DeepSpeedVersionError) as e:
        A.check_version(version)
    msg = str(e.value)
    assert f"DeepSpeed {version} is installed" in msg and A.SUPPORTED in msg and "pip install" in msg
    assert A.check_version("0.19.9+local") == "0.19.9+local"


def test_build_engine_checks_the_installed_version(monkeypatch):
    import deepspeed

    init_single_rank()
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    with pytest.raises(A.DeepSpeedVersionError, match="0.21.0"):
        E.build_engine(make_cfg(), TinyNet(), 1)


# --------------------------------------------------------------------------- process group


def test_shm_comm_op_is_the_one_we_skip():
    """`deepspeed.ops.__compatible_ops__[...]` keyed by the CPU shared-memory op's NAME."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    A.skip_shm_comm_jit()
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    assert builder.NAME == "deepspeed_shm_comm"
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


DIST_INIT_CHECK = """
import sys, torch
sys.path.insert(0, "tests")
from etsdm_dist import dist
dist.init()
import deepspeed.comm as dc
group = torch.distributed.group.WORLD
assert torch.distributed.get_backend() == "gloo" and not dc.is_initialized()
from ds_worker import TinyNet, make_cfg
from etsdm_dist.train import engine as E
engine = E.build_engine(make_cfg(), TinyNet(), 1)
assert dc.is_initialized() and dc.get_world_size() == 1 and dc.get_rank() == 0
assert torch.distributed.group.WORLD is group  # DeepSpeed wrapped our group, made none of its own
print("comm ok")
"""


def test_deepspeed_comm_wraps_the_group_dist_init_made():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", DIST_INIT_CHECK], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "comm ok" in out.stdout, out.stderr[-3000:]


def test_dist_imports_no_deepspeed():
    code = "import sys; import etsdm_dist.dist; assert 'deepspeed' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


# --------------------------------------------------------------------------- optimizer layouts


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_optimizer_class_per_layout(engines, layout):
    """Which optimizer DeepSpeed builds decides every dispatch in the adapter."""
    engine, _ = engines[layout]
    want = {(0, "fp32"): "AdamW", (0, "bf16"): "FP16_UnfusedOptimizer",
            (3, "fp32"): "DeepSpeedZeroOptimizer_Stage3"}.get(layout, "DeepSpeedZeroOptimizer")
    assert type(engine.optimizer).__name__ == want
    if want != "AdamW":
        assert isinstance(engine.optimizer.optimizer, torch.optim.AdamW)  # torch_adam on CPU


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_param_groups_chain_reaches_the_torch_optimizer(engines, layout):
    engine, _ = engines[layout]
    groups = A.param_groups(engine)
    inner = engine.optimizer if layout == (0, "fp32") else engine.optimizer.optimizer
    assert all(any(g is h for h in groups) for g in inner.param_groups) and all("lr" in g for g in groups)


def test_zero3_parameter_attributes(engines):
    """ds_id, ds_tensor (1-D, .ds_numel = padded partition), ds_numel, ds_shape, partition_numel(),
    ds_process_group; the optimizer's fp32_partitioned_groups_flat / fp16_groups and their state."""
    engine, _ = engines[(3, "fp32")]
    opt = engine.optimizer
    for p in engine.module.parameters():
        assert isinstance(p.ds_id, int) and p.ds_tensor.dim() == 1
        assert p.ds_tensor.ds_numel == p.partition_numel() == p.ds_tensor.numel()
        assert p.ds_numel == torch.Size(p.ds_shape).numel() and hasattr(p, "ds_process_group")
        assert A.zero3_span(p) == (0, p.ds_numel, p.partition_numel())  # one rank owns it all
    names = _names(engine)
    assert sorted(names[id(p)] for g in opt.fp16_groups for p in g) == sorted(names.values())
    for flat in opt.fp32_partitioned_groups_flat:
        assert flat.dtype == torch.float32 and flat.dim() == 1
        st = opt.optimizer.state[flat]
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(st) and st["exp_avg"].shape == flat.shape
    assert not getattr(opt, "swap_optimizer", False) and not getattr(opt, "params_in_nvme_and_cpu", False)


def test_zero3_local_fp32_partition_api(engines):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

    engine, _ = engines[(3, "fp32")]
    for p in engine.module.parameters():
        local = safe_get_local_fp32_param(p)
        assert local.dtype == torch.float32 and local.numel() == p.partition_numel()
        torch.testing.assert_close(local.view(-1)[:p.ds_numel], safe_get_full_fp32_param(p).view(-1))


@pytest.mark.parametrize("layout", [(1, "fp32"), (2, "fp32"), (1, "bf16")], ids=["z1", "z2", "z1-bf16"])
def test_hp_mapping_fragments(engines, layout):
    """ZeRO-1/2: param._hp_mapping.lp_fragment_address (start, numel), get_hp_fragment(key),
    set_optim_state_fragment; optimizer.bit16_groups, _hp_optimizer_states_linked, and the flat
    fp32 partition as param_groups[g]["params"][0]."""
    engine, _ = engines[layout]
    opt = engine.optimizer
    assert isinstance(opt._hp_optimizer_states_linked, bool)
    for g, lps in enumerate(opt.bit16_groups):
        hp = opt.optimizer.param_groups[g]["params"][0]
        assert hp.dtype == torch.float32 and hp.dim() == 1 and "exp_avg" in opt.optimizer.state[hp]
        for lp in lps:
            m = lp._hp_mapping
            addr = m.lp_fragment_address
            assert (addr.start, addr.numel) == (0, lp.numel())  # one rank: the whole parameter
            assert m.get_hp_fragment().dtype == torch.float32 and m.get_hp_fragment().numel() == addr.numel
            assert m.get_hp_fragment("exp_avg").numel() == addr.numel
            assert callable(m.set_optim_state_fragment)


def test_bf16_zero0_wrapper_groups(engines):
    """FP16_UnfusedOptimizer: fp16_groups (bf16 params) zip fp32_groups (fp32 masters)."""
    engine, _ = engines[(0, "bf16")]
    opt = engine.optimizer
    assert not hasattr(opt, "fp32_groups_flat")
    pairs = [(lp, hp) for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)]
    assert len(pairs) == len(list(engine.module.parameters()))
    for lp, hp in pairs:
        assert lp.dtype == torch.bfloat16 and hp.dtype == torch.float32 and hp.shape == lp.shape
        assert torch.equal(lp, hp.to(torch.bfloat16)) and "exp_avg" in opt.optimizer.state[hp]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_master_fragments_are_the_fp32_masters(engines, layout):
    """Per layout the fragments cover every parameter and hold DeepSpeed's fp32 master values."""
    from deepspeed.utils import safe_get_full_fp32_param

    engine, _ = engines[layout]
    frags = A.master_fragments(engine.module, engine.optimizer)
    params = dict(engine.module.named_parameters())
    assert [f.name for f in frags] == list(params)
    for f in frags:
        full = safe_get_full_fp32_param(params[f.name])
        if full is None:  # ZeRO-0: the wrapper's master, or the fp32 parameter
            full = f.read() if layout == (0, "bf16") else params[f.name].detach()
            assert f.replicated
        assert f.read().dtype == torch.float32 and f.numel == full.numel() and f.start == 0
        assert torch.equal(f.read(), full.reshape(-1).float())


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_grad_norm_sources(engines, layout):
    """optimizer._global_grad_norm (ZeRO, wrappers); ZeRO-0 fp32: clip_fp32_gradients, which the
    adapter replaces on the instance to keep the norm (engine._take_model_step still calls it)."""
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.utils import clip_grad_norm_

    engine, _ = engines[layout]
    if layout == (0, "fp32"):
        assert not hasattr(engine.optimizer, "_global_grad_norm")
        assert "self.clip_fp32_gradients()" in inspect.getsource(DeepSpeedEngine._take_model_step)
        assert {"parameters", "max_norm", "mpu"} <= set(inspect.signature(clip_grad_norm_).parameters)
        assert "clip_fp32_gradients" in vars(engine)  # the adapter's instance-level replacement
    else:
        assert hasattr(engine.optimizer, "_global_grad_norm")
    norm = A.grad_norm(engine)
    assert norm is not None and norm > 0


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_counters_and_loss_scale(engines, layout):
    engine, _ = engines[layout]
    c = A.counters(engine)
    assert c == {"global_steps": 2, "global_samples": 16, "skipped_steps": 0}
    A.set_counters(engine, {"global_steps": 5, "global_samples": 40, "skipped_steps": 1})
    assert (engine.global_steps, engine.global_samples, engine.skipped_steps) == (5, 40, 1)
    A.set_counters(engine, c)
    assert A.loss_scale(engine) == 1.0 and not engine.fp16_enabled()
    if layout[0] > 0:  # fp16 cannot run on this CPU: the ZeRO optimizers' scale attribute
        assert isinstance(engine.optimizer.loss_scale, (int, float))


def test_dynamic_loss_scaler_cur_scale():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    assert scaler.cur_scale == 2.0**16  # loss_scale() falls back to optimizer.loss_scaler.cur_scale


@pytest.mark.parametrize("layout", [(0, "fp32"), (3, "fp32")], ids=["z0", "z3"])
def test_torch_adam_step_is_a_float_tensor(engines, layout):
    engine, _ = engines[layout]
    base = engine.optimizer if layout[0] == 0 else engine.optimizer.optimizer
    steps = [st["step"] for st in base.state.values()]
    assert steps and all(torch.is_tensor(s) and s.dtype == torch.float32 and float(s) == 2 for s in steps)
    assert type(base).__module__.startswith("torch.optim")  # how the adapter tells it from FusedAdam


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_checkpoint_files_load_weights_only(engines, layout):
    """Every DeepSpeed file of every layout holds only tensors, plain data and `safe_types`."""
    _, folder = engines[layout]
    A.check_files(folder)
    sd = A.load_file(A.model_states_file(folder))
    assert {"module", "buffer_names", *A.COUNTERS} <= set(sd) and sd["global_steps"] == 2
    if layout[0] == 0:
        opt = sd["optimizer"]
        want = {"fp32_groups", "optimizer_state_dict"} if layout[1] == "bf16" else {"state"}
        assert want <= set(opt), sorted(opt)


def test_check_files_refuses_a_pickled_callable(engines, tmp_path):
    _, folder = engines[(2, "fp32")]
    sd = A.load_file(A.model_states_file(folder))
    sd["evil"] = print  # any callable global outside the allow list
    bad = tmp_path / "t"
    bad.mkdir()
    torch.save(sd, bad / "mp_rank_00_model_states.pt")
    with pytest.raises(pickle.UnpicklingError, match="mp_rank_00_model_states.pt"):
        A.check_files(str(bad))


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_to_canonical_per_parameter_files(engines, layout, tmp_path):
    """ds_to_universal (ZeRO-1/2/3: zero/{param}/*.pt, step.pt or optimizer_state.pt) and the
    ZeRO-0 split give every trainable parameter's fp32 master, both moments and its step."""
    from deepspeed.utils import safe_get_full_fp32_param

    engine, folder = engines[layout]
    names = [n for n, _ in engine.module.named_parameters()]
    out = A.to_canonical(folder, str(tmp_path), layout[0], names)
    base = engine.optimizer if layout[0] == 0 and layout[1] == "fp32" else engine.optimizer.optimizer
    live = {float(st["step"]) for st in base.state.values()}  # bf16 ZeRO-0 steps once at init: 3
    assert len(live) == 1 and out["steps"] == dict.fromkeys(names, live.pop())
    assert out["counters"]["global_steps"] == 2 and set(out["buffers"]) == {"scale"}
    for n, p in engine.module.named_parameters():
        got = {key: A.load_file(os.path.join(tmp_path, "zero", n, f"{key}.pt"))
               for key in ("fp32", "exp_avg", "exp_avg_sq")}
        # ZeRO-1/2 and our ZeRO-0 split write {"param": tensor}; ZeRO-3's converter a bare tensor
        got = {k: (v["param"] if isinstance(v, dict) else v).reshape(-1) for k, v in got.items()}
        assert all(t.dtype == torch.float32 for t in got.values())
        master = safe_get_full_fp32_param(p)  # None under ZeRO-0
        if master is None:
            master = engine.optimizer.fp32_groups[0][list(dict(engine.module.named_parameters())).index(n)] \
                if layout == (0, "bf16") else p.detach()
        assert torch.equal(got["fp32"], master.reshape(-1).float()), n
        assert bool(got["exp_avg_sq"].gt(0).any()), n  # real moments, not injected zeros
