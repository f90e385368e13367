import math

import pytest
import torch

from etsdm_dist.diffusion.schedule import make_schedule

torch.set_num_threads(1)
KINDS = ("linear", "quadratic", "cosine")
F64 = torch.float64


def _grid(sch, n=2001):
    return torch.linspace(sch.t_min, sch.t_max, n, dtype=F64)


@pytest.mark.parametrize("time", ["discrete", "continuous"])
@pytest.mark.parametrize("kind", KINDS)
def test_vp_identity_and_monotone(kind, time):
    sch = make_schedule(kind, time)
    t = _grid(sch)
    a, s, lam = sch.alpha(t, F64), sch.sigma(t, F64), sch.log_snr(t, F64)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(a), atol=1e-12)
    assert (a[1:] < a[:-1]).all() and (s[1:] > s[:-1]).all() and (lam[1:] < lam[:-1]).all()
    assert torch.allclose(lam, torch.log(a / s), atol=1e-9)
    assert (s > 0).all() and (a > 0).all()


@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_default_dtype_and_requested_dtype(time):
    sch = make_schedule("linear", time)
    t = torch.tensor([0, 1]) if time == "discrete" else torch.tensor([0.5, 0.25], dtype=torch.bfloat16)
    assert sch.alpha(t).dtype == torch.float32
    assert sch.sigma(t, torch.float64).dtype == torch.float64
    assert sch.log_snr(t, torch.bfloat16).dtype == torch.bfloat16


def _betas_from(sch):
    ab = sch.alpha(torch.arange(sch.num_timesteps), F64) ** 2
    return 1.0 - ab / torch.cat([torch.ones(1, dtype=F64), ab[:-1]])


def test_discrete_linear_and_quadratic_betas():
    b = _betas_from(make_schedule("linear"))
    assert torch.allclose(b, torch.linspace(1e-4, 0.02, 1000, dtype=F64), rtol=1e-9, atol=1e-13)
    bq = _betas_from(make_schedule("quadratic"))
    sq = bq.sqrt()
    assert torch.allclose(sq[1:] - sq[:-1], torch.full((999,), (math.sqrt(0.02) - 1e-2) / 999, dtype=F64),
                          rtol=1e-6)
    assert math.isclose(bq[0].item(), 1e-4, rel_tol=1e-9) and math.isclose(bq[-1].item(), 0.02, rel_tol=1e-9)


def test_discrete_cosine_matches_nichol_dhariwal():
    sch = make_schedule("cosine")
    s, T = 0.008, 1000

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    ab = sch.alpha(torch.arange(T), F64) ** 2
    # Before clipping kicks in, alpha_bar(t) = f((t+1)/T) / f(0).
    for t in (0, 1, 10, 250, 500, 900, 990):
        assert math.isclose(ab[t].item(), f((t + 1) / T) / f(0), rel_tol=1e-9)
    b = _betas_from(sch)
    assert b.max().item() <= 0.999 + 1e-12 and math.isclose(b[-1].item(), 0.999, rel_tol=1e-9)


def _trapz_integral(beta, t, n=20001):
    s = torch.linspace(0, t, n, dtype=F64)
    return torch.trapezoid(beta(s), s).item()


@pytest.mark.parametrize("t", [0.0, 1e-3, 0.1, 0.37, 0.8, 1.0])
def test_continuous_closed_forms(t):
    T, b0, b1 = 1000, 1e-4, 0.02
    lin = make_schedule("linear", "continuous")
    quad = make_schedule("quadratic", "continuous")
    cos = make_schedule("cosine", "continuous")
    tt = torch.tensor([t], dtype=F64)
    # log alpha = -1/2 integral of beta(s) where beta(s) is the discrete betas times T.
    i_lin = _trapz_integral(lambda s: T * (b0 + s * (b1 - b0)), t)
    i_quad = _trapz_integral(lambda s: T * (math.sqrt(b0) + s * (math.sqrt(b1) - math.sqrt(b0))) ** 2, t)
    assert math.isclose(math.log(lin.alpha(tt, F64).item()), -0.5 * i_lin, rel_tol=1e-7, abs_tol=1e-12)
    assert math.isclose(math.log(quad.alpha(tt, F64).item()), -0.5 * i_quad, rel_tol=1e-7, abs_tol=1e-12)
    if t < cos.t_max:
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        assert math.isclose(cos.alpha(tt, F64).item() ** 2, f(t) / f(0), rel_tol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_continuous_matches_discrete(kind):
    # Index k has applied k+1 betas, so it corresponds to continuous time (k+1)/T.
    d, c = make_schedule(kind), make_schedule(kind, "continuous")
    k = torch.arange(0, 990)  # cosine's clipped final betas are excluded
    assert (d.alpha(k, F64) - c.alpha((k + 1) / 1000.0, F64)).abs().max() < 2e-3
    assert (d.sigma(k, F64) - c.sigma((k + 1) / 1000.0, F64)).abs().max() < 2e-3
    # and at t = k/T the mismatch is still one step's worth
    assert (d.alpha(k, F64) - c.alpha(k / 1000.0, F64)).abs().max() < 5e-3


@pytest.mark.parametrize("time", ["discrete", "continuous"])
@pytest.mark.parametrize("kind", KINDS)
def test_log_snr_inverse_round_trip(kind, time):
    sch = make_schedule(kind, time)
    t = _grid(sch, 777)
    back = sch.t_from_log_snr(sch.log_snr(t, F64))
    assert back.dtype == F64
    assert torch.allclose(back, t, atol=1e-8 * (sch.t_max if time == "discrete" else 1.0))
    lam = torch.linspace(sch.log_snr(torch.tensor(sch.t_max), F64).item(),
                         sch.log_snr(torch.tensor(sch.t_min), F64).item(), 101, dtype=F64)
    assert torch.allclose(sch.log_snr(sch.t_from_log_snr(lam), F64), lam, atol=1e-7)


def test_discrete_interpolation_of_log_alpha():
    sch = make_schedule("linear")
    ints = torch.arange(1000)
    assert torch.equal(sch.log_alpha64(ints), sch.log_alpha_table)
    assert torch.equal(sch.log_alpha64(ints.double()), sch.log_alpha_table)
    t = torch.tensor([0.25, 17.5, 998.9], dtype=F64)
    lo, hi = sch.log_alpha64(t.floor()), sch.log_alpha64(t.floor() + 1)
    w = t - t.floor()
    assert torch.allclose(sch.log_alpha64(t), (1 - w) * lo + w * hi, rtol=0, atol=1e-14)


def test_q_sample():
    sch = make_schedule("cosine")
    x0 = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    out = sch.q_sample(x0, t, eps)
    exp = sch.alpha(t)[:, None, None, None] * x0 + sch.sigma(t)[:, None, None, None] * eps
    assert out.dtype == torch.float32 and torch.allclose(out, exp, atol=1e-6)
    assert sch.q_sample(x0.bfloat16(), t, eps).dtype == torch.bfloat16


def test_range_and_field_errors():
    sch = make_schedule("linear")
    with pytest.raises(ValueError, match="out of range"):
        sch.alpha(torch.tensor([1000]))
    with pytest.raises(ValueError, match="out of range"):
        make_schedule("linear", "continuous").alpha(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="diffusion.schedule"):
        make_schedule("sigmoid")
    with pytest.raises(ValueError, match="diffusion.time"):
        make_schedule("linear", "ct")
    with pytest.raises(ValueError, match="diffusion.beta_start"):
        make_schedule("linear", beta_start=0.03)


def test_time_range():
    assert make_schedule().t_min == 0.0 and make_schedule().t_max == 999.0
    c = make_schedule("cosine", "continuous")
    assert 0 < c.t_min < 0.01 and c.t_max < 1.0
    assert math.isfinite(c.log_snr(torch.tensor(c.t_max)).item())
