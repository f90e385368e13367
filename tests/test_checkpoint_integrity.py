"""Checkpoint integrity (issue 13): resume verifies every file's sha256 and falls back only from a
checkpoint proven bad; a checkpoint that cannot be read stops the resume instead of rolling back;
retention deletes only superseded or proven-bad checkpoints and logs each deletion; data files and
their directory are fsynced before the manifest and COMMITTED."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from ds_worker import TinyNet, free_port, init_single_rank, make_cfg, train
from etsdm_dist import run_dir as rd
from etsdm_dist.data import storage
from etsdm_dist.train import checkpoint as C
from etsdm_dist.train import engine as E
from etsdm_dist.train.ema import EMA

MODEL = "mp_rank_00_model_states.pt"
LOGGER = "etsdm_dist.train.checkpoint"


def _engine(cfg):
    init_single_rank()
    engine = E.build_engine(cfg, TinyNet(), 1)
    return engine, EMA.from_config(engine, cfg)


def _flip_byte(path: str) -> None:
    """Bit rot: same size, so only sha256 can see it."""
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _messages(caplog, level=logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(rd, "READ_BACKOFF_S", 0.001)


@pytest.mark.parametrize("victim", [MODEL, C.EMA_FILE])
def test_flipped_byte_falls_back_and_is_not_recommitted(tmp_path, caplog, victim):
    run = str(tmp_path / "run")
    cfg = make_cfg(run, keep_last=10)
    engine, ema = _engine(cfg)
    older = C.save(engine, ema, cfg, images=train(engine, ema, cfg, range(2)))
    newest = C.save(engine, ema, cfg, images=train(engine, ema, cfg, range(2, 3)))
    good = {f: _sha(os.path.join(newest, f)) for f in os.listdir(newest)}
    _flip_byte(os.path.join(newest, victim))

    caplog.set_level(logging.INFO, logger=LOGGER)
    found, ignored = C.resume(run)  # what Trainer.start calls
    assert found[0] == older
    assert [p for p, _ in ignored] == [newest] and victim in ignored[0][1] and "sha256" in ignored[0][1]
    warnings = _messages(caplog, logging.WARNING)
    assert any(newest in m and victim in m for m in warnings), warnings

    # Resumed from the older one, the run reaches the same counter again: the corrupt checkpoint is
    # deleted (logged, as proven bad) and replaced by freshly trained state, not its own bytes.
    engine2, ema2 = _engine(cfg)
    C.load(engine2, ema2, found[0], found[1], cfg, 1)
    caplog.clear()
    assert C.save(engine2, ema2, cfg, images=train(engine2, ema2, cfg, range(2, 3))) == newest
    assert any(newest in m and "proven bad" in m and victim in m for m in _messages(caplog, logging.WARNING))
    manifest, reason = C.verify(newest, sha256=True)
    assert reason is None
    # fp32 training is deterministic: the rewritten weights are the ones before the bit flip.
    assert manifest["files"][victim]["sha256"] == good[victim] == _sha(os.path.join(newest, victim))
    assert C.resume(run)[0][0] == newest


def test_data_files_and_dir_are_fsynced_before_manifest_and_marker(tmp_path, monkeypatch):
    """A power loss cannot be simulated here, so this records the order of os.fsync calls (the path
    behind each fd) in this process: every data file, then the checkpoint dir, must be flushed
    before manifest.json and COMMITTED are written (and flushed)."""
    run = str(tmp_path / "run")
    cfg = make_cfg(run)
    engine, ema = _engine(cfg)
    train(engine, ema, cfg, range(1))
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    final = C.save(engine, ema, cfg, images=8)
    monkeypatch.undo()

    def first(pred) -> int:
        return next(i for i, p in enumerate(synced) if pred(p))

    manifest_at = first(lambda p: os.path.basename(p).startswith("." + C.MANIFEST))
    marker_at = first(lambda p: os.path.basename(p).startswith("." + C.MARKER))
    data = rd.verify(final)[0]["files"]
    assert set(data) == {C.EMA_FILE, MODEL, "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    last_data = max(first(lambda p, f=f: os.path.basename(p) == f) for f in data)
    assert any(p == final for p in synced[last_data + 1:manifest_at]), synced  # the renames, too
    assert last_data < manifest_at < marker_at, synced


def _three_checkpoints(run):
    cfg = make_cfg(run, keep_last=10)
    engine, ema = _engine(cfg)
    paths = [C.save(engine, ema, cfg, images=train(engine, ema, cfg, range(i, i + 1))) for i in range(3)]
    return cfg, paths


def _flaky_reads(monkeypatch, suffix: str, failures: float) -> list[str]:
    """storage.read_bytes raises a connection reset (transient) for the first `failures` reads of
    paths ending in `suffix`; returns the list of failed reads."""
    real, failed = storage.read_bytes, []

    def read_bytes(path, **kw):
        if path.endswith(suffix) and len(failed) < failures:
            failed.append(path)
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return real(path, **kw)

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    return failed


def test_transient_manifest_error_is_retried_not_rolled_back(tmp_path, monkeypatch, fast_retries, caplog):
    run = str(tmp_path / "run")
    cfg, paths = _three_checkpoints(run)
    suffix = f"{C.ckpt_name(24)}/{C.MANIFEST}"

    failed = _flaky_reads(monkeypatch, suffix, 2)  # a blip: the retries see it through
    found, ignored = C.find_resume(run)
    assert len(failed) == 2 and found[0] == paths[2] and ignored == []
    failed.clear()
    found, ignored = C.resume(run)
    assert len(failed) == 2 and found[0] == paths[2] and ignored == []
    assert any("transient" in r.getMessage() and suffix in r.getMessage() for r in caplog.records)

    monkeypatch.undo()
    monkeypatch.setattr(rd, "READ_BACKOFF_S", 0.001)
    failed = _flaky_reads(monkeypatch, suffix, float("inf"))  # an outage: stop, do not roll back
    with pytest.raises(C.CheckpointReadError, match=C.ckpt_name(24)):
        C.resume(run)
    assert len(failed) == rd.READ_RETRIES + 1
    with pytest.raises(C.CheckpointReadError, match="could not read"):
        C.find_resume(run)
    monkeypatch.undo()
    assert C.verify(paths[2], sha256=True)[1] is None  # intact all along


def test_intact_newer_checkpoint_is_never_deleted(tmp_path, caplog):
    """The state a wrongful rollback leaves (a run on ckpt-16 while an intact ckpt-24 exists):
    neither retention nor a save reaching 24 may delete ckpt-24."""
    run = str(tmp_path / "run")
    cfg, paths = _three_checkpoints(run)
    engine, ema = _engine(cfg)
    C.load(engine, ema, paths[1], rd.verify(paths[1])[0], cfg, 1)
    caplog.set_level(logging.INFO, logger=LOGGER)
    C.save(engine, ema, cfg, images=20)  # e.g. a preemption save
    assert C.verify(paths[2], sha256=True)[1] is None
    assert any(paths[2] in m and "keeping" in m for m in _messages(caplog, logging.WARNING))
    sha = _sha(os.path.join(paths[2], MODEL))
    with pytest.raises(RuntimeError, match="committed and intact"):
        C.save(engine, ema, cfg, images=24)
    assert C.verify(paths[2], sha256=True)[1] is None and _sha(os.path.join(paths[2], MODEL)) == sha


def test_retention_deletes_only_superseded_or_proven_bad_and_logs_each(tmp_path, caplog):
    run = str(tmp_path / "run")
    cfg = make_cfg(run, keep_last=10)
    engine, ema = _engine(cfg)
    p = {n: C.save(engine, ema, cfg, images=n) for n in (8, 16, 24, 32, 40)}
    os.remove(os.path.join(p[16], C.MARKER))  # a save that crashed before committing
    _flip_byte(os.path.join(p[32], C.EMA_FILE))  # newer than 24 and proven bad
    caplog.set_level(logging.INFO, logger=LOGGER)
    deleted = C.apply_retention(run, 24, keep_last=1, milestone_every=0, checkpoint_images=8)
    assert deleted == [C.ckpt_name(n) for n in (8, 16, 32)]
    msgs = _messages(caplog)
    for n, why in ((8, "superseded"), (16, "never committed"), (32, "proven bad")):
        assert any(f"deleting checkpoint {p[n]}" in m and why in m for m in msgs), (n, msgs)
    assert any(p[32] in m and C.EMA_FILE in m for m in _messages(caplog, logging.WARNING))
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [C.ckpt_name(24), C.ckpt_name(40)]
    assert C.verify(p[40], sha256=True)[1] is None  # intact and newer: kept


def test_assign_files_balances_and_covers_every_file():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 10}
    shares = C.assign_files(sizes, 2)
    assert sorted(f for s in shares for f in s) == sorted(sizes)
    assert shares == [["a", "d", "e"], ["b", "c"]]  # loads 120 and 110: largest first, least loaded
    assert C.assign_files(sizes, 8)[5:] == [[], [], []]


# --------------------------------------------------------------------------- two ranks agree


def _rank_main(rank: int, port: int, runs: dict, faults: dict, out: str) -> None:
    """One of two gloo ranks: resume() on each run; `faults[run]` is (rank, file) whose hashing
    fails on that rank with a persistent timeout (a transient error that never clears)."""
    os.environ.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=2)
    rd.READ_BACKOFF_S = 0.001
    real_sha = rd.sha256_file
    result = {}
    for key, run in runs.items():
        fault = faults.get(key)

        def sha(path, fault=fault):
            if fault and rank == fault[0] and path.endswith("/" + fault[1]):
                raise TimeoutError("read timed out")
            return real_sha(path)

        rd.sha256_file = sha
        try:
            found, ignored = C.resume(run)
            result[key] = ("ok", found and found[0], ignored)
        except Exception as e:  # noqa: BLE001 - reported to the test
            result[key] = (type(e).__name__, str(e), None)
    torch.save(result, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_hashing_and_agree(tmp_path):
    """Each rank hashes its share of the files; a file proven bad on one rank, or unreadable on
    one rank, gives every rank the same verdict (fall back / CheckpointReadError)."""
    cfg = make_cfg(str(tmp_path / "bad"), keep_last=10)
    engine, ema = _engine(cfg)
    older = C.save(engine, ema, cfg, images=train(engine, ema, cfg, range(1)))
    newest = C.save(engine, ema, cfg, images=train(engine, ema, cfg, range(1, 2)))
    sizes = {f: m["size"] for f, m in rd.verify(newest)[0]["files"].items()}
    rank1_file = C.assign_files(sizes, 2)[1][0]
    shutil.copytree(tmp_path / "bad", tmp_path / "flaky")
    _flip_byte(os.path.join(newest, rank1_file))
    runs = {"bad": str(tmp_path / "bad"), "flaky": str(tmp_path / "flaky")}
    out = str(tmp_path / "result")
    mp.start_processes(_rank_main, args=(free_port(), runs, {"flaky": (1, rank1_file)}, out), nprocs=2,
                       start_method="spawn")
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1))
    assert r0 == r1
    assert r0["bad"][:2] == ("ok", older) and r0["bad"][2][0][0] == newest and rank1_file in r0["bad"][2][0][1]
    assert r0["flaky"][0] == "CheckpointReadError" and rank1_file in r0["flaky"][1]
