"""Closed-form Gaussian-mixture eps, the analytic t-singularity, and the Lipschitz / perturbation
diagnostics. CPU, float64 where the closed form is checked; each test runs well under a second."""

import math

import numpy as np
import pytest
import torch

from etsdm_dist.diffusion.etsdm import ConditionedModel, EtsdmSettings
from etsdm_dist.study.gmm import GaussianMixture, mmd2_rbf, ring_mixture, sliced_wasserstein
from etsdm_dist.study.lipschitz import (FORM_NETWORK, FORM_WRAPPED, conditioned_parts, fit_power_law,
                                  lipschitz_network_input, lipschitz_wrapped_true_t, log_grid,
                                  perturbation_error)
from etsdm_dist.diffusion.schedule import make_schedule

torch.set_num_threads(1)
F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mixture():
    # Unequal weights and stds so a formula that ignores either would fail.
    means = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [0.0, -1.2]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.1, 0.3, 0.2]), torch.tensor([0.5, 0.3, 0.2]))


# ------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("alpha,sigma", [(0.99, 0.14), (0.8, 0.6), (0.3, 0.95)])
def test_eps_matches_autograd_score(alpha, sigma):
    g = _mixture()
    x = (torch.randn(64, 2, generator=_gen(0), dtype=F64) * 1.5).requires_grad_(True)
    # Independent reference: differentiate the marginal log density directly.
    logp = g.log_prob(x, alpha, sigma).sum()
    (score_ad,) = torch.autograd.grad(logp, x)
    torch.testing.assert_close(g.score(x.detach(), alpha, sigma), score_ad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g.eps(x.detach(), alpha, sigma), -sigma * score_ad, rtol=1e-10,
                               atol=1e-10)


def test_marginal_log_prob_matches_convolution_samples():
    # p_t really is the law of alpha x0 + sigma eps: compare its mean log-density on samples
    # against a second, independent sample set (cross-entropy = entropy for the right density).
    g = _mixture()
    a, s = 0.9, math.sqrt(1 - 0.81)
    x0 = g.sample(20000, _gen(1), dtype=F64)
    xt = a * x0 + s * torch.randn(x0.shape, generator=_gen(2), dtype=F64)
    wrong = GaussianMixture(g.means, g.stds * 1.5, g.weights)
    assert g.log_prob(xt, a, s).mean() > wrong.log_prob(xt, a, s).mean() + 0.01


@pytest.mark.parametrize("alpha", [0.95, 0.7])
def test_eps_matches_monte_carlo_posterior(alpha):
    g = _mixture()
    sigma = math.sqrt(1 - alpha ** 2)
    x = alpha * g.sample(8, _gen(3), dtype=F64) + sigma * torch.randn(8, 2, generator=_gen(4), dtype=F64)
    # eps = (x - alpha E[x0|x]) / sigma with E[x0|x] by importance sampling from the prior.
    mc = (x - alpha * g.posterior_mean_x0_mc(x, alpha, sigma, 200_000, _gen(5))) / sigma
    err = (g.eps(x, alpha, sigma) - mc).norm(dim=1).max()
    assert err < 0.03, err
    # and the check has power: a wrong alpha in the closed form is far off
    assert (g.eps(x, alpha * 0.9, sigma) - mc).norm(dim=1).max() > 0.1


def test_analytic_lipschitz_blows_up_like_inverse_sqrt_t():
    g = ring_mixture(8, 1.0, 0.05)
    sc = make_schedule("linear", "continuous")
    x0 = g.sample(256, _gen(0), dtype=F64)
    res = lipschitz_wrapped_true_t(g.eps_model(sc), x0, sc, log_grid(1e-8, 1e-4, 60), generator=_gen(1))
    K = np.asarray(res["K"])
    assert np.all(np.diff(K) < 0), "K(t) must increase monotonically as t -> 0"
    assert K[0] / K[-1] > 50
    fit = fit_power_law(res["t_left"], K, 1e-8, 1e-5)
    assert abs(fit["exponent"] + 0.5) < 0.02, fit
    assert fit["r2"] > 0.999
    # finite differences agree with the autograd t-derivative at x fixed
    t = torch.tensor(1e-6, dtype=F64, requires_grad=True)
    x = sc.q_sample(x0[:16], torch.full((16,), 1e-6, dtype=F64),
                    torch.randn(16, 2, generator=_gen(9), dtype=F64))
    e = g.eps(x, sc.alpha(t, F64), sc.sigma(t, F64))
    jac = torch.stack([torch.autograd.grad(e[:, j].sum(), t, retain_graph=True)[0] for j in range(2)])
    h = 1e-9
    fd = (g.eps(x, sc.alpha(1e-6 + h, F64), sc.sigma(1e-6 + h, F64)) - g.eps(x, sc.alpha(1e-6, F64), sc.sigma(1e-6, F64))) / h
    torch.testing.assert_close(fd.sum(0), jac, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ Lipschitz forms
class _SlopeNet(torch.nn.Module):
    """net(x, c) = x + c * v with ||v|| = slope: its t-Lipschitz constant is exactly ``slope``."""

    def __init__(self, slope):
        super().__init__()
        self.v = torch.tensor([0.6, 0.8]) * slope

    def forward(self, x, c):
        return x + c[:, None].to(x.dtype) * self.v.to(x.dtype)


class _SmoothNet(torch.nn.Module):
    def forward(self, x, c):
        return torch.sin(x + 0.01 * c[:, None].to(x.dtype))


def test_network_form_returns_known_slope_for_ddpm_and_etsdm():
    sd = make_schedule("linear", "discrete")
    x0 = torch.randn(32, 2, generator=_gen(0))
    for enabled, n_int in [(False, 999), (True, 5 + 900 - 1)]:
        m = ConditionedModel(_SlopeNet(0.25), EtsdmSettings(enabled=enabled, t_tilde=100, n=5))
        net_fn, cond_fn, scale = conditioned_parts(m)
        r = lipschitz_network_input(net_fn, cond_fn, x0, sd, torch.arange(1000.), t_tilde=100,
                                    time_scale=scale, generator=_gen(1))
        assert r["form"] == FORM_NETWORK
        np.testing.assert_allclose(r["K"], 0.25, rtol=1e-4)
        assert len(r["K"]) == n_int
        if enabled:  # the trained conditions: 0, 20, .., 80, then every step from 100
            assert r["cond_left"][:6] == [0, 20, 40, 60, 80, 100]
            assert r["summary"]["below_t_tilde"]["count"] == 5


def test_network_form_in_continuous_time_uses_true_time_units():
    sc = make_schedule("linear", "continuous")
    m = ConditionedModel(_SlopeNet(0.25), EtsdmSettings.defaults_for("continuous"))
    net_fn, cond_fn, scale = conditioned_parts(m)
    assert scale == 1000.0
    r = lipschitz_network_input(net_fn, cond_fn, torch.zeros(8, 2), sc,
                                torch.linspace(0.0, 1.0, 201), time_scale=scale, generator=_gen(0))
    # slope per unit network input is 0.25, i.e. 250 per unit true time
    np.testing.assert_allclose(r["K"], 250.0, rtol=1e-3)


def test_wrapped_form_is_zero_inside_subintervals_and_jumps_at_boundaries():
    sd = make_schedule("linear", "discrete")
    x0 = torch.randn(32, 2, generator=_gen(0))
    ets = ConditionedModel(_SmoothNet(), EtsdmSettings(enabled=True, t_tilde=100, n=5))
    ddpm = ConditionedModel(_SmoothNet(), EtsdmSettings(enabled=False, t_tilde=100, n=5))
    grid = torch.arange(200.)
    re = lipschitz_wrapped_true_t(ets, x0, sd, grid, t_tilde=100, generator=_gen(1))
    rd = lipschitz_wrapped_true_t(ddpm, x0, sd, grid, t_tilde=100, generator=_gen(1))
    assert re["form"] == rd["form"] == FORM_WRAPPED
    K = np.asarray(re["K"])  # K[i] is the step i -> i+1
    boundary = np.zeros(199, dtype=bool)
    boundary[[19, 39, 59, 79, 99]] = True
    assert np.all(K[:100][~boundary[:100]] == 0.0)   # exactly zero, not merely small
    assert np.all(K[boundary] > 1e-3)
    assert np.all(K[100:] > 0) and np.all(np.asarray(rd["K"]) > 0)
    # the jump 0 -> 20 equals the DDPM change across 20 steps (same net, same x)
    assert re["summary"]["below_t_tilde"]["max"] > rd["summary"]["below_t_tilde"]["max"]


def test_perturbation_error_of_identity_model():
    sd = make_schedule("linear", "discrete")
    x0 = torch.zeros(500, 3, dtype=F64)
    noise = torch.randn(500, 3, generator=_gen(0), dtype=F64)
    delta = torch.randn(500, 3, generator=_gen(1), dtype=F64)
    ident = lambda x, t: x  # noqa: E731
    r = perturbation_error(ident, x0, sd, [0, 500, 999], scale=0.2, noise=noise, delta=delta)
    for t, rel in zip(r["t"], r["rel_error"]):
        s = float(sd.sigma(torch.tensor(t), F64))
        expect = float(0.2 * delta.norm(dim=1).sum() / (s * noise.norm(dim=1).sum()))
        assert rel == pytest.approx(expect, rel=1e-9)
    # a constant model is perfectly stable
    const = lambda x, t: torch.ones_like(x)  # noqa: E731
    assert perturbation_error(const, x0, sd, [10], noise=noise, delta=delta)["rel_error"] == [0.0]


# ------------------------------------------------------------------ sample distances
def test_distances_zero_for_same_distribution_and_grow_with_shift():
    g = ring_mixture(8, 1.0, 0.05)
    a, b = g.sample(1500, _gen(0)), g.sample(1500, _gen(1))
    shifted = b + torch.tensor([0.1, 0.0])
    blurred = b + 0.1 * torch.randn(b.shape, generator=_gen(2))
    m_same, m_shift, m_blur = (mmd2_rbf(a, y, 0.1) for y in (b, shifted, blurred))
    assert abs(m_same) < 0.003 and m_shift > 10 * abs(m_same) and m_blur > 10 * abs(m_same)
    # Sliced W2 has a finite-sample floor on multimodal data (mode masses fluctuate by ~1/sqrt(N)
    # and W2 charges the gap between modes for it), so it needs more samples than MMD.
    a, b = g.sample(6000, _gen(3)), g.sample(6000, _gen(4))
    s_same, s_shift = sliced_wasserstein(a, b), sliced_wasserstein(a, b + torch.tensor([0.1, 0.0]))
    assert s_same < 0.06 and s_shift > 1.5 * s_same
    assert sliced_wasserstein(a, b, seed=3) == sliced_wasserstein(a, b, seed=3)


def test_power_law_fit_recovers_exponent():
    t = np.logspace(-6, -2, 30)
    fit = fit_power_law(t, 3.0 * t ** -0.5, 1e-6, 1e-2)
    assert fit["exponent"] == pytest.approx(-0.5) and fit["r2"] == pytest.approx(1.0)
    assert fit_power_law(t, t, 1.0, 2.0)["exponent"] is None
