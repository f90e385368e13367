import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from etsdm_dist.diffusion.etsdm import ConditionedModel, EtsdmSettings, condition_time
from etsdm_dist.diffusion.schedule import make_schedule

torch.set_num_threads(1)


def f_disc(t, **kw):
    return condition_time(t, enabled=True, time="discrete", **kw)


def f_cont(t, **kw):
    return condition_time(t, enabled=True, time="continuous", **kw)


@pytest.mark.parametrize("t_tilde,n", [(100, 5), (100, 1), (100, 20), (60, 4), (1000, 8), (7, 7)])
def test_discrete_every_timestep(t_tilde, n):
    t = torch.arange(1000)
    w = t_tilde // n
    expected = torch.tensor([(v // w) * w if v < t_tilde else v for v in range(1000)], dtype=torch.float32)
    for tin in (t, t.float(), t.double()):
        out = f_disc(tin, t_tilde=t_tilde, n=n)
        assert out.dtype == torch.float32
        assert torch.equal(out, expected)


def test_discrete_defaults_example():
    out = f_disc(torch.tensor([0, 19, 20, 39, 40, 79, 80, 99, 100, 101, 999]), t_tilde=100, n=5)
    assert out.tolist() == [0, 0, 20, 20, 40, 60, 80, 80, 100, 101, 999]


def test_discrete_just_below_boundaries():
    # Sampler times can be non-integer: boundary - tiny belongs to the previous sub-interval.
    for b in (20, 40, 60, 80, 100):
        for dt in (torch.float64, torch.float32):
            below = torch.nextafter(torch.tensor(float(b), dtype=dt), torch.tensor(0.0, dtype=dt))
            at = torch.tensor(float(b), dtype=dt)
            assert f_disc(below, t_tilde=100, n=5).item() == b - 20
            assert f_disc(at, t_tilde=100, n=5).item() == b
            assert f_disc(at - 1e-3, t_tilde=100, n=5).item() == b - 20
    assert f_disc(torch.tensor([99.999, 100.5]), t_tilde=100, n=5).tolist() == [80.0, 100.5]


def _boundary(t_tilde, n, i):
    return float(Fraction(repr(t_tilde)) * i / n)


@pytest.mark.parametrize("t_tilde,n", [(0.1, 5), (0.2, 7), (0.05, 3), (0.3, 10), (1.0, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_every_boundary(t_tilde, n, dtype):
    for i in range(n + 1):
        b = _boundary(t_tilde, n, i)
        at = torch.tensor(b, dtype=dtype)
        out = f_cont(at, t_tilde=t_tilde, n=n)
        assert out.dtype == torch.float32
        # Exactly at a boundary: the left end is the boundary itself.
        assert out.item() == torch.tensor(b, dtype=torch.float32).item(), (i, b)
        if i > 0:
            below = torch.nextafter(at, torch.tensor(0.0, dtype=dtype))
            prev = torch.tensor(_boundary(t_tilde, n, i - 1), dtype=torch.float32).item()
            assert f_cont(below, t_tilde=t_tilde, n=n).item() == prev, (i, b)
            mid = torch.tensor((_boundary(t_tilde, n, i - 1) + b) / 2, dtype=dtype)
            assert f_cont(mid, t_tilde=t_tilde, n=n).item() == prev


def test_continuous_paper_boundaries_written_as_literals():
    # The floats a user writes (0.02, 0.04, ...) are boundaries; a naive float floor gets some wrong.
    lits = [0.0, 0.02, 0.04, 0.06, 0.08]
    for dt in (torch.float32, torch.float64):
        out = f_cont(torch.tensor(lits, dtype=dt), t_tilde=0.1, n=5)
        assert torch.equal(out, torch.tensor(lits, dtype=torch.float32))
    naive = [math.floor(v * 5 / 0.1) for v in lits]
    assert naive != [0, 1, 2, 3, 4]  # e.g. 0.06 * 5 / 0.1 = 2.9999999999999996


def test_continuous_above_t_tilde_is_identity():
    t = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1
    assert torch.equal(f_cont(t, t_tilde=0.1, n=5), t)
    t64 = t.double()
    assert torch.equal(f_cont(t64, t_tilde=0.1, n=5), t64.float())


def test_disabled_is_bit_identical():
    t = torch.rand(257, generator=torch.Generator().manual_seed(1)) * 999
    for time, tt in (("discrete", 100), ("continuous", 0.1)):
        out = condition_time(t, enabled=False, t_tilde=tt, n=5, time=time)
        assert out.dtype == torch.float32 and torch.equal(out, t) and out is t
    ti = torch.arange(1000)
    out = condition_time(ti, enabled=False, t_tilde=100, n=5, time="discrete")
    assert out.dtype == torch.float32 and torch.equal(out, ti.float())


def test_n_equal_t_tilde_is_plain_ddpm():
    t = torch.cat([torch.arange(1000).float(), torch.tensor([3.7, 55.5, 99.9])])
    out = f_disc(t, t_tilde=100, n=100)
    base = condition_time(t, enabled=False, t_tilde=100, n=100, time="discrete")
    assert torch.equal(out, base) and torch.equal(out, t)


def test_bf16_input_gives_fp32():
    t = torch.arange(0, 256).to(torch.bfloat16)  # integers <= 256 are exact in bf16
    out = f_disc(t, t_tilde=100, n=5)
    assert out.dtype == torch.float32
    assert torch.equal(out, f_disc(torch.arange(0, 256), t_tilde=100, n=5))
    tc = torch.tensor([0.01, 0.05, 0.5], dtype=torch.bfloat16)
    outc = f_cont(tc, t_tilde=0.1, n=5)
    assert outc.dtype == torch.float32
    assert outc[:2].tolist() == [0.0, torch.tensor(0.04).item()] and outc[2].item() == tc[2].float().item()


@pytest.mark.parametrize("kw,field", [
    (dict(t_tilde=100, n=3, time="discrete"), "etsdm.n"),
    (dict(t_tilde=100, n=0, time="discrete"), "etsdm.n"),
    (dict(t_tilde=100, n=2.5, time="discrete"), "etsdm.n"),
    (dict(t_tilde=0, n=5, time="discrete"), "etsdm.t_tilde"),
    (dict(t_tilde=10.5, n=5, time="discrete"), "etsdm.t_tilde"),
    (dict(t_tilde=2.0, n=5, time="continuous"), "etsdm.t_tilde"),
    (dict(t_tilde=0.1, n=5, time="ct"), "diffusion.time"),  # the time kind is diffusion's setting
    (dict(t_tilde=float("nan"), n=5, time="discrete"), "etsdm.t_tilde"),
    (dict(t_tilde=float("inf"), n=5, time="discrete"), "etsdm.t_tilde"),
])
def test_invalid_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        condition_time(torch.tensor([1.0]), enabled=True, **kw)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        EtsdmSettings(enabled=True, **kw)


def test_settings_defaults_and_schedule_check():
    d, c = EtsdmSettings.defaults_for("discrete"), EtsdmSettings.defaults_for("continuous")
    assert (d.t_tilde, d.n, d.time_scale) == (100, 5, 1.0)
    assert (c.t_tilde, c.n, c.time_scale) == (0.1, 5, 1000.0)
    d.check_schedule(make_schedule())
    with pytest.raises(ValueError, match=r"etsdm\.t_tilde"):
        d.with_(t_tilde=200, n=5).check_schedule(make_schedule(num_timesteps=100))
    with pytest.raises(ValueError, match=r"diffusion\.num_timesteps"):
        d.with_(t_tilde=200, n=5).check_schedule(make_schedule(num_timesteps=100))
    with pytest.raises(ValueError, match=r"diffusion\.time"):
        d.check_schedule(make_schedule(time="continuous"))


class Recorder(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.seen = []
        self.dtype = dtype

    def forward(self, x, t, y=None):
        self.seen.append((t.clone(), y))
        return x.to(self.dtype) * 0 + t.to(self.dtype).view(-1, *([1] * (x.dim() - 1)))


def test_conditioned_model_discrete():
    net = Recorder(torch.bfloat16)
    m = ConditionedModel(net, EtsdmSettings.defaults_for("discrete"))
    x = torch.zeros(4, 2)
    t = torch.tensor([5, 20, 99, 500])
    out = m(x, t)
    tc, y = net.seen[-1]
    assert tc.dtype == torch.float32 and tc.tolist() == [0, 20, 80, 500] and y is None
    assert out.dtype == torch.bfloat16
    m(x, t, torch.arange(4))
    assert net.seen[-1][1].tolist() == [0, 1, 2, 3]
    m(x, torch.tensor(37))  # scalar t is broadcast to the batch
    assert net.seen[-1][0].tolist() == [20.0] * 4


def test_conditioned_model_continuous_scale_and_baseline():
    net = Recorder()
    m = ConditionedModel(net, EtsdmSettings.defaults_for("continuous"))
    m(torch.zeros(3, 1), torch.tensor([0.03, 0.5, 0.0999], dtype=torch.float64))
    assert torch.allclose(net.seen[-1][0], torch.tensor([20.0, 500.0, 80.0]))
    base = ConditionedModel(net, EtsdmSettings.defaults_for("discrete", enabled=False))
    t = torch.rand(8) * 999
    base(torch.zeros(8, 1), t)
    assert torch.equal(net.seen[-1][0], t)


# --------------------------------------------------------------------------- one rule, one default


@pytest.mark.parametrize("time, t_tilde, n, T, ok", [
    ("discrete", 100, 5, 1000, True),
    ("discrete", 1000, 8, 1000, True),  # t_tilde == T is allowed
    ("discrete", 1001, 1, 1000, False),
    ("discrete", 200, 5, 100, False),  # beyond a shorter chain
    ("discrete", 100, 3, 1000, False),
    ("discrete", 10.5, 1, 1000, False),
    ("continuous", 0.1, 5, 1000, True),
    ("continuous", 1.0, 3, 1000, True),
    ("continuous", 1.5, 5, 1000, False),
])
def test_config_and_model_apply_the_same_rule(time, t_tilde, n, T, ok):
    from etsdm_dist import config

    over = [f"diffusion.time={time}", f"etsdm.t_tilde={t_tilde}", f"etsdm.n={n}", f"diffusion.num_timesteps={T}"]
    try:
        config.load(None, over)
        config_ok = True
    except config.ConfigError:
        config_ok = False
    try:
        EtsdmSettings(enabled=True, t_tilde=t_tilde, n=n, time=time).check_schedule(
            make_schedule(time=time, num_timesteps=T))
        model_ok = True
    except ValueError:
        model_ok = False
    assert config_ok == model_ok == ok


@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_config_default_is_the_settings_default(time):
    from etsdm_dist import config
    from etsdm_dist.diffusion import build

    cfg = config.load(None, [f"diffusion.time={time}", "network.preset=tiny"])
    assert cfg.etsdm.t_tilde is None  # null in the config: the default for the time kind
    with torch.device("meta"):
        model = build.build_model(cfg)
    assert model.settings == EtsdmSettings.defaults_for(time)
    assert config.etsdm_t_tilde(cfg) == model.settings.t_tilde
