"""Resume a checkpoint under another ZeRO stage, world size or precision: one conversion path.

DeepSpeed 0.19.8 re-partitions ZeRO-1/2 checkpoints itself (ds_to_universal + load_universal),
but not between ZeRO-3 and ZeRO-1/2 (its ZeRO-3 universal files are flat tensors without
`ds_version` or a per-parameter `step`), and not to or from ZeRO-0 (no shards). We therefore
use DeepSpeed only on the *source* side, and write the target engine ourselves:

    convert(src_dir, dst_dir, zero_stage, trainable)  one process per host fills its local cache
    restore(engine, dst_dir)                           every rank, right after build_engine

`dst_dir` holds a canonical, layout-free state (the universal checkpoint's per-parameter layout):
    zero/{param}/{fp32,exp_avg,exp_avg_sq}.pt   full fp32 tensors (flat or shaped: we reshape)
    etsdm_reshard.json   {"steps": {param: Adam step}, "keys": [...], "counters": {...}}
    etsdm_buffers.pt     {buffer: tensor}, the module's persistent buffers
ZeRO-1/2/3 sources go through `deepspeed.checkpoint.ds_to_universal` (in-process, one worker);
a ZeRO-0 source is one model-states file (module weights, or the fp16/bf16 wrapper's fp32
masters, and the torch optimizer state keyed by parameter index) that we split ourselves.

`restore` builds nothing: the engine is the normal one for this run's stage and world size.
Parameter by parameter (one full tensor in memory at a time) it writes the fp32 master, each
Adam moment and the low-precision weight into whatever holds them:
    ZeRO-3         this rank's padded partition (safe_set_local_*), and param.ds_tensor
    ZeRO-1/2, BF16_Optimizer   the rank's fragment (safe_set_full_*), and the module weight
    ZeRO-0         fp16/bf16 wrapper masters (unfused or fused flat), or the module weight
The optimizer state (lazy in DeepSpeed: created by the first step) is created here with the
source's step count, typed as the optimizer keeps it (a float tensor for torch's Adam/AdamW, an
int for DeepSpeed's FusedAdam/CPUAdam). fp16 dynamic loss-scale state is not carried over.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
from argparse import Namespace

import torch

META = "etsdm_reshard.json"
BUFFERS = "etsdm_buffers.pt"
_STEP = "step"


def _safe_loads():
    from etsdm_dist.train.checkpoint import weights_only_loads

    return weights_only_loads()


def _model_states_file(src: str) -> str:
    """Rank 0's model-states file: mp_rank_00_model_states.pt (ZeRO-0/1/2) or
    zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO-3)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(src, name)):
            return os.path.join(src, name)
    raise FileNotFoundError(f"{src}: no DeepSpeed model-states file (mp_rank_00_model_states.pt)")


def _save_param(dst: str, name: str, key: str, tensor: torch.Tensor) -> None:
    d = os.path.join(dst, "zero", name)
    os.makedirs(d, exist_ok=True)
    torch.save({"param": tensor.detach().float().cpu().contiguous()}, os.path.join(d, f"{key}.pt"))


def _step_number(value) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


# --------------------------------------------------------------------------- source side


def _ds_to_universal(src: str, dst: str) -> None:
    """DeepSpeed's converter, in-process and single-worker (no process pool)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = Namespace(input_folder=src, output_folder=dst, num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    with _safe_loads():
        ds_to_universal(args)


def _universal_steps(dst: str, zero_stage: int, trainable: list[str]) -> dict[str, float]:
    """Adam step per parameter: ZeRO-1/2 files carry one per parameter; ZeRO-3's converter keeps
    only rank 0's optimizer state, one step per sub-group (equal: sub-groups step together)."""
    if zero_stage in (1, 2):
        out = {}
        for name in trainable:
            path = os.path.join(dst, "zero", name, f"{_STEP}.pt")
            if os.path.isfile(path):
                out[name] = _step_number(torch.load(path, map_location="cpu", weights_only=True))
        return out
    with _safe_loads():
        sd = torch.load(os.path.join(dst, "zero", "optimizer_state.pt"), map_location="cpu")
    steps = {_step_number(s[_STEP]) for s in sd["optimizer_state_dict"]["state"].values() if _STEP in s}
    if len(steps) > 1:
        raise RuntimeError(f"ZeRO-3 checkpoint: sub-groups have different Adam steps {sorted(steps)}")
    if not steps:
        return {}
    step = steps.pop()
    return {name: step for name in trainable}


def _split_zero0(sd: dict, dst: str, trainable: list[str]) -> dict[str, float]:
    """ZeRO-0 model-states -> per-parameter files. The torch optimizer state is keyed by the
    parameter's index in the optimizer's groups, which follow the model's trainable parameters."""
    module, opt = sd["module"], sd.get("optimizer")
    shapes = {n: tuple(module[n].shape) for n in trainable if n in module}
    missing = [n for n in trainable if n not in module]
    if missing:
        raise RuntimeError(f"ZeRO-0 checkpoint lacks parameters {missing[:5]}: not this network")
    if opt is None:
        raise RuntimeError("ZeRO-0 checkpoint has no optimizer state")
    if "fp32_groups" in opt:  # fp16/bf16, unfused wrapper: one fp32 master per parameter
        masters = [t for group in opt["fp32_groups"] for t in group]
        state = opt["optimizer_state_dict"]["state"]
    elif "fp32_groups_flat" in opt:  # fp16/bf16, fused: one flat master (and state) per group
        masters, state, names = [], {}, iter(trainable)
        for g, flat in enumerate(opt["fp32_groups_flat"]):
            flat_state, off = opt["optimizer_state_dict"]["state"].get(g, {}), 0
            while off < flat.numel():
                name = next(names)
                n = int(torch.Size(shapes[name]).numel())
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
        _save_param(dst, name, "fp32", masters[i])
        for key, value in state.get(i, {}).items():
            if key == _STEP:
                steps[name] = _step_number(value)
            elif torch.is_tensor(value) and value.numel() == masters[i].numel():
                _save_param(dst, name, key, value)
    skip = set(trainable) | set(sd.get("buffer_names") or [])
    for name, tensor in module.items():  # frozen parameters: their (only) value is the module's
        if name not in skip:
            _save_param(dst, name, "fp32", tensor)
    return steps


def convert(src: str, dst: str, zero_stage: int, trainable: list[str]) -> None:
    """Write the canonical state of DeepSpeed checkpoint dir `src` (written under ZeRO
    `zero_stage`) into `dst`, atomically (tmp dir + rename). `trainable`: the network's trainable
    parameter names in model order (the order DeepSpeed hands them to the optimizer)."""
    tmp = f"{dst}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with _safe_loads():
            sd = torch.load(_model_states_file(src), map_location="cpu")
        if zero_stage == 0:
            steps = _split_zero0(sd, tmp, trainable)
        else:
            _ds_to_universal(src, tmp)
            steps = _universal_steps(tmp, zero_stage, trainable)
        module = sd.get("module") or {}
        torch.save({n: module[n].detach().cpu().clone() for n in (sd.get("buffer_names") or []) if n in module},
                   os.path.join(tmp, BUFFERS))
        keys = sorted({os.path.basename(p)[:-3] for n in trainable
                       for p in glob.glob(os.path.join(tmp, "zero", glob.escape(n), "*.pt"))} - {"fp32", _STEP})
        meta = {"source_zero_stage": zero_stage, "steps": steps, "keys": keys,
                "counters": {k: int(sd.get(k) or 0) for k in ("global_steps", "global_samples", "skipped_steps")}}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f)
        del sd
        try:
            os.rename(tmp, dst)
        except OSError:  # another host converted into a shared cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- target side


class _Source:
    def __init__(self, root: str):
        self.root = root
        with open(os.path.join(root, META)) as f:
            meta = json.load(f)
        self.steps: dict[str, float] = meta["steps"]
        self.keys: list[str] = meta["keys"]
        self.counters: dict[str, int] = meta["counters"]

    def has(self, name: str, key: str) -> bool:
        return os.path.isfile(os.path.join(self.root, "zero", name, f"{key}.pt"))

    def read(self, name: str, key: str, shape) -> torch.Tensor:
        """Full fp32 tensor of `key` for parameter `name`, in `shape`."""
        path = os.path.join(self.root, "zero", name, f"{key}.pt")
        if not os.path.isfile(path):
            raise RuntimeError(f"checkpoint has no {key} for parameter {name}: not this network")
        t = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # ZeRO-3 reads a slice
        t = t["param"] if isinstance(t, dict) else t
        if t.numel() != torch.Size(shape).numel():
            raise RuntimeError(f"checkpoint: {name} has {t.numel()} elements, the network {tuple(shape)}")
        return t.reshape(shape).float()

    def state(self, name: str, shape) -> dict[str, torch.Tensor]:
        """Optimizer moments for `name` (zeros where the source never stepped it)."""
        return {k: self.read(name, k, shape) if self.has(name, k) else torch.zeros(shape) for k in self.keys}

    def common_step(self, names: list[str]) -> float:
        steps = {self.steps[n] for n in names if n in self.steps}
        if len(steps) > 1:
            raise RuntimeError(f"parameters {names[:3]}... had different Adam steps {sorted(steps)} in the "
                               f"checkpoint; this run's layout keeps one step per group")
        return steps.pop() if steps else 0.0


def _step_value(base, step: float, like: torch.Tensor):
    """The step as `base` keeps it: torch's Adam/AdamW a float32 tensor (on the device when
    capturable or fused), DeepSpeed's FusedAdam / CPUAdam a Python int."""
    if type(base).__module__.startswith("torch.optim"):
        group = base.param_groups[0] if base.param_groups else {}
        device = like.device if (group.get("capturable") or group.get("fused")) else "cpu"
        return torch.tensor(float(step), dtype=torch.float32, device=device)
    return int(step)


def _flat_state(base, hp: torch.Tensor, keys: list[str], step: float) -> dict:
    """Create (or reuse) the optimizer state of flat master `hp`; values are written later."""
    st = base.state[hp]
    for k in keys:
        if k not in st:
            st[k] = torch.zeros_like(hp)
    st[_STEP] = _step_value(base, step, hp)
    return st


@torch.no_grad()
def _restore_zero3(opt, params, names, src: _Source) -> None:
    """ZeRO-3: each rank owns one zero-padded slice of every parameter (masters and moments)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    if getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
        raise NotImplementedError("resuming into ZeRO-3 with NVMe offload after a layout change")
    for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
        _flat_state(opt.optimizer, flat, src.keys,
                    src.common_step([names[id(q)] for q in opt.fp16_groups[i]]))
    for name, p in params:
        shape, part = tuple(p.ds_shape), p.partition_numel()
        start = opt._get_param_partition_rank(p) * part
        count = max(0, min(part, p.ds_numel - start))

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
def _restore_fragments(opt, params, names, src: _Source) -> None:
    """ZeRO-1/2 (and BF16_Optimizer): each rank owns a fragment of each parameter's master."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = opt.optimizer
    lp_groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups")
    for g, lps in enumerate(lp_groups):
        hp = base.param_groups[g]["params"][0]
        st = _flat_state(base, hp, src.keys, src.common_step([names[id(p)] for p in lps]))
        for lp in lps:  # what DeepSpeed does lazily after its first step
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
def _restore_zero0(opt, params, names, src: _Source) -> None:
    """No ZeRO: fp32 module weights with a plain torch optimizer, or DeepSpeed's fp16/bf16
    wrapper with an fp32 master per parameter (unfused) or per group (fused, flat)."""
    for name, p in params:
        if not p.requires_grad:  # frozen: no master, no optimizer state
            p.data.copy_(src.read(name, "fp32", p.shape).to(p.dtype))
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # unfused wrapper
        base = opt.optimizer
        for lps, hps in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, hp in zip(lps, hps):
                name = names[id(lp)]
                master = src.read(name, "fp32", lp.shape)
                hp.data.copy_(master)
                lp.data.copy_(master.to(lp.dtype))
                st = _flat_state(base, hp, src.keys, src.steps.get(name, 0.0))
                for k, v in src.state(name, lp.shape).items():
                    st[k].copy_(v)
    elif hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups_flat"):  # fused wrapper
        base = opt.optimizer
        for i, lps in enumerate(opt.fp16_groups):
            flat = opt.fp32_groups_flat[i]
            st = _flat_state(base, flat, src.keys, src.common_step([names[id(p)] for p in lps]))
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
    else:  # fp32, the torch optimizer steps the module's own parameters
        in_opt = {id(q) for group in (opt.param_groups if opt is not None else []) for q in group["params"]}
        for name, p in params:
            if not p.requires_grad:
                continue
            p.data.copy_(src.read(name, "fp32", p.shape))
            if id(p) in in_opt:
                if name in src.steps:
                    st = _flat_state(opt, p, src.keys, src.steps[name])
                    for k, v in src.state(name, p.shape).items():
                        st[k].copy_(v)
                else:  # torch's Adam keeps no state for a parameter that never stepped
                    opt.state.pop(p, None)


def restore(engine, src_dir: str) -> dict[str, int]:
    """Write the canonical state in `src_dir` (see `convert`) into `engine`: fp32 masters, Adam
    moments and steps, low-precision weights, persistent buffers, DeepSpeed's step counters.
    Every rank calls it (no collectives). Returns the counters."""
    from etsdm_dist.train.ema import persistent_buffers

    src = _Source(src_dir)
    module, opt = engine.module, engine.optimizer
    params = list(module.named_parameters())
    names = {id(p): n for n, p in params}
    if any(hasattr(p, "ds_id") for _, p in params):
        _restore_zero3(opt, params, names, src)
    elif any(hasattr(p, "_hp_mapping") for _, p in params):
        _restore_fragments(opt, params, names, src)
    else:
        _restore_zero0(opt, params, names, src)

    saved = torch.load(os.path.join(src_dir, BUFFERS), map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, buf in persistent_buffers(module).items():
            if name not in saved:
                raise RuntimeError(f"checkpoint has no buffer {name}: not this network")
            buf.copy_(saved[name])
    engine.global_steps = src.counters["global_steps"]
    engine.global_samples = src.counters["global_samples"]
    engine.skipped_steps = src.counters["skipped_steps"]
    return dict(src.counters)


def trainable_names(engine) -> list[str]:
    """The network's trainable parameter names in model order (DeepSpeed's optimizer order)."""
    return [n for n, p in engine.module.named_parameters() if p.requires_grad]
