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
import os
import re
import tempfile

import torch

from etsdm_dist.data import storage

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


def verify(path: str, *, sha256: bool = False) -> tuple[dict | None, str | None]:
    """(manifest, None) if `path` is a committed, intact checkpoint, else (None, reason)."""
    try:
        marker = storage.join(path, MARKER)
        if not storage.exists(marker):
            return None, "no COMMITTED marker (save did not finish)"
        data = storage.read_bytes(storage.join(path, MANIFEST))
        if storage.read_json(marker).get("manifest_sha256") != hashlib.sha256(data).hexdigest():
            return None, "manifest.json does not match the sha256 recorded in COMMITTED"
        manifest = json.loads(data)
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if manifest.get("format") != FORMAT or manifest.get("name") != name:
            return None, f"manifest format/name mismatch ({manifest.get('format')}, {manifest.get('name')})"
        sizes = file_sizes(path)
        for fname, meta in manifest["files"].items():
            if fname not in sizes:
                return None, f"{fname} is missing"
            if sizes[fname] != meta["size"]:
                return None, f"{fname} has {sizes[fname]} bytes, manifest says {meta['size']}"
            if sha256 and sha256_file(storage.join(path, fname)) != meta["sha256"]:
                return None, f"{fname} sha256 differs from the manifest"
        return manifest, None
    except Exception as e:  # unreadable JSON, storage errors: the checkpoint is not usable
        return None, f"unreadable: {type(e).__name__}: {e}"


def find_resume(run_dir: str, *, sha256: bool = False
                ) -> tuple[tuple[str, dict] | None, list[tuple[str, str]]]:
    """((path, manifest) of the newest intact committed checkpoint or None, ignored) where
    `ignored` lists (path, reason) for every newer checkpoint dir that was skipped, for the loop
    to log. `latest` is only cross-checked: a partial or corrupt target is reported, never used.
    No collectives: call it on rank 0 and broadcast, or on every rank."""
    root = storage.join(run_dir, CHECKPOINTS)
    ignored: list[tuple[str, str]] = []
    try:
        names = sorted((n for n in storage.listdir(root) if ckpt_images(n) is not None),
                       key=ckpt_images, reverse=True)
    except FileNotFoundError:
        names = []
    latest = None
    try:
        latest = storage.read_json(storage.join(run_dir, LATEST)).get("checkpoint")
    except Exception:
        pass
    found = None
    for name in names:
        path = storage.join(root, name)
        manifest, reason = verify(path, sha256=sha256)
        if manifest is not None:
            found = (path, manifest)
            break
        if name != latest and is_gone(path):
            continue
        if name == latest:
            reason = f"`latest` points here, but {reason}; fell back to an older checkpoint"
        ignored.append((path, reason))
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
