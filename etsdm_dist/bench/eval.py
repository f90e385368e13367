"""FID feature benchmark: is our whole path as fast as the bare Inception network?

    etsdm bench eval [--data SOURCE] [--images 64] [--batch 8] [--rounds 3] [--threads T] [--json]
                     [--sample-images 64 --sample-batch 64 --sample-steps 10] [network overrides]

Side by side in one process, on the same images, interleaved round by round:
  1. bare: the TorchScript network exactly as shipped (torch.jit.load, eval, no_grad, NCHW),
     called on the already preprocessed float tensors [B, 3, 299, 299] of those images;
  2. ours: the whole path from the source (default: Fashion-MNIST t10k written as PNG shards,
     read back with the training loader's range reads and decode), the protocol's resize, our
     network call (channels_last, inference_mode) and the float64 statistics accumulation.
     Target: >= 0.9x the bare network's images/s.
A third row times the bare network on channels_last copies of the same tensors: the layout our
path uses, so ours / that row is the cost of everything around the network.
A second part times the sampling job's path (per-image generators, eval-width slices, the sampler,
uint8 conversion) against bare forwards of the same network at the same batch: network calls per
image per second. Figures are images per wall second and per CPU-second of this process (the second is less
disturbed by other processes sharing the cores); best of --rounds, plus the median of the
per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

FMNIST = "/usr/share/datasets/fashion-mnist"


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def make_shards(dst: str, images: int) -> str:
    from etsdm_dist.data import shard_writer

    if not os.path.exists(f"{FMNIST}/t10k-images-idx3-ubyte.gz"):
        raise SystemExit(f"etsdm bench eval: {FMNIST} missing (apt-get install dataset-fashion-mnist); "
                         f"pass --data SOURCE instead")
    rc = shard_writer.main([FMNIST, dst, "--split", "t10k", "--limit", str(images),
                            "--max-samples", "1000", "--no-progress"])
    if rc:
        raise SystemExit(f"etsdm bench eval: writing shards to {dst} failed ({rc})")
    return dst


def run(a: argparse.Namespace) -> dict:
    from etsdm_dist.eval.features import FeatureStats
    from etsdm_dist.eval.inception import Inception, load_torchscript, preprocess
    from etsdm_dist.eval.sources import open_source

    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        source = open_source(a.data or make_shards(os.path.join(tmp, "shards"), a.images), a.images)
        net = Inception(batch_images=a.batch)
        bare = load_torchscript(net.path)
        # the bare side's input: the same images, already preprocessed (not timed)
        inputs = [preprocess(images) for images, _ in source.batches(0, 1, a.batch)]
        n = sum(len(x) for x in inputs)

        def ours():
            stats = FeatureStats(net, kid_rows=n)
            for images, idx in source.batches(0, 1, a.batch):
                stats.add(images, idx)
            stats.all_reduce()
            stats.statistics()

        inputs_cl = [x.contiguous(memory_format=torch.channels_last) for x in inputs]

        def plain(xs=inputs):
            with torch.no_grad():
                for x in xs:
                    bare(x)

        # warm-up: the first calls of a TorchScript module profile and optimise its graph
        plain(), plain(inputs_cl), ours()
        rounds = []
        for r in range(a.rounds):
            tb, cb = _timed(plain)
            to, co = _timed(ours)
            tl, cl = _timed(lambda: plain(inputs_cl))
            rounds.append({"bare_wall_s": tb, "bare_cpu_s": cb, "ours_wall_s": to, "ours_cpu_s": co,
                           "bare_cl_wall_s": tl, "bare_cl_cpu_s": cl})
            print(f"round {r}: bare {n / tb:.2f} img/s ({n / cb:.2f}/cpu-s), ours {n / to:.2f} img/s "
                  f"({n / co:.2f}/cpu-s), bare channels_last {n / tl:.2f} img/s ({n / cl:.2f}/cpu-s)",
                  file=sys.stderr, flush=True)

    def best(key):
        return n / min(x[key] for x in rounds)

    return {
        "images": n, "batch": a.batch, "threads": torch.get_num_threads(), "source": source.describe(),
        "bare_img_per_s": best("bare_wall_s"), "ours_img_per_s": best("ours_wall_s"),
        "bare_img_per_cpu_s": best("bare_cpu_s"), "ours_img_per_cpu_s": best("ours_cpu_s"),
        "bare_cl_img_per_s": best("bare_cl_wall_s"), "bare_cl_img_per_cpu_s": best("bare_cl_cpu_s"),
        "ratio_wall_best": best("ours_wall_s") / best("bare_wall_s"),
        "ratio_cpu_best": best("ours_cpu_s") / best("bare_cpu_s"),
        "ratio_wall_median": statistics.median(x["bare_wall_s"] / x["ours_wall_s"] for x in rounds),
        "ratio_cpu_median": statistics.median(x["bare_cpu_s"] / x["ours_cpu_s"] for x in rounds),
        "rounds": rounds,
    }


def run_sampling(a: argparse.Namespace) -> dict:
    """Sampling job path (per-image generators, index-aligned eval-width slices, sampler, uint8)
    vs bare forwards of the same network on batches of the same size: network calls per second."""
    from etsdm_dist import config
    from etsdm_dist.diffusion.build import build_model, build_schedule
    from etsdm_dist.eval.sampling import ImageSampler, LoadedModel, image_batches, sampler_settings

    cfg = config.load(None, ["network.preset=tiny", "network.in_channels=1", *a.sampling_overrides])
    torch.manual_seed(0)
    model = build_model(cfg).eval().requires_grad_(False)
    loaded = LoadedModel.in_memory(model, build_schedule(cfg))
    settings = sampler_settings(None, sampler="ddim", steps=a.sample_steps)
    sampler = ImageSampler(loaded, settings, seed=0)
    n, b = a.sample_images, min(a.sample_batch, a.sample_images)
    calls = a.sample_steps + 1  # + the final noise-free jump (denoise_to_zero)
    x = torch.randn(b, *loaded.image_shape)
    t = torch.full((b,), 500.0)

    def ours():
        for _ in image_batches(sampler, range(n), b):
            pass

    def bare():
        with torch.inference_mode():
            for _ in range(-(-n // b) * calls):
                model(x, t)

    ours(), bare()
    rounds = []
    for _ in range(a.rounds):
        to, _c = _timed(ours)
        tb, _c = _timed(bare)
        rounds.append((to, tb))
    best_o, best_b = min(r[0] for r in rounds), min(r[1] for r in rounds)
    per_image_calls = n * calls
    return {"network": f"tiny preset {list(loaded.image_shape)}", "images": n, "batch": b,
            "eval_width": sampler.eval_width, "sampler": f"ddim {a.sample_steps} steps + denoise_to_zero",
            "ours_img_per_s": n / best_o, "ours_image_calls_per_s": per_image_calls / best_o,
            "bare_image_calls_per_s": per_image_calls / best_b,
            "ratio_best": best_b / best_o, "ratio_median": statistics.median(tb / to for to, tb in rounds)}


def table(r: dict) -> str:
    return "\n".join([
        f"Inception features, {r['images']} images of {r['source']['kind']} "
        f"{r['source']['image_resolution']}, batch {r['batch']}, {r['threads']} threads (best of rounds)",
        f"  bare network (NCHW, no_grad) on preprocessed tensors: {r['bare_img_per_s']:7.2f} img/s "
        f"{r['bare_img_per_cpu_s']:7.2f} img/cpu-s",
        f"  ours: decode + resize + network + float64 stats:     {r['ours_img_per_s']:7.2f} img/s "
        f"{r['ours_img_per_cpu_s']:7.2f} img/cpu-s",
        f"  bare network, channels_last input (for reference):     {r['bare_cl_img_per_s']:7.2f} img/s "
        f"{r['bare_cl_img_per_cpu_s']:7.2f} img/cpu-s",
        f"  ours / bare: wall {r['ratio_wall_best']:.2f}x (median of rounds {r['ratio_wall_median']:.2f}x), "
        f"CPU {r['ratio_cpu_best']:.2f}x (median {r['ratio_cpu_median']:.2f}x); target >= 0.9x",
    ] + ([] if "sampling" not in r else [
        f"Sampling job path, {r['sampling']['network']}, {r['sampling']['sampler']}, "
        f"{r['sampling']['images']} images, batch {r['sampling']['batch']}, eval width {r['sampling']['eval_width']}",
        f"  ours: {r['sampling']['ours_img_per_s']:.2f} img/s = {r['sampling']['ours_image_calls_per_s']:.1f} "
        f"network calls per image per s; bare forwards of the same batch: "
        f"{r['sampling']['bare_image_calls_per_s']:.1f}",
        f"  ours / bare: {r['sampling']['ratio_best']:.2f}x (median of rounds {r['sampling']['ratio_median']:.2f}x)",
    ]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="etsdm bench eval", description=__doc__.split("\n")[0])
    p.add_argument("--data", help="shard folder/URL, image folder or .npz (default: Fashion-MNIST "
                                  "t10k written as PNG shards to a temporary folder)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="images per network call, both sides")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--sample-images", type=int, default=64, help="sampling part: images (0: skip it)")
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("sampling_overrides", nargs="*", help="config overrides for the sampling network")
    a = p.parse_args(argv)
    r = run(a)
    if a.sample_images:
        r["sampling"] = run_sampling(a)
    print(json.dumps(r) if a.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
