"""The one module that knows DeepSpeed's internals.

Everything else in etsdm-dist uses DeepSpeed through `deepspeed.initialize`, the engine's public
methods, and the functions below. Private attributes, `deepspeed.runtime/utils/checkpoint.*`
imports, checkpoint file layouts and the one instance patch live here, so a DeepSpeed upgrade
is checked in one place: tests/test_deepspeed_adapter.py holds one test per internal used here,
on real tiny engines of every ZeRO stage.

API:
    SUPPORTED, check_version()        the DeepSpeed range we test (also pyproject's pin)
    on_cpu(), skip_shm_comm_jit(), initialize(model, params, ds_config)
    param_groups(engine)              every param-group dict the optimizer stack steps with
    micro_step(engine, loss)          backward + step; True when an optimizer step was applied
    grad_norm / loss_scale / counters / set_counters(engine)
    master_fragments(module, optimizer)   this rank's fp32 master pieces, one per parameter
    restore_state(engine, source)     write full fp32 masters, Adam moments and steps into engine
    to_canonical(src, dst, stage, trainable)  a DeepSpeed checkpoint -> per-parameter fp32 files
    load_file / check_files / weights_only_loads / load_checkpoint   weights-only loading

Who owns what (ZeRO-3 partitions): the rank of the parameter's partition group
(`param.ds_process_group`), as DeepSpeed decides it; `zero3_span` is the only place computing it.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pickle
import weakref
from argparse import Namespace
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as tdist

TESTED = "0.19.8"
SUPPORTED = ">=0.19.8,<0.20"  # pyproject.toml declares the same (tests check they agree)
STEP = "step"


class DeepSpeedVersionError(RuntimeError):
    pass


def check_version(installed: str | None = None) -> str:
    """The installed DeepSpeed version, or an error naming it, the supported range and the fix."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if installed is None:
        import deepspeed

        installed = deepspeed.__version__
    try:
        ok = SpecifierSet(SUPPORTED).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise DeepSpeedVersionError(
            f"DeepSpeed {installed} is installed, but etsdm-dist supports deepspeed{SUPPORTED} "
            f"(tested: {TESTED}; it relies on DeepSpeed internals, see "
            f"etsdm_dist/train/deepspeed_adapter.py). Install a supported version: "
            f"pip install 'deepspeed{SUPPORTED}' (CPU machines: bash tools/install.sh)")
    return installed


# --------------------------------------------------------------------------- engine


def on_cpu() -> bool:
    """Whether DeepSpeed's accelerator is the CPU (tests, CI) rather than a GPU."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return True
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def skip_shm_comm_jit() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op (minutes on CPU) when it first wraps the
    process group; training never uses it. Mark it incompatible before deepspeed.initialize."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# Norms DeepSpeed computes and drops (ZeRO-0 fp32 clipping) or never computes (ZeRO-0 fp32, no
# clipping): kept per engine here instead of as attributes on DeepSpeed's object.
_NORMS: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()
_CLIP_RECORDS: "weakref.WeakSet[object]" = weakref.WeakSet()


def initialize(model: torch.nn.Module, params, ds_config: dict):
    """deepspeed.initialize after the version check; returns the engine. The process group, if
    one exists (dist.init), is reused: deepspeed.comm wraps it instead of creating another."""
    check_version()
    skip_shm_comm_jit()
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    if (engine.gradient_clipping() > 0 and not engine.zero_optimization()
            and not (engine.fp16_enabled() or engine.bfloat16_enabled())):
        _record_clip_norm(engine)
    return engine


def _record_clip_norm(engine) -> None:
    """ZeRO-0 fp32 with clipping: the engine's clip_fp32_gradients computes the global norm and
    drops it. An instance-level replacement (same call) keeps it, saving a second gradient pass."""
    from deepspeed.runtime.utils import clip_grad_norm_

    ref = weakref.ref(engine)

    def clip_fp32_gradients():
        e = ref()
        _NORMS[e] = clip_grad_norm_(parameters=e.module.parameters(), max_norm=e.gradient_clipping(),
                                    mpu=e.mpu)

    engine.clip_fp32_gradients = clip_fp32_gradients
    _CLIP_RECORDS.add(engine)


def param_groups(engine) -> list[dict]:
    """Every param-group dict of the optimizer and the optimizers it wraps (ZeRO and fp16/bf16
    wrappers share the inner dicts, but a wrapper could keep its own copy)."""
    out, seen, opt = [], set(), engine.optimizer
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        out += [g for g in (getattr(opt, "param_groups", None) or []) if all(g is not h for h in out)]
        opt = getattr(opt, "optimizer", None)
    return out


def _local_grad_norm(engine) -> torch.Tensor:
    """2-norm of the (already all-reduced) module gradients, as a device tensor (no host sync)."""
    grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def micro_step(engine, loss: torch.Tensor) -> bool:
    """engine.backward + engine.step; True when this call applied an optimizer step."""
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(loss)
    if boundary and not hasattr(engine.optimizer, "_global_grad_norm") and engine not in _CLIP_RECORDS:
        _NORMS[engine] = _local_grad_norm(engine)
    engine.step()
    return bool(boundary and engine.was_step_applied())


def grad_norm(engine) -> float | None:
    """Global gradient 2-norm of the last applied step (before clipping), or None if unknown."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = _NORMS.get(engine)
    return None if norm is None else float(norm)


def loss_scale(engine) -> float:
    """Current fp16 dynamic loss scale; 1.0 for fp32 / bf16."""
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    for name in ("cur_scale", "loss_scale"):
        value = getattr(opt, name, None)
        if isinstance(value, (int, float)) or torch.is_tensor(value):
            return float(value)
    return float(opt.loss_scaler.cur_scale)


COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def counters(engine) -> dict[str, int]:
    """DeepSpeed's step counters (skipped_steps: fp16 overflow skips; all restored on resume)."""
    return {k: int(getattr(engine, k)) for k in COUNTERS}


def set_counters(engine, values: dict[str, int]) -> None:
    for k in COUNTERS:
        setattr(engine, k, int(values[k]))


# --------------------------------------------------------------------------- fp32 masters


def zero3_span(param) -> tuple[int, int, int]:
    """(start, count, partition size) of the flattened ZeRO-3 parameter this rank owns: the
    rank in the parameter's partition group times the (padded) partition size."""
    part = int(param.ds_tensor.ds_numel)
    group = getattr(param, "ds_process_group", None)
    owner = tdist.get_rank(group=group) if tdist.is_initialized() else 0
    start = owner * part
    return start, max(0, min(part, int(param.ds_numel) - start)), part


@dataclass(frozen=True)
class MasterFragment:
    """This rank's fp32 master of [start, start + numel) of one flattened parameter."""
    name: str
    shape: tuple[int, ...]
    start: int
    numel: int  # 0: this rank holds none of it
    replicated: bool  # every rank holds the same whole value
    read: Callable[[], torch.Tensor]  # its current values, 1-D fp32 (a view where possible)


def _wrapper_masters(optimizer) -> dict[int, Callable[[], torch.Tensor]]:
    """id(param) -> its fp32 master in DeepSpeed's fp16/bf16 optimizers without ZeRO."""
    out: dict[int, Callable[[], torch.Tensor]] = {}
    lp_groups = getattr(optimizer, "fp16_groups", None)
    if lp_groups is None or hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return out
    if hasattr(optimizer, "fp32_groups"):  # unfused: one fp32 clone per param
        for lps, hps in zip(lp_groups, optimizer.fp32_groups):
            for lp, hp in zip(lps, hps):
                out[id(lp)] = (lambda hp=hp: hp.detach().view(-1))
    elif hasattr(optimizer, "fp32_groups_flat"):  # fused: params are views of one flat buffer
        for i, lps in enumerate(lp_groups):
            flat_lp, flat_hp = optimizer.fp16_groups_flat[i], optimizer.fp32_groups_flat[i]
            for lp in lps:
                if lp.untyped_storage().data_ptr() == flat_lp.untyped_storage().data_ptr():
                    off, n = lp.storage_offset() - flat_lp.storage_offset(), lp.numel()
                    out[id(lp)] = (lambda o=off, n=n, h=flat_hp: h.detach().narrow(0, o, n))
    return out


def master_fragments(module: torch.nn.Module, optimizer) -> list[MasterFragment]:
    """One fragment per parameter of `module`, from the best fp32 source DeepSpeed has:
    ZeRO-3 partition; ZeRO-1/2 (and BF16_Optimizer) fragment; fp16/bf16 wrapper master (whole,
    replicated); else the parameter itself (fp32 ZeRO-0, frozen, a plain module; replicated)."""
    from deepspeed.utils import safe_get_local_fp32_param

    wrapped = _wrapper_masters(optimizer) if optimizer is not None else {}
    frags = []
    for name, p in module.named_parameters():
        if hasattr(p, "ds_id"):
            start, n, _ = zero3_span(p)

            def z3(p=p, n=n):
                hp = safe_get_local_fp32_param(p) if p.requires_grad else None
                if hp is None:  # frozen: no master copy, the partition itself is the value
                    hp = p.ds_tensor.detach().float()
                return hp.view(-1)[:n]

            frags.append(MasterFragment(name, tuple(p.ds_shape), start, n, False, z3))
        elif hasattr(p, "_hp_mapping"):
            m = p._hp_mapping
            if m is None:  # another rank's fragment entirely
                frags.append(MasterFragment(name, tuple(p.shape), 0, 0, False, lambda: torch.empty(0)))
            else:
                addr = m.lp_fragment_address
                frags.append(MasterFragment(name, tuple(p.shape), addr.start, addr.numel, False,
                                            lambda m=m: m.get_hp_fragment().detach().view(-1)))
        elif id(p) in wrapped:
            frags.append(MasterFragment(name, tuple(p.shape), 0, p.numel(), True, wrapped[id(p)]))
        else:
            frags.append(MasterFragment(name, tuple(p.shape), 0, p.numel(), True,
                                        lambda p=p: p.detach().float().reshape(-1)))
    return frags


# --------------------------------------------------------------------------- restore


def _step_value(base, step: float, like: torch.Tensor):
    """The Adam step as `base` keeps it: torch's Adam/AdamW a float32 tensor (on the device when
    capturable or fused), DeepSpeed's FusedAdam / CPUAdam a Python int."""
    if type(base).__module__.startswith("torch.optim"):
        group = base.param_groups[0] if base.param_groups else {}
        device = like.device if (group.get("capturable") or group.get("fused")) else "cpu"
        return torch.tensor(float(step), dtype=torch.float32, device=device)
    return int(step)


def _state_for(base, hp: torch.Tensor, keys: list[str], step: float) -> dict:
    """Create (or reuse) the optimizer state of `hp` (DeepSpeed creates it lazily at the first
    step); the moments are written afterwards."""
    st = base.state[hp]
    for k in keys:
        if k not in st:
            st[k] = torch.zeros_like(hp)
    st[STEP] = _step_value(base, step, hp)
    return st


@torch.no_grad()
def _restore_zero3(opt, params, names, src) -> None:
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    if getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
        raise NotImplementedError("resuming into ZeRO-3 with NVMe offload after a layout change")
    for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
        _state_for(opt.optimizer, flat, src.keys, src.common_step([names[id(q)] for q in opt.fp16_groups[i]]))
    for name, p in params:
        shape = tuple(p.ds_shape)
        start, count, part = zero3_span(p)

        def local(full: torch.Tensor) -> torch.Tensor:  # this rank's slice, zero padded
            out = torch.zeros(part, dtype=torch.float32)
            out[:count] = full.reshape(-1)[start:start + count]
            return out

        master = local(src.read(name, "fp32", shape))
        p.ds_tensor.data.copy_(master.to(p.ds_tensor.dtype))
        if p.requires_grad:
            safe_set_local_fp32_param(p, master)
            for k, v in src.state(name, shape).items():
                safe_set_local_optimizer_state(p, local(v), k)


@torch.no_grad()
def _restore_fragments(opt, params, names, src) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = opt.optimizer
    lp_groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups")
    for g, lps in enumerate(lp_groups):
        hp = base.param_groups[g]["params"][0]
        st = _state_for(base, hp, src.keys, src.common_step([names[id(p)] for p in lps]))
        for lp in lps:  # the link DeepSpeed makes lazily after its first step
            if lp._hp_mapping is not None:
                lp._hp_mapping.set_optim_state_fragment(hp, st)
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = True
    for name, p in params:
        master = src.read(name, "fp32", p.shape)
        p.data.copy_(master.to(p.dtype))
        if getattr(p, "_hp_mapping", None) is not None:
            safe_set_full_fp32_param(p, master)
            for k, v in src.state(name, p.shape).items():
                safe_set_full_optimizer_state(p, v, k)


@torch.no_grad()
def _restore_zero0(opt, params, names, src) -> None:
    for name, p in params:
        if not p.requires_grad:  # frozen: no master, no optimizer state
            p.data.copy_(src.read(name, "fp32", p.shape).to(p.dtype))
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # unfused wrapper
        for lps, hps in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, hp in zip(lps, hps):
                name = names[id(lp)]
                master = src.read(name, "fp32", lp.shape)
                hp.data.copy_(master)
                lp.data.copy_(master.to(lp.dtype))
                st = _state_for(opt.optimizer, hp, src.keys, src.steps.get(name, 0.0))
                for k, v in src.state(name, lp.shape).items():
                    st[k].copy_(v)
    elif hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups_flat"):  # fused wrapper
        for i, lps in enumerate(opt.fp16_groups):
            flat = opt.fp32_groups_flat[i]
            st = _state_for(opt.optimizer, flat, src.keys, src.common_step([names[id(p)] for p in lps]))
            off = 0
            for lp in lps:
                name, n = names[id(lp)], lp.numel()
                master = src.read(name, "fp32", lp.shape)
                flat.data.narrow(0, off, n).copy_(master.reshape(-1))
                opt.fp16_groups_flat[i].data.narrow(0, off, n).copy_(master.reshape(-1))
                lp.data.copy_(master.to(lp.dtype))
                for k, v in src.state(name, lp.shape).items():
                    st[k].narrow(0, off, n).copy_(v.reshape(-1))
                off += n
    else:  # fp32: the torch optimizer steps the module's own parameters
        in_opt = {id(q) for group in (opt.param_groups if opt is not None else []) for q in group["params"]}
        for name, p in params:
            if not p.requires_grad:
                continue
            p.data.copy_(src.read(name, "fp32", p.shape))
            if id(p) in in_opt:
                if name in src.steps:
                    st = _state_for(opt, p, src.keys, src.steps[name])
                    for k, v in src.state(name, p.shape).items():
                        st[k].copy_(v)
                else:  # torch's Adam keeps no state for a parameter that never stepped
                    opt.state.pop(p, None)


def restore_state(engine, source) -> None:
    """Write full per-parameter state into `engine`, whatever its stage, world size and
    precision: fp32 masters, Adam moments and steps, and the low-precision weights. `source`
    provides keys (moment names), steps ({name: step}), read(name, "fp32", shape),
    state(name, shape) -> {key: full tensor} and common_step(names). No collectives."""
    params = list(engine.module.named_parameters())
    names = {id(p): n for n, p in params}
    opt = engine.optimizer
    if any(hasattr(p, "ds_id") for _, p in params):
        _restore_zero3(opt, params, names, source)
    elif any(hasattr(p, "_hp_mapping") for _, p in params):
        _restore_fragments(opt, params, names, source)
    else:
        _restore_zero0(opt, params, names, source)


# --------------------------------------------------------------------------- files


def safe_types() -> list:
    """The plain-data DeepSpeed classes its checkpoint files pickle (allowed by weights_only)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """torch.load(weights_only=True) inside this block also accepts DeepSpeed's `safe_types`.
    (torch.load itself is not replaced: calls asking for weights_only=False stay unrestricted.)"""
    with torch.serialization.safe_globals(safe_types()):
        yield


def load_file(path: str, **kwargs):
    """A DeepSpeed (or our) checkpoint file, weights-only, on the CPU."""
    with weights_only_loads():
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def check_files(folder: str) -> None:
    """Refuse a folder of DeepSpeed files any of which would unpickle more than tensors, plain
    data and `safe_types` (pickle.UnpicklingError naming the file). DeepSpeed loads its files
    with weights_only=False; checking them right before it does keeps that load to the same
    plain data. Memory-mapped, so the tensors are not read."""
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*.pt"), recursive=True)):
        try:
            try:
                obj = load_file(path, mmap=True)
            except RuntimeError as e:  # not a zip-format file: mmap is unsupported, read it
                if "mmap" not in str(e):
                    raise
                obj = load_file(path)
            del obj
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: refused by the weights-only loader: {e}") from e


def load_checkpoint(engine, folder: str, tag: str) -> None:
    """engine.load_checkpoint of `folder/tag` (weights, optimizer, counters) after check_files."""
    check_files(os.path.join(folder, tag))
    loaded, _ = engine.load_checkpoint(folder, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(folder, tag)}")


MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def model_states_file(src: str) -> str:
    """Rank 0's model-states file (ZeRO-0/1/2, then ZeRO-3 naming)."""
    for name in MODEL_STATES:
        if os.path.isfile(os.path.join(src, name)):
            return os.path.join(src, name)
    raise FileNotFoundError(f"{src}: no DeepSpeed model-states file ({' or '.join(MODEL_STATES)})")


def save_param(dst: str, name: str, key: str, tensor: torch.Tensor) -> None:
    """One tensor in the universal checkpoint's layout: dst/zero/{name}/{key}.pt."""
    d = os.path.join(dst, "zero", name)
    os.makedirs(d, exist_ok=True)
    torch.save({"param": tensor.detach().float().cpu().contiguous()}, os.path.join(d, f"{key}.pt"))


def _step_number(value) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


def to_universal(src: str, dst: str) -> None:
    """DeepSpeed's ds_to_universal, in-process and single-worker, on weights-only checked files."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    check_files(src)
    ds_to_universal(Namespace(input_folder=src, output_folder=dst, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True))


def _universal_steps(dst: str, zero_stage: int, trainable: list[str]) -> dict[str, float]:
    """Adam step per parameter: ZeRO-1/2 files carry one per parameter; ZeRO-3's converter keeps
    only rank 0's optimizer state, one step per sub-group (equal: sub-groups step together)."""
    if zero_stage in (1, 2):
        paths = {n: os.path.join(dst, "zero", n, f"{STEP}.pt") for n in trainable}
        return {n: _step_number(load_file(p)) for n, p in paths.items() if os.path.isfile(p)}
    sd = load_file(os.path.join(dst, "zero", "optimizer_state.pt"))
    steps = {_step_number(s[STEP]) for s in sd["optimizer_state_dict"]["state"].values() if STEP in s}
    if len(steps) > 1:
        raise RuntimeError(f"ZeRO-3 checkpoint: sub-groups have different Adam steps {sorted(steps)}")
    return dict.fromkeys(trainable, steps.pop()) if steps else {}


def _split_zero0(sd: dict, dst: str, trainable: list[str]) -> dict[str, float]:
    """ZeRO-0 model-states -> per-parameter files. The torch optimizer state is keyed by the
    parameter's index in the optimizer's groups, which follow the model's trainable parameters."""
    module, opt = sd["module"], sd.get("optimizer")
    missing = [n for n in trainable if n not in module]
    if missing:
        raise RuntimeError(f"ZeRO-0 checkpoint lacks parameters {missing[:5]}: not this network")
    if opt is None:
        raise RuntimeError("ZeRO-0 checkpoint has no optimizer state")
    shapes = {n: tuple(module[n].shape) for n in trainable}
    if "fp32_groups" in opt:  # fp16/bf16, unfused wrapper: one fp32 master per parameter
        masters = [t for group in opt["fp32_groups"] for t in group]
        state = opt["optimizer_state_dict"]["state"]
    elif "fp32_groups_flat" in opt:  # fp16/bf16, fused: one flat master (and state) per group
        masters, state, names = [], {}, iter(trainable)
        for g, flat in enumerate(opt["fp32_groups_flat"]):
            flat_state, off = opt["optimizer_state_dict"]["state"].get(g, {}), 0
            while off < flat.numel():
                n = int(torch.Size(shapes[next(names)]).numel())
                masters.append(flat.narrow(0, off, n))
                state[len(masters) - 1] = {k: (v.narrow(0, off, n) if torch.is_tensor(v) and v.numel() == flat.numel()
                                               else v) for k, v in flat_state.items()}
                off += n
    else:  # fp32: the module weights are the masters, a plain torch optimizer state
        masters = [module[n] for n in trainable]
        state = opt["state"]
    if len(masters) != len(trainable):
        raise RuntimeError(f"ZeRO-0 checkpoint has {len(masters)} optimizer parameters, the network "
                           f"{len(trainable)} trainable ones")
    steps = {}
    for i, name in enumerate(trainable):
        if masters[i].numel() != torch.Size(shapes[name]).numel():
            raise RuntimeError(f"ZeRO-0 checkpoint: {name} has {masters[i].numel()} elements, "
                               f"expected shape {shapes[name]}")
        save_param(dst, name, "fp32", masters[i])
        for key, value in state.get(i, {}).items():
            if key == STEP:
                steps[name] = _step_number(value)
            elif torch.is_tensor(value) and value.numel() == masters[i].numel():
                save_param(dst, name, key, value)
    skip = set(trainable) | set(sd.get("buffer_names") or [])
    for name, tensor in module.items():  # frozen parameters: their (only) value is the module's
        if name not in skip:
            save_param(dst, name, "fp32", tensor)
    return steps


def to_canonical(src: str, dst: str, zero_stage: int, trainable: list[str]) -> dict:
    """Per-parameter full fp32 tensors of DeepSpeed checkpoint dir `src` (written under ZeRO
    `zero_stage`) in dst/zero/{param}/{fp32,exp_avg,...}.pt. ZeRO-1/2/3 go through
    ds_to_universal; ZeRO-0 (one file) is split here. Returns {"steps": {param: Adam step},
    "counters": DeepSpeed's step counters, "buffers": {name: tensor}}."""
    sd = load_file(model_states_file(src))
    if zero_stage == 0:
        steps = _split_zero0(sd, dst, trainable)
    else:
        to_universal(src, dst)
        steps = _universal_steps(dst, zero_stage, trainable)
    module = sd.get("module") or {}
    return {"steps": steps, "counters": {k: int(sd.get(k) or 0) for k in COUNTERS},
            "buffers": {n: module[n].detach().cpu().clone() for n in (sd.get("buffer_names") or [])
                        if n in module}}
