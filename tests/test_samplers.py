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
from etsdm_dist.diffusion import samplers
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
    with pytest.raises(ValueError, match=r"sample\.grid"):
        time_grid(sch, 10, "karras")
    with pytest.raises(ValueError, match=r"sample\.steps"):
        time_grid(sch, 1000, "uniform")
    with pytest.raises(ValueError, match=r"sample\.sampler"):
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


# --------------------------------------------------------------------------- grids the papers define
def test_time_uniform_grid_is_not_rounded():
    sch = make_schedule("linear", "discrete")
    ts = time_grid(sch, 7, "time_uniform")
    assert torch.allclose(ts, torch.linspace(999, 0, 8, dtype=F64), rtol=0, atol=1e-12)
    assert not torch.equal(ts, ts.round())  # 999/7 is not an integer stride
    assert time_grid(sch, 2000, "time_uniform").shape == (2001,)  # finer than T: fine, interpolated


@pytest.mark.parametrize("timesteps", [5, 10, 20, 50, 100])
def test_ddim_quad_is_ddims_own_skip(timesteps):
    import numpy as np

    # DDIM's runners/diffusion.py: seq = [int(s) for s in np.linspace(0, sqrt(0.8 T), timesteps) ** 2]
    seq = [int(s) for s in list(np.linspace(0, np.sqrt(1000 * 0.8), timesteps) ** 2)]
    ts = time_grid(make_schedule(), timesteps - 1, "ddim_quad")
    # Repeats (0, 0, 1, ... for many steps) are identity steps in DDIM: the grid keeps each once.
    assert ts.tolist() == [float(s) for s in sorted(set(seq), reverse=True)]
    assert (len(ts) < timesteps) == (len(set(seq)) < len(seq))
    assert ts[-1] == 0 and ts[0] <= 800 and ts[0] >= 799  # truncated, up to 0.8 T


def test_ddim_quad_errors_name_the_field():
    with pytest.raises(ValueError, match=r"sample\.grid 'ddim_quad'"):
        time_grid(make_schedule(time="continuous"), 10, "ddim_quad")
    with pytest.raises(ValueError, match=r"sample\.steps"):
        time_grid(make_schedule(), 0, "ddim_quad")


# --------------------------------------------------------------------------- independent implementations
# Written from the papers' algorithms in their own notation (not from samplers.py), float64.
def _ts_lam(sch, ts):
    return sch.alpha(ts, F64), sch.sigma(ts, F64), sch.log_snr(ts, F64)


def ref_dpmpp_2m(eps, x, sch, ts):
    """DPM-Solver++(2M), Lu et al. 2022b, Algorithm 2 (first step first order)."""
    a, sg, lam = _ts_lam(sch, ts)
    prev = None
    for i in range(1, len(ts)):
        x0 = (x - sg[i - 1] * eps(x, ts[i - 1].expand(x.shape[0]))) / a[i - 1]
        h = lam[i] - lam[i - 1]
        if prev is None:
            d = x0
        else:
            r = (lam[i - 1] - lam[i - 2]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev
        x = sg[i] / sg[i - 1] * x - a[i] * torch.expm1(-h) * d
        prev = x0
    return x


def ref_dpm_2m_noise(eps, x, sch, ts):
    """Multistep second-order DPM-Solver with the noise model, DPM-Solver's default form."""
    a, sg, lam = _ts_lam(sch, ts)
    prev = None
    for i in range(1, len(ts)):
        e0 = eps(x, ts[i - 1].expand(x.shape[0]))
        h = lam[i] - lam[i - 1]
        x_new = a[i] / a[i - 1] * x - sg[i] * torch.expm1(h) * e0
        if prev is not None:
            r0 = (lam[i - 1] - lam[i - 2]) / h
            x_new = x_new - 0.5 * sg[i] * torch.expm1(h) * (e0 - prev) / r0
        x, prev = x_new, e0
    return x


def ref_dpm_solver_2(eps, x, sch, ts):
    """DPM-Solver-2, Lu et al. 2022a, Algorithm 1 (r1 = 1/2)."""
    a, sg, lam = _ts_lam(sch, ts)
    for i in range(1, len(ts)):
        h = lam[i] - lam[i - 1]
        s = sch.t_from_log_snr(lam[i - 1] + h / 2)
        a_s, sg_s = sch.alpha(s, F64), sch.sigma(s, F64)
        u = a_s / a[i - 1] * x - sg_s * torch.expm1(h / 2) * eps(x, ts[i - 1].expand(x.shape[0]))
        x = a[i] / a[i - 1] * x - sg[i] * torch.expm1(h) * eps(u, s.expand(x.shape[0]))
    return x


def ref_dpm_solver_3(eps, x, sch, ts):
    """DPM-Solver-3, Lu et al. 2022a, Algorithm 2 (r1 = 1/3, r2 = 2/3)."""
    a, sg, lam = _ts_lam(sch, ts)
    r1, r2 = 1 / 3, 2 / 3
    for i in range(1, len(ts)):
        h = lam[i] - lam[i - 1]
        s1, s2 = sch.t_from_log_snr(lam[i - 1] + r1 * h), sch.t_from_log_snr(lam[i - 1] + r2 * h)
        e0 = eps(x, ts[i - 1].expand(x.shape[0]))
        u1 = sch.alpha(s1, F64) / a[i - 1] * x - sch.sigma(s1, F64) * torch.expm1(r1 * h) * e0
        D1 = eps(u1, s1.expand(x.shape[0])) - e0
        u2 = (sch.alpha(s2, F64) / a[i - 1] * x - sch.sigma(s2, F64) * torch.expm1(r2 * h) * e0
              - sch.sigma(s2, F64) * r2 / r1 * (torch.expm1(r2 * h) / (r2 * h) - 1) * D1)
        D2 = eps(u2, s2.expand(x.shape[0])) - e0
        x = a[i] / a[i - 1] * x - sg[i] * torch.expm1(h) * e0 - sg[i] / r2 * (torch.expm1(h) / h - 1) * D2
    return x


@pytest.mark.parametrize("time", ["discrete", "continuous"])
@pytest.mark.parametrize("grid", ["logsnr", "time_uniform"])
def test_dpm_solver_matches_the_papers_algorithms(time, grid):
    sch = make_schedule("linear", time)
    x_T = torch.linspace(-3, 3, 17, dtype=F64)[:, None]
    eps = eps_exact(sch)
    ts = time_grid(sch, 9, grid)
    cases = [
        (ref_dpmpp_2m, dict(variant="dpm_solver++", order=2)),
        (ref_dpm_2m_noise, dict(variant="dpm_solver", order=2)),
        (ref_dpm_solver_2, dict(variant="dpm_solver", order=2, method="singlestep")),
        (ref_dpm_solver_3, dict(variant="dpm_solver", order=3, method="singlestep")),
    ]
    for ref, opts in cases:
        ours = dpm_solver(eps, x_T, sch, ts, lower_order_final=False, **opts)
        want = ref(eps, x_T, sch, ts)
        assert torch.allclose(ours, want, rtol=1e-11, atol=1e-11), (ref.__name__, (ours - want).abs().max())
    # The Taylor form is a different (also second-order) update: close, not equal.
    taylor = dpm_solver(eps, x_T, sch, ts, variant="dpm_solver++", order=2, solver_type="taylor",
                        lower_order_final=False)
    assert not torch.equal(taylor, ref_dpmpp_2m(eps, x_T, sch, ts))


@pytest.mark.parametrize("name", ["dpm_solver", "dpm_solver++"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("solver_type", ["dpmsolver", "taylor"])
@pytest.mark.parametrize("kind,time", [("linear", "continuous"), ("linear", "discrete")])
def test_singlestep_convergence_order(name, order, solver_type, kind, time):
    sch = make_schedule(kind, time)
    x_T = torch.linspace(-3, 3, 41, dtype=F64)[:, None]
    ref = ode_exact(sch, x_T, sch.t_max, sch.t_min)
    errs = [(sample(name, eps_exact(sch), x_T, sch, n, grid="logsnr", order=order, method="singlestep",
                    solver_type=solver_type) - ref).abs().max().item()
            for n in ((4, 8, 16) if order == 2 else (16, 32, 64))]  # order 3 dpm_solver++ dips at 8
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert errs[0] > errs[1] > errs[2], errs
    assert rates[-1] >= order - 0.5, (errs, rates)


@pytest.mark.parametrize("name", ["dpm_solver", "dpm_solver++"])
def test_multistep_2m_dpmsolver_form_is_second_order(name):
    errs, rates = _orders(name, 2, make_schedule("cosine", "continuous"))
    assert rates[-1] >= 1.5, (errs, rates)


def test_dpm_solver_option_errors():
    sch = make_schedule()
    for opt, match in ((dict(method="adaptive"), r"sample\.method"), (dict(solver_type="heun"), r"sample\.solver_type"),
                       (dict(order=4), r"sample\.order")):
        with pytest.raises(ValueError, match=match):
            sample("dpm_solver++", eps_exact(sch), torch.zeros(2, 1), sch, 5, **opt)


# --------------------------------------------------------------------------- x0 limits
def ref_guided_diffusion_ddpm(eps, x, sch, noise_list, clip):
    """guided-diffusion's p_sample_loop (posterior mean from the clipped pred_xstart,
    posterior variance, no noise at t = 0) on the full discrete chain."""
    abar = sch.alpha(torch.arange(1000, dtype=F64), F64) ** 2
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    betas = 1 - abar / abar_prev
    k = 0
    for t in range(999, -1, -1):
        e = eps(x, torch.full((x.shape[0],), float(t), dtype=F64))
        x0 = torch.sqrt(1 / abar[t]) * x - torch.sqrt(1 / abar[t] - 1) * e
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = (betas[t] * torch.sqrt(abar_prev[t]) / (1 - abar[t])) * x0 + \
               ((1 - abar_prev[t]) * torch.sqrt(1 - betas[t]) / (1 - abar[t])) * x
        if t > 0:
            var = betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
            x = mean + torch.sqrt(var) * noise_list[k]
            k += 1
        else:
            x = mean
    return x


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_matches_guided_diffusion_with_clip_denoised(clip):
    sch = make_schedule("linear")
    n = 64
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(n, 1, generator=g, dtype=F64) for _ in range(999)]
    ours = sample("ddpm", eps_exact(sch, mu=0.9, s=0.5), x_T, sch, 999, generator=torch.Generator().manual_seed(1),
                  denoise_to_zero=True, clip_denoised=clip)
    want = ref_guided_diffusion_ddpm(eps_exact(sch, mu=0.9, s=0.5), x_T, sch, zs, clip)
    assert torch.allclose(ours, want, rtol=0, atol=1e-9), (ours - want).abs().max()
    assert (ours.abs().max() <= 1.0) == clip  # mu = 0.9, s = 0.5: unclipped samples leave [-1, 1]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_clips_and_thresholds(name):
    sch = make_schedule()
    x_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(2))
    eps = eps_exact(sch, mu=0.9, s=0.6)
    kw = dict(grid="logsnr", denoise_to_zero=True)
    free = sample(name, eps, x_T, sch, 8, generator=torch.Generator().manual_seed(3), **kw)
    clipped = sample(name, eps, x_T, sch, 8, generator=torch.Generator().manual_seed(3), clip_denoised=True, **kw)
    thr = sample(name, eps, x_T, sch, 8, generator=torch.Generator().manual_seed(3), thresholding=True, **kw)
    assert free.abs().max() > 1.2
    assert clipped.abs().max() <= 1.0 + 1e-6 and thr.abs().max() <= 1.0 + 1e-6
    assert not torch.equal(clipped, thr)


def test_dynamic_threshold_against_numpy():
    import numpy as np

    x0 = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=F64) * torch.tensor(
        [0.2, 1.0, 2.0, 3.0, 0.9], dtype=F64).view(-1, 1, 1, 1)
    got = samplers.dynamic_threshold(x0, 0.9, 1.0)
    a = x0.numpy().reshape(5, -1)
    s = np.maximum(np.quantile(np.abs(a), 0.9, axis=1), 1.0)[:, None]
    want = np.clip(a, -s, s) / s
    assert np.allclose(got.numpy().reshape(5, -1), want, rtol=1e-6, atol=1e-7)


def test_dpmpp_thresholding_limits_the_data_prediction():
    # DPM-Solver applies thresholding to x0 inside data_prediction_fn; ours goes through eps and back.
    sch = make_schedule("linear", "continuous")
    x_T = torch.linspace(-3, 3, 16, dtype=F64).view(4, 4)
    eps = eps_exact(sch, mu=0.9, s=0.6)

    def eps_from_thresholded_x0(x, t):
        a = sch.alpha(t, F64).view(-1, 1)
        s = sch.sigma(t, F64).view(-1, 1)
        x0 = samplers.dynamic_threshold((x - s * eps(x, t)) / a, 0.995, 1.0)
        return (x - a * x0) / s

    ts = time_grid(sch, 10, "logsnr")
    ours = dpm_solver(eps, x_T, sch, ts, thresholding=True, lower_order_final=False)
    assert torch.allclose(ours, ref_dpmpp_2m(eps_from_thresholded_x0, x_T, sch, ts), atol=1e-10)
    with pytest.raises(ValueError, match="exclusive"):
        dpm_solver(eps, x_T, sch, ts, thresholding=True, clip_denoised=True)


# --------------------------------------------------------------------------- per-image generators
@pytest.mark.parametrize("name,opts", [("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_per_image_generators_make_images_independent_of_the_batch(name, opts):
    sch = make_schedule()
    idx = list(range(10, 17))

    def run(indices):
        gens = samplers.image_generators(5, indices)
        x_T = samplers.noise((len(indices), 2, 3), gens)
        return sample(name, eps_exact(sch), x_T, sch, 6, generator=gens, **opts)

    full = run(idx)
    parts = torch.cat([run(idx[:1]), run(idx[1:4]), run(idx[4:])])
    assert torch.equal(full, parts)
    assert not torch.equal(run([20, 21]), full[:2])  # another index: other noise


def test_noise_rows_come_from_their_own_generator():
    gens = samplers.image_generators(0, [3, 4])
    got = samplers.noise((2, 5, 7), gens)
    for row, i in zip(got, (3, 4)):
        g = torch.Generator().manual_seed(samplers.image_seed(0, i))
        assert torch.equal(row, torch.randn(5, 7, generator=g))
    assert samplers.image_seed(0, 1) != samplers.image_seed(1, 0)
    with pytest.raises(ValueError, match="per-image generators"):
        samplers.noise((3, 2), gens)
