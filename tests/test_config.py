"""The config tree: YAML + overrides -> validated pydantic models; errors name the field."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import typing
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


# --------------------------------------------------------------------------- numbers and names


@pytest.mark.parametrize("override, field", [
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),  # YAML reads `nan` as a string; as a number it is still NaN
    ("optim.lr=-1e-4", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.warmup_kimg=.inf", "optim.warmup_kimg"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.betas=[0.9, .nan]", "optim.betas"),
    ("train.report_kimg=-1.28", "train.report_kimg"),
    ("train.checkpoint_kimg=.nan", "train.checkpoint_kimg"),
    ("train.sample_kimg=-.inf", "train.sample_kimg"),
    ("train.total_kimg=.inf", "train.total_kimg"),
    ("train.ema_start_kimg=-1", "train.ema_start_kimg"),
    ("train.ema_rampup_ratio=-0.05", "train.ema_rampup_ratio"),
    ("train.ema_rampup_ratio=.nan", "train.ema_rampup_ratio"),
    ("train.batch_images=-128", "train.batch_images"),
    ("train.batch_images=true", "train.batch_images"),  # a bool is not a count
    ("train.seed=-1", "train.seed"),
    ("network.base_channels=-32", "network.base_channels"),
    ("network.in_channels=0", "network.in_channels"),
    ("network.groups=-8", "network.groups"),
    ("network.out_channels=0", "network.out_channels"),
    ("network.dropout=.nan", "network.dropout"),
    ("network.channel_mult=[1, -2]", "network.channel_mult"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.retry_backoff_s=.inf", "data.retry_backoff_s"),
    ("diffusion.beta_end=.nan", "diffusion.beta_end"),
    ("diffusion.num_timesteps=1", "diffusion.num_timesteps"),
    ("etsdm.t_tilde=.inf", "etsdm.t_tilde"),
    ("etsdm.t_tilde=-100", "etsdm.t_tilde"),
    ("sample.eta=-0.5", "sample.eta"),
    ("sample.steps=0", "sample.steps"),
])
def test_non_finite_and_negative_numbers_are_rejected(override, field):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, [override])
    assert str(e.value).startswith(field), str(e.value)  # the message leads with the field at fault


def test_nan_from_the_command_line_exits_2_naming_the_field():
    bad = subprocess.run([sys.executable, "-m", "etsdm_dist.cli", "config", "optim.lr=.nan"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "optim.lr" in bad.stderr and "finite" in bad.stderr, bad.stderr


def test_every_error_in_a_tree_is_reported_with_its_path():
    with pytest.raises(C.ConfigError) as e:
        C.from_dict({"optim": {"lr": float("nan")}, "train": {"ema_decays": [0.9, 2.0]}})
    lines = str(e.value).splitlines()
    assert lines[0].startswith("optim.lr:") and lines[1].startswith("train.ema_decays[1]:"), lines


def test_unknown_fields_list_the_valid_ones():
    with pytest.raises(C.ConfigError) as e:
        C.load(None, ["train.batch_image=64"])
    msg = str(e.value)
    assert "'train.batch_image'" in msg and all(f in msg for f in C.TrainConfig.model_fields)
    with pytest.raises(C.ConfigError, match="unknown config field 'trian'; config has: diffusion, etsdm"):
        C.load(None, ["trian.seed=1"])


def test_yaml_1_1_exponent_without_dot_is_a_number(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("optim:\n  lr: 1e-4\n  eps: 1E-8\ntrain:\n  ema_decays: [9.99e-1]\n")
    assert yaml.safe_load(p.read_text())["optim"]["lr"] == "1e-4"  # what PyYAML hands us
    cfg = C.load(str(p))
    assert cfg.optim.lr == 1e-4 and cfg.optim.eps == 1e-8 and cfg.train.ema_decays == [0.999]
    assert isinstance(cfg.optim.lr, float)


def test_ema_rampup_ratio_round_trips():
    assert C.load(None).train.ema_rampup_ratio is None
    cfg = C.load(None, ["train.ema_rampup_ratio=0.05"])
    assert cfg.train.ema_rampup_ratio == 0.05
    assert C.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert C.load(None, ["train.ema_rampup_ratio=null"]).train.ema_rampup_ratio is None


def test_stored_tree_is_plain_data_that_loads_back():
    # Run dirs store cfg.to_yaml(); manifests and exports store cfg.to_dict() as JSON.
    import json

    cfg = C.load(str(CONFIGS[0]), ["train.deepspeed_extra={wall_clock_breakdown: true}"])
    as_json = json.loads(json.dumps(cfg.to_dict()))
    assert as_json == cfg.to_dict() and C.from_dict(as_json) == cfg
    other = C.load(str(CONFIGS[0]), ["train.seed=5"])
    assert other.to_dict() != cfg.to_dict()  # resume's comparison sees a changed setting


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cli_output_loads_back_to_the_same_tree(path, tmp_path):
    over = ["train.zero_stage=3", "network.groups=16"]
    out = subprocess.run([sys.executable, "-m", "etsdm_dist.cli", "config", str(path), *over],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(out.stdout)
    again = C.load(str(dumped))
    assert again == C.load(str(path), over)
    assert again.train.zero_stage == 3 and again.network.groups == 16


def test_has_field():
    assert C.has_field("train.batch_images") and C.has_field("network.groups")
    assert C.has_field("train.deepspeed_extra.zero_optimization.stage")  # keys under a mapping field
    for bad in ("etsdm.time", "schedule.num_timesteps", "sampler.steps", "train.batch_images.x", "network"):
        assert C.has_field(bad) is (bad == "network"), bad


# Heads of dotted names checked in error strings: the config's sections and the names of their
# fields (so a field written as if it were a section, e.g. `schedule.kind`, is caught too).
_SECTIONS = set(C.Config.model_fields)
_HEADS = _SECTIONS | {f for s in _SECTIONS for f in C.Config.model_fields[s].annotation.model_fields}
_DOTTED = re.compile(r"(?<![\w.])([a-z_]+)\.([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)")


def _error_strings(source: str):
    """(line, text) of every string literal inside a raise, or in a call to a *Error / *Warning class."""
    for node in ast.walk(ast.parse(source)):
        roots = []
        if isinstance(node, ast.Raise) and node.exc is not None:
            roots.append(node.exc)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name.endswith(("Error", "Exception", "Warning")) or name == "warn":
                roots.append(node)
        for root in roots:
            for sub in ast.walk(root):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub.lineno, sub.value


def _misnamed_fields(paths) -> list[str]:
    bad = []
    for path in paths:
        for line, text in _error_strings(Path(path).read_text()):
            for m in _DOTTED.finditer(text):
                if m.group(1) in _HEADS and not C.has_field(m.group(0)):
                    bad.append(f"{path}:{line}: {m.group(0)}")
    return sorted(set(bad))


def test_every_field_named_in_an_error_message_exists():
    package = Path(C.__file__).resolve().parent
    # The study's grid files have sections of their own (data.source, train.config: study/spec.py);
    # messages about them name grid-file keys, not config fields.
    grid_file = {package / "study" / "spec.py", package / "study" / "cells.py"}
    sources = sorted(p for p in package.rglob("*.py") if p not in grid_file)
    assert len(sources) > 20
    bad = _misnamed_fields(sources)
    assert not bad, "error messages name config fields that do not exist:\n" + "\n".join(bad)


def test_the_error_message_scan_finds_wrong_names(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        'def f(t):\n'
        '    raise ValueError(f"etsdm.time must be discrete, got {t}")\n'
        'def g():\n'
        '    raise ConfigError("schedule.num_timesteps: too small; see diffusion.num_timesteps")\n'
        'def h(n):\n'
        '    return RuntimeError(f"sampler.steps={n} ok; index.json and etsdm_dist.config are no fields")\n')
    assert _misnamed_fields([probe]) == [f"{probe}:2: etsdm.time", f"{probe}:4: schedule.num_timesteps",
                                         f"{probe}:6: sampler.steps"]


def test_choices_match_the_code_that_uses_them():
    # The config is torch-free, so it spells out these choices; they must be the code's own.
    from etsdm_dist.diffusion import samplers, schedule
    from etsdm_dist.diffusion.settings import TIME_KINDS

    def choices(section, name):
        return set(typing.get_args(getattr(C, section).model_fields[name].annotation))

    assert choices("DiffusionConfig", "schedule") == set(schedule.SCHEDULE_KINDS)
    assert choices("DiffusionConfig", "time") == set(TIME_KINDS) == set(schedule.TIME_KINDS)
    assert choices("SampleConfig", "sampler") == set(samplers.SAMPLERS)
    assert choices("SampleConfig", "grid") == set(samplers.GRID_KINDS)


def test_config_imports_no_torch():
    code = "import sys, etsdm_dist.config as c; c.load(None); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
