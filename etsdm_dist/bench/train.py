"""`etsdm bench train`: what our training step costs over a plain PyTorch loop.

All sides train the same network (same preset, same initial weights) on the same in-memory batch
(uint8, converted on the device each step as the loop does) with the same loss code
(E-TSDM-conditioned eps-MSE) and AdamW with gradient clipping:

  plain        lr from the image counter (the same warm-up) -> model(x) -> loss -> backward
               -> clip_grad_norm_ -> AdamW.step   (torch only)
  plain + EMA  the same, plus one torch._foreach_lerp_ per train.ema_decays entry over the fp32
               parameters: the cheapest EMA a hand-written loop could have
  ours         the loop's step itself (train.step.TrainStep, which the training loop calls):
               set_lr from the image counter, the DeepSpeed engine (ZeRO stage as configured),
               valid-sample masking, per-timestep loss sums, the EMA on applied steps and the
               per-step all-reduce of the stop/NaN/data flags with the loss sum

All sides use torch's default AdamW on CPU (what the engine's generated config selects there); on
GPU plain uses torch's fused AdamW and ours DeepSpeed's FusedAdam.

Steps interleave one at a time (plain, plain+EMA, ours; the order rotating every iteration) so a
noisy shared machine hurts all sides alike; per-step times are medians over all timed steps, and
each overhead is the median over iterations of the ratio of neighbouring steps:
  overhead vs plain        ours / plain - 1          (the headline; target <= 10%)
  overhead vs plain + EMA  ours / (plain + EMA) - 1  (the engine alone, with the EMA's cost removed)
Data loading is excluded by default (`etsdm bench loader` measures it); `--data URL` feeds every
step of every side from shards through our loader instead.

On a GPU it also reports images/s, model FLOP utilisation and peak memory. MFU counts the network's
forward FLOPs per image (network.flops_per_image: matmul/conv/attention by torch's FlopCounterMode)
times 3 for forward + backward, divided by the dense peak of the card at the training precision from
PEAK_TFLOPS below (no sparsity). Those are vendor datasheet numbers for SXM parts.

Without --config it runs the built-in config with network.preset=tiny at batch 32 (nothing from a
source tree is needed); `etsdm bench train --config configs/fmnist32.yaml network.preset=32` runs
another. One process: `etsdm bench train [--batch 32] [--steps 20] [--rounds 3]`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Without --config: the built-in defaults made small enough for a CPU smoke run.
BUILTIN_OVERRIDES = ("network.preset=tiny", "train.batch_images=32")


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
    p.add_argument("--config", default=None,
                   help=f"YAML run file (default: the built-in config with {' '.join(BUILTIN_OVERRIDES)})")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. network.preset=32")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: train.batch_images)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the first round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--data", default=None, metavar="URL",
                   help="feed every side's steps from these shards (path or s3://, made by `etsdm shard`) "
                        "through our loader with data.num_workers workers, instead of one in-memory "
                        "batch: the time includes waiting for data")
    args = p.parse_args(argv)

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    import torch

    from etsdm_dist import config as config_mod
    from etsdm_dist import dist
    from etsdm_dist.data.decode import to_model_input
    from etsdm_dist.diffusion.build import build_model, build_schedule
    from etsdm_dist.diffusion.loss import diffusion_loss
    from etsdm_dist.diffusion.network import count_parameters, flops_per_image
    from etsdm_dist.train import engine as engine_mod
    from etsdm_dist.train.ema import EMA
    from etsdm_dist.seeds import seed63
    from etsdm_dist.train.step import TrainStep, make_engine, param_dtype

    over = [] if args.config else list(BUILTIN_OVERRIDES)
    over += list(args.overrides)
    if args.batch:
        over.append(f"train.batch_images={args.batch}")
    # One micro-batch per step on both sides; no reports, checkpoints or grids.
    over += ["train.micro_batch_images=null", "train.report_kimg=0", "train.checkpoint_kimg=0",
             "train.sample_kimg=0"]
    cfg = config_mod.load(args.config, over)
    launch = dist.init()
    if engine_mod.on_cpu():  # the bench owns its process, like `etsdm train`
        engine_mod.keep_freed_host_memory()
    device = dist.device_for(launch)
    B = cfg.train.batch_images
    dtype = param_dtype(cfg.train.precision)
    schedule = build_schedule(cfg)

    torch.manual_seed(cfg.train.seed)
    plain_model = build_model(cfg).to(device)
    torch.manual_seed(cfg.train.seed)
    our_model = build_model(cfg)
    res, ch = plain_model.net.config.resolution, plain_model.net.config.in_channels
    # One in-memory batch in the loader's format (uint8 images, all valid), or the loader itself.
    fixed = {"images": torch.randint(0, 256, (B, ch, res, res), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(0)),
             "labels": torch.full((B,), -1, dtype=torch.long), "positions": torch.arange(B),
             "valid": torch.ones(B, dtype=torch.bool)}
    loader = None
    if args.data:
        from etsdm_dist.data.loader import load_index, make_loader

        index = load_index(args.data)
        if index.resolution and (index.channels, *index.resolution) != (ch, res, res):
            raise SystemExit(f"--data {args.data}: images are {index.channels}x{index.resolution}, "
                             f"the network takes {ch}x{res}x{res} (network.in_channels / network.resolution)")
        loader = make_loader(cfg.data, index, seed=cfg.train.seed, start_position=0, batch_images=B,
                             world_size=1, rank=0, micro_batch_images=B)

    def next_batch() -> dict:
        """The step's batch: the next loader batch (shared by all sides, in turn) or the fixed one."""
        return fixed if loader is None else next(loader)

    # ---- plain PyTorch
    o = cfg.optim
    opt = torch.optim.AdamW(plain_model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, fused=device.type == "cuda" or None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # network.compile: torch.compile on both sides (ours through DeepSpeed's engine.compile, as
    # the training loop does); the warm-up steps absorb the compilation.
    plain_fn = torch.compile(plain_model) if cfg.network.compile else plain_model

    plain_images = [0]

    def plain_step(i: int) -> None:
        # The same LR warm-up as ours: early in warm-up the LR is tiny, zero-initialised output
        # layers stay near zero and Adam's second moments fill with denormals, which make sqrt
        # ~10x slower on x86. A plain loop at full LR would not pay that: compare like with like.
        plain_images[0] += B
        for group in opt.param_groups:
            group["lr"] = engine_mod.lr_at(cfg, plain_images[0])
        gen = torch.Generator(device=device).manual_seed(seed63(1, i))
        x0 = to_model_input(next_batch()["images"], device, torch.float32)
        with autocast:
            per, _ = diffusion_loss(plain_fn, x0, schedule, generator=gen)
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

    # ---- ours: the training loop's step
    engine = make_engine(cfg, our_model, 1)
    train_step = TrainStep(cfg, engine, EMA.from_config(engine, cfg), schedule, device=device)
    batches = iter(next_batch, None)  # endless: next_batch never returns None

    def our_step(i: int) -> None:
        train_step(batches)

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
    # Interleaved one step at a time, the order rotating each iteration: a shared machine's slow
    # spells then land on all sides alike, and each ratio is taken between neighbouring steps.
    sides = [plain_step, plain_ema_step, our_step]
    per_step: list[list[float]] = [[] for _ in sides]  # [side][iteration]
    for r in range(args.rounds):
        for i in range(args.steps):
            it = 1000 * (r + 1) + i
            for k in range(len(sides)):
                s = (k + i) % len(sides)
                per_step[s].append(timed(sides[s], 1, it))
    plain_t, plain_ema_t, our_t = (
        [statistics.median(ts[r * args.steps:(r + 1) * args.steps]) for r in range(args.rounds)]
        for ts in per_step)
    tp, tpe, to = (statistics.median(ts) for ts in per_step)
    ratio = statistics.median(o / p for o, p in zip(per_step[2], per_step[0]))
    ratio_ema = statistics.median(o / p for o, p in zip(per_step[2], per_step[1]))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "precision": cfg.train.precision, "zero_stage": cfg.train.zero_stage,
        "preset": cfg.network.preset, "params_M": count_parameters(plain_model.net) / 1e6,
        "batch_images": B, "compile": cfg.network.compile, "data": args.data or "one in-memory batch", "steps_per_round": args.steps, "rounds": args.rounds,
        "ema_decays": list(cfg.train.ema_decays),
        "plain_s_per_step": tp, "plain_ema_s_per_step": tpe, "ours_s_per_step": to,
        "overhead_pct": 100 * (ratio - 1), "overhead_vs_plain_ema_pct": 100 * (ratio_ema - 1),
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
          f"preset {result['preset']} ({result['params_M']:.2f}M params)  batch {B}  data: {result['data']}")
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
    print(f"{'':<{width}}  (medians over {args.rounds * args.steps} interleaved steps per side; "
          f"rounds = per-round medians)")
    if "ours_mfu_pct" in result:
        print(f"{'MFU':<{width}}: plain {result['plain_mfu_pct']:.1f}%  ours {result['ours_mfu_pct']:.1f}%  "
              f"(3 x {flops / 1e9:.2f} GFLOP/img over {result['peak_tflops_used']} TFLOP/s {result['peak_precision']} dense)")
    if "peak_mem_GiB" in result:
        print(f"{'peak memory':<{width}}: {result['peak_mem_GiB']:.2f} GiB (torch.cuda.max_memory_allocated)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if loader is not None:
        loader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
