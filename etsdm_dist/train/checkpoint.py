"""Checkpoints as transactions, on a local path or s3://, resumable under another world size.

Layout under train.run_dir:
    checkpoints/ckpt-{images:012d}/  DeepSpeed's files, ema.pt, manifest.json, COMMITTED
    latest                           {"checkpoint": name, "images": n}; a hint, never trusted alone

Save order (`save`, collective): every rank stages its own files in a private local dir, hashes
them and publishes them (rename into place, or upload) -> barrier -> rank 0 writes manifest.json
(size + sha256 of every file, world size, stage, precision, config, counters) -> COMMITTED
(holding the manifest's sha256) -> `latest` -> retention. A crash at any point leaves either the
previous committed checkpoint or the new one; `resume` never picks a partial one. On a local
run_dir every data file is fsynced, then the directory, before manifest.json and COMMITTED, so a
power loss cannot leave a COMMITTED checkpoint with empty files.

Resume (`resume`, then `needs_universal` BEFORE build_engine, then `load`): `resume` checks every
file of the newest committed checkpoint against its manifest (size and sha256, the hashing shared
among all ranks) and falls back to an older one only when a file is proven bad; a checkpoint that
cannot be read (storage errors after retries) stops the resume. Retention and the save that reuses
a name delete a committed checkpoint only when it is superseded or proven bad, and say so. The same world
size, ZeRO stage and precision (or ZeRO-0 -> ZeRO-0 at any world size) loads DeepSpeed's files
directly. Any other layout is converted by reshard.py: rank 0 of each host writes a canonical
per-parameter state into a local cache (ds_to_universal for ZeRO-1/2/3 sources), and every rank
writes it into its normally built engine. Every direction among ZeRO 0/1/2/3, world sizes and
fp32/bf16 is exact for fp32 masters, Adam moments and steps.

Unpickling: our files are loaded with weights_only=True. DeepSpeed calls
torch.load(weights_only=False) throughout its checkpoint code, so every DeepSpeed file is first
checked with the weights-only loader (plus the four plain-data DeepSpeed types its files contain)
before DeepSpeed opens it: deepspeed_adapter.check_files / load_checkpoint / to_canonical.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Any

import torch
import torch.distributed as tdist

from etsdm_dist.redact import redact
from etsdm_dist.train import deepspeed_adapter as ds
from etsdm_dist.train import reshard
from etsdm_dist.data import storage
from etsdm_dist.config import ConfigError
from etsdm_dist.run_dir import (CHECKPOINTS, EMA_FILE, FORMAT, LATEST, MANIFEST, MARKER,  # noqa: F401
                                CheckpointReadError, candidates, check_committed, check_files, ckpt_images,
                                ckpt_name, file_sizes, find_resume, is_gone, passed_over, retrying,
                                sha256_file, verify)

log = logging.getLogger(__name__)
if not log.handlers:  # deletions and fallbacks must reach the run's output even with logging unset
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[etsdm] %(levelname)s %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)


def _rank_world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        tdist.barrier()


def _gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (small, JSON-able: file lists, host names)."""
    if _rank_world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * _rank_world()[1]
    tdist.all_gather_object(out, obj)
    return out


def cache_root(cache_dir: str | None = None) -> str:
    """Local scratch for staging uploads, downloads and universal conversions."""
    root = cache_dir or os.environ.get("ETSDM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"etsdm-cache-{os.getuid()}")
    os.makedirs(root, exist_ok=True)
    return root


# --------------------------------------------------------------------------- weights-only loading

# torch.load(weights_only=True) inside this block also accepts DeepSpeed's plain-data types.
weights_only_loads = ds.weights_only_loads


# --------------------------------------------------------------------------- save


def _fsync(path: str) -> None:
    """Flush a local file's data, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a directory; a file that cannot be flushed fails the save.
        if not (os.path.isdir(path) and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _clear_target(final: str) -> str | None:
    """Make way for a new checkpoint at `final` (rank 0). A dir already there is a save that never
    committed, or a committed checkpoint this run passed over at resume: it is deleted only if
    proven bad. Returns why the save cannot go on, or None."""
    try:
        if not retrying(lambda: storage.exists(final), final):
            return None
        if retrying(lambda: storage.exists(storage.join(final, MARKER)), final):
            manifest, reason = verify(final, sha256=True)
            if manifest is not None:
                return (f"checkpoint {final} is committed and intact, but this run did not resume from "
                        f"it: refusing to overwrite it (is another run writing to this run_dir? To "
                        f"rewind on purpose, move it away first)")
            log.warning("deleting checkpoint %s: proven bad (%s); this run resumed from an older one "
                        "and is writing it again", final, reason)
        else:
            log.info("deleting %s: a save that never committed (crash leftover)", final)
        _rmtree(final)
    except CheckpointReadError as e:
        return f"cannot make way for checkpoint {final}: {e}"
    return None


def _rmtree(path: str) -> None:
    """Delete a checkpoint dir; the marker goes first so a half-deleted one is never 'committed'."""
    marker = storage.join(path, MARKER)
    if storage.exists(marker):
        storage.remove(marker)
    if storage.exists(path):
        storage.remove(path, recursive=True)


def save(engine, ema, cfg, *, images: int, stats: Any = None,
         cache_dir: str | None = None) -> str:
    """Write checkpoint `ckpt-{images}` under cfg.train.run_dir (collective: all ranks call).

    `stats`: JSON-able loop state returned by `load`. No RNG state: the loop
    reseeds every step from the image counter. Returns the checkpoint path once committed (and
    `latest` updated).
    """
    run_dir = cfg.train.run_dir
    rank, world = _rank_world()
    name = ckpt_name(images)
    final = storage.join(run_dir, CHECKPOINTS, name)
    remote = storage.is_remote(run_dir)

    problem = None
    if rank == 0:
        try:  # a failure here must reach the other ranks, not leave them in the gather below
            problem = _clear_target(final)
            if problem is None:
                storage.makedirs(final)
                if not remote:
                    _fsync(os.path.dirname(final.rstrip("/")))
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            problem = f"cannot create checkpoint {final}: {type(e).__name__}: {e}"
    ema_state = ema.state_dict()  # collective
    problem = _gather(problem)[0]  # also the barrier: the dir exists before any rank writes
    if problem is not None:
        raise RuntimeError(problem)

    stage_parent = (tempfile.mkdtemp(prefix=f"stage-{name}-r{rank}-", dir=cache_root(cache_dir))
                    if remote else os.path.join(final, f".stage-rank{rank}"))
    os.makedirs(stage_parent, exist_ok=True)
    stage = os.path.join(stage_parent, name)
    try:
        # DeepSpeed writes this rank's files only (and its recovery scripts beside the tag dir,
        # which we do not publish). save_latest=False: its `latest` is a non-atomic plain write.
        engine.save_checkpoint(stage_parent, tag=name, save_latest=False)
        os.makedirs(stage, exist_ok=True)
        if rank == 0:
            torch.save(ema_state, os.path.join(stage, EMA_FILE))
        files = {}
        for fname in sorted(os.listdir(stage)):
            src = os.path.join(stage, fname)
            if not os.path.isfile(src):
                raise RuntimeError(f"unexpected directory {src} in DeepSpeed's checkpoint output")
            files[fname] = {"size": os.path.getsize(src), "sha256": sha256_file(src)}
            if remote:
                storage.upload_file(src, storage.join(final, fname))
            else:
                _fsync(src)  # data on disk before the manifest vouches for it
                os.replace(src, os.path.join(final, fname))
        if not remote:
            _fsync(final)  # and the renames
    finally:
        shutil.rmtree(stage_parent, ignore_errors=True)

    per_rank = _gather({"files": files})
    _barrier()  # every rank's files are in place (uploads confirmed) before anything commits

    if rank == 0:
        all_files: dict[str, dict] = {}
        for r, entry in enumerate(per_rank):
            for fname, meta in entry["files"].items():
                if fname in all_files:
                    raise RuntimeError(f"checkpoint {final}: {fname} written by two ranks")
                all_files[fname] = meta
        manifest = {
            "format": FORMAT,
            "name": name,
            "images": int(images),
            "world_size": world,
            "zero_stage": cfg.train.zero_stage,
            "precision": cfg.train.precision,
            "config": redact(cfg.to_dict()),  # readers take network/diffusion/etsdm/sample only
            "stats": stats,
            "files": all_files,
            "versions": {"torch": torch.__version__, "deepspeed": ds.check_version()},
            "created_unix": time.time(),
        }
        data = (json.dumps(manifest, indent=1) + "\n").encode()
        storage.write_bytes_atomic(storage.join(final, MANIFEST), data)
        storage.write_json_atomic(storage.join(final, MARKER),
                                  {"manifest_sha256": hashlib.sha256(data).hexdigest()})
        storage.write_json_atomic(storage.join(run_dir, LATEST), {"checkpoint": name, "images": int(images)})
        try:
            apply_retention(run_dir, int(images), cfg.train.keep_last, cfg.train.milestone_every,
                            round(cfg.train.checkpoint_kimg * 1000))
        except Exception as e:  # noqa: BLE001 - the checkpoint is committed; the next save retries
            log.warning("retention after %s skipped: %s: %s", name, type(e).__name__, e)
    _barrier()
    return final


# --------------------------------------------------------------------------- retention


def retained(images: list[int], keep_last: int, milestone_every: int, checkpoint_images: int) -> set[int]:
    """Which committed checkpoints (by image counter) to keep: the newest `keep_last`, plus every
    `milestone_every`-th regular checkpoint (index = images / checkpoint_images; off-grid ones such
    as preemption saves are never milestones)."""
    keep = set(sorted(images)[-keep_last:]) if keep_last > 0 else set()
    if milestone_every > 0 and checkpoint_images > 0:
        keep |= {i for i in images if i % (milestone_every * checkpoint_images) == 0}
    return keep


def apply_retention(run_dir: str, newest: int, keep_last: int, milestone_every: int,
                    checkpoint_images: int) -> list[str]:
    """Delete what the just-committed `newest` makes redundant (rank 0), each with a log line
    saying why: committed checkpoints outside `retained` (superseded), dirs never committed (crash
    leftovers), and committed checkpoints newer than `newest` (a timeline a resume abandoned) only
    when verified bad in full. A newer one that is intact or unreadable is kept, with a warning.
    Returns the deleted names."""
    root = storage.join(run_dir, CHECKPOINTS)
    committed, victims = [], {}
    for name in retrying(lambda: storage.listdir(root), root):
        n = ckpt_images(name)
        if n is None:
            continue
        path = storage.join(root, name)
        try:
            if retrying(lambda: storage.exists(storage.join(path, MARKER)), path):
                if n <= newest:
                    committed.append(n)
                    continue
                manifest, reason = verify(path, sha256=True)
                if manifest is not None:
                    log.warning("keeping checkpoint %s: committed and intact, yet newer than %s which "
                                "this run just committed (another run in this run_dir?); a resume "
                                "would pick it", path, ckpt_name(newest))
                    continue
                victims[name] = f"proven bad ({reason}), on a timeline this run abandoned at resume"
            elif n != newest and not retrying(lambda: is_gone(path), path):
                victims[name] = "never committed (a save that crashed)"
        except CheckpointReadError as e:
            log.warning("keeping %s for now: could not tell whether it is committed and intact (%s)", path, e)
    keep = retained(committed, keep_last, milestone_every, checkpoint_images) | {newest}
    for n in committed:
        if n not in keep:
            victims[ckpt_name(n)] = (f"superseded by {ckpt_name(newest)} (train.keep_last={keep_last}, "
                                     f"train.milestone_every={milestone_every})")
    for name in sorted(victims):
        level = logging.WARNING if victims[name].startswith("proven bad") else logging.INFO
        log.log(level, "deleting checkpoint %s: %s", storage.join(root, name), victims[name])
        _rmtree(storage.join(root, name))
    return sorted(victims)


# --------------------------------------------------------------------------- resume


def assign_files(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Which rank hashes which files: largest first, each to the least loaded rank (ties: lowest
    rank), so every file is read once and the slowest rank's share is small. Deterministic."""
    shares: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    for fname in sorted(sizes, key=lambda f: (-sizes[f], f)):
        r = min(range(world), key=lambda i: (load[i], i))
        shares[r].append(fname)
        load[r] += sizes[fname]
    return shares


def _outcome(fn) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except CheckpointReadError as e:
        return "unreadable", str(e)
    except Exception as e:  # noqa: BLE001 - carried to every rank, raised there
        return "error", f"{type(e).__name__}: {e}"


def _raise(status: str, message: str):
    raise (CheckpointReadError if status == "unreadable" else RuntimeError)(message)


def _agreed(fn) -> Any:
    """fn() run on rank 0; its result, or its failure raised, on every rank (collective)."""
    status, value = _gather(_outcome(fn) if _rank_world()[0] == 0 else None)[0]
    if status != "ok":
        _raise(status, value)
    return value


def resume(run_dir: str) -> tuple[tuple[str, dict] | None, list[tuple[str, str]]]:
    """Collective: ((path, manifest) of the newest committed checkpoint whose every file matches
    its manifest in size and sha256, or None; the (path, reason) of each newer dir passed over).
    Every rank gets the same answer. Rank 0 reads the listing and the manifests; the files are
    hashed once each, shared among all ranks. A proven-bad checkpoint is passed over with a WARNING
    naming it and the file; one that cannot be read (transient errors persisting after retries, or
    any other read error) raises CheckpointReadError on every rank instead of rolling back."""
    rank, world = _rank_world()
    root = storage.join(run_dir, CHECKPOINTS)
    names, latest = _agreed(lambda: candidates(run_dir))
    ignored: list[tuple[str, str]] = []
    found = None
    for name in names:
        path = storage.join(root, name)
        manifest, reason = _agreed(lambda: check_committed(path))
        if manifest is not None:
            t0 = time.perf_counter()
            sizes = {f: int(m["size"]) for f, m in manifest["files"].items()}
            mine = assign_files(sizes, world)[rank]
            verdicts = _gather(_outcome(lambda: check_files(path, manifest, mine)))
            bad = [value for status, value in verdicts if status == "ok" and value]
            if not bad:  # a proven-bad file outweighs a read failure elsewhere, nothing else does
                for status, value in verdicts:
                    if status != "ok":
                        _raise(status, value)
                found = (path, manifest)
                if rank == 0:
                    log.info("verified %s: %d files, %.1f MB, sha256 in %.1fs on %d rank(s)", path,
                             len(sizes), sum(sizes.values()) / 1e6, time.perf_counter() - t0, world)
                break
            reason = f"corrupt: {bad[0]}"
        message = _agreed(lambda: passed_over(path, reason, latest))
        if message is not None:
            ignored.append((path, message))
            if rank == 0:
                log.warning("ignoring checkpoint %s: %s", path, message)
    if latest and latest not in names:
        ignored.append((storage.join(root, latest), "`latest` points at a checkpoint that does not exist"))
        if rank == 0:
            log.warning("ignoring %s: %s", *ignored[-1])
    return found, ignored


# --------------------------------------------------------------------------- load


def needs_universal(manifest: dict, cfg, world_size: int) -> bool:
    """Whether resuming from `manifest` converts the checkpoint (reshard.py) instead of loading
    DeepSpeed's files directly: its world size, ZeRO stage or precision differs from this run's
    (ZeRO-0 -> ZeRO-0 at the same precision loads directly at any world size: one file holds
    everything). Call BEFORE build_engine and pass the answer as build_engine(load_universal=...);
    `load` checks that they agree."""
    src, dst = int(manifest["zero_stage"]), int(cfg.train.zero_stage)
    if src not in (0, 1, 2, 3):
        raise ConfigError(f"checkpoint {manifest['name']}: unknown ZeRO stage {src}")
    if src == 0 and dst == 0 and manifest["precision"] == cfg.train.precision:
        return False
    return (int(manifest["world_size"]) != int(world_size) or src != dst
            or manifest["precision"] != cfg.train.precision)


def _host_leader() -> bool:
    """Whether this rank is the lowest rank on its host (it fills the host's local cache)."""
    rank, _ = _rank_world()
    hosts = _gather(socket.gethostname())
    return hosts.index(hosts[rank]) == rank


def _localize(path: str, manifest: dict, cache: str, leader: bool) -> str:
    """A local dir with the checkpoint's files (downloaded and sha256-checked when remote)."""
    if not storage.is_remote(path):
        return path
    name = manifest["name"]
    local = os.path.join(cache, "download", name)
    if leader:
        shutil.rmtree(local, ignore_errors=True)
        for fname, meta in manifest["files"].items():
            dst = os.path.join(local, fname)
            storage.download_file(storage.join(path, fname), dst)
            if sha256_file(dst) != meta["sha256"]:
                raise RuntimeError(f"{storage.join(path, fname)}: sha256 differs from the manifest "
                                   f"(corrupt upload?); delete the checkpoint dir to resume from an older one")
    _barrier()
    return local


def load(engine, ema, path: str, manifest: dict, cfg, world_size: int, *,
         cache_dir: str | None = None) -> dict:
    """Restore engine (weights, optimizer, step counters) and EMA from a verified checkpoint
    (collective). Returns the loop state:
    {"images", "stats", "universal", "skipped_steps"}.
    An "rng" entry of older manifests is ignored: the loop reseeds every step."""
    universal = needs_universal(manifest, cfg, world_size)
    if universal != bool(engine.load_universal_checkpoint()):
        raise RuntimeError(
            f"the engine was built with load_universal={not universal}, but this checkpoint "
            f"(world size {manifest['world_size']}, ZeRO-{manifest['zero_stage']}, "
            f"{manifest['precision']}) needs load_universal={universal}: call "
            f"checkpoint.needs_universal() before build_engine")
    cache = os.path.join(cache_root(cache_dir), f"load-{manifest['name']}")
    leader = _host_leader()
    local = _localize(path, manifest, cache, leader)
    name = manifest["name"]
    try:
        if universal:
            canonical = os.path.join(cache, "canonical", name)
            failure = None
            if leader and not os.path.isdir(canonical):
                os.makedirs(os.path.dirname(canonical), exist_ok=True)
                try:
                    reshard.convert(local, canonical, int(manifest["zero_stage"]),
                                    reshard.trainable_names(engine))
                except Exception as e:  # tell the other ranks instead of leaving them in a barrier
                    failure = e
            failures = [f for f in _gather(None if failure is None else f"{type(failure).__name__}: {failure}") if f]
            if failure is not None:
                raise failure
            if failures:
                raise RuntimeError(f"converting checkpoint {path} failed on another host: {failures[0]}")
            reshard.restore(engine, canonical)
        else:
            ds.load_checkpoint(engine, os.path.dirname(local.rstrip("/")), name)
        ema.load_state_dict(torch.load(os.path.join(local, EMA_FILE), map_location="cpu",
                                       weights_only=True))
    finally:
        _barrier()
        if leader:
            shutil.rmtree(cache, ignore_errors=True)
    return {
        "images": int(manifest["images"]),
        "stats": manifest.get("stats"),
        "universal": universal,
        "skipped_steps": ds.counters(engine)["skipped_steps"],
    }
