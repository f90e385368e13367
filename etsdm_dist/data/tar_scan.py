"""`etsdm index URL_PATTERN`: index webdataset tars written by other tools, reading only tar headers.

People who train at scale hold their images as webdataset tars already (img2dataset, webdataset's
ShardWriter: `{key}.jpg|png|webp`, `.txt`, `.json`, `.cls`, members of one sample contiguous, any
resolution). The loader needs only our index.json beside them: per-sample byte ranges, so each
rank range-reads its own samples. The scan walks each tar's 512-byte member headers with range
reads -- a window of `--window` bytes per request, so small members cost one request for many
headers and a large member's data is skipped -- and never decodes an image.

What cannot be used is listed with the reason (index-skipped.txt and stderr) and left out, never
silently: a sample without an image member, a key whose members are not contiguous, a member with
a pax/GNU extension header (the range reader parses plain ustar members), a name without the
key.ext form, a truncated or corrupt tar (its complete samples before the damage are kept).
A sample left out in the middle of a tar splits that tar into several index entries (segments of
one file, each a run of adjacent samples), which is all the index format needs.

The index records the target: `--resolution N --mode center-crop|pad` and `--channels`; the
loader fits every image to it on the fly (decode.decode_fit, what `etsdm shard` writes), so
training, `etsdm fid-ref` and `etsdm verify` see the same N x N images. Labels come from `.cls`,
or from a field of `.json` (`--label-field`), read by the loader (the scan reads no member data).

Resumable: each scanned tar's result is one small object under `_index_scan/` beside the tars; a
rerun scans only tars without a result (or whose size changed) and then writes index.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import hashlib
import json
import sys
from dataclasses import dataclass

from etsdm_dist.data import storage
from etsdm_dist.data import tarformat
from etsdm_dist.data.decode import FIT_MODES, IMAGE_MEMBERS, image_member
from etsdm_dist.data.shard_index import INDEX_FORMAT, ShardIndexError, name_problem

BLOCK = tarformat.BLOCK
SCAN_DIR = "_index_scan"  # per-tar results of an interrupted or finished scan
SKIPPED = "index-skipped.txt"
# Bytes per header read, at first and at least (_Window adapts it): the break-even between
# skipping data and reading through it. `etsdm bench scan` on the local S3 server (README): one
# request costs ~10-15 ms there, the time of ~1 MB of transfer, so members under ~1 MB are read
# through (as cheap as reading the tar whole) and only larger members' data is skipped. On a
# link where bytes are dearer than requests (egress, a slow WAN), pass a smaller --window.
DEFAULT_WINDOW = 1 << 20
MAX_WINDOW = 16 << 20
_ZERO = bytes(BLOCK)


class ScanError(Exception):
    """Bad arguments or destination; the message says what and where."""


# --------------------------------------------------------------------------- settings


def scan_settings(index) -> tuple[str | None, str | None]:
    """(fit mode, label field) of an index written by `etsdm index`; (None, None) for ours.

    The loader calls this at startup, so a malformed `scan` object fails there with the field."""
    scan = index.scan
    if scan is None:
        return None, None
    where = f"{storage.join(index.url, 'index.json')}: field 'scan'"
    if not isinstance(scan, dict):
        raise ShardIndexError(f"{where}: expected an object")
    fit, field = scan.get("fit"), scan.get("label_field")
    if fit not in FIT_MODES:
        raise ShardIndexError(f"{where}.fit: must be one of {FIT_MODES}, got {fit!r:.40}")
    res = index.resolution
    if res is None or res[0] != res[1]:
        raise ShardIndexError(f"{where}: fitting images needs a square 'resolution', got {res}")
    if field is not None and (not isinstance(field, str) or not field):
        raise ShardIndexError(f"{where}.label_field: must be a non-empty string or null")
    return fit, field


def label_from_json(raw, field: str) -> bytes:
    """The `field` of a sample's .json member as .cls text (an integer); ValueError naming it."""
    try:
        doc = json.loads(bytes(raw))
    except ValueError as e:
        raise ValueError(f".json does not parse ({e})") from None
    value = doc.get(field) if isinstance(doc, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f".json field {field!r} is {value!r:.40}, expected an integer label")
    return str(value).encode()


# --------------------------------------------------------------------------- patterns


def expand(pattern: str) -> list[str]:
    """URLs of a brace pattern (`s3://b/p/{00000..00099}.tar`), or every .tar in a folder."""
    import braceexpand

    urls = list(braceexpand.braceexpand(pattern))
    if len(urls) == 1 and not urls[0].endswith(".tar"):
        folder = urls[0].rstrip("/")
        try:
            names = storage.listdir(folder)
        except FileNotFoundError:
            raise ScanError(f"{pattern}: no such folder (give a brace pattern of .tar URLs or a "
                            f"folder holding .tar files)") from None
        urls = [storage.join(folder, n) for n in names if n.endswith(".tar")]
        if not urls:
            raise ScanError(f"{pattern}: no .tar files in this folder")
    return urls


def split_folder(urls: list[str]) -> tuple[str, list[str]]:
    """(the one folder, file names): the loader resolves names against index.json's folder."""
    folders = {u.rstrip("/").rsplit("/", 1)[0] if "/" in u else "." for u in urls}
    if len(folders) != 1:
        raise ScanError(f"the tars lie in {len(folders)} folders ({', '.join(sorted(folders)[:3])}"
                        f"...): index.json must sit beside its tars, one folder per index")
    names = [u.rstrip("/").rsplit("/", 1)[-1] for u in urls]
    for n in names:
        bad = name_problem(n)
        if bad:
            raise ScanError(f"tar name {bad} (the loader accepts only safe names; rename it)")
    if len(set(names)) != len(names):
        raise ScanError("the pattern names some tar twice")
    return folders.pop(), names


# --------------------------------------------------------------------------- one tar


class _Window:
    """Range reads of one object through an adaptive window: header reads inside the last window
    cost nothing; the next request fetches `window` bytes from the header on. The window doubles
    (up to MAX_WINDOW) while the next header lies (almost) right after the last window: small
    members, so few large requests, close to reading the tar whole. It drops back to the minimum
    when a member's data skipped is larger than the window: large members, whose data is not
    read. `etsdm bench scan` measures both cases."""

    def __init__(self, url: str, size: int, window: int, retries: int):
        self.url, self.size, self.retries = url, size, retries
        self.min_window = self.window = max(BLOCK, window)
        self.lo, self.buf = 0, b""
        self.requests = self.bytes_read = 0

    def get(self, pos: int, n: int = BLOCK) -> bytes:
        if not self.lo <= pos <= pos + n <= self.lo + len(self.buf):
            gap = pos - (self.lo + len(self.buf))  # bytes skipped since the last window
            if self.requests:
                self.window = (min(MAX_WINDOW, self.window * 2) if gap < self.window // 4 else
                               self.min_window if gap > self.window else self.window)
            hi = min(self.size, pos + max(n, self.window))
            self.buf = storage.read_range(self.url, pos, hi, retries=self.retries)
            self.lo = pos
            self.requests += 1
            self.bytes_read += hi - pos
        return self.buf[pos - self.lo:pos - self.lo + n]


def _extension(typ: bytes, data: bytes) -> dict:
    """A pax ('x') or GNU long-name ('L') member's data -> overrides {'path': .., 'size': ..}."""
    if typ == b"L":
        return {"path": data.split(b"\0", 1)[0].decode("utf-8", "replace")}
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:  # records: "LEN key=value\n", LEN counts them all
        sp = data.index(b" ", pos)
        n = int(data[pos:sp])
        if n <= sp - pos:
            raise ValueError(f"bad pax record length {n}")
        k, _, v = data[sp + 1:pos + n - 1].partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += n
    return out


def walk(get, size: int):
    """Walk tar members -> (members [(name, type, lo, data_lo, data_size, hi)], problem or None,
    the name of the member the tar broke off in, if known).

    `get(pos, n)` returns bytes [pos, pos+n). pax / GNU long-name members are folded into the
    member they describe (its lo is the extension header's offset, its name and size those the
    extension gives), so a sample range covers them. hi: the end of the padded data."""
    members, pos, ext, ext_lo = [], 0, {}, None
    while pos < size:
        if pos + BLOCK > size:
            return members, f"truncated: {size - pos} bytes of a tar header at byte {pos}", None
        hdr = get(pos, BLOCK)
        if hdr == _ZERO:
            return members, None, None  # end-of-archive
        try:
            stored = tarformat.octal_field(hdr[148:156], "checksum", "")
            length = tarformat.octal_field(hdr[124:136], "size", "")
        except ValueError:
            stored, length = -1, 0
        if stored != tarformat.header_checksum(hdr):
            return members, f"corrupt tar header at byte {pos} (bad checksum): nothing after it is read", None
        typ = hdr[156:157]
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if hdr[257:262] == b"ustar" and hdr[345]:
            name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        if typ not in (b"x", b"L") and "size" in ext:  # pax: sizes past the octal field
            length = int(ext["size"])
        hi = pos + BLOCK + length + (-length % BLOCK)
        if hi > size:
            return members, (f"truncated: member {ext.get('path', name)!r} at byte {pos} needs "
                             f"{hi} bytes, the tar has {size}"), ext.get("path", name)
        if typ in (b"x", b"L"):
            try:
                ext = {**ext, **_extension(typ, get(pos + BLOCK, length))}
            except (ValueError, IndexError) as e:
                return members, f"corrupt pax/GNU header at byte {pos} ({e})", None
            ext_lo = pos if ext_lo is None else ext_lo
        else:
            members.append((ext.get("path", name), typ, pos if ext_lo is None else ext_lo,
                            pos + BLOCK, length, hi))
            ext, ext_lo = {}, None
        pos = hi
    return members, None, None  # no end-of-archive blocks: tolerated (no member is lost)


@dataclass
class _Run:
    """Adjacent members of one key: a sample candidate [lo, hi) of the tar."""
    key: str
    lo: int
    hi: int
    exts: list
    problem: str | None = None


def group_samples(members) -> tuple[list[_Run], list[tuple[str, str]]]:
    """Members -> (usable samples in tar order, [(key or member, reason)] of what is left out)."""
    runs: list[_Run] = []
    problems: list[tuple[str, str]] = []
    for name, typ, lo, _, _, hi in members:
        if typ not in (b"0", b"\0"):
            what = {b"5": "directory", b"g": "pax global header"}.get(typ, f"type {typ!r}")
            if typ != b"g":
                problems.append((name, f"not a regular file ({what}): not a sample member"))
            runs.append(_Run("", lo, hi, [], "gap"))  # keeps its neighbours from merging
            continue
        try:
            key, ext = tarformat.split_name(name)
        except tarformat.TarFormatError:
            problems.append((name, "member name has no key.extension form"))
            runs.append(_Run("", lo, hi, [], "gap"))
            continue
        if runs and runs[-1].key == key and runs[-1].problem != "gap":
            run = runs[-1]
            run.hi = hi
        else:
            run = _Run(key, lo, hi, [])
            runs.append(run)
        if ext in run.exts and run.problem is None:
            run.problem = f"duplicate member .{ext}"
        run.exts.append(ext)
    count: dict[str, int] = {}
    for r in runs:
        if r.problem != "gap":
            count[r.key] = count.get(r.key, 0) + 1
    good = []
    for r in runs:
        if r.problem == "gap":
            continue
        if count[r.key] > 1:
            r.problem = (f"members of this key are not contiguous ({count[r.key]} separate runs); "
                         f"all of them left out")
        elif image_member(r.exts) is None and r.problem is None:
            r.problem = f"no image member ({'/'.join(IMAGE_MEMBERS)}) among {sorted(r.exts)}"
        if r.problem:
            problems.append((r.key, r.problem))
        else:
            good.append(r)
    return good, problems


def parse_members(buf, *, where: str = "") -> tuple[str, dict]:
    """One sample's bytes (pax / GNU headers allowed) -> (key, {ext: memoryview of the data}).

    The loader's parser for scanned indexes: tarformat.parse_sample reads plain ustar only."""
    mv = memoryview(buf).cast("B") if memoryview(buf).format != "B" else memoryview(buf)
    members, problem, _ = walk(lambda pos, n: bytes(mv[pos:pos + n]), len(mv))
    if problem:
        raise tarformat.TarFormatError(f"{where}: {problem}".lstrip(": "))
    for name, typ, *_ in members:
        if typ not in (b"0", b"\0"):
            raise tarformat.TarFormatError(f"{where}: member {name!r} is not a regular file".lstrip(": "))
    return tarformat.sample_from_members([(m[0], mv[m[3]:m[3] + m[4]]) for m in members], where=where)


def segments(name: str, size: int, samples: list[_Run]) -> list[dict]:
    """Index entries: one per run of adjacent samples (a sample left out splits the tar)."""
    out: list[dict] = []
    for r in samples:
        if out and out[-1]["offsets"][-1] == r.lo:
            seg = out[-1]
        else:
            seg = {"name": name, "samples": 0, "bytes": size, "offsets": [r.lo], "first_key": None,
                   "keys": [], "images": []}
            out.append(seg)
        seg["samples"] += 1
        seg["offsets"].append(r.hi)
        seg["keys"].append(r.key)
        seg["images"].append(image_member(r.exts))
    return out


def scan_tar(url: str, *, window: int = DEFAULT_WINDOW, retries: int = 8) -> dict:
    """One tar -> {name, bytes, segments, problems, members, requests, bytes_read}."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    size = storage.size(url)
    read = _Window(url, size, window, retries)
    members, tar_problem, broken = walk(read.get, size)
    samples, problems = group_samples(members)
    if tar_problem:
        # The sample being read when the tar broke off may have lost members: left out, unless
        # the broken member is known to start another key.
        cut = members[-1][5] if members else 0
        try:
            other = broken is not None and tarformat.split_name(broken)[0] != samples[-1].key
        except (tarformat.TarFormatError, IndexError):
            other = False
        if samples and samples[-1].hi == cut and not other:
            lost = samples.pop()
            problems.append((lost.key, f"last sample before the damage, may be incomplete ({tar_problem})"))
        elif broken is not None:
            try:
                broken = tarformat.split_name(broken)[0]
            except tarformat.TarFormatError:
                pass
            problems.append((broken, f"cut off: {tar_problem}"))
        problems.append(("", tar_problem))
    return {"name": name, "bytes": size, "segments": segments(name, size, samples),
            "problems": problems, "members": len(members), "requests": read.requests,
            "bytes_read": read.bytes_read}


# --------------------------------------------------------------------------- the command


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="etsdm index", description=__doc__.split("\n")[0])
    p.add_argument("pattern", help="tar URLs: a brace pattern (s3://b/p/{00000..00099}.tar) or a folder")
    p.add_argument("--out", help="where index.json goes: must be the tars' folder (the default)")
    p.add_argument("--resolution", type=int, required=True,
                   help="the loader fits every image to N x N (set network.resolution to N)")
    p.add_argument("--mode", choices=FIT_MODES, default="center-crop", help="how images are fitted")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3, help="1: grayscale, 3: RGB")
    p.add_argument("--label-field", help="labels from this field of each .json (where no .cls is)")
    p.add_argument("--num-classes", type=int, help="labels lie in [0, K) (needed for data.use_labels)")
    p.add_argument("--workers", type=int, default=8, help="tars scanned at once (threads)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="bytes per header read")
    p.add_argument("--retries", type=int, default=8, help="transient read errors per request")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.resolution < 1 or a.workers < 1 or a.window < BLOCK or (a.num_classes is not None
                                                                 and a.num_classes < 1):
        p.error(f"--resolution, --workers, --num-classes must be >= 1 and --window >= {BLOCK}")
    return a


def _scan_all(urls, names, folder, a) -> list[dict]:
    """Every tar's result, from _index_scan/ where a previous run left one for the same size."""
    from tqdm import tqdm

    scan_dir = storage.join(folder, SCAN_DIR)
    done = set(storage.listdir(scan_dir)) if storage.exists(scan_dir) else set()
    results: dict[str, dict] = {}
    todo = []
    for url, name in zip(urls, names):
        if f"{name}.json" in done:
            old = storage.read_json(storage.join(scan_dir, f"{name}.json"))
            try:
                same = old.get("bytes") == storage.size(url)
            except OSError:
                same = False
            if same:
                results[name] = old
                continue
        todo.append((url, name))
    if results:
        print(f"etsdm index: resuming: {len(results)} of {len(urls)} tars already scanned",
              file=sys.stderr)
    bar = tqdm(total=len(urls), initial=len(results), unit="tar", file=sys.stderr,
               disable=a.no_progress, desc="index")

    def one(url: str, name: str) -> dict:
        try:
            res = scan_tar(url, window=a.window, retries=a.retries)
        except OSError as e:  # missing / unreadable: listed, not saved (a rerun tries again)
            return {"name": name, "bytes": None, "segments": [], "failed": True,
                    "problems": [["", f"cannot read: {e}"]], "requests": 0, "bytes_read": 0}
        storage.write_json_atomic(storage.join(scan_dir, f"{name}.json"), res, indent=None)
        return res

    try:
        with concurrent.futures.ThreadPoolExecutor(a.workers) as pool:
            futs = [pool.submit(one, url, name) for url, name in todo]
            for f in concurrent.futures.as_completed(futs):
                r = f.result()
                results[r["name"]] = r
                bar.update(1)
    finally:
        bar.close()
    return [results[n] for n in names]


def fingerprint(entries: list[dict]) -> str:
    """What identifies a scanned set: every entry's tar name, size, sample ranges and keys."""
    h = hashlib.sha256()
    for s in entries:
        h.update(json.dumps([s["name"], s["bytes"], s["offsets"], s["keys"]]).encode())
    return h.hexdigest()


def build_index(results: list[dict], a, pattern: str) -> tuple[dict, list[str]]:
    """The index document and the skipped lines (shard, key, reason) of scanned tars."""
    entries = [seg for r in results for seg in r["segments"]]
    skipped = [f"{r['name']}\t{key}\t{why}" for r in results for key, why in r["problems"]]
    if not entries:
        raise ScanError(f"{pattern}: no usable sample in {len(results)} tars "
                        f"(first problem: {skipped[0] if skipped else 'no members'})")
    formats = sorted({e for s in entries for e in s["images"]})
    index = {
        "format": INDEX_FORMAT, "shards": entries,
        "total_samples": sum(s["samples"] for s in entries),
        "total_bytes": sum(r["bytes"] for r in results if r["bytes"] is not None),
        "resolution": [a.resolution, a.resolution], "channels": a.channels,
        "image_format": formats[0] if len(formats) == 1 else "mixed",
        "label_map": None, "num_classes": a.num_classes, "fingerprint": fingerprint(entries),
        "scan": {"fit": a.mode, "label_field": a.label_field, "source": pattern},
        "skipped": {"count": len(skipped), "list_file": SKIPPED},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return index, skipped


def run(a: argparse.Namespace) -> dict:
    urls = expand(a.pattern)
    folder, names = split_folder(urls)
    index_url = storage.join(folder, "index.json")
    if a.out:
        out = a.out.rstrip("/")
        out_folder = out[: -len("index.json")].rstrip("/") if out.endswith("index.json") else out
        if out_folder.rstrip("/") != folder.rstrip("/"):
            raise ScanError(f"--out {a.out}: index.json must sit in the tars' folder {folder} "
                            f"(the loader finds shards relative to it)")
    if storage.exists(index_url) and not a.overwrite:
        raise ScanError(f"{index_url} exists; use --overwrite to replace it")
    results = _scan_all(urls, names, folder, a)
    index, skipped = build_index(results, a, a.pattern)
    storage.write_bytes_atomic(storage.join(folder, SKIPPED), "".join(f"{s}\n" for s in skipped).encode())
    storage.write_json_atomic(index_url, index, indent=None)  # last: the commit
    index["_requests"] = sum(r["requests"] for r in results)
    index["_bytes_read"] = sum(r["bytes_read"] for r in results)
    index["_skipped_lines"] = skipped
    return index


def main(argv: list[str] | None = None) -> int:
    a = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        index = run(a)
    except (ScanError, ShardIndexError) as e:
        print(f"etsdm index: error: {e}", file=sys.stderr)
        return 2
    skipped = index["_skipped_lines"]
    for line in skipped[:20]:
        print(f"etsdm index: left out: {line}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"etsdm index: ... {len(skipped) - 20} more", file=sys.stderr)
    folder = split_folder(expand(a.pattern))[0]
    print(f"etsdm index: {index['total_samples']} samples in {len({s['name'] for s in index['shards']})} "
          f"tars ({index['total_bytes'] / 1e6:.1f} MB; {index['_bytes_read'] / 1e6:.2f} MB read in "
          f"{index['_requests']} requests), {len(skipped)} left out (listed in "
          f"{storage.join(folder, SKIPPED)}) -> {storage.join(folder, 'index.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
