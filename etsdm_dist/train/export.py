"""`etsdm export RUN`: a run's EMA weights as ONE file that loads without DeepSpeed.

Reads the newest committed checkpoint of RUN (local or s3://), takes ema.pt (already a
consolidated fp32 {name: tensor} per decay, world-size independent) and writes one EMA with the
model config embedded: the network section plus diffusion and etsdm settings, so a sampler can
rebuild the exact network and time map from the file alone.

    safetensors (default): tensors + metadata {"etsdm": JSON string}
    pt:                    torch.save({"state_dict": ..., "config": ...}), plain data only

`etsdm_dist.run_dir.load_exported(path) -> (state_dict, config_dict)` reads either (weights_only,
no DeepSpeed).
"""
from __future__ import annotations

import argparse
import io
import json
import sys

import torch

from etsdm_dist.data import storage
from etsdm_dist.run_dir import EXPORT_FORMAT, EXPORT_META_KEY, find_resume, read_ema



def export(run_dir: str, out: str | None = None, *, ema_index: int = 0, fmt: str | None = None) -> str:
    """Write the EMA `ema_index` of RUN's newest committed checkpoint; returns the output path."""
    found, ignored = find_resume(run_dir)
    for path, reason in ignored:
        print(f"etsdm export: skipped {path}: {reason}", file=sys.stderr)
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no committed checkpoint to export")
    ckpt_path, manifest = found
    ema = read_ema(ckpt_path, manifest)
    decays = ema["decays"]
    if not 0 <= ema_index < len(decays):
        raise IndexError(f"--ema-index {ema_index} out of range: the run has EMA decays {decays}")
    state = dict(ema["ema"][ema_index])
    state.update(ema.get("buffers", {}))
    run_cfg = manifest["config"]
    config = {
        "format": EXPORT_FORMAT,
        "network": run_cfg["network"],
        "diffusion": run_cfg["diffusion"],
        "etsdm": run_cfg["etsdm"],
        "ema": {"index": ema_index, "decay": decays[ema_index]},
        "images": manifest["images"],
        "source": ckpt_path,
    }
    if fmt is None:
        fmt = "pt" if out and out.endswith((".pt", ".pth")) else "safetensors"
    if out is None:
        out = storage.join(run_dir, "export",
                           f"{manifest['name']}-ema{decays[ema_index]:g}.{'pt' if fmt == 'pt' else 'safetensors'}")
    write_export(out, state, config, fmt)
    return out


def write_export(out: str, state: dict[str, torch.Tensor], config: dict, fmt: str = "safetensors") -> None:
    """One EMA's weights with the model config embedded, atomically (local path or URL)."""
    storage.write_bytes_atomic(out, _serialize(state, config, fmt))


def _serialize(state: dict[str, torch.Tensor], config: dict, fmt: str) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(tensors, metadata={EXPORT_META_KEY: json.dumps(config)})
    if fmt == "pt":
        buf = io.BytesIO()
        torch.save({"state_dict": tensors, "config": config}, buf)
        return buf.getvalue()
    raise ValueError(f"unknown export format {fmt!r}: choose safetensors or pt")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="etsdm export", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run dir (local path or s3://...)")
    p.add_argument("--ema-index", type=int, default=0, help="which of train.ema_decays (default 0)")
    p.add_argument("--out", default=None, help="output file (default RUN/export/<ckpt>-ema<decay>.<ext>)")
    p.add_argument("--format", choices=("safetensors", "pt"), default=None,
                   help="default: from --out's extension, else safetensors")
    args = p.parse_args(argv)
    try:
        out = export(args.run, args.out, ema_index=args.ema_index, fmt=args.format)
    except (FileNotFoundError, IndexError, RuntimeError, ValueError) as e:
        print(f"etsdm export: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
