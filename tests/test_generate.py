"""The fixed-seed sample grid written during training (generate.save_sample_grid)."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from etsdm_dist import config
from etsdm_dist.eval import grid as generate
from etsdm_dist.eval import sampling
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


def test_sampler_options_come_from_the_sample_section_by_name():
    import inspect

    from etsdm_dist.diffusion import samplers

    cfg = config.load(None, ["sample.eta=0.3", "sample.order=3", "sample.variance=beta"])
    for name in samplers.SAMPLERS:
        opts = sampling.sampler_options(cfg.sample.replace(sampler=name))
        params = inspect.signature(samplers.SAMPLERS[name]).parameters
        assert opts and all(k in params for k in opts)
        assert ("eta" in opts) == (name == "ddim") and ("variance" in opts) == (name == "ddpm")
        assert ("order" in opts) == name.startswith("dpm_solver")
        assert all(opts[k] == getattr(cfg.sample, k) for k in opts)
    assert sampling.sampler_options(cfg.sample)["eta"] == 0.3


def test_every_sample_option_reaches_a_sampler():
    """A sample field that no sampler takes (a renamed keyword) would be silently ignored."""
    import inspect

    from etsdm_dist.diffusion import samplers

    taken = {k for f in samplers.SAMPLERS.values() for k in inspect.signature(f).parameters}
    options = set(config.SampleConfig.model_fields) - {"sampler", "steps", "grid", "ema"}
    assert options and not options - taken, options - taken


def test_stochastic_ddim_grid_is_reproducible(tmp_path):
    cfg, model, schedule = _setup("sample.eta=1.0")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    generate.save_sample_grid(cfg, model, schedule, torch.device("cpu"), str(a), num=4)
    torch.randn(10)  # the global RNG moving must not matter
    generate.save_sample_grid(cfg, model, schedule, torch.device("cpu"), str(b), num=4)
    assert a.read_bytes() == b.read_bytes()
    cfg0, _, _ = _setup()
    c = tmp_path / "c.png"
    generate.save_sample_grid(cfg0, model, schedule, torch.device("cpu"), str(c), num=4)
    assert c.read_bytes() != a.read_bytes()  # eta reached the sampler
