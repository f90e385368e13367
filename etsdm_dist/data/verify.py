"""`etsdm verify DST`: check shards against their index.json before spending GPU hours on them.

First index.json passes the loader's own check (shard_index.parse_index: safe shard names, sample
sizes within bounds), so verify refuses what training would refuse, before reading any shard.
Then it re-downloads every shard and checks what the loader relies on: sha256, byte size, sample count,
the per-sample offsets (each range parses as one sample's contiguous members), keys unique across
the whole set and in order, and (unless --no-decode) that every image decodes with the indexed
resolution and channels. PNG chunk CRCs are checked even with --no-decode, so a flipped byte in
an image is pinned to its key, not only to its shard.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import struct
import sys
import zlib

from etsdm_dist.data import storage
from etsdm_dist.data import tarformat
from etsdm_dist.data.shard_index import INDEX_FORMAT as FORMAT
from etsdm_dist.data.shard_index import ShardIndexError, parse_index

MAX_REPORTED = 50


def _png_crc_error(data: bytes) -> str | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return "not a PNG (bad signature)"
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            return f"PNG chunk {ctype!r} truncated"
        if zlib.crc32(data[pos + 4:end]) != struct.unpack(">I", data[end:end + 4])[0]:
            return f"PNG chunk {ctype!r} CRC mismatch (corrupt bytes)"
        if ctype == b"IEND":
            return None
        pos = end + 4
    return "PNG has no IEND chunk (truncated)"


def _check_sample(key: str, fields: dict, index: dict, decode: bool) -> str | None:
    fmt = index["image_format"]
    labelled = index.get("num_classes") is not None
    want = {fmt, "json"} | ({"cls"} if labelled else set())
    if set(fields) != want:
        return f"members {sorted(fields)}, expected {sorted(want)}"
    if labelled:
        try:
            tarformat.parse_label(fields["cls"], index["num_classes"], "index.json num_classes")
        except ValueError as e:
            return str(e)
    try:
        json.loads(fields["json"])
    except ValueError as e:
        return f".json does not parse ({e})"
    img = fields[fmt]
    if fmt == "png":
        err = _png_crc_error(img)
        if err:
            return err
    if decode:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(img)) as im:
                im.load()
                size, mode = im.size, im.mode
        except Exception as e:
            return f"image does not decode ({type(e).__name__}: {e})"
        res = index.get("resolution")
        if res is not None and [size[1], size[0]] != list(res):
            return f"image is {size[1]}x{size[0]} (HxW), index says {res[0]}x{res[1]}"
        want_mode = "L" if index["channels"] == 1 else "RGB"
        if mode != want_mode:
            return f"image mode {mode}, index says {index['channels']} channels ({want_mode})"
    return None


def verify(dst: str, *, decode: bool = True, retries: int = 8, progress: bool = False) -> list[str]:
    """All problems found (empty list: the set is sound). Each names the shard and key."""
    errors: list[str] = []
    index_path = storage.join(dst, "index.json")
    try:
        index = storage.read_json(index_path)
    except FileNotFoundError:
        return [f"{index_path}: missing (not a shard set, or `etsdm shard` did not finish)"]
    if index.get("format") != FORMAT:
        return [f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}"]
    try:  # what the loader refuses at startup (unsafe names, absurd sizes) stops here too
        parse_index(index, dst)
    except ShardIndexError as e:
        return [str(e)]
    if index.get("scan") is not None:  # other tools' tars, indexed by `etsdm index`
        from etsdm_dist.data.scan_verify import verify_scanned
        return verify_scanned(dst, index, decode=decode, retries=retries, progress=progress)
    shards = index["shards"]
    seen: dict[str, str] = {}  # key -> shard holding it
    fp = hashlib.sha256("".join(f"{s['name']}:{s['sha256']}\n" for s in shards).encode())
    if fp.hexdigest() != index["fingerprint"]:
        errors.append(f"{index_path}: fingerprint does not match the shard list")
    if sum(s["samples"] for s in shards) != index["total_samples"]:
        errors.append(f"{index_path}: total_samples != sum of shard samples")
    if sum(s["bytes"] for s in shards) != index["total_bytes"]:
        errors.append(f"{index_path}: total_bytes != sum of shard bytes")
    if not storage.exists(storage.join(dst, index["skipped"]["list_file"])):
        errors.append(f"{dst}: skipped list {index['skipped']['list_file']} missing")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=index["total_samples"], unit="img", file=sys.stderr, desc="verify")
    for s in shards:
        name, offs, first = s["name"], s["offsets"], s["first_key"]
        keys = f"keys {first}..{tarformat.key_at(first, s['samples'] - 1)}"
        try:
            data = storage.read_bytes(storage.join(dst, name), retries=retries)
        except FileNotFoundError:
            errors.append(f"{name}: shard missing ({keys})")
            continue
        except OSError as e:
            errors.append(f"{name}: cannot read ({e}) ({keys})")
            continue
        if len(data) != s["bytes"]:
            errors.append(f"{name}: {len(data)} bytes, index says {s['bytes']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != s["sha256"]:
            errors.append(f"{name}: sha256 mismatch")
        if len(offs) != s["samples"] + 1 or offs[0] != 0 or any(
                b <= a for a, b in zip(offs, offs[1:])):
            errors.append(f"{name}: offsets are not {s['samples']}+1 increasing values from 0")
            continue
        if len(data) >= offs[-1] and data[offs[-1]:].strip(b"\0"):
            errors.append(f"{name}: non-zero bytes after the last sample (end-of-archive)")
        prev = None
        for i in range(s["samples"]):
            expect = tarformat.key_at(first, i)
            a, b = offs[i], offs[i + 1]
            if b > len(data):
                errors.append(f"{name}: sample {expect}: bytes [{a}, {b}) beyond the end of the "
                              f"shard ({len(data)} bytes): truncated")
                break
            try:
                members = tarformat.parse_sample_members(data[a:b], key=expect, where=name)
                key, fields = tarformat.sample_from_members(members, where=name)
            except tarformat.TarFormatError as e:
                errors.append(str(e))
                continue
            if key in seen:
                errors.append(f"{name}: sample {key}: duplicate key (also in {seen[key]})")
            seen.setdefault(key, name)
            if i == 0 and key != first:
                errors.append(f"{name}: sample {key}: first key, index says {first}")
            if prev is not None and key <= prev:
                errors.append(f"{name}: sample {key}: out of key order (after {prev})")
            prev = key
            problem = _check_sample(key, fields, index, decode)
            if problem:
                errors.append(f"{name}: sample {key}: {problem}")
            if bar:
                bar.update(1)
        if len(errors) > MAX_REPORTED:
            break
    if bar:
        bar.close()
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="etsdm verify", description="Check shards against index.json.")
    p.add_argument("dst", help="folder or URL holding index.json and the shards")
    p.add_argument("--no-decode", action="store_true", help="skip image decoding (faster)")
    p.add_argument("--retries", type=int, default=8, help="transient read errors per shard")
    p.add_argument("--progress", action="store_true", help="progress bar on stderr")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        errors = verify(a.dst, decode=not a.no_decode, retries=a.retries, progress=a.progress)
    except (OSError, ValueError, KeyError) as e:
        print(f"etsdm verify: {a.dst}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if errors:
        for e in errors[:MAX_REPORTED]:
            print(f"etsdm verify: FAIL {e}", file=sys.stderr)
        more = len(errors) - MAX_REPORTED
        print(f"etsdm verify: {len(errors) if more <= 0 else f'{MAX_REPORTED}+'} problems in "
              f"{a.dst}", file=sys.stderr)
        return 1
    index = storage.read_json(storage.join(a.dst, "index.json"))
    print(f"etsdm verify: OK {a.dst}: {len(index['shards'])} shards, {index['total_samples']} "
          f"samples, {index['total_bytes'] / 1e6:.1f} MB, fingerprint {index['fingerprint'][:12]}"
          f"{'' if a.no_decode else ', all images decode'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
