"""checkpoint.py + export.py: the commit protocol (local and s3://), resume, retention, universal
conversion from a real 2-rank ZeRO-3 run, weights-only loading, export round trip."""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch

from ds_worker import TinyNet, full_exp_avg, full_params, init_single_rank, launch, make_cfg, train
from etsdm_dist.train import checkpoint as C
from etsdm_dist.train import engine as E
from etsdm_dist.train import export as X
from etsdm_dist import run_dir
from etsdm_dist.data import storage
from etsdm_dist.config import ConfigError
from etsdm_dist.train.ema import EMA


def _engine(cfg, load_universal=False):
    init_single_rank()
    engine = E.build_engine(cfg, TinyNet(), 1, load_universal=load_universal)
    return engine, EMA.from_config(engine, cfg)


def _assert_same_state(a_engine, a_ema, b_engine, b_ema):
    pa, pb = full_params(a_engine), full_params(b_engine)
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    ea, eb = a_ema.state_dict(), b_ema.state_dict()
    for i in range(len(ea["ema"])):
        for n in ea["ema"][i]:
            assert torch.equal(ea["ema"][i][n], eb["ema"][i][n]), n


def _rehash(ckpt: str) -> None:
    """Re-sign a tampered checkpoint so that only the weights-only loader stands in the way."""
    man = json.loads(storage.read_bytes(storage.join(ckpt, C.MANIFEST)))
    for fname, meta in man["files"].items():
        data = storage.read_bytes(storage.join(ckpt, fname))
        meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    data = (json.dumps(man) + "\n").encode()
    storage.write_bytes_atomic(storage.join(ckpt, C.MANIFEST), data)
    storage.write_json_atomic(storage.join(ckpt, C.MARKER), {"manifest_sha256": hashlib.sha256(data).hexdigest()})


def _protocol_round_trip(run_dir):
    """Save twice, resume from the newest in a fresh engine, and continue identically."""
    cfg = make_cfg(run_dir, keep_last=1, micro_batch_images=4)
    engine, ema = _engine(cfg)
    images = train(engine, ema, cfg, range(2))
    C.save(engine, ema, cfg, images=images, stats={"loss": 0.5})
    images = train(engine, ema, cfg, range(2, 3))
    path = C.save(engine, ema, cfg, images=images, stats={"loss": 0.25})
    assert path == storage.join(run_dir, "checkpoints", "ckpt-000000000024")

    # keep_last=1. (SeaweedFS lists a prefix emptied by deletion as a directory: count files.)
    ckpts = storage.join(run_dir, "checkpoints")
    assert [n for n in storage.listdir(ckpts) if C.file_sizes(storage.join(ckpts, n))] == ["ckpt-000000000024"]
    assert storage.read_json(storage.join(run_dir, "latest"))["checkpoint"] == "ckpt-000000000024"
    found, ignored = C.find_resume(run_dir, sha256=True)
    assert ignored == [] and found[0] == path
    man = found[1]
    assert (man["images"], man["world_size"], man["zero_stage"], man["precision"]) == (24, 1, 2, "fp32")
    assert set(man["files"]) == {"ema.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert man["config"]["train"]["run_dir"] == run_dir and "rng" not in man
    assert not C.needs_universal(man, cfg, 1)

    engine2, ema2 = _engine(make_cfg(run_dir, keep_last=1, micro_batch_images=4))
    state = C.load(engine2, ema2, path, man, cfg, 1)
    assert state["images"] == 24 and state["stats"] == {"loss": 0.25}
    assert not state["universal"]
    _assert_same_state(engine, ema, engine2, ema2)
    train(engine, ema, cfg, range(3, 4))  # Adam moments and step counts restored: identical step
    train(engine2, ema2, cfg, range(3, 4))
    _assert_same_state(engine, ema, engine2, ema2)
    return engine, ema, cfg


def test_local_save_resume_is_exact(tmp_path):
    _protocol_round_trip(str(tmp_path / "run"))


def test_s3_save_resume_and_corruption(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("ETSDM_CACHE_DIR", str(tmp_path / "cache"))
    run = f"{s3_bucket}/runs/a"
    engine, ema, cfg = _protocol_round_trip(run)
    assert os.listdir(tmp_path / "cache") == []  # staging and download copies cleaned up
    cfg.train.keep_last = 5
    newer = C.save(engine, ema, cfg, images=40)
    assert C.find_resume(run)[0][0] == newer
    victim = storage.join(newer, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    storage.write_bytes_atomic(victim, storage.read_bytes(victim)[:-10])  # a truncated upload
    found, ignored = C.find_resume(run)
    assert found[0].endswith("ckpt-000000000024")
    assert ignored[0][0] == newer and "bytes" in ignored[0][1] and "`latest`" in ignored[0][1]


def test_partial_and_corrupt_checkpoints_are_ignored(tmp_path):
    run = str(tmp_path / "run")
    cfg = make_cfg(run, keep_last=10)
    engine, ema = _engine(cfg)
    paths = [C.save(engine, ema, cfg, images=8 * (i + 1)) for i in range(4)]
    os.remove(os.path.join(paths[3], "COMMITTED"))  # as if it crashed before commit, yet `latest` names it
    with open(os.path.join(paths[2], "ema.pt"), "ab") as f:  # grew after hashing
        f.write(b"x")
    same_size = os.path.join(paths[1], "mp_rank_00_model_states.pt")
    data = bytearray(open(same_size, "rb").read())
    data[len(data) // 2] ^= 0xFF  # bit rot: same size, only sha256 sees it
    open(same_size, "wb").write(bytes(data))

    found, ignored = C.find_resume(run)
    assert found[0] == paths[1]
    assert [p for p, _ in ignored] == [paths[3], paths[2]]
    assert "COMMITTED" in ignored[0][1] and "ema.pt has" in ignored[1][1]
    assert "`latest` points here" in ignored[0][1] and "`latest`" not in ignored[1][1]
    found, ignored = C.find_resume(run, sha256=True)
    assert found[0] == paths[0] and "sha256" in ignored[2][1]

    with open(os.path.join(paths[0], "manifest.json"), "a") as f:  # manifest edited after commit
        f.write(" ")
    assert "manifest.json does not match" in C.verify(paths[0])[1]
    assert C.find_resume(str(tmp_path / "empty")) == (None, [])


def test_retention_keeps_last_k_and_milestones(tmp_path):
    assert C.retained([8, 16, 24, 32, 40, 48], 2, 3, 8) == {24, 40, 48}
    assert C.retained([8, 16, 20], 1, 2, 8) == {16, 20}  # 20: off-grid (preemption) save, newest
    assert C.retained([8, 16], 5, 0, 8) == {8, 16}
    run = str(tmp_path)
    root = os.path.join(run, "checkpoints")
    for n in [8, 16, 24, 32, 40, 48, 56]:
        os.makedirs(os.path.join(root, C.ckpt_name(n)))
        open(os.path.join(root, C.ckpt_name(n), "mp_rank_00_model_states.pt"), "w").close()
        if n not in (16, 56):  # 16: a crashed save; 56: a timeline abandoned by a resume
            open(os.path.join(root, C.ckpt_name(n), "COMMITTED"), "w").close()
    os.makedirs(os.path.join(root, "unrelated"))
    deleted = C.apply_retention(run, 48, keep_last=2, milestone_every=2, checkpoint_images=8)
    assert deleted == [C.ckpt_name(n) for n in (8, 16, 24, 56)]
    assert sorted(os.listdir(root)) == ["ckpt-000000000032", "ckpt-000000000040", "ckpt-000000000048", "unrelated"]


class _Marker:
    ran = False


def _evil():
    _Marker.ran = True
    return "pwned"


class _Evil:
    def __reduce__(self):
        return (_evil, ())


def test_loading_never_unpickles_objects(tmp_path):
    """A checkpoint whose DeepSpeed file smuggles a pickled callable (re-signed, so it verifies)
    must be refused by the weights-only loader before the callable runs."""
    run = str(tmp_path / "run")
    cfg = make_cfg(run)
    engine, ema = _engine(cfg)
    path = C.save(engine, ema, cfg, images=8)
    f = os.path.join(path, "mp_rank_00_model_states.pt")
    sd = torch.load(f, weights_only=False)
    sd["evil"] = _Evil()
    torch.save(sd, f)
    _rehash(path)
    found, _ = C.find_resume(run, sha256=True)
    engine2, ema2 = _engine(cfg)
    with pytest.raises(pickle.UnpicklingError):
        C.load(engine2, ema2, found[0], found[1], cfg, 1)
    assert not _Marker.ran
    with pytest.raises(RuntimeError, match="load_universal"):  # misuse is explained
        C.load(engine2, ema2, found[0], dict(found[1], world_size=2), cfg, 1)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Real 2-rank fp32 runs (one launch): ZeRO-3 and ZeRO-0, 3 steps each, a checkpoint, the
    reference state at the checkpoint, and the params after one more step."""
    d = tmp_path_factory.mktemp("two_rank")
    launch(2, ["--out", str(d), "--stages", "3,0", "--steps", "3"])
    return d


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 0])
def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_runs, stage, tmp_path, monkeypatch):
    """ZeRO-3 from 2 ranks to 1 goes through the automatic universal conversion; ZeRO-0 keeps its
    whole optimizer state in one file and loads directly. Both must restore exactly."""
    monkeypatch.setenv("ETSDM_CACHE_DIR", str(tmp_path / "cache"))
    run = str(two_rank_runs / f"run-z{stage}")
    ref = torch.load(two_rank_runs / f"ref-z{stage}.pt", weights_only=True)
    found, ignored = C.find_resume(run, sha256=True)
    assert ignored == []
    path, man = found
    assert man["world_size"] == 2 and man["zero_stage"] == stage and "rng" not in man
    if stage == 3:
        assert C.needs_universal(man, make_cfg(run, zero_stage=2), 1)  # 3 -> 2 converts (reshard.py)
    cfg = make_cfg(run, zero_stage=stage)  # 1 rank, no micro-batch split: another batch layout too
    universal = C.needs_universal(man, cfg, 1)
    assert universal == (stage == 3)
    engine, ema = _engine(cfg, load_universal=universal)
    state = C.load(engine, ema, path, man, cfg, 1)
    assert state["universal"] == universal and state["images"] == 24
    params, exp_avg = full_params(engine), full_exp_avg(engine)
    for n, t in ref["params"].items():
        assert torch.equal(params[n], t), n  # exact fp32 masters
        assert torch.equal(exp_avg[n], ref["exp_avg"][n]), n  # and optimizer moments
    got = ema.state_dict()
    for i in range(2):
        for n, t in ref["ema"]["ema"][i].items():
            assert torch.equal(got["ema"][i][n], t), n
    train(engine, ema, cfg, range(3, 4))  # the step after resume matches the 2-rank run's
    for n, t in full_params(engine).items():
        torch.testing.assert_close(t, ref["params_next"][n], rtol=1e-5, atol=1e-6)
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")


def test_export_round_trip(tmp_path, s3_bucket):
    run = str(tmp_path / "run")
    cfg = make_cfg(run)
    engine, ema = _engine(cfg)
    train(engine, ema, cfg, range(2))
    C.save(engine, ema, cfg, images=16)
    want = ema.full_state(1)
    out = str(tmp_path / "m.safetensors")
    assert X.main([run, "--ema-index", "1", "--out", out]) == 0
    sd, conf = run_dir.load_exported(out)
    assert conf["ema"] == {"index": 1, "decay": 0.5} and conf["images"] == 16
    assert conf["network"] == cfg.to_dict()["network"] and conf["etsdm"] == cfg.to_dict()["etsdm"]
    assert "diffusion" in conf
    net = TinyNet(seed=3)
    net.load_state_dict(sd, strict=True)  # params and buffers, no DeepSpeed needed
    for n, t in want.items():
        assert torch.equal(sd[n], t), n
    remote_out = f"{s3_bucket}/exports/m.pt"  # the other format, written to object storage
    assert X.main([run, "--out", remote_out]) == 0
    sd0, conf0 = run_dir.load_exported(remote_out)
    assert conf0["ema"]["index"] == 0 and torch.equal(sd0["a.weight"], ema.full_state(0)["a.weight"])
    assert X.main([run, "--ema-index", "7"]) == 1
    assert X.main([str(tmp_path / "nothing")]) == 1
