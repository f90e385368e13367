"""Samplers against the analytic Gaussian model.

Data x0 ~ N(mu, s^2) per coordinate. Then x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2) and, since
Cov(eps, x_t) = sigma, the exact noise predictor is E[eps | x_t] = sigma (x - alpha mu) /
(alpha^2 s^2 + sigma^2). The probability-flow ODE between two 1-D Gaussian marginals is the monotone
(affine) transport map, so its exact solution is x_t = m_t + v_t (x_T - m_T) / v_T with
m = alpha mu, v = sqrt(alpha^2 s^2 + sigma^2).
"""

import math

import pytest
import torch

from etsdm_dist.diffusion.etsdm import ConditionedModel, EtsdmSettings, condition_time
from etsdm_dist.diffusion.samplers import SAMPLERS, ddim, ddpm, dpm_solver, sample, time_grid
from etsdm_dist.diffusion.schedule import make_schedule

torch.set_num_threads(1)
MU, S = 0.7, 0.5
F64 = torch.float64


def eps_exact(sch, mu=MU, s=S):
    def f(x, t):
        a = sch.alpha(t, F64).view(-1, *([1] * (x.dim() - 1)))
        sg = sch.sigma(t, F64).view(-1, *([1] * (x.dim() - 1)))
        return (sg * (x.to(F64) - a * mu) / (a * a * s * s + sg * sg)).to(x.dtype)
    return f


def marginal(sch, t):
    a, sg = sch.alpha(torch.tensor(t), F64).item(), sch.sigma(torch.tensor(t), F64).item()
    return a * MU, math.sqrt(a * a * S * S + sg * sg)


def ode_exact(sch, x_T, t0, t1):
    m0, v0 = marginal(sch, t0)
    m1, v1 = marginal(sch, t1)
    return m1 + v1 * (x_T - m0) / v0


def quantile_noise(n, dtype=F64):
    # Deterministic standard-normal "sample" (quantiles) so moment tests have no Monte-Carlo noise.
    u = (torch.arange(n, dtype=F64) + 0.5) / n
    return (math.sqrt(2.0) * torch.erfinv(2 * u - 1)).to(dtype)[:, None]


# --------------------------------------------------------------------------- grids
@pytest.mark.parametrize("time", ["discrete", "continuous"])
@pytest.mark.parametrize("kind", ["uniform", "quadratic", "logsnr"])
@pytest.mark.parametrize("steps", [1, 7, 50, 999])
def test_grid_properties(time, kind, steps):
    sch = make_schedule("linear", time)
    ts = time_grid(sch, steps, kind)
    assert ts.dtype == F64 and ts.shape == (steps + 1,)
    assert ts[0].item() == sch.t_max and ts[-1].item() == sch.t_min
    assert (ts[1:] < ts[:-1]).all()
    if time == "discrete" and kind != "logsnr":
        assert torch.equal(ts, ts.round())
    if kind == "logsnr":
        lam = sch.log_snr(ts, F64)
        d = lam[1:] - lam[:-1]
        assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-6)


def test_quadratic_grid_is_dense_near_data():
    ts = time_grid(make_schedule(), 10, "quadratic")
    gaps = (ts[:-1] - ts[1:])
    assert (gaps[1:] <= gaps[:-1]).all() and gaps[-1] < gaps[0] / 5


def test_grid_errors():
    sch = make_schedule()
    with pytest.raises(ValueError, match=r"sampler\.grid"):
        time_grid(sch, 10, "karras")
    with pytest.raises(ValueError, match=r"sampler\.steps"):
        time_grid(sch, 1000, "uniform")
    with pytest.raises(ValueError, match=r"sampler\.name"):
        sample("euler", eps_exact(sch), torch.zeros(2, 1), sch, 5)


# --------------------------------------------------------------------------- deterministic samplers
@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_ddim_equals_dpm_solver_order1(time):
    # DDIM (eta=0) is the first-order exponential integrator in both parameterisations.
    sch = make_schedule("cosine", time)
    x_T = torch.linspace(-3, 3, 33, dtype=F64)[:, None]
    ts = time_grid(sch, 12, "logsnr")
    a = ddim(eps_exact(sch), x_T, sch, ts)
    for v in ("dpm_solver", "dpm_solver++"):
        b = dpm_solver(eps_exact(sch), x_T, sch, ts, order=1, variant=v)
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("grid", ["uniform", "logsnr"])
def test_ddim_moments_converge(grid):
    sch = make_schedule("linear")
    x_T = quantile_noise(4001)
    m, v = marginal(sch, sch.t_min)
    errs = []
    for steps in (5, 20, 100):
        out = sample("ddim", eps_exact(sch), x_T, sch, steps, grid=grid)
        errs.append(abs(out.mean().item() - m) + abs(out.var().item() - v * v))
    # DDIM is first order: 5x the steps should cut the error roughly 5x. (A floor of ~2e-3 in the
    # mean remains: x_T ~ N(0, 1) ignores alpha_{t_max} mu, the usual prior mismatch.)
    assert errs[0] > errs[1] > errs[2] and errs[1] / errs[2] > 3 and errs[2] < 2e-2
    # Tweedie's final jump to the data: moments of E[x0 | x_{t_min}] are ~ (mu, s^2).
    out = sample("ddim", eps_exact(sch), x_T, sch, 400, grid=grid, denoise_to_zero=True)
    assert abs(out.mean().item() - MU) < 5e-3 and abs(out.var().item() / S ** 2 - 1) < 2e-2


def _orders(name, order, sch, steps=(10, 20, 40)):
    x_T = torch.linspace(-3, 3, 41, dtype=F64)[:, None]
    ref = ode_exact(sch, x_T, sch.t_max, sch.t_min)
    errs = [(sample(name, eps_exact(sch), x_T, sch, n, grid="logsnr", order=order,
                    lower_order_final=False) - ref).abs().max().item() for n in steps]
    return errs, [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]


@pytest.mark.parametrize("name", ["dpm_solver", "dpm_solver++"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("kind,time", [("linear", "continuous"), ("cosine", "continuous"),
                                       ("linear", "discrete")])
def test_dpm_solver_convergence_order(name, order, kind, time):
    errs, rates = _orders(name, order, make_schedule(kind, time))
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs
    assert rates[-1] >= order - 0.5, (errs, rates)


def test_exact_reference_matches_1000_step_solver():
    # The closed-form ODE solution used above agrees with a fine numerical reference.
    sch = make_schedule("linear", "continuous")
    x_T = torch.linspace(-3, 3, 41, dtype=F64)[:, None]
    fine = sample("dpm_solver++", eps_exact(sch), x_T, sch, 1000, grid="logsnr", order=3)
    assert (fine - ode_exact(sch, x_T, sch.t_max, sch.t_min)).abs().max() < 1e-9
    coarse = sample("dpm_solver", eps_exact(sch), x_T, sch, 20, grid="logsnr", order=2)
    assert (coarse - fine).abs().max() > 1e-4  # the coarse run is measurably off: test is not vacuous


def test_few_steps_default_options_run_in_fp32():
    sch = make_schedule()
    x_T = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    bf16_model = lambda x, t: eps_exact(sch)(x, t).to(torch.bfloat16)
    for name in SAMPLERS:
        out = sample(name, bf16_model, x_T, sch, 6, grid="logsnr", generator=torch.Generator().manual_seed(1))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_dpm_solver_rejects_infinite_log_snr():
    sch = make_schedule("linear", "continuous")
    ts = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    with pytest.raises(ValueError, match="log-SNR"):
        dpm_solver(eps_exact(sch), torch.zeros(2, 1), sch, ts)


# --------------------------------------------------------------------------- stochastic samplers
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_full_chain_reproduces_marginal(variance):
    sch = make_schedule("linear")
    n = 20000
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(n, 1, generator=g)
    out = sample("ddpm", eps_exact(sch), x_T, sch, 999, grid="uniform", generator=g, variance=variance)
    m, v = marginal(sch, 0.0)
    assert abs(out.mean().item() - m) < 4 * v / math.sqrt(n)
    assert abs(out.var().item() / (v * v) - 1) < 4 * math.sqrt(2 / n) + 0.01


def test_ddpm_equals_ddim_eta1():
    sch = make_schedule("cosine")
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    ts = time_grid(sch, 25, "quadratic")
    a = ddpm(eps_exact(sch), x_T, sch, ts, generator=torch.Generator().manual_seed(4))
    b = ddim(eps_exact(sch), x_T, sch, ts, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(a, b, atol=1e-10)


def test_ddpm_coarse_grid_variance_improves_with_steps():
    sch = make_schedule("linear")
    x_T = torch.randn(20000, 1, generator=torch.Generator().manual_seed(5))
    m, v = marginal(sch, 0.0)
    errs = []
    for steps in (3, 100):
        out = sample("ddpm", eps_exact(sch), x_T, sch, steps, generator=torch.Generator().manual_seed(6))
        errs.append(abs(out.var().item() - v * v))
    assert errs[1] < errs[0]


# --------------------------------------------------------------------------- E-TSDM through samplers
class RecordingNet(torch.nn.Module):
    """Analytic eps evaluated at the CONDITION time (what a trained E-TSDM net approximates)."""

    def __init__(self, sch, scale):
        super().__init__()
        self.sch, self.scale, self.seen = sch, scale, []

    def forward(self, x, t_cond):
        self.seen.append(t_cond.clone())
        assert t_cond.dtype == torch.float32
        return eps_exact(self.sch)(x, t_cond.double() / self.scale)


def _run(sch, settings, steps, grid, name="dpm_solver++"):
    net = RecordingNet(sch, settings.time_scale)
    model = ConditionedModel(net, settings)
    ts = time_grid(sch, steps, grid)
    out = SAMPLERS[name](model, torch.linspace(-2, 2, 5)[:, None], sch, ts, order=2) \
        if name.startswith("dpm") else SAMPLERS[name](model, torch.linspace(-2, 2, 5)[:, None], sch, ts)
    seen = torch.stack([s[0] for s in net.seen]) / settings.time_scale
    return ts, seen, out


def test_samplers_see_f_of_t_on_logsnr_and_quadratic_grids():
    sch, st = make_schedule(), EtsdmSettings.defaults_for("discrete")
    for grid in ("logsnr", "quadratic"):
        ts, seen, _ = _run(sch, st, 10, grid)
        expect = condition_time(ts[:-1], enabled=True, t_tilde=100, n=5, time="discrete")
        assert torch.equal(seen, expect)
        assert (seen != ts[:-1].float()).any(), grid  # f is active below t_tilde
    # continuous: the net sees 1000 * f(t)
    sch_c, st_c = make_schedule(time="continuous"), EtsdmSettings.defaults_for("continuous")
    ts, seen, _ = _run(sch_c, st_c, 10, "logsnr")
    expect = condition_time(ts[:-1], enabled=True, t_tilde=0.1, n=5, time="continuous")
    assert torch.allclose(seen, expect, rtol=1e-6) and (expect != ts[:-1].float()).any()


@pytest.mark.parametrize("steps", [50, 10])  # stride ~20 and ~100
@pytest.mark.parametrize("name", ["ddim", "dpm_solver++"])
def test_uniform_stride_grids_make_f_identity(steps, name):
    sch = make_schedule()
    ts, seen, out = _run(sch, EtsdmSettings.defaults_for("discrete"), steps, "uniform", name)
    low = ts[ts < 100]
    assert torch.equal(low % (1000 // steps), torch.zeros_like(low))
    assert torch.equal(seen, ts[:-1].float())
    _, _, base = _run(sch, EtsdmSettings.defaults_for("discrete", enabled=False), steps, "uniform", name)
    assert torch.equal(out, base)
