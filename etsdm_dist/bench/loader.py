"""Loader benchmark on a local SeaweedFS S3 server: is the loader as fast as the storage and Pillow?

    etsdm bench loader [--images 2000] [--workers 2] [--json]
    python bench/loader.py ...

Side by side in one run, on the same shards of 256x256 JPEGs (~40-60 KB each): random crops of
the real photos that tools/install.sh extracts from the scikit-image wheel, or without them
synthetic images with a photo's 1/f spectrum (no pixel noise, which would make JPEGs
unrealistically big and slow to decode):
  1. raw s3fs: whole-shard sequential GETs (MB/s)                      -- the storage ceiling
  2. our loader with decode=False: range reads of the samples (MB/s)   -- target >= 0.9x of (1)
  3. decode, one core: our loader end to end (S3 read + decode + copy into the batch) and our
     decode path alone, vs Pillow's own decode of the same bytes in a tight loop (img/s)
     -- target: ours per image no slower than Pillow's.
The S3 server is etsdm_dist.data.local_s3's SeaweedServer (the one the tests use).
Numbers are best-of-N, the competing measurements interleaved; decode figures are images per
CPU-second of the benchmark process (other processes share this machine's cores).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path


import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def natural_image(rng: np.random.Generator, n: int = 256) -> np.ndarray:
    """A smooth image with a photo's 1/f amplitude spectrum and correlated colour channels."""
    fy, fx = np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    chans = []
    for _ in range(3):
        spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f
        spec[0, 0] = 0
        chans.append(np.fft.irfft2(spec, s=(n, n)))
    x = np.stack(chans, -1) @ rng.uniform(0.3, 1.0, (3, 3))
    x = (x - x.mean()) / x.std()
    return np.clip(128 + 45 * x, 0, 255).astype(np.uint8)


def make_jpegs(count: int, res: int, quality: int, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEGs: a few base images, each variant rolled / mirrored / recoloured."""
    rng = np.random.default_rng(seed)
    bases = [natural_image(rng, res) for _ in range(min(count, 32))]
    out = []
    for i in range(count):
        img = bases[i % len(bases)]
        img = np.roll(img, (int(rng.integers(res)), int(rng.integers(res))), axis=(0, 1))  # periodic
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = img[:, :, rng.permutation(3)]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


PHOTOS = Path(sys.prefix) / "share" / "etsdm-photos"  # scikit-image's photos (tools/install.sh)


def photo_jpegs(count: int, res: int, quality: int, seed: int = 0) -> list[bytes]:
    """Random crops (rescaled to res x res, mirrored at random) of the real colour photos."""
    rng = np.random.default_rng(seed)
    photos = []
    for f in sorted(PHOTOS.glob("*")):
        with Image.open(f) as im:
            if im.mode == "RGB" and min(im.size) >= res:
                photos.append(im.copy())
    if not photos:
        raise FileNotFoundError(f"no colour photos of at least {res} px in {PHOTOS}")
    out = []
    for i in range(count):
        im = photos[i % len(photos)]
        side = int(rng.integers(res, min(im.size[0], im.size[1], res * 3 // 2) + 1))  # keep detail
        x, y = int(rng.integers(im.size[0] - side + 1)), int(rng.integers(im.size[1] - side + 1))
        crop = im.crop((x, y, x + side, y + side)).resize((res, res), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def write_shards(url: str, jpegs: list[bytes], shard_samples: int) -> dict:
    from etsdm_dist.data import storage
    from etsdm_dist.data import tarformat

    shards = []
    for s, lo in enumerate(range(0, len(jpegs), shard_samples)):
        parts, offsets = [], [0]
        for i, data in enumerate(jpegs[lo:lo + shard_samples]):
            parts.append(tarformat.sample_bytes(f"{lo + i:08d}", {"jpg": data, "cls": b"%d" % (i % 10)}))
            offsets.append(offsets[-1] + len(parts[-1]))
        body = b"".join(parts)
        body += tarformat.end_of_archive(len(body))
        name = f"train-{s:06d}.tar"
        storage.write_bytes_atomic(storage.join(url, name), body)
        shards.append({"name": name, "samples": len(offsets) - 1, "bytes": len(body), "sha256": "",
                       "offsets": offsets, "first_key": f"{lo:08d}"})
    index = {"format": "etsdm-shards/1", "shards": shards, "total_samples": len(jpegs),
             "resolution": None, "channels": 3, "image_format": "jpg", "label_map": None,
             "num_classes": 10, "fingerprint": "bench"}
    storage.write_json_atomic(storage.join(url, "index.json"), index)
    return index


def best(fn, repeats: int) -> float:
    """Smallest wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(a: argparse.Namespace) -> dict:
    import torch

    from etsdm_dist.data import loader as L
    from etsdm_dist.data import storage
    from etsdm_dist.config import DataConfig
    from etsdm_dist.data.local_s3 import SeaweedServer

    torch.set_num_threads(1)
    res: dict = {"images": a.images, "resolution": a.resolution, "micro_batch": a.micro_batch,
                 "workers": a.workers, "read_ahead": a.read_ahead,
                 "loader_epochs": a.loader_epochs}
    with tempfile.TemporaryDirectory(prefix="etsdm-bench-") as tmp:
        server = SeaweedServer(tmp).start()
        try:
            import os
            os.environ.update(server.env)
            url = server.make_bucket("bench") + "/shards"
            t0 = time.perf_counter()
            source = a.source
            if source == "auto":
                source = "photos" if (PHOTOS / "astronaut.png").exists() else "synthetic"
            res["source"] = source
            quality = a.quality or (98 if source == "photos" else 92)
            jpegs = (photo_jpegs if source == "photos" else make_jpegs)(a.images, a.resolution, quality)
            write_shards(url, jpegs, a.shard_samples)
            res["setup_s"] = round(time.perf_counter() - t0, 1)
            index = L.load_index(url)
            shard_bytes = sum(s.bytes for s in index.shards)
            res["shard_mb"] = round(shard_bytes / 1e6, 1)
            res["jpeg_kb_mean"] = round(sum(map(len, jpegs)) / len(jpegs) / 1e3, 1)

            # (1) raw s3fs whole-shard GETs vs (2) our loader without decoding, interleaved so
            # that load from other processes hits both alike; best of `repeats` each.
            import fsspec
            fs = fsspec.filesystem("s3", skip_instance_cache=True)
            paths = [storage.join(url, s.name)[len("s3://"):] for s in index.shards]
            n, b = index.total_samples, a.micro_batch
            steps = n // b  # whole micro-batches within the first epoch
            mb = sum(s.offsets[-1] - s.offsets[0] for s in index.shards) * steps * b / n
            # the loader runs several epochs: its read-ahead past the end of the timed run (up to
            # read_ahead extents) would otherwise be an artefact of a short benchmark
            lsteps = a.loader_epochs * n // b
            lmb = sum(s.offsets[-1] - s.offsets[0] for s in index.shards) * lsteps * b / n
            cfg = DataConfig(url=url, hflip=False, num_workers=0, prefetch_factor=4,
                             on_error="raise", retries=8, retry_backoff_s=0.5)

            def raw() -> float:
                t0 = time.perf_counter()
                for p in paths:
                    fs.cat_file(p)
                return time.perf_counter() - t0

            def loader_run(workers: int, decode: bool, count: int, clock=time.perf_counter,
                           coalesce: bool = True):
                ld = L.make_loader(cfg.replace(num_workers=workers), index, seed=0,
                                   start_position=0, batch_images=b, world_size=1, rank=0,
                                   micro_batch_images=b, decode=decode, read_ahead=a.read_ahead,
                                   **({} if coalesce else {"group": 1, "max_read_bytes": 1}))
                try:
                    for _ in range(warm if workers else 0):
                        next(ld)  # worker start-up is not throughput (a whole first item)
                    t0 = clock()
                    for _ in range(count):
                        next(ld)
                    return clock() - t0
                finally:
                    ld.close()

            from etsdm_dist.data import order as S
            plan = S.ShardPlan(index.shard_samples, 0)
            reqs = []
            for j in range(steps):
                for sp in plan.spans(range(j * b, (j + 1) * b)):
                    o = index.shards[sp.shard].offsets
                    reqs.append((paths[sp.shard], o[sp.first], o[sp.first + sp.count]))

            def raw_ranges() -> float:  # the loader's requests, by s3fs alone, one at a time
                t0 = time.perf_counter()
                for p, lo, hi in reqs:
                    fs.cat_file(p, start=lo, end=hi)
                return time.perf_counter() - t0

            # the loader's own requests with 0 workers: micro-batches coalesced into extents
            ds = L.ShardStream(index, seed=0, start_position=0, batch_images=b, world_size=1,
                               rank=0, micro_batch_images=b, decode=False)
            ext_reqs, seen = [], set()
            for item in ds._schedule(plan, 0, 1):
                if isinstance(item, L.Extent):
                    ext_reqs.append((paths[item.shard], item.lo, item.hi))
                elif item[0] >= steps - 1:
                    break
            res["group_w"] = warm = L.auto_group(index, 1, b, a.workers) if a.workers else 1
            res["coalesced_requests"] = len(ext_reqs)
            res["micro_batch_requests"] = len(reqs)

            def raw_extents() -> float:  # the loader's coalesced requests, by s3fs alone
                t0 = time.perf_counter()
                for p, lo, hi in ext_reqs:
                    fs.cat_file(p, start=lo, end=hi)
                return time.perf_counter() - t0

            ext_mb = sum(hi - lo for _, lo, hi in ext_reqs)

            raw()  # warm-up: connections, credentials, the server's caches
            storage.read_range(url + "/" + index.shards[0].name, 0, 1)
            raw_t, rng_t, ext_t, ld_t, ldu_t, ldw_t = [], [], [], [], [], []
            for _ in range(a.repeats):
                raw_t.append(raw())
                rng_t.append(raw_ranges())
                ext_t.append(raw_extents())
                ld_t.append(loader_run(0, False, lsteps))
                ldu_t.append(loader_run(0, False, lsteps, coalesce=False))
                if a.workers:
                    ldw_t.append(loader_run(a.workers, False, lsteps - warm) * lsteps
                                 / (lsteps - warm))
            res["raw_s3fs_MBps"] = shard_bytes / min(raw_t) / 1e6
            res["raw_s3fs_ranges_MBps"] = mb / min(rng_t) / 1e6
            res["raw_s3fs_extents_MBps"] = ext_mb / min(ext_t) / 1e6
            res["loader_raw_MBps"] = lmb / min(ld_t) / 1e6
            res["loader_raw_uncoalesced_MBps"] = lmb / min(ldu_t) / 1e6
            if a.workers:
                res[f"loader_raw_w{a.workers}_MBps"] = lmb / min(ldw_t) / 1e6
            res["loader_raw_vs_s3fs"] = res["loader_raw_MBps"] / res["raw_s3fs_MBps"]
            res["loader_raw_vs_s3fs_extents"] = res["loader_raw_MBps"] / res["raw_s3fs_extents_MBps"]
            res["loader_raw_uncoalesced_vs_s3fs_ranges"] = (res["loader_raw_uncoalesced_MBps"]
                                                           / res["raw_s3fs_ranges_MBps"])

            # (3) decode per core: CPU seconds of this process (all its threads), so other
            # processes on the machine change the wall time but hardly this figure.
            m = min(len(jpegs), a.decode_images)
            sub = jpegs[:m]

            def pillow_loop():
                for data in sub:
                    np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

            def ours_loop():
                out = torch.empty((a.resolution, a.resolution, 3), dtype=torch.uint8)
                for data in sub:
                    np.copyto(out.numpy(), L.decode_image(data, 3, ["JPEG"]))

            def cpu(fn) -> float:
                t0 = time.process_time()
                fn()
                return time.process_time() - t0

            dsteps = max(1, m // b)
            pil_t, ours_t, e2e_t = [], [], []
            for _ in range(a.repeats):
                pil_t.append(cpu(pillow_loop))
                ours_t.append(cpu(ours_loop))
                e2e_t.append(loader_run(0, True, dsteps, clock=time.process_time))
            res["pillow_img_s"] = m / min(pil_t)
            res["ours_decode_img_s"] = m / min(ours_t)
            res["loader_img_s"] = dsteps * b / min(e2e_t)
            if a.workers:  # wall clock: what a training step would see from this rank
                res[f"loader_w{a.workers}_img_s"] = (steps - warm) * b / min(
                    loader_run(a.workers, True, steps - warm) for _ in range(a.repeats))
            res["ours_decode_vs_pillow"] = res["ours_decode_img_s"] / res["pillow_img_s"]
            res["loader_vs_pillow"] = res["loader_img_s"] / res["pillow_img_s"]
        finally:
            server.stop()
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}


def table(r: dict) -> str:
    w, raw = r["workers"], r["raw_s3fs_MBps"]
    rows = [
        ("(1) raw s3fs whole-shard GETs", f"{raw:.0f} MB/s", "the storage ceiling"),
        ("    raw s3fs, one micro-batch per GET", f"{r['raw_s3fs_ranges_MBps']:.0f} MB/s",
         f"{r['raw_s3fs_ranges_MBps'] / raw:.2f}x (1): {r['micro_batch_requests']} range GETs"),
        ("    raw s3fs, the loader's coalesced GETs", f"{r['raw_s3fs_extents_MBps']:.0f} MB/s",
         f"{r['raw_s3fs_extents_MBps'] / raw:.2f}x (1): {r['coalesced_requests']} range GETs"),
        ("(2) loader decode=False, 0 workers", f"{r['loader_raw_MBps']:.0f} MB/s",
         f"{r['loader_raw_vs_s3fs']:.2f}x (1)  target >= 0.9;  "
         f"{r['loader_raw_vs_s3fs_extents']:.2f}x the same GETs by s3fs (coalesced)"),
        ("    same, coalescing off", f"{r['loader_raw_uncoalesced_MBps']:.0f} MB/s",
         f"{r['loader_raw_uncoalesced_MBps'] / raw:.2f}x (1);  "
         f"{r['loader_raw_uncoalesced_vs_s3fs_ranges']:.2f}x the same GETs by s3fs "
         f"(what >1 ranks do)"),
    ]
    if w:
        rows.append((f"    loader decode=False, {w} workers", f"{r[f'loader_raw_w{w}_MBps']:.0f} MB/s",
                     f"{r[f'loader_raw_w{w}_MBps'] / raw:.2f}x (1)  (groups of {r['group_w']} "
                     f"micro-batches per worker item)"))
    rows += [
        ("(3) Pillow decode loop", f"{r['pillow_img_s']:.0f} img/cpu-s", ""),
        ("    our decode path", f"{r['ours_decode_img_s']:.0f} img/cpu-s",
         f"{r['ours_decode_vs_pillow']:.2f}x Pillow  target >= 1"),
        ("    our loader end to end, 0 workers", f"{r['loader_img_s']:.0f} img/cpu-s",
         f"{r['loader_vs_pillow']:.2f}x Pillow (S3 read, parse, decode, batch)"),
    ]
    if w:
        rows.append((f"    our loader, {w} workers", f"{r[f'loader_w{w}_img_s']:.0f} img/s", "wall clock"))
    head = (f"loader bench: {r['images']} {r['source']} JPEGs {r['resolution']}x{r['resolution']} "
            f"(mean {r['jpeg_kb_mean']} KB), {r['shard_mb']} MB of shards, 1 rank, micro-batch "
            f"{r['micro_batch']}, workers 0 and {w}, read-ahead {r['read_ahead']}, setup "
            f"{r['setup_s']} s")
    return "\n".join([head] + [f"  {a:40s} {b:>13s}  {c}" for a, b, c in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="etsdm bench loader", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="JPEGs written (~45 KB each)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--quality", type=int, default=None,
                   help="JPEG quality (default 98 for photos, 92 synthetic: ~40-45 KB per image)")
    p.add_argument("--source", choices=("auto", "photos", "synthetic"), default="auto",
                   help="crops of the real photos tools/install.sh extracts, or 1/f synthetic images")
    p.add_argument("--shard-samples", type=int, default=250)
    p.add_argument("--micro-batch", type=int, default=64, help="images per range-read batch")
    p.add_argument("--workers", type=int, default=2, help="also measure with this many workers (0: skip)")
    p.add_argument("--decode-images", type=int, default=400, help="images in the decode comparison")
    p.add_argument("--read-ahead", type=int, default=2, help="micro-batches of range reads in flight")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--loader-epochs", type=int, default=2,
                   help="epochs per timed decode=False loader run (amortises its read-ahead)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = p.parse_args(argv)
    r = run(a)
    print(json.dumps(r) if a.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
