"""`etsdm verify` for a set indexed by `etsdm index` (tar_scan.py): other tools' tars.

Such a set has no sha256 per shard (the scan reads headers only) and its own keys and member
types, so verify.py hands it here. Re-downloads every tar and checks what the loader relies on:
the tar still has the indexed size, every indexed range parses as one sample with the indexed key
and image member (pax headers allowed), keys are unique across the set, labels (.cls, or the
index's .json field) are integers in [0, num_classes), and (unless --no-decode) every image fits
to the indexed resolution through the loader's own decode path, size-checked before decoding.
"""
from __future__ import annotations

import sys

from etsdm_dist.data import storage
from etsdm_dist.data import tarformat
from etsdm_dist.data.decode import PIL_FORMATS, decode_fit, image_member
from etsdm_dist.data.tar_scan import fingerprint, label_from_json, parse_members

MAX_REPORTED = 50


def _check_sample(fields: dict, want_ext: str, index: dict, decode: bool) -> str | None:
    ext = image_member(fields)
    if ext != want_ext:
        return f"image member .{ext}, index says .{want_ext}"
    field = index["scan"].get("label_field")
    raw = fields.get("cls")
    try:
        if raw is None and field is not None and "json" in fields:
            raw = label_from_json(fields["json"], field)
        if raw is not None:
            tarformat.parse_label(raw, index.get("num_classes"), "index.json num_classes")
    except ValueError as e:
        return str(e)
    if decode:
        n = index["resolution"][0]
        try:
            decode_fit(fields[ext], index["channels"], n, index["scan"]["fit"], [PIL_FORMATS[ext]])
        except Exception as e:  # noqa: BLE001 - what the loader would count as a bad sample
            return f"image does not decode ({type(e).__name__}: {e})"
    return None


def verify_scanned(dst: str, index: dict, *, decode: bool = True, retries: int = 8,
                   progress: bool = False) -> list[str]:
    """All problems found in a scanned set (empty: sound); each names the tar and key."""
    errors: list[str] = []
    entries = index["shards"]
    if fingerprint(entries) != index.get("fingerprint"):
        errors.append(f"{storage.join(dst, 'index.json')}: fingerprint does not match the entries")
    by_name: dict[str, list[dict]] = {}
    for s in entries:
        by_name.setdefault(s["name"], []).append(s)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=index["total_samples"], unit="img", file=sys.stderr, desc="verify")
    seen: dict[str, str] = {}
    for name, segs in by_name.items():
        try:
            data = storage.read_bytes(storage.join(dst, name), retries=retries)
        except FileNotFoundError:
            errors.append(f"{name}: tar missing ({sum(s['samples'] for s in segs)} indexed samples)")
            continue
        except OSError as e:
            errors.append(f"{name}: cannot read ({e})")
            continue
        if len(data) != segs[0]["bytes"]:
            errors.append(f"{name}: {len(data)} bytes, index says {segs[0]['bytes']} (changed since "
                          f"`etsdm index`? index it again)")
            continue
        for s in segs:
            keys, images, offs = s.get("keys"), s.get("images"), s["offsets"]
            if not (isinstance(keys, list) and isinstance(images, list)
                    and len(keys) == len(images) == s["samples"]):
                errors.append(f"{name}: entry at byte {offs[0]}: 'keys'/'images' do not list "
                              f"{s['samples']} samples")
                continue
            for i, (key, ext) in enumerate(zip(keys, images)):
                try:
                    got, fields = parse_members(data[offs[i]:offs[i + 1]], where=name)
                except tarformat.TarFormatError as e:
                    errors.append(f"{name}: sample {key}: bytes [{offs[i]}, {offs[i + 1]}): {e}")
                    continue
                if got != key:
                    errors.append(f"{name}: bytes [{offs[i]}, {offs[i + 1]}) hold key {got}, "
                                  f"index says {key}")
                    continue
                uid = f"{key}"
                if uid in seen:
                    errors.append(f"{name}: sample {key}: duplicate key (also in {seen[uid]})")
                seen.setdefault(uid, name)
                problem = _check_sample(fields, ext, index, decode)
                if problem:
                    errors.append(f"{name}: sample {key}: {problem}")
                if bar:
                    bar.update(1)
        if len(errors) > MAX_REPORTED:
            break
    if bar:
        bar.close()
    return errors
