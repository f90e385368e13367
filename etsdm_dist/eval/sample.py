"""`etsdm sample SOURCE --num N --out URL`: N images from a trained model, on any number of ranks.

SOURCE is a run directory (EMA `--ema-index` of its newest committed checkpoint) or a file written
by `etsdm export`. Sampler settings default to the run's `sample` section (an export has none: the
built-in defaults), each overridable by a flag. Launch it like training (deepspeed launcher,
torchrun, SLURM, MPI: the same rank facade, etsdm_dist.dist) or as one plain process; no DeepSpeed
engine is involved. Under torchrun put `--` before SOURCE (`torchrun ... -m etsdm_dist.eval.sample
-- SOURCE --num N ...`): torchrun's own parser would otherwise claim `--num` as an abbreviation.

Images are cut into chunks of `--chunk` consecutive indices. A chunk is written whole and then
committed by its record `_sample/chunk-KKKKKK.json` (atomic write, after its data). A rerun of the
same command skips committed chunks and redoes the rest, so a job killed at any point (kill -9
included) ends with exactly N images, no gap and no duplicate; since image i depends only on
(weights, settings, seed, i) (see sampling.py), the redone chunks are the same bytes. Chunks still
to do are dealt round-robin over the ranks of the current launch, so a resume may use another
rank count. `_sample/job.json` records what decides the images; a rerun with other settings stops
with an error instead of mixing two sets.

Output (`--format`):
  shards  one tar shard per chunk (`samples-KKKKKK.tar`: .png, .json, .cls if conditional) and,
          once all chunks are in, index.json (written last) + skipped.txt: `etsdm verify` and the
          training loader read it. A grid of the first 64 images goes to OUT/grid.png.
  png     OUT/IIIIII.png per image; labels (if conditional) and the grid go to OUT/_sample/.
OUT is a local path or any fsspec URL (s3://...).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from typing import Any

import torch

from etsdm_dist.eval.grid import encode_png, grid_png
from etsdm_dist.eval.sampling import (SampleError, add_sampler_flags, settings_from_args, describe, digest, image_batches,
                                      load_model, ImageSampler)

STATE_DIR = "_sample"
JOB_FILE = "job.json"
SHARD_PREFIX = "samples"
GRID_IMAGES = 64
FORMATS = ("shards", "png")


# --------------------------------------------------------------------------- layout (pure)
def chunk_ranges(n: int, chunk: int) -> list[range]:
    """Image indices of each chunk: consecutive, the last one shorter when chunk does not divide n."""
    if n < 1 or chunk < 1:
        raise SampleError(f"--num and --chunk must be >= 1, got {n} and {chunk}")
    return [range(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def assign(pending: list[int], rank: int, world_size: int) -> list[int]:
    """The chunks one rank does: round-robin over the chunks still to do."""
    return pending[rank::world_size]


def image_key(i: int, n: int) -> str:
    return str(i).zfill(max(9, len(str(n))))


def png_name(i: int, n: int) -> str:
    return f"{str(i).zfill(max(6, len(str(n - 1))))}.png"


def shard_name(k: int) -> str:
    return f"{SHARD_PREFIX}-{k:06d}.tar"


def record_name(k: int) -> str:
    return f"chunk-{k:06d}.json"


# --------------------------------------------------------------------------- encoding
def shard_bytes(items: list[tuple[str, dict[str, bytes]]]) -> tuple[bytes, list[int]]:
    """A tar shard of whole samples (tarformat's layout, as `etsdm shard` writes) and its offsets."""
    from etsdm_dist.data import tarformat

    parts, offsets = [], [0]
    for key, members in items:
        parts.append(tarformat.sample_bytes(key, members))
        offsets.append(offsets[-1] + len(parts[-1]))
    parts.append(tarformat.end_of_archive(offsets[-1]))
    return b"".join(parts), offsets


# --------------------------------------------------------------------------- one chunk
class Job:
    def __init__(self, sampler: ImageSampler, n: int, out: str, *, fmt: str = "shards", chunk: int = 1024,
                 batch_images: int = 64, grid_path: str | None = None):
        from etsdm_dist.data import storage

        if fmt not in FORMATS:
            raise SampleError(f"--format must be one of {FORMATS}, got {fmt!r}")
        self.sampler, self.n, self.fmt, self.batch = sampler, int(n), fmt, int(batch_images)
        self.out = out.rstrip("/") if storage.is_remote(out) else out
        self.chunks = chunk_ranges(self.n, int(chunk))
        self.chunk = int(chunk)
        if self.batch < 1:
            raise SampleError(f"--batch must be >= 1, got {batch_images}")
        self.state = storage.join(self.out, STATE_DIR)
        self.grid_path = grid_path or storage.join(self.out if fmt == "shards" else self.state, "grid.png")
        self.identity = {"format": "etsdm-sample/1", "num": self.n, "chunk": self.chunk, "output": fmt,
                         **describe(sampler)}

    def record_path(self, k: int) -> str:
        from etsdm_dist.data import storage

        return storage.join(self.state, record_name(k))

    def committed(self, k: int) -> dict | None:
        """The chunk's record if it is committed and its data are all there, else None."""
        from etsdm_dist.data import storage

        try:
            rec = storage.read_json(self.record_path(k))
        except (FileNotFoundError, ValueError):
            return None
        if rec.get("job") != digest(self.identity) or rec.get("chunk") != k:
            return None
        try:
            if self.fmt == "shards":
                ok = storage.size(storage.join(self.out, rec["shard"]["name"])) == rec["shard"]["bytes"]
            else:
                ok = all(storage.size(storage.join(self.out, f)) == s for f, s in rec["files"])
        except (FileNotFoundError, KeyError):
            ok = False
        return rec if ok else None

    def run_chunk(self, k: int, progress=None) -> int:
        """Generate chunk k, write its data, then commit its record. Returns its image count."""
        from etsdm_dist.data import storage

        idx = list(self.chunks[k])
        labels = self.sampler.labels(idx)
        items, files = [], []
        for images, ids in image_batches(self.sampler, idx, self.batch):
            for img, i in zip(images, ids.tolist()):
                png = encode_png(img)
                y = None if labels is None else int(labels[i - idx[0]])
                if self.fmt == "shards":
                    meta = {"index": i, "seed": self.sampler.seed, **({} if y is None else {"label": y})}
                    members = {"png": png, "json": json.dumps(meta, sort_keys=True).encode()}
                    if y is not None:
                        members["cls"] = str(y).encode()
                    items.append((image_key(i, self.n), members))
                else:
                    name = png_name(i, self.n)
                    storage.write_bytes_atomic(storage.join(self.out, name), png)
                    files.append((name, len(png)))
            if progress is not None:
                progress(len(ids))
        rec: dict[str, Any] = {"job": digest(self.identity), "chunk": k, "first": idx[0], "count": len(idx),
                               "labels": None if labels is None else labels.tolist()}
        if self.fmt == "shards":
            data, offsets = shard_bytes(items)
            name = shard_name(k)
            storage.write_bytes_atomic(storage.join(self.out, name), data)
            rec["shard"] = {"name": name, "samples": len(items), "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest(), "offsets": offsets,
                            "first_key": items[0][0]}
        else:
            rec["files"] = files
        storage.write_json_atomic(self.record_path(k), rec)  # the commit
        return len(idx)

    # ----------------------------------------------------------------------- whole job
    def open(self, overwrite: bool = False) -> list[int]:
        """Rank 0: check or write job.json; the chunks still to do."""
        from etsdm_dist.data import storage

        path = storage.join(self.state, JOB_FILE)
        if storage.exists(path) and not overwrite:
            old = storage.read_json(path)
            if old != json.loads(json.dumps(self.identity)):
                diff = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
                raise SampleError(f"{self.out} holds samples of another job (differs in {diff}); rerun the "
                                  f"same command, pick another --out, or pass --overwrite")
        else:
            storage.check_writable(self.out)
            if overwrite:
                for k in range(len(self.chunks)):
                    if storage.exists(self.record_path(k)):
                        storage.remove(self.record_path(k))
            storage.write_json_atomic(path, self.identity)
        return [k for k in range(len(self.chunks)) if self.committed(k) is None]

    def finish(self) -> dict:
        """Rank 0, once every chunk is committed: index.json (shards) or done.json, and the grid."""
        from etsdm_dist.data import storage
        from etsdm_dist.data.shard_index import INDEX_FORMAT

        recs = [self.committed(k) for k in range(len(self.chunks))]
        missing = [k for k, r in enumerate(recs) if r is None]
        if missing:
            raise RuntimeError(f"{self.out}: chunks {missing[:10]} are not committed after every rank finished")
        total = sum(r["count"] for r in recs)
        if total != self.n:
            raise RuntimeError(f"{self.out}: chunks hold {total} images, expected {self.n}")
        storage.write_bytes_atomic(self.grid_path, grid_png(self._first_images(recs)))
        c, h, w = self.sampler.loaded.image_shape
        n_cls = self.sampler.loaded.num_classes or None
        labels = None if n_cls is None else [y for r in recs for y in r["labels"]]
        if self.fmt == "png":
            done = {"num": self.n, "files": [f for r in recs for f, _ in r["files"]], "labels": labels,
                    "job": self.identity}
            storage.write_json_atomic(storage.join(self.state, "done.json"), done, indent=None)
            return done
        shards = [r["shard"] for r in recs]
        index = {
            "format": INDEX_FORMAT, "prefix": SHARD_PREFIX, "shards": shards,
            "total_samples": total, "total_bytes": sum(s["bytes"] for s in shards),
            "resolution": [h, w], "channels": c, "image_format": "png", "label_map": None,
            "num_classes": n_cls,
            "fingerprint": hashlib.sha256("".join(f"{s['name']}:{s['sha256']}\n" for s in shards).encode()).hexdigest(),
            "skipped": {"count": 0, "list_file": "skipped.txt"},
            "source": f"etsdm sample (job {digest(self.identity)[:16]})",
        }
        storage.write_bytes_atomic(storage.join(self.out, "skipped.txt"), b"")
        storage.write_json_atomic(storage.join(self.out, "index.json"), index, indent=None)  # last: commit
        return index

    def _first_images(self, recs: list[dict]) -> torch.Tensor:
        """The first min(N, 64) images, read back from what was written."""
        import numpy as np
        from PIL import Image

        from etsdm_dist.data import storage, tarformat

        want = min(self.n, GRID_IMAGES)
        out = []
        for r in recs:
            if len(out) >= want:
                break
            if self.fmt == "shards":
                data = storage.read_bytes(storage.join(self.out, r["shard"]["name"]))
                offs = r["shard"]["offsets"]
                pngs = []
                for a, b in zip(offs, offs[1:]):
                    _key, fields = tarformat.sample_from_members(tarformat.parse_sample_members(data[a:b]))
                    pngs.append(fields["png"])
            else:
                pngs = [storage.read_bytes(storage.join(self.out, f)) for f, _ in r["files"]]
            for png in pngs[:want - len(out)]:
                arr = np.array(Image.open(io.BytesIO(png)))
                out.append(torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()))
        return torch.stack(out)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="etsdm sample", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="run directory or file written by `etsdm export` (local or s3://)")
    p.add_argument("--num", type=int, required=True, help="number of images N")
    p.add_argument("--out", required=True, help="output folder or URL (s3://...)")
    p.add_argument("--format", choices=FORMATS, default="shards")
    p.add_argument("--seed", type=int, default=0, help="image i draws all its noise from seed (SEED, i)")
    p.add_argument("--batch", type=int, default=64, help="images per rank in flight")
    p.add_argument("--chunk", type=int, default=1024, help="images per committed chunk (and shard)")
    p.add_argument("--eval-width", type=int, default=None,
                   help="network rows per call, aligned to image indices (default 8 on CPU, 64 on GPU); "
                        "images are identical for any --batch and rank count at a fixed value")
    p.add_argument("--ema-index", type=int, default=None, help="run dir: which EMA (default: sample.ema)")
    p.add_argument("--classes", default=None,
                   help="class-conditional models: comma-separated labels, cycled (default: all, balanced)")
    p.add_argument("--grid-png", default=None, help="where the grid of the first 64 goes")
    p.add_argument("--overwrite", action="store_true", help="discard committed chunks of another job in OUT")
    p.add_argument("--no-progress", action="store_true")
    add_sampler_flags(p)
    args, extra = p.parse_known_args(argv)
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def run(args: argparse.Namespace) -> dict:
    """The job on this rank (collective: every rank calls it)."""
    from etsdm_dist import dist

    device = dist.device_for(dist.launch_info())
    loaded = load_model(args.source, ema_index=args.ema_index, device=device)
    try:
        classes = None if args.classes is None else [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        raise SampleError(f"--classes must be comma-separated integers, got {args.classes!r}") from None
    sampler = ImageSampler(loaded, settings_from_args(loaded.sample_section, args), seed=args.seed,
                           eval_width=args.eval_width, classes=classes, device=device)
    job = Job(sampler, args.num, args.out, fmt=args.format, chunk=args.chunk, batch_images=args.batch,
              grid_path=args.grid_png)
    status: dict[str, Any] = {}
    if dist.is_main():
        try:
            status["pending"] = job.open(overwrite=args.overwrite)
        except (SampleError, OSError) as e:
            status["error"] = str(e)
    status = dist.all_gather_object(status)[0]  # every rank follows rank 0's view
    if "error" in status:
        raise SampleError(status["error"])
    pending = status["pending"]
    mine = assign(pending, dist.rank(), dist.world_size())
    bar = None
    if dist.is_main() and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(job.chunks[k]) for k in mine), unit="img", file=sys.stderr,
                   desc=f"sample (rank 0 of {dist.world_size()})")
    t0 = time.monotonic()
    done = 0
    for k in mine:
        done += job.run_chunk(k, progress=bar.update if bar else None)
    if bar:
        bar.close()
    counts = dist.all_reduce(torch.tensor([float(done)]), "sum")
    elapsed = dist.all_reduce(torch.tensor([time.monotonic() - t0]), "max")
    dist.barrier()
    summary = {"num": job.n, "new_images": int(counts.item()), "skipped_chunks": len(job.chunks) - len(pending),
               "seconds": float(elapsed.item()), "out": job.out}
    if dist.is_main():
        job.finish()
        rate = summary["new_images"] / max(summary["seconds"], 1e-9)
        print(f"etsdm sample: {job.n} images in {job.out} ({summary['new_images']} made now on "
              f"{dist.world_size()} rank(s), {summary['skipped_chunks']} chunks already committed) in "
              f"{summary['seconds']:.1f} s, {rate:.2f} img/s", flush=True)
    dist.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    from etsdm_dist import dist

    argv = sys.argv[1:] if argv is None else list(argv)
    argv, local_rank = dist.strip_local_rank(argv)  # the deepspeed launcher's --local_rank
    if argv[:1] == ["--"]:  # `torchrun -m etsdm_dist.eval.sample -- SOURCE ...` on launchers that keep it
        argv = argv[1:]
    args = parse_args(argv)
    created = not dist.initialized()  # a caller's process group (in-process use) is left alone
    dist.init(local_rank)
    try:
        with torch.no_grad():
            run(args)
    except SampleError as e:
        print(f"etsdm sample: error: {e}", file=sys.stderr)
        return 2
    finally:
        if created and dist.initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
