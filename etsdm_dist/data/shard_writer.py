"""`etsdm shard SRC DST`: images or idx files -> webdataset tar shards + index.json.

The loader reads samples by byte range, so besides the tars we write an index with every
sample's offset (see tarformat.py for the byte layout). Output is a pure function of the
source list and the options (sorted listing, seeded shuffle, ordered worker results, fixed tar
headers), which is what makes an interrupted run resumable exactly: `_progress.json` records
the shards already uploaded and the source position after them, and a rerun continues there.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import struct
import sys
import tempfile

from etsdm_dist.data import storage
from etsdm_dist.data import tarformat
from etsdm_dist.data.decode import FIT_MODES, fit_image, to_channels as _to_channels
from etsdm_dist.data.shard_index import INDEX_FORMAT, name_problem

PROGRESS = "_progress.json"
SKIPPED = "skipped.txt"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


class ShardError(Exception):
    """Bad input or destination; the message says what and where."""


# --------------------------------------------------------------------------- sources
# A source is (name, kind, ref, label): kind "file" (ref = path) or "raw" (ref = (h, w, pixels)).


def _read_maybe_gz(path: str) -> bytes:
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        return f.read()


def _find_idx(src: str, split: str | None) -> tuple[str, str | None]:
    """(images file, labels file or None) for a directory or a path prefix like /data/train."""
    if os.path.isdir(src):
        d, stem = src, None
    else:
        d, stem = os.path.dirname(src) or ".", os.path.basename(src)
        split = split or stem
    names = sorted(n for n in os.listdir(d) if "-images-idx3-ubyte" in n) if os.path.isdir(d) else []
    if split:
        names = [n for n in names if n.split("-images-idx3-ubyte")[0] == split]
    elif len({n.split("-images-idx3-ubyte")[0] for n in names}) > 1:
        if any(n.startswith("train-") for n in names):
            names = [n for n in names if n.startswith("train-")]
        else:
            raise ShardError(f"{src}: several idx image files {names}; pick one with --split")
    if not names:
        raise ShardError(f"{src}: no *-images-idx3-ubyte[.gz] file" + (f" for split {split!r}"
                                                                          if split else ""))
    images = os.path.join(d, names[0])
    lab = names[0].replace("-images-idx3-ubyte", "-labels-idx1-ubyte")
    cands = [os.path.join(d, c) for c in (lab, lab.removesuffix(".gz"), lab + ".gz")]
    return images, next((c for c in cands if os.path.exists(c)), None)


def _idx_sources(src: str, split: str | None) -> tuple[list[tuple], str]:
    images_path, labels_path = _find_idx(src, split)
    raw = _read_maybe_gz(images_path)
    magic, n, h, w = struct.unpack(">IIII", raw[:16])
    if magic != 0x803 or len(raw) != 16 + n * h * w:
        raise ShardError(f"{images_path}: not an idx3 ubyte image file (magic {magic:#x}, "
                         f"{len(raw)} bytes for {n}x{h}x{w})")
    labels = None
    if labels_path:
        lraw = _read_maybe_gz(labels_path)
        lmagic, ln = struct.unpack(">II", lraw[:8])
        if lmagic != 0x801 or ln != n or len(lraw) != 8 + n:
            raise ShardError(f"{labels_path}: not an idx1 label file matching {n} images")
        labels = lraw[8:]
    base = os.path.basename(images_path)
    out = [(f"{base}[{i}]", "raw", (h, w, raw[16 + i * h * w:16 + (i + 1) * h * w]),
            labels[i] if labels is not None else None) for i in range(n)]
    return out, images_path


def _folder_sources(src: str, labels: str | None) -> tuple[list[tuple], dict | None, list]:
    """Sorted image files; with labels='folder' the first path component is the class."""
    found = []
    for d, dirs, files in os.walk(src):
        dirs.sort()
        for f in files:
            if f.lower().endswith(IMAGE_EXTS):
                found.append(os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/"))
    found.sort()
    if labels != "folder":
        return [(rel, "file", os.path.join(src, rel), None) for rel in found], None, []
    classes = sorted({rel.split("/")[0] for rel in found if "/" in rel})
    label_map = {c: i for i, c in enumerate(classes)}
    out, skipped = [], []
    for rel in found:
        if "/" not in rel:  # an image beside the class folders has no class
            skipped.append((rel, "not inside a class subfolder (--labels folder)"))
            continue
        out.append((rel, "file", os.path.join(src, rel), label_map[rel.split("/")[0]]))
    return out, label_map, skipped


# --------------------------------------------------------------------------- per-image work


def _process(job: tuple) -> tuple:
    """(pos, source) -> (pos, "ok", image bytes, json bytes, (h, w)) or (pos, "skip", reason).

    Runs in worker processes: no storage access, only Pillow.
    """
    from PIL import Image, ImageOps

    pos, (name, kind, ref, _label), opt = job
    try:
        if kind == "raw":
            h, w, pixels = ref
            img = Image.frombytes("L", (w, h), pixels)
        else:
            with Image.open(ref) as im:
                im.load()
                img = ImageOps.exif_transpose(im)
    except Exception as e:  # unreadable / corrupt source: listed, never silently dropped
        return pos, "skip", f"cannot decode: {type(e).__name__}: {e}"
    w, h = img.size
    if min(w, h) < opt["min_size"]:
        return pos, "skip", f"too small: {w}x{h} < --min-size {opt['min_size']}"
    img = _to_channels(img, opt["channels"])
    n, mode = opt["resolution"], opt["mode"]
    if n and mode in FIT_MODES:  # decode.fit_image: the loader fits other tools' shards alike
        img = fit_image(img, n, mode)
    buf = io.BytesIO()
    if opt["format"] == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        img.save(buf, "JPEG", quality=opt["quality"])
    meta = json.dumps({"source": name, "width": w, "height": h}, sort_keys=True).encode()
    return pos, "ok", buf.getvalue(), meta, (img.size[1], img.size[0])


def _results(jobs: list, workers: int):
    """Processed jobs in source order whatever the worker count (imap keeps order)."""
    if workers <= 1:
        yield from map(_process, jobs)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(_process, jobs, chunksize=8)


# --------------------------------------------------------------------------- writing


class _Shard:
    def __init__(self, name: str, staging: str):
        self.name, self.path = name, staging
        self.f = open(staging, "wb")
        self.sha = hashlib.sha256()
        self.offsets: list[int] = [0]
        self.first_key: str | None = None

    @property
    def nbytes(self) -> int:
        return self.offsets[-1]

    def add(self, key: str, data: bytes) -> None:
        self.first_key = self.first_key or key
        self.f.write(data)
        self.sha.update(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def close(self) -> dict:
        tail = tarformat.end_of_archive(self.nbytes)
        self.f.write(tail)
        self.sha.update(tail)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"name": self.name, "samples": len(self.offsets) - 1,
                "bytes": self.nbytes + len(tail), "sha256": self.sha.hexdigest(),
                "offsets": self.offsets, "first_key": self.first_key}


def _publish(local: str, dst_path: str) -> None:
    if storage.is_remote(dst_path):
        storage.upload_file(local, dst_path)
        os.remove(local)
    else:  # staged in the destination directory: a rename publishes it atomically
        os.replace(local, dst_path)
        storage._fsync_dir(os.path.dirname(os.path.abspath(dst_path)))


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="etsdm shard", description=__doc__.split("\n")[0])
    p.add_argument("src", help="image folder, class-per-subfolder tree, or idx dir / prefix")
    p.add_argument("dst", help="output dir or URL (s3://bucket/prefix)")
    p.add_argument("--labels", choices=["none", "folder"], default="none")
    p.add_argument("--split", help="idx files: which split (train, t10k); default train")
    p.add_argument("--prefix", default="train",
                   help="shard name prefix: shards are DST/PREFIX-000000.tar, ... (ASCII letters, digits, _ - .)")
    p.add_argument("--format", choices=["png", "jpg"], default="png")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--resolution", type=int, help="output N x N")
    p.add_argument("--mode", choices=["center-crop", "pad", "none"],
                   help="fit to --resolution (default center-crop with --resolution, else none)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="default 1 for idx, 3 for images")
    p.add_argument("--min-size", type=int, default=0, help="skip sources whose short side is less")
    p.add_argument("--max-samples", type=int, default=10000, help="samples per shard")
    p.add_argument("--max-bytes", type=int, default=0, help="bytes per shard (0: no limit)")
    p.add_argument("--workers", type=int, default=1, help="decode/encode processes")
    p.add_argument("--shuffle-seed", type=int, help="shuffle source order before sharding")
    p.add_argument("--limit", type=int, help="first N sources (sorted order) only")
    p.add_argument("--overwrite", action="store_true", help="discard an existing/partial DST")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    a.mode = a.mode or ("center-crop" if a.resolution else "none")
    if a.resolution and a.mode == "none":
        p.error("--resolution needs --mode center-crop or pad")
    if a.max_samples < 1 or a.max_bytes < 0 or (a.resolution is not None and a.resolution < 1):
        p.error("--max-samples and --resolution must be positive, --max-bytes >= 0")
    for flag, value, low, high in (("--quality", a.quality, 1, 100), ("--workers", a.workers, 1, None),
                                   ("--min-size", a.min_size, 0, None), ("--limit", a.limit, 1, None)):
        if value is not None and (value < low or (high is not None and value > high)):
            p.error(f"{flag}: {value} is outside [{low}, {high if high is not None else 'inf'}]")
    bad = name_problem(a.prefix)
    if bad:  # the prefix becomes a file name inside DST: it must not reach outside it
        p.error(f"--prefix: {bad}")
    return a


def run(a: argparse.Namespace) -> dict:
    """Write the shards and index for parsed arguments; returns the index."""
    from tqdm import tqdm

    src, dst = a.src, a.dst.rstrip("/") if storage.is_remote(a.dst) else a.dst
    if storage.is_remote(src):
        raise ShardError(f"SRC {src}: must be a local folder or idx path (copy it down first)")
    if os.path.isdir(src):
        is_idx = any("-images-idx3-ubyte" in n for n in os.listdir(src))
    else:  # an idx path prefix such as /data/fashion-mnist/train
        d, stem = os.path.dirname(src) or ".", os.path.basename(src)
        is_idx = os.path.isdir(d) and any(n.startswith(stem + "-images-idx3-ubyte")
                                          for n in os.listdir(d))
        if not is_idx:
            raise ShardError(f"SRC {src} does not exist (nor is it an idx prefix)")
    try:  # before reading any source: a wrong bucket should fail in a second, not an hour
        storage.check_writable(dst)
    except storage.StorageAccessError as e:
        raise ShardError(str(e)) from e
    pre_skipped: list[tuple[str, str]] = []
    label_map = None
    if is_idx:
        sources, src_desc = _idx_sources(src, a.split)
    else:
        sources, label_map, pre_skipped = _folder_sources(src, a.labels)
        src_desc = os.path.abspath(src)
    if a.limit is not None:
        sources = sources[:a.limit]
    if not sources:
        raise ShardError(f"SRC {src}: no images ({', '.join(IMAGE_EXTS)}) found")
    if a.shuffle_seed is not None:
        random.Random(a.shuffle_seed).shuffle(sources)
    channels = a.channels or (1 if is_idx else 3)
    opt = {"min_size": a.min_size, "channels": channels, "resolution": a.resolution,
           "mode": a.mode, "format": a.format, "quality": a.quality}

    # Everything that determines the bytes: a resume with other options would mix two datasets.
    ident = hashlib.sha256()
    for name, kind, ref, label in sources:
        ident.update(f"{name}\0{label}\0{os.path.getsize(ref) if kind == 'file' else ''}\n".encode())
    params = {**opt, "labels": a.labels, "prefix": a.prefix, "max_samples": a.max_samples,
              "max_bytes": a.max_bytes, "shuffle_seed": a.shuffle_seed, "limit": a.limit,
              "sources_sha256": ident.hexdigest()}

    prog_path = storage.join(dst, PROGRESS)
    state = {"params": params, "shards": [], "next_source": 0, "next_key": 0,
             "skipped": [], "complete": False}
    if storage.exists(prog_path) and not a.overwrite:
        old = storage.read_json(prog_path)
        if old.get("params") != params:
            raise ShardError(f"{dst} holds a run with other options or sources ({PROGRESS}); "
                             "use --overwrite or another DST")
        state = old
        if state["complete"]:
            print(f"etsdm shard: {dst} is already complete", file=sys.stderr)
            return storage.read_json(storage.join(dst, "index.json"))
        print(f"etsdm shard: resuming after {len(state['shards'])} shards "
              f"(source {state['next_source']}/{len(sources)})", file=sys.stderr)
    elif storage.exists(storage.join(dst, "index.json")) and not a.overwrite:
        raise ShardError(f"{dst} already has an index.json from another run; use --overwrite")

    key_width = max(9, len(str(len(sources))))
    remote = storage.is_remote(dst)
    stage_dir = tempfile.mkdtemp(prefix="etsdm-shard-") if remote else dst
    cur: _Shard | None = None
    pending_skips: list[list[str]] = []
    resolutions: set = set()

    def flush(next_source: int) -> None:
        nonlocal cur
        entry = cur.close()
        _publish(cur.path, storage.join(dst, entry["name"]))
        state["shards"].append(entry)
        state["skipped"].extend(pending_skips)
        pending_skips.clear()
        state["next_source"], state["next_key"] = next_source, state["next_key"] + entry["samples"]
        state["resolutions"] = sorted({tuple(r) for r in state.get("resolutions", [])} | resolutions)
        storage.write_json_atomic(prog_path, state)
        cur = None

    start = state["next_source"]
    jobs = [(pos, sources[pos], opt) for pos in range(start, len(sources))]
    bar = tqdm(total=len(sources), initial=start, unit="img", file=sys.stderr,
               disable=a.no_progress, desc="shard")
    try:
        for pos, status, *rest in _results(jobs, a.workers):
            bar.update(1)
            if status == "skip":
                pending_skips.append([sources[pos][0], rest[0]])
                continue
            img, meta, hw = rest
            label = sources[pos][3]
            key = str(state["next_key"] + (len(cur.offsets) - 1 if cur else 0)).zfill(key_width)
            fields = {a.format: img, "json": meta}
            if label is not None:
                fields["cls"] = str(label).encode()
            data = tarformat.sample_bytes(key, fields)
            if cur and a.max_bytes and cur.nbytes + len(data) + len(
                    tarformat.end_of_archive(cur.nbytes + len(data))) > a.max_bytes:
                flush(pos)
            if cur is None:
                name = f"{a.prefix}-{len(state['shards']):06d}.tar"
                cur = _Shard(name, os.path.join(stage_dir, f".{name}.partial"))
            cur.add(key, data)
            resolutions.add(hw)
            if len(cur.offsets) - 1 >= a.max_samples:
                flush(pos + 1)
        if cur:
            flush(len(sources))
    finally:
        bar.close()
        if cur is not None:  # interrupted mid-shard: drop the partial staging file
            cur.f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(cur.path)
        if remote:
            shutil.rmtree(stage_dir, ignore_errors=True)

    state["skipped"].extend(pending_skips)
    skipped = pre_skipped + [tuple(s) for s in state["skipped"]]
    shards = state["shards"]
    if not shards:
        raise ShardError(f"SRC {src}: all {len(sources)} sources were skipped "
                         f"(first: {skipped[0][0]}: {skipped[0][1]})")
    all_res = {tuple(r) for r in state.get("resolutions", [])}
    fp = hashlib.sha256("".join(f"{s['name']}:{s['sha256']}\n" for s in shards).encode())
    index = {
        "format": INDEX_FORMAT, "prefix": a.prefix, "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "resolution": list(next(iter(all_res))) if len(all_res) == 1 else None,
        "channels": channels, "image_format": a.format, "label_map": label_map,
        "num_classes": (len(label_map) if label_map is not None else
                        (max(s[3] for s in sources) + 1 if sources[0][3] is not None else None)),
        "fingerprint": fp.hexdigest(),
        "skipped": {"count": len(skipped), "list_file": SKIPPED},
        "source": src_desc,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_bytes_atomic(storage.join(dst, SKIPPED),
                               "".join(f"{n}\t{r}\n" for n, r in skipped).encode())
    storage.write_json_atomic(storage.join(dst, "index.json"), index, indent=None)  # last: commit
    state["complete"] = True
    storage.write_json_atomic(prog_path, state)
    return index


def main(argv: list[str] | None = None) -> int:
    a = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        index = run(a)
    except ShardError as e:
        print(f"etsdm shard: error: {e}", file=sys.stderr)
        return 2
    n_skip = index["skipped"]["count"]
    print(f"etsdm shard: {index['total_samples']} samples in {len(index['shards'])} shards "
          f"({index['total_bytes'] / 1e6:.1f} MB) -> {storage.join(a.dst, 'index.json')}")
    if n_skip:
        print(f"etsdm shard: skipped {n_skip} sources, listed in "
              f"{storage.join(a.dst, SKIPPED)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
