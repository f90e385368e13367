"""`etsdm sample`: per-image determinism, exact N, 1 vs 2 ranks, kill -9 and resume."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_harness as H
from etsdm_dist import config
from etsdm_dist.data import tarformat, verify
from etsdm_dist.diffusion import build
from etsdm_dist.eval import sample as job
from etsdm_dist.eval.sampling import ImageSampler, image_batches, sampler_settings, load_model

STEPS = ["--steps", "4"]


def write_export(path: Path, *overrides: str, seed: int = 0) -> str:
    """A tiny perturbed network in `etsdm export`'s safetensors format (no training run needed)."""
    from safetensors.torch import save

    cfg = config.load(H.CI_CONFIG, list(overrides))
    torch.manual_seed(seed)
    model = build.build_model(cfg)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    d = cfg.to_dict()
    meta = {"format": "etsdm-export-1", "network": d["network"], "diffusion": d["diffusion"],
            "etsdm": d["etsdm"], "ema": {"index": 0, "decay": 0.99}}
    path.write_bytes(save({k: v.contiguous() for k, v in model.state_dict().items()},
                          metadata={"etsdm": json.dumps(meta)}))
    return str(path)


@pytest.fixture(scope="module")
def export_file(tmp_path_factory) -> str:
    return write_export(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def read_images(out: str) -> tuple[list[str], np.ndarray, list]:
    """(keys, uint8 images [N, H, W], labels) of a shard set, in index order."""
    index = json.loads((Path(out) / "index.json").read_text())
    keys, imgs, labels = [], [], []
    for s in index["shards"]:
        data = (Path(out) / s["name"]).read_bytes()
        for a, b in zip(s["offsets"], s["offsets"][1:]):
            key, fields = tarformat.sample_from_members(tarformat.parse_sample_members(data[a:b]))
            keys.append(key)
            imgs.append(np.array(Image.open(io.BytesIO(fields["png"]))))
            labels.append(int(fields["cls"]) if "cls" in fields else None)
    return keys, np.stack(imgs), labels


# --------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("settings", [dict(sampler="ddim", steps=4, eta=1.0),
                                      dict(sampler="dpm_solver++", steps=4, grid="time_uniform")])
def test_images_do_not_depend_on_the_batch(export_file, settings):
    sampler = ImageSampler(load_model(export_file), sampler_settings(None, **settings), seed=7)
    idx = list(range(3, 16))
    full = sampler.generate(idx)
    for b in (1, 3, 5, 8):
        parts = torch.cat([sampler.generate(idx[a:a + b]) for a in range(0, len(idx), b)])
        assert torch.equal(parts, full), b
    assert torch.isfinite(full).all() and full.abs().max() <= 1.0 + 1e-6  # clip_denoised + denoise_to_zero
    other = ImageSampler(sampler.loaded, sampler.settings, seed=8).generate(idx[:2])
    assert not torch.equal(other, full[:2])


def test_chunks_and_assignment_cover_every_image_once():
    for n, chunk in ((13, 4), (1, 5), (16, 4), (100, 7)):
        ranges = job.chunk_ranges(n, chunk)
        assert [i for r in ranges for i in r] == list(range(n))
        for world in (1, 2, 3):
            got = sorted(k for r in range(world) for k in job.assign(list(range(len(ranges))), r, world))
            assert got == list(range(len(ranges)))
    with pytest.raises(job.SampleError, match="--num"):
        job.chunk_ranges(0, 4)


def test_conditional_png_folder_balanced(tmp_path):
    src = write_export(tmp_path / "cond.safetensors", "network.num_classes=3")
    out = tmp_path / "pngs"
    args = job.parse_args([src, "--num", "7", "--out", str(out), "--format", "png", "--chunk", "3",
                           "--no-progress", *STEPS])
    job.run(args)
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(7)]
    done = json.loads((out / "_sample" / "done.json").read_text())
    assert done["labels"] == [0, 1, 2, 0, 1, 2, 0]
    assert (out / "_sample" / "grid.png").exists()
    args = job.parse_args([src, "--num", "4", "--out", str(tmp_path / "c2"), "--format", "png",
                           "--classes", "2", "--no-progress", *STEPS])
    job.run(args)
    assert json.loads((tmp_path / "c2" / "_sample" / "done.json").read_text())["labels"] == [2, 2, 2, 2]
    with pytest.raises(job.SampleError, match="--classes"):
        job.run(job.parse_args([src, "--num", "2", "--out", str(tmp_path / "c3"), "--classes", "5", *STEPS]))


def test_rerun_with_other_settings_is_refused(export_file, tmp_path):
    out = str(tmp_path / "s")
    job.run(job.parse_args([export_file, "--num", "3", "--out", out, "--no-progress", *STEPS]))
    with pytest.raises(job.SampleError, match="another job"):
        job.run(job.parse_args([export_file, "--num", "3", "--out", out, "--steps", "5"]))


# --------------------------------------------------------------------------- ranks
def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "etsdm_dist.eval.sample", *args, "--no-progress"]


def test_one_and_two_ranks_give_the_same_images_for_any_batch(export_file, tmp_path):
    common = ["--num", "13", "--chunk", "4", "--sampler", "ddpm", *STEPS, "--seed", "3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = H.launch_cmd(_cmd(export_file, "--out", one, "--batch", "3", *common), tmp_path / "log1", timeout_s=240)
    assert r1.returncodes == [0], r1.output()[-3000:]
    torchrun = str(H.VENV_BIN / "torchrun")
    r2 = H.launch_cmd([torchrun, "--nproc_per_node", "2", "--master_port", str(H.free_port()), "-m",
                       "etsdm_dist.eval.sample", "--", export_file, "--out", two, "--batch", "5", *common,
                       "--no-progress"], tmp_path / "log2", timeout_s=240)
    assert r2.returncodes == [0], r2.output()[-3000:]
    assert "2 rank(s)" in r2.output() and "img/s" in r2.output()
    i1, i2 = (json.loads((Path(d) / "index.json").read_text()) for d in (one, two))
    assert [s["sha256"] for s in i1["shards"]] == [s["sha256"] for s in i2["shards"]]  # bit-identical
    assert [s["samples"] for s in i1["shards"]] == [4, 4, 4, 1]
    keys, imgs, _ = read_images(two)
    assert keys == [str(i).zfill(9) for i in range(13)] and imgs.shape == (13, 32, 32)
    assert verify.verify(two) == []
    # The same images as in-process generation with yet another batch size.
    sampler = ImageSampler(load_model(export_file), sampler_settings(None, sampler="ddpm", steps=4), seed=3)
    ref = torch.cat([b for b, _ in image_batches(sampler, range(13), 13)])
    assert np.array_equal(ref[:, 0].numpy(), imgs)


def test_kill_9_then_resume_has_no_gap_and_no_duplicate(export_file, tmp_path):
    out = tmp_path / "k"
    args = [export_file, "--out", str(out), "--num", "40", "--chunk", "4", "--batch", "4", "--steps", "6"]
    log = open(tmp_path / "first.log", "wb")
    p = subprocess.Popen(_cmd(*args), env=H.base_env(), cwd=str(H.REPO), stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    t0 = time.monotonic()
    try:
        while len(list((out / "_sample").glob("chunk-*.json"))) < 2:
            assert p.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() - t0 < 180
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        log.close()
    committed = sorted((out / "_sample").glob("chunk-*.json"))
    assert 2 <= len(committed) < 10 and not (out / "index.json").exists()
    # A half-written next chunk (data without its record) must be redone, not trusted.
    nxt = len(committed)
    (out / job.shard_name(nxt)).write_bytes(b"partial")
    r = H.launch_cmd(_cmd(*args), tmp_path / "resume", timeout_s=240)
    assert r.returncodes == [0], r.output()[-3000:]
    assert f"{len(committed)} chunks already committed" in r.output()
    keys, imgs, _ = read_images(str(out))
    assert keys == [str(i).zfill(9) for i in range(40)]  # exactly N, in order, none twice
    assert verify.verify(str(out)) == []
    sampler = ImageSampler(load_model(export_file), sampler_settings(None, steps=6), seed=0)
    ref = torch.cat([b for b, _ in image_batches(sampler, range(40), 16)])
    assert np.array_equal(ref[:, 0].numpy(), imgs)


def _fake_run(run_dir: Path, states: list[dict], cfg) -> None:
    """A committed checkpoint laid out as train/checkpoint.py writes it (checked with its reader),
    plus a newer half-written one that must be ignored."""
    import hashlib

    from etsdm_dist.train import checkpoint

    ck = run_dir / "checkpoints" / "ckpt-000000000064"
    ck.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save({"decays": [0.99, 0.999], "ema": states, "buffers": {}}, buf)
    (ck / "ema.pt").write_bytes(buf.getvalue())
    manifest = {"format": checkpoint.FORMAT, "name": ck.name, "images": 64, "config": cfg.to_dict(),
                "files": {"ema.pt": {"size": len(buf.getvalue()), "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}}}
    data = json.dumps(manifest).encode()
    (ck / "manifest.json").write_bytes(data)
    (ck / "COMMITTED").write_text(json.dumps({"manifest_sha256": hashlib.sha256(data).hexdigest()}))
    partial = run_dir / "checkpoints" / "ckpt-000000000128"
    partial.mkdir()
    (partial / "manifest.json").write_text("{}")
    found, _ = checkpoint.find_resume(str(run_dir))
    assert found is not None and found[0].endswith(ck.name)  # the layout is the real one


def test_run_directory_source_uses_the_chosen_ema(tmp_path):
    cfg = config.load(H.CI_CONFIG, ["sample.sampler=dpm_solver++", "sample.steps=3"])
    torch.manual_seed(1)
    nets = [build.build_model(cfg).state_dict() for _ in range(2)]
    for st in nets:
        for v in st.values():
            v.add_(0.05 * torch.randn_like(v))
    _fake_run(tmp_path / "run", nets, cfg)
    loaded = load_model(str(tmp_path / "run"), ema_index=1)
    assert loaded.source["ema_decay"] == 0.999 and loaded.sample_section["sampler"] == "dpm_solver++"
    assert all(torch.equal(loaded.model.state_dict()[k], nets[1][k]) for k in nets[1])
    settings = sampler_settings(loaded.sample_section)
    assert (settings.sampler, settings.steps) == ("dpm_solver++", 3)  # defaults from the run
    out = str(tmp_path / "o")
    job.run(job.parse_args([str(tmp_path / "run"), "--num", "2", "--out", out, "--no-progress"]))
    assert json.loads((tmp_path / "o" / "_sample" / "job.json").read_text())["settings"]["sampler"] == "dpm_solver++"
    with pytest.raises(job.SampleError, match="--ema-index 2 out of range"):
        load_model(str(tmp_path / "run"), ema_index=2)


def test_shards_on_s3_equal_local_ones_and_verify(export_file, tmp_path, s3_bucket):
    url = f"{s3_bucket}/samples"
    args = ["--num", "5", "--chunk", "2", "--batch", "3", *STEPS, "--no-progress"]
    assert job.main([export_file, "--out", url, *args]) == 0
    assert job.main([export_file, "--out", str(tmp_path / "local"), *args]) == 0
    assert verify.verify(url) == []
    from etsdm_dist.data import storage

    local_index = json.loads((tmp_path / "local" / "index.json").read_text())
    remote_index = json.loads(storage.read_bytes(f"{url}/index.json"))
    assert [s["sha256"] for s in remote_index["shards"]] == [s["sha256"] for s in local_index["shards"]]
    assert storage.exists(f"{url}/grid.png")
