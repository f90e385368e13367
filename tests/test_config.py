"""The config tree: YAML + overrides -> validated dataclasses; errors name the field."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from etsdm_dist import config as C

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = C.load(str(path))
    assert isinstance(cfg.train.batch_images, int)
    # The dump is loadable again and gives the same tree (round trip).
    assert C.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_overrides_are_yaml_typed_and_nested():
    cfg = C.load(None, ["optim.lr=1e-4", "train.ema_decays=[0.99, 0.999]", "etsdm.enabled=false",
                        "network.channel_mult=[1,2]", "network.preset=32", "train.deepspeed_extra={a: 1}"])
    assert cfg.optim.lr == 1e-4 and cfg.train.ema_decays == [0.99, 0.999]
    assert cfg.etsdm.enabled is False and cfg.network.channel_mult == [1, 2]
    assert cfg.network.preset == "32"  # YAML's int 32 meant as the preset's name
    assert cfg.train.deepspeed_extra == {"a": 1}


def test_yaml_file_plus_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  batch_images: 64\n  report_kimg: 0.64\n  checkpoint_kimg: 6.4\n  total_kimg: 64\n")
    cfg = C.load(str(p), ["train.zero_stage=3"])
    assert cfg.train.batch_images == 64 and cfg.train.zero_stage == 3
    assert cfg.optim.lr == C.OptimConfig().lr  # untouched fields keep their defaults


@pytest.mark.parametrize("override, field", [
    ("train.zero_stage=4", "train.zero_stage"),
    ("train.precision=fp8", "train.precision"),
    ("network.foo=1", "network.foo"),
    ("train.batch_images=abc", "train.batch_images"),
    ("etsdm.n=7", "etsdm.n"),  # 7 does not divide t_tilde=100
    ("etsdm.t_tilde=1001", "etsdm.t_tilde"),
    ("train.report_kimg=1.0", "train.report_kimg"),  # 1000 images is not a whole number of 128-batches
    ("train.ema_decays=[1.5]", "train.ema_decays"),
    ("sample.ema=3", "sample.ema"),
    ("data.on_error=ignore", "data.on_error"),
    ("optim.betas=[0.9]", "optim.betas"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(C.ConfigError, match=field.replace(".", r"\.")):
        C.load(None, [override])


def test_continuous_time_default_t_tilde():
    cfg = C.load(None, ["diffusion.time=continuous"])
    assert C.etsdm_t_tilde(cfg) == 0.1
    assert C.etsdm_t_tilde(C.load(None)) == 100.0
    with pytest.raises(C.ConfigError, match="etsdm.t_tilde"):
        C.load(None, ["diffusion.time=continuous", "etsdm.t_tilde=2"])


def test_batch_layout():
    assert C.batch_layout(128, 4, None) == (32, 1)
    assert C.batch_layout(128, 4, 8) == (8, 4)
    with pytest.raises(C.ConfigError, match="train.batch_images"):
        C.batch_layout(128, 3, None)
    with pytest.raises(C.ConfigError, match="train.micro_batch_images"):
        C.batch_layout(128, 4, 5)


def test_etsdm_config_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "etsdm_dist.cli", "config", str(CONFIGS[0]), "train.seed=7"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["train"]["seed"] == 7
    bad = subprocess.run([sys.executable, "-m", "etsdm_dist.cli", "config", "train.zero_stage=9"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "train.zero_stage" in bad.stderr and "0, 1, 2, 3" in bad.stderr
