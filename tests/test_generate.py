"""The fixed-seed sample grid written during training (generate.save_sample_grid)."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from etsdm_dist import config
from etsdm_dist.eval import grid as generate
from etsdm_dist.diffusion import build


def _setup(*overrides):
    cfg = config.load("configs/ci_tiny.yaml", ["sample.steps=4", *overrides])
    torch.manual_seed(0)
    model = build.build_model(cfg).eval()
    for p in model.parameters():  # leave the zero init: a non-trivial network
        p.data.add_(0.02 * torch.randn_like(p))
    return cfg, model, build.build_schedule(cfg)


def test_grid_shape_and_fixed_seed(tmp_path):
    cfg, model, schedule = _setup()
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    generate.save_sample_grid(cfg, model, schedule, torch.device("cpu"), str(a), num=6)
    generate.save_sample_grid(cfg, model, schedule, torch.device("cpu"), str(b), num=6)
    assert a.read_bytes() == b.read_bytes()  # same seed every time: grids comparable across kimg
    img = np.asarray(Image.open(io.BytesIO(a.read_bytes())))
    assert img.shape == (2 * 32, 3 * 32)  # 6 images of 32x32x1 in a 3-column grid
    assert img.std() > 0


def test_grid_follows_the_sample_config(tmp_path):
    cfg, model, schedule = _setup()
    cfg2, _, _ = _setup("sample.sampler=dpm_solver++", "sample.grid=logsnr", "sample.order=2")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    generate.save_sample_grid(cfg, model, schedule, torch.device("cpu"), str(a), num=4)
    generate.save_sample_grid(cfg2, model, schedule, torch.device("cpu"), str(b), num=4)
    assert a.read_bytes() != b.read_bytes()
