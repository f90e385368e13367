"""`etsdm index` scan benchmark on a local SeaweedFS S3 server: headers-only vs whole tars.

    etsdm bench scan [--tars 8] [--samples 200] [--json]

Writes tars of the kind other tools write (pax headers per member, as webdataset's ShardWriter
does; `{key}.jpg` + `.json` + `.txt` per sample) in two profiles: small images (~8 KB, what
img2dataset writes at 256 px) and large ones (~400 KB). Side by side, best of --repeats,
interleaved: (1) whole: each tar read whole by one GET, headers walked in memory -- what a
scan without range reads costs; (2) headers-only scans (tar_scan.scan_tar) with windows of
4 KB .. 1 MB minimum (each adapts: tar_scan._Window; 64 KB is the default). Figures: seconds per tar, requests and bytes read per tar. Member data is random
bytes (nothing is decoded). One thread: the per-tar cost that --workers multiplies.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

import numpy as np

WINDOWS = (4 << 10, 64 << 10, 1 << 20)
PROFILES = {"small": 8 << 10, "large": 400 << 10}


def make_tar(samples: int, image_bytes: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(samples):
            size = int(image_bytes * rng.uniform(0.5, 1.5))
            for ext, data in (("jpg", rng.bytes(size)), ("json", b'{"w": 256}'), ("txt", b"a caption")):
                ti = tarfile.TarInfo(f"{seed:05d}{i:05d}.{ext}")
                ti.size, ti.mtime = len(data), time.time()
                tf.addfile(ti, io.BytesIO(data))
    return bio.getvalue()


def run(a: argparse.Namespace) -> dict:
    from etsdm_dist.data import storage, tar_scan
    from etsdm_dist.data.local_s3 import SeaweedServer

    out: dict = {"tars": a.tars, "samples": a.samples, "profiles": {}}
    with tempfile.TemporaryDirectory(prefix="etsdm-bench-scan-") as tmp:
        server = SeaweedServer(tmp).start()
        try:
            os.environ.update(server.env)
            storage.invalidate()
            bucket = server.make_bucket("scan")
            for prof, image_bytes in PROFILES.items():
                urls = []
                for t in range(a.tars):
                    url = f"{bucket}/{prof}/t-{t:05d}.tar"
                    storage.write_bytes_atomic(url, make_tar(a.samples, image_bytes, t))
                    urls.append(url)
                mb = sum(storage.size(u) for u in urls) / 1e6
                best: dict = {}
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    for u in urls:  # whole: one GET, walk in memory
                        data = storage.read_bytes(u)
                        tar_scan.walk(lambda p, n: data[p:p + n], len(data))
                    best["whole"] = min(best.get("whole", 1e9), (time.perf_counter() - t0) / len(urls))
                    for w in WINDOWS:
                        t0 = time.perf_counter()
                        reqs = got = 0
                        for u in urls:
                            r = tar_scan.scan_tar(u, window=w)
                            reqs, got = reqs + r["requests"], got + r["bytes_read"]
                        name = f"window_{w >> 10}k"
                        best[name] = min(best.get(name, 1e9), (time.perf_counter() - t0) / len(urls))
                        best[name + "_requests"] = reqs / len(urls)
                        best[name + "_mb_read"] = got / len(urls) / 1e6
                best["tar_mb"] = mb / len(urls)
                out["profiles"][prof] = best
        finally:
            server.stop()
    return out


def table(r: dict) -> str:
    lines = [f"scan bench: {r['tars']} tars x {r['samples']} samples (jpg+json+txt, pax headers), "
             f"local SeaweedFS, 1 thread, best of rounds; seconds per tar"]
    for prof, b in r["profiles"].items():
        lines.append(f"  {prof} images, {b['tar_mb']:.1f} MB per tar:")
        lines.append(f"    {'whole tar (1 GET, walk in memory)':38s} {b['whole'] * 1e3:8.1f} ms  "
                     f"{b['tar_mb']:.2f} MB read")
        for w in WINDOWS:
            n = f"window_{w >> 10}k"
            lines.append(f"    {'headers only, window ' + str(w >> 10) + ' KB':38s} {b[n] * 1e3:8.1f} ms  "
                         f"{b[n + '_mb_read']:.2f} MB read in {b[n + '_requests']:.0f} requests")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="etsdm bench scan", description=__doc__.split("\n")[0])
    p.add_argument("--tars", type=int, default=4)
    p.add_argument("--samples", type=int, default=200, help="samples per tar")
    p.add_argument("--repeats", type=int, default=3, help="best of this many rounds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = p.parse_args(argv)
    r = run(a)
    print(json.dumps(r) if a.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
