"""`etsdm bench train`: what our training step costs over a plain PyTorch loop.

Both sides train the same network (same preset, same initial weights) on the same in-memory batch
with the same loss code (E-TSDM-conditioned eps-MSE) and AdamW with gradient clipping:

  plain        model(x) -> loss -> backward -> clip_grad_norm_ -> AdamW.step   (torch only)
  plain + EMA  the same, plus one torch._foreach_lerp_ per train.ema_decays entry over the fp32
               parameters: the cheapest EMA a hand-written loop could have
  ours         the loop's step: DeepSpeed engine (ZeRO stage as configured) + set_lr from the image
               counter + valid-sample masking + EMA update + the per-step all-reduce of stop/NaN flags

All sides use torch's default AdamW on CPU (what the engine's generated config selects there); on
GPU plain uses torch's fused AdamW and ours DeepSpeed's FusedAdam.

Rounds alternate between the sides (plain, plain+EMA, ours, plain, ...) so a noisy shared machine hurts
all alike; the per-step time is the median over rounds. Two ratios are printed:
  overhead vs plain        ours / plain - 1          (the headline; target <= 10%)
  overhead vs plain + EMA  ours / (plain + EMA) - 1  (the engine alone, with the EMA's cost removed)
Data loading is excluded on purpose (bench/loader.py measures it).

On a GPU it also reports images/s, model FLOP utilisation and peak memory. MFU counts the network's
forward FLOPs per image (network.flops_per_image: matmul/conv/attention by torch's FlopCounterMode)
times 3 for forward + backward, divided by the dense peak of the card at the training precision from
PEAK_TFLOPS below (no sparsity). Those are vendor datasheet numbers for SXM parts.

Single process: `python bench/train.py [--preset tiny] [--batch 32] [--steps 20] [--rounds 3]`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense (non-sparse) peak TFLOP/s per precision. bf16/fp16: tensor cores; fp32: TF32 tensor cores
# (torch uses them for fp32 matmul/conv only with allow_tf32 / matmul precision 'high').
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_for(device_name: str, precision: str) -> float | None:
    for key, table in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return table.get(precision)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="etsdm bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "ci_tiny.yaml"))
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. network.preset=32")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: train.batch_images)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the first round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    import torch

    from etsdm_dist import config as config_mod, dist, engine as engine_mod
    from etsdm_dist.ema import EMA
    from etsdm_dist.loss import diffusion_loss
    from etsdm_dist.network import count_parameters, flops_per_image
    from etsdm_dist.training_loop import _EngineModel, _mix, _param_dtype, build_model, build_schedule

    over = list(args.overrides)
    if args.batch:
        over.append(f"train.batch_images={args.batch}")
    over += ["train.report_kimg=0", "train.checkpoint_kimg=0", "train.sample_kimg=0"]
    cfg = config_mod.load(args.config, over)
    launch = dist.init()
    device = dist.device_for(launch)
    B = cfg.train.batch_images
    dtype = _param_dtype(cfg)
    schedule = build_schedule(cfg)

    torch.manual_seed(cfg.train.seed)
    plain_model = build_model(cfg).to(device)
    torch.manual_seed(cfg.train.seed)
    our_model = build_model(cfg)
    res, ch = plain_model.net.config.resolution, plain_model.net.config.in_channels
    x0 = (torch.rand(B, ch, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    valid = torch.ones(B, dtype=torch.bool, device=device)

    # ---- plain PyTorch
    o = cfg.optim
    opt = torch.optim.AdamW(plain_model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, fused=device.type == "cuda" or None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def plain_step(i: int) -> None:
        gen = torch.Generator(device=device).manual_seed(_mix(1, i))
        with autocast:
            per, _ = diffusion_loss(plain_model, x0, schedule, generator=gen)
        loss = per.mean()
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(plain_model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # ---- plain + EMA: the plain step plus a minimal EMA (fp32 params, one lerp per decay)
    plain_params = [p for p in plain_model.parameters() if p.requires_grad]
    plain_emas = [[p.detach().float().clone() for p in plain_params] for _ in cfg.train.ema_decays]

    def plain_ema_step(i: int) -> None:
        plain_step(i)
        with torch.no_grad():
            src = [p.detach() for p in plain_params]
            for decay, ema_list in zip(cfg.train.ema_decays, plain_emas):
                torch._foreach_lerp_(ema_list, src, 1.0 - float(decay))

    # ---- ours (the loop's per-step work, minus data loading)
    engine = engine_mod.build_engine(cfg, our_model, 1)
    ema = EMA.from_config(engine, cfg)
    model_fn = _EngineModel(engine, our_model.settings, dtype)
    images = [0]

    def our_step(i: int) -> None:
        engine_mod.set_lr(engine, engine_mod.lr_at(cfg, images[0] + B))
        gen = torch.Generator(device=device).manual_seed(_mix(1, i))
        per, t = diffusion_loss(model_fn, x0, schedule, generator=gen)
        vf = valid.to(per.dtype)
        loss = (per * vf).sum() / vf.sum().clamp(min=1.0)
        engine_mod.engine_micro_step(engine, loss)
        ema.update(images[0] + B)
        images[0] += B
        flags = torch.tensor([0.0, 0.0, float(per.detach().sum()), float(B)], dtype=torch.float64, device=device)
        dist.all_reduce(flags, "sum").cpu()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(step, n, offset):
        sync()
        t0 = time.perf_counter()
        for i in range(n):
            step(offset + i)
        sync()
        return (time.perf_counter() - t0) / n

    for i in range(args.warmup):
        plain_step(i)
        plain_ema_step(i)
        our_step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plain_t, plain_ema_t, our_t = [], [], []
    for r in range(args.rounds):
        plain_t.append(timed(plain_step, args.steps, 1000 * (r + 1)))
        plain_ema_t.append(timed(plain_ema_step, args.steps, 1000 * (r + 1)))
        our_t.append(timed(our_step, args.steps, 1000 * (r + 1)))
    tp, tpe, to = statistics.median(plain_t), statistics.median(plain_ema_t), statistics.median(our_t)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "precision": cfg.train.precision, "zero_stage": cfg.train.zero_stage,
        "preset": cfg.network.preset, "params_M": count_parameters(plain_model.net) / 1e6,
        "batch_images": B, "steps_per_round": args.steps, "rounds": args.rounds,
        "ema_decays": list(cfg.train.ema_decays),
        "plain_s_per_step": tp, "plain_ema_s_per_step": tpe, "ours_s_per_step": to,
        "overhead_pct": 100 * (to / tp - 1), "overhead_vs_plain_ema_pct": 100 * (to / tpe - 1),
        "plain_rounds_s": plain_t, "plain_ema_rounds_s": plain_ema_t, "ours_rounds_s": our_t,
        "plain_img_s": B / tp, "plain_ema_img_s": B / tpe, "ours_img_s": B / to,
    }
    flops = flops_per_image(plain_model.net)
    result["gflop_per_image_fwd"] = flops / 1e9
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        prec = cfg.train.precision if cfg.train.precision != "fp32" else (
            "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        peak = peak_for(name, prec)
        result["peak_tflops_used"] = peak
        result["peak_precision"] = prec
        if peak:
            result["plain_mfu_pct"] = 100 * 3 * flops * (B / tp) / (peak * 1e12)
            result["ours_mfu_pct"] = 100 * 3 * flops * (B / to) / (peak * 1e12)
        result["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"device {result['device']}  {result['precision']} ZeRO-{result['zero_stage']}  "
          f"preset {result['preset']} ({result['params_M']:.2f}M params)  batch {B}")
    n_ema = len(cfg.train.ema_decays)
    rows = [("plain PyTorch", tp, plain_t), (f"plain + EMA x{n_ema} (torch._foreach_lerp_)", tpe, plain_ema_t),
            (f"etsdm engine (EMA x{n_ema})", to, our_t)]
    width = max(len(r[0]) for r in rows)
    for name, t_step, rounds in rows:
        print(f"{name:<{width}}: {t_step * 1e3:8.2f} ms/step  {B / t_step:9.1f} img/s   "
              f"rounds {[round(x * 1e3, 2) for x in rounds]}")
    verdict = "OK" if result["overhead_pct"] <= 10 else "ABOVE TARGET"
    print(f"{'overhead vs plain':<{width}}: {result['overhead_pct']:+.1f}%  (target <= 10%: {verdict})")
    print(f"{'overhead vs plain + EMA':<{width}}: {result['overhead_vs_plain_ema_pct']:+.1f}%  "
          f"(the engine alone; the EMA itself costs {100 * (tpe / tp - 1):+.1f}% on the plain loop)")
    if "ours_mfu_pct" in result:
        print(f"{'MFU':<{width}}: plain {result['plain_mfu_pct']:.1f}%  ours {result['ours_mfu_pct']:.1f}%  "
              f"(3 x {flops / 1e9:.2f} GFLOP/img over {result['peak_tflops_used']} TFLOP/s {result['peak_precision']} dense)")
    if "peak_mem_GiB" in result:
        print(f"{'peak memory':<{width}}: {result['peak_mem_GiB']:.2f} GiB (torch.cuda.max_memory_allocated)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
