"""A run directory as written by training: read by training (resume), `etsdm export` and the
evaluation jobs, so it lives outside train/ and never imports DeepSpeed.

    RUN/checkpoints/ckpt-{images:012d}/  DeepSpeed's files, ema.pt, manifest.json, COMMITTED
    RUN/latest                           {"checkpoint": name, "images": n}; a hint, never trusted alone

A checkpoint counts only when COMMITTED holds the sha256 of its manifest.json and every file the
manifest lists is there with its size (and, when asked, its sha256). An exported file (`etsdm
export`) is one EMA's weights with the model config embedded: safetensors with metadata
{"etsdm": JSON} or a torch.save zip {"state_dict", "config"}; both load with no unpickling.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile

import torch

from etsdm_dist.data import retry, storage

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MARKER = "COMMITTED"
MANIFEST = "manifest.json"
EMA_FILE = "ema.pt"
LATEST = "latest"
FORMAT = 1
CKPT_NAME = re.compile(r"^ckpt-(\d{12})$")


def ckpt_name(images: int) -> str:
    return f"ckpt-{int(images):012d}"


def ckpt_images(name: str) -> int | None:
    m = CKPT_NAME.match(name)
    return int(m.group(1)) if m else None
EXPORT_FORMAT = "etsdm-export-1"
EXPORT_META_KEY = "etsdm"


def sha256_file(path: str) -> str:
    """Streaming sha256 of a local file or remote object."""
    h = hashlib.sha256()
    with (open(path, "rb") if not storage.is_remote(path) else storage.open_reader(path)) as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sizes(path: str) -> dict[str, int]:
    """File name -> size in one listing (local dir or remote prefix)."""
    if not storage.is_remote(path):
        return {e.name: e.stat().st_size for e in os.scandir(path) if e.is_file()}
    fs_of = getattr(storage, "_fs", None)
    if fs_of is None:
        return {n: storage.size(storage.join(path, n)) for n in storage.listdir(path)}
    fs, p = fs_of(path)
    p = p.rstrip("/")
    # An emptied prefix can list itself (SeaweedFS keeps directory entries): not a file in it.
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in fs.ls(p, detail=True)
            if e.get("type") != "directory" and e["name"].rstrip("/") != p}


def is_gone(path: str) -> bool:
    """No files left: a deleted checkpoint. Object stores with real directories (SeaweedFS's
    filer) keep listing the empty prefix after every object under it was removed."""
    try:
        return not file_sizes(path)
    except FileNotFoundError:
        return True


# --------------------------------------------------------------------------- verification
#
# Two verdicts must never be confused: a checkpoint *proven bad* (a file missing, or its size or
# sha256 not the manifest's; manifest bytes that do not match COMMITTED or do not parse) is passed
# over for an older one; a checkpoint that *could not be read* (storage errors after retries) stops
# the resume with CheckpointReadError, because falling back would later delete an intact newer
# checkpoint as an abandoned timeline.

READ_RETRIES = 5
READ_BACKOFF_S = 0.5


class CheckpointReadError(OSError):
    """A checkpoint could not be read (not proven bad): resuming from an older one would roll the
    run back, so the caller stops instead."""


def retrying(fn, what: str):
    """fn() with transient storage errors retried (backoff with jitter). FileNotFoundError passes
    through (a missing file is evidence); any other failure becomes CheckpointReadError."""
    for attempt in range(READ_RETRIES + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as e:
            if not retry.is_transient(e) or attempt == READ_RETRIES:
                tries = f"after {attempt + 1} tries" if attempt else "(not retryable)"
                raise CheckpointReadError(
                    f"{what}: could not read it {tries}: {type(e).__name__}: {e}. Not falling back to "
                    f"an older checkpoint (that would discard this one); fix the storage and rerun") from e
            log.warning("%s: transient error (%s: %s), retry %d/%d", what, type(e).__name__, e,
                        attempt + 1, READ_RETRIES)
            if storage.is_remote(what):
                storage.invalidate(what)  # the next try gets a fresh connection
            retry.sleep_backoff(attempt, READ_BACKOFF_S)
    raise AssertionError("unreachable")


def check_committed(path: str) -> tuple[dict | None, str | None]:
    """The cheap half of `verify`: COMMITTED, manifest.json and every listed file's size.
    (manifest, None) if they hold, (None, reason) if the checkpoint is proven bad or uncommitted;
    raises CheckpointReadError when storage would not say."""
    try:
        marker = retrying(lambda: storage.read_bytes(storage.join(path, MARKER)), storage.join(path, MARKER))
    except FileNotFoundError:
        return None, "no COMMITTED marker (save did not finish)"
    try:
        data = retrying(lambda: storage.read_bytes(storage.join(path, MANIFEST)), storage.join(path, MANIFEST))
    except FileNotFoundError:
        return None, f"{MANIFEST} is missing"
    try:
        recorded = json.loads(marker).get("manifest_sha256")
    except (ValueError, AttributeError):
        return None, f"{MARKER} is not the JSON a save writes"
    if recorded != hashlib.sha256(data).hexdigest():
        return None, "manifest.json does not match the sha256 recorded in COMMITTED"
    try:
        manifest = json.loads(data)
        files = {f: (int(m["size"]), str(m["sha256"])) for f, m in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"manifest.json does not parse ({type(e).__name__}: {e})"
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if manifest.get("format") != FORMAT or manifest.get("name") != name:
        return None, f"manifest format/name mismatch ({manifest.get('format')}, {manifest.get('name')})"
    try:
        sizes = retrying(lambda: file_sizes(path), path)
    except FileNotFoundError:
        return None, "the checkpoint directory is gone"
    for fname, (size, _) in files.items():
        if fname not in sizes:
            return None, f"{fname} is missing"
        if sizes[fname] != size:
            return None, f"{fname} has {sizes[fname]} bytes, manifest says {size}"
    return manifest, None


def check_files(path: str, manifest: dict, names) -> str | None:
    """The expensive half of `verify`: sha256 of the files `names` against the manifest. A reason
    naming the first bad file, or None; raises CheckpointReadError when a file cannot be read."""
    for fname in names:
        url = storage.join(path, fname)
        try:
            digest = retrying(lambda: sha256_file(url), url)
        except FileNotFoundError:
            return f"{fname} is missing"
        if digest != manifest["files"][fname]["sha256"]:
            return f"{fname} sha256 differs from the manifest"
    return None


def verify(path: str, *, sha256: bool = False) -> tuple[dict | None, str | None]:
    """(manifest, None) if `path` is a committed, intact checkpoint; (None, reason) if it is
    proven bad or was never committed. Raises CheckpointReadError when it could not be read."""
    manifest, reason = check_committed(path)
    if manifest is not None and sha256:
        reason = check_files(path, manifest, sorted(manifest["files"]))
    return (None, reason) if reason else (manifest, None)


def candidates(run_dir: str) -> tuple[list[str], str | None]:
    """(checkpoint dir names newest first, the name `latest` points at or None)."""
    root = storage.join(run_dir, CHECKPOINTS)
    try:
        names = sorted((n for n in retrying(lambda: storage.listdir(root), root) if ckpt_images(n) is not None),
                       key=ckpt_images, reverse=True)
    except FileNotFoundError:
        names = []
    latest = None
    try:  # only a hint, used for messages
        latest = storage.read_json(storage.join(run_dir, LATEST)).get("checkpoint")
    except Exception:
        pass
    return names, latest


def passed_over(path: str, reason: str, latest: str | None) -> str | None:
    """The message for a checkpoint dir passed over for `reason`, or None for a deleted one."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    try:
        gone = name != latest and is_gone(path)
    except Exception:  # noqa: BLE001 - only decides whether to mention it: do
        gone = False
    if gone:
        return None
    if name == latest:
        return f"`latest` points here, but {reason}; fell back to an older checkpoint"
    return reason


def find_resume(run_dir: str, *, sha256: bool = False
                ) -> tuple[tuple[str, dict] | None, list[tuple[str, str]]]:
    """((path, manifest) of the newest intact committed checkpoint or None, ignored) where
    `ignored` lists (path, reason) for every newer checkpoint dir that was skipped, for the caller
    to log. `latest` is only cross-checked: a partial or corrupt target is reported, never used.
    A checkpoint that cannot be read raises CheckpointReadError rather than being skipped.
    No collectives: training resumes through checkpoint.resume, which shares the hashing."""
    root = storage.join(run_dir, CHECKPOINTS)
    names, latest = candidates(run_dir)
    ignored: list[tuple[str, str]] = []
    found = None
    for name in names:
        path = storage.join(root, name)
        manifest, reason = verify(path, sha256=sha256)
        if manifest is not None:
            found = (path, manifest)
            break
        message = passed_over(path, reason, latest)
        if message is not None:
            ignored.append((path, message))
    if latest and latest not in names:
        ignored.append((storage.join(root, latest), "`latest` points at a checkpoint that does not exist"))
    return found, ignored


def read_ema(ckpt_path: str, manifest: dict) -> dict:
    """ema.pt of a verified checkpoint, sha256-checked against its manifest, weights_only."""
    with tempfile.TemporaryDirectory(prefix="etsdm-ema-") as tmp:
        local = os.path.join(tmp, EMA_FILE)
        storage.download_file(storage.join(ckpt_path, EMA_FILE), local)
        if sha256_file(local) != manifest["files"][EMA_FILE]["sha256"]:
            raise RuntimeError(f"{storage.join(ckpt_path, EMA_FILE)}: sha256 differs from the manifest")
        return torch.load(local, map_location="cpu", weights_only=True)


def newest_ema(run: str, ema_index: int | None = None) -> tuple[dict, dict, dict]:
    """(EMA state incl. buffers, the run's config dict, info) of a run's newest committed checkpoint;
    `ema_index` defaults to the run's `sample.ema`. ValueError without a checkpoint or for an index
    out of range."""
    found, _ = find_resume(run)
    if found is None:
        raise ValueError(f"{run}: no committed checkpoint")
    ckpt_path, manifest = found
    run_cfg = manifest["config"]
    ema = read_ema(ckpt_path, manifest)
    decays = ema["decays"]
    index = int(run_cfg.get("sample", {}).get("ema", 0) if ema_index is None else ema_index)
    if not 0 <= index < len(decays):
        name = "sample.ema" if ema_index is None else "--ema-index"
        raise ValueError(f"{name} {index} out of range: {run} has EMA decays {decays}")
    state = dict(ema["ema"][index])
    state.update(ema.get("buffers", {}))
    info = {"checkpoint": ckpt_path, "images": manifest.get("images"), "ema_index": index,
            "ema_decay": decays[index]}
    return state, run_cfg, info


def load_exported(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, config) from an exported file, local or remote; never unpickles objects."""
    data = storage.read_bytes(path)
    try:
        return _parse_exported(data)
    except Exception as e:  # not an export: say which file and why
        raise ValueError(f"{path}: not a file written by `etsdm export` ({type(e).__name__}: {e})") from e


def _parse_exported(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    if data[:2] == b"PK":  # torch.save's zip container
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return obj["state_dict"], obj["config"]
    from safetensors.torch import load

    n = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, then the JSON header
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return load(data), json.loads(meta[EXPORT_META_KEY])
