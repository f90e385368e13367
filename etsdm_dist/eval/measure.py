"""Judging a model: images sampled on the fly -> Inception statistics -> FID/KID. No image is
written: each rank samples its own block of image indices (per-image seeds, so the images are the
same on any number of ranks) and feeds them straight into the feature statistics.

    etsdm fid --run RUN --num N --ref ref.npz [--sampler ... --steps ... --grid ... --seed S]

Also the API behind `etsdm compare` and the training loop's periodic FID (`train.fid_kimg`).
`etsdm fid --samples ...` (images already on disk) is eval/fid.py; this module adds `--run`.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

from etsdm_dist import dist
from etsdm_dist.eval.features import FeatureStats, Statistics, check_compatible, compare
from etsdm_dist.eval.fid import compute, load_reference
from etsdm_dist.eval.inception import Inception
from etsdm_dist.eval.sampling import (ImageSampler, LoadedModel, add_sampler_flags, describe, digest,
                                      image_batches, load_model, settings_dict, settings_from_args)
from etsdm_dist.eval.sources import ImageSource, rank_block

class SampledSource(ImageSource):
    """N images of a sampler, made where they are read; image i is the same on any rank count."""

    kind = "samples"

    def __init__(self, sampler: ImageSampler, num: int, sample_batch: int):
        if num < 2:
            raise ValueError(f"--num must be >= 2 for FID statistics, got {num}")
        shape = list(sampler.loaded.image_shape)
        super().__init__(str(sampler.loaded.source.get("path", "in-memory model")), num, num, shape[1:],
                         digest({"sampler": describe(sampler), "num": num}))
        self.sampler, self.sample_batch = sampler, int(sample_batch)

    def batches(self, rank, world_size, batch_images):
        # batch_images is the Inception batch; sampling has its own (the network is not Inception)
        yield from image_batches(self.sampler, rank_block(self.n, rank, world_size), self.sample_batch)


def measure(sampler: ImageSampler, num: int, ref: Statistics, net: Inception, *, sample_batch: int = 64,
            kid_rows: int = 1000, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
            progress: bool = False) -> dict | None:
    """FID/KID of `num` images of `sampler` against `ref` (collective: every rank calls it).
    Returns the result on rank 0, None elsewhere."""
    check_compatible(FeatureStats(net, kid_rows=0).base_meta(), ref.meta)
    source = SampledSource(sampler, num, sample_batch)
    t0 = time.perf_counter()
    stats = compute(source, net, kid_rows=kid_rows, batch_images=net.batch_images, progress=progress)
    seconds = time.perf_counter() - t0
    if not dist.is_main():
        return None
    st = stats.statistics({"data": source.describe()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes go into the result
        res = compare(st, ref, kid_subsets=kid_subsets, kid_subset_size=min(kid_subset_size, num),
                      seed=seed, warn=False)
    s = sampler.settings
    return {"fid": res["fid"], "kid": res["kid"], "n": st.n, "n_ref": ref.n or None,
            "protocol": st.meta["protocol"], "resolution": st.meta["resolution"],
            "sampler": s.sampler, "steps": s.steps, "grid": s.grid, "settings": settings_dict(s),
            "seed": sampler.seed, "weights": sampler.loaded.source, "inception": st.meta["network"],
            "ranks": dist.world_size(), "seconds": round(seconds, 2),
            "images_per_s": round(st.n / max(seconds, 1e-9), 3), "notes": res["notes"]}


def make_sampler(loaded: LoadedModel, args: argparse.Namespace, *, seed: int, device) -> ImageSampler:
    return ImageSampler(loaded, settings_from_args(loaded.sample_section, args), seed=seed, device=device)


def run_main(argv: list[str]) -> int:
    """`etsdm fid --run RUN --num N --ref ref.npz`: sample and measure in one distributed job."""
    from etsdm_dist.eval import fid

    p = argparse.ArgumentParser(prog="etsdm fid --run", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory (newest committed EMA) or `etsdm export` file")
    p.add_argument("--num", type=int, required=True, help="images to sample and measure")
    p.add_argument("--ref", required=True, help="reference statistics (.npz from etsdm fid-ref)")
    p.add_argument("--ema-index", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="image i is sampled from seed (seed, i)")
    p.add_argument("--sample-batch", type=int, default=64, help="images per sampling batch per rank")
    p.add_argument("--out", default="fid.json", help="JSON result (local or URL; '' for none)")
    p.add_argument("--kid-rows", type=int, default=1000)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    fid.add_common_args(p)
    add_sampler_flags(p)

    def body(argv, launch, device) -> int:
        a = p.parse_args(argv)
        ref = load_reference(a.ref)
        net = fid.setup_network(a, launch, device)
        sampler = make_sampler(load_model(a.run, ema_index=a.ema_index, device=device), a, seed=a.seed,
                               device=device)
        res = measure(sampler, a.num, ref, net, sample_batch=a.sample_batch, kid_rows=a.kid_rows,
                      kid_subsets=a.kid_subsets, kid_subset_size=a.kid_subset_size, seed=a.seed,
                      progress=not a.no_progress)
        if res is not None:
            res["ref"] = {"path": a.ref, "data": ref.meta.get("data"), "protocol": ref.meta.get("protocol")}
            fid.report(res, a.out, "etsdm fid")
        dist.barrier()
        return 0

    return fid.run_job("etsdm fid", argv, body)


def main(argv: list[str] | None = None) -> int:
    """`etsdm fid`: --run (sample and measure) here, --samples (images on disk) in eval/fid.py."""
    from etsdm_dist.eval import fid

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(x == "--run" or x.startswith("--run=") for x in argv):
        return run_main(argv)
    return fid.main(argv)


if __name__ == "__main__":  # `python -m etsdm_dist.eval.measure` under a launcher = `etsdm fid`
    sys.exit(main())
