"""`diffusion.prediction: v` against the analytic Gaussian model, and its path through training,
checkpoints, exports and `etsdm sample`.

Data x0 ~ N(mu, S^2) per coordinate: with m = alpha^2 S^2 + sigma^2 the exact denoisers are
E[eps | x_t] = sigma (x - alpha mu) / m and E[x0 | x_t] = mu + alpha S^2 (x - alpha mu) / m, so the
v loss's minimiser is v* = E[v | x_t] = alpha E[eps | x_t] - sigma E[x0 | x_t] in closed form.
"""
from __future__ import annotations

import json

import pytest
import torch

from etsdm_dist.diffusion import prediction as P
from etsdm_dist.diffusion import samplers
from etsdm_dist.diffusion.etsdm import ConditionedModel, EtsdmSettings
from etsdm_dist.diffusion.loss import diffusion_loss
from etsdm_dist.diffusion.schedule import make_schedule

torch.set_num_threads(1)
F64 = torch.float64
MU, S = 0.6, 0.5


def _coef(sch, t, x):
    shape = (-1,) + (1,) * (x.dim() - 1)
    return sch.alpha(t, F64).reshape(shape), sch.sigma(t, F64).reshape(shape)


class ExactNet(torch.nn.Module):
    """net(x, c) = the exact eps* or v* at true time c / scale (E-TSDM off, so c is t itself)."""

    def __init__(self, sch, kind: str, scale: float = 1.0):
        super().__init__()
        self.sch, self.kind, self.scale = sch, kind, scale

    def forward(self, x, c):
        a, s = _coef(self.sch, c.double() / self.scale, x)
        xd = x.to(F64)
        m = a * a * S * S + s * s
        eps = s * (xd - a * MU) / m
        x0 = MU + a * S * S * (xd - a * MU) / m
        return (eps if self.kind == "eps" else a * eps - s * x0).to(x.dtype)


def _models(sch):
    st = EtsdmSettings.defaults_for(sch.time, enabled=False)
    return (ConditionedModel(ExactNet(sch, "eps", st.time_scale), st),
            ConditionedModel(ExactNet(sch, "v", st.time_scale), st, prediction="v", schedule=sch))


def test_maps_between_eps_v_and_x0_are_exact_inverses():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1000, generator=g, dtype=F64)
    a = torch.rand(1000, generator=g, dtype=F64)
    s = torch.sqrt(1 - a * a)
    x_t = a * x0 + s * eps
    v = P.v_target(x0, eps, a, s)
    assert torch.allclose(P.eps_from_v(x_t, v, a, s), eps, rtol=0, atol=1e-13)
    assert torch.allclose(P.x0_from_v(x_t, v, a, s), x0, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="diffusion.prediction"):
        P.check_prediction("x0")


@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_v_loss_is_the_eps_loss_over_alpha_squared_and_v_star_minimises_it(time):
    # eps_hat - eps = alpha (v_hat - v) for any prediction, so the v loss is the eps loss of the
    # same network read as eps, divided by alpha^2, sample by sample: the v target is right.
    sch = make_schedule("linear", time)
    eps_model, v_model = _models(sch)
    x0 = MU + S * torch.randn(4096, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    lv, t = diffusion_loss(v_model, x0, sch, generator=torch.Generator().manual_seed(2))
    as_eps = lambda x, tt, y=None: v_model(x, tt)  # noqa: E731 - the same network, output as eps
    le, t2 = diffusion_loss(as_eps, x0, sch, generator=torch.Generator().manual_seed(2))
    assert torch.equal(t, t2)
    a = sch.alpha(t, F64)
    assert torch.allclose(lv, le / a ** 2, rtol=1e-9, atol=1e-12)
    # v* is the minimiser: along v* + c h the mean loss is a parabola with its vertex at c ~ 0
    # (Monte-Carlo error only), while reading eps* as v (what a mixed-up model would be) is far off.
    g = torch.Generator().manual_seed(3)
    x0 = MU + S * torch.randn(20000, 1, generator=g, dtype=F64)
    tt = torch.randint(0, sch.num_timesteps, (20000,), generator=g) if time == "discrete" else \
        torch.rand(20000, generator=g, dtype=F64).clamp(min=1e-3)
    e = torch.randn(20000, 1, generator=g, dtype=F64)
    aa, ss = _coef(sch, tt, x0)
    x = aa * x0 + ss * e
    target = P.v_target(x0, e, aa, ss)
    vstar = v_model(x, tt, output="prediction")
    h = x  # any direction
    c = ((target - vstar) * h).sum() / (h * h).sum()
    assert abs(float(c)) < 0.02
    loss_star = ((vstar - target) ** 2).mean()
    loss_mixed = ((eps_model(x, tt) - target) ** 2).mean()
    assert loss_mixed > 1.5 * loss_star


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
@pytest.mark.parametrize("clip", [False, True])
def test_v_minimiser_samples_like_the_eps_minimiser(name, clip):
    sch = make_schedule("linear")
    eps_model, v_model = _models(sch)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    # Integer grid times: the network's float32 time input is then exact, so the eps and v models
    # see the same t as the wrapper's float64 v -> eps map and agree to rounding.
    kw = dict(grid="uniform", denoise_to_zero=True, clip_denoised=clip)
    if name.startswith("dpm"):
        kw["order"] = 3
    want = samplers.sample(name, eps_model, x_T, sch, 12, generator=torch.Generator().manual_seed(5), **kw)
    denoise = lambda x, t: v_model(x, t, output="denoise")  # noqa: E731 - the sampling job's form
    got = samplers.sample(name, denoise, x_T, sch, 12, generator=torch.Generator().manual_seed(5), **kw)
    plain = samplers.sample(name, v_model, x_T, sch, 12, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.allclose(got, want, rtol=0, atol=1e-9), (got - want).abs().max()
    assert torch.allclose(plain, want, rtol=0, atol=1e-9)  # forward's default output is eps


def test_v_gives_x0_without_dividing_by_alpha():
    # At t = T-1 (alpha = 0.0064) a v error delta moves x0 by sigma * delta; read through eps it
    # would move x0 by delta / alpha. The wrapper hands samplers the direct x0.
    sch = make_schedule("linear")
    _, v_model = _models(sch)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(6))
    t = torch.full((8,), 999.0, dtype=F64)
    eps, x0 = v_model(x, t, output="denoise")
    a, s = (float(v) for v in (sch.alpha(torch.tensor(999.0), F64), sch.sigma(torch.tensor(999.0), F64)))
    v = v_model(x, t, output="prediction")
    assert torch.allclose(x0, (a * x.double() - s * v.double()).float(), rtol=0, atol=1e-6)
    assert torch.equal(v_model(x, t), eps)


def test_v_refuses_a_non_vp_schedule_and_needs_one():
    sch = make_schedule("linear")

    class Stretched:  # sigma = 2 sqrt(1 - alpha^2): not variance preserving
        kind, time, t_min, t_max, num_timesteps = "stretched", "discrete", 0.0, 999.0, 1000
        alpha = staticmethod(sch.alpha)

        @staticmethod
        def sigma(t, dtype=torch.float32):
            return 2 * sch.sigma(t, dtype)

    st = EtsdmSettings()
    with pytest.raises(ValueError, match="variance-preserving"):
        ConditionedModel(ExactNet(sch, "v"), st, prediction="v", schedule=Stretched())
    with pytest.raises(ValueError, match="needs the noise schedule"):
        ConditionedModel(ExactNet(sch, "v"), st, prediction="v")
    with pytest.raises(ValueError, match="diffusion.prediction"):
        ConditionedModel(ExactNet(sch, "v"), st, prediction="x0", schedule=sch)


def test_prediction_travels_with_exports(tmp_path):
    from etsdm_dist import config as config_mod
    from etsdm_dist.diffusion.build import build_model
    from etsdm_dist.eval.sampling import load_model
    from etsdm_dist.train.export import write_export

    cfg = config_mod.from_dict({"network": {"preset": "tiny", "base_channels": 16, "channel_mult": [1, 2],
                                            "attention_resolutions": []},
                                "diffusion": {"prediction": "v"}})
    model = build_model(cfg)
    assert model.prediction == "v"
    dumped = cfg.model_dump(mode="json")
    conf = {"format": "etsdm-export-1", "network": dumped["network"], "diffusion": dumped["diffusion"],
            "etsdm": dumped["etsdm"]}
    write_export(str(tmp_path / "v.safetensors"), model.net.state_dict(), conf)
    assert load_model(str(tmp_path / "v.safetensors")).model.prediction == "v"
    # An export from before the field existed holds an eps model, and is read as one.
    old = {**conf, "diffusion": {k: v for k, v in dumped["diffusion"].items() if k != "prediction"}}
    write_export(str(tmp_path / "old.pt"), model.net.state_dict(), old, "pt")
    assert load_model(str(tmp_path / "old.pt")).model.prediction == "eps"


@pytest.mark.slow
def test_v_run_trains_and_samples_through_the_cli(base, data, tmp_path):
    """A 1-rank ci_tiny run with prediction v: the loss falls, the checkpoint records v, and
    `etsdm sample` on the run directory rebuilds a v model and writes the images."""
    import train_harness as H
    from etsdm_dist import cli
    from etsdm_dist.eval.sampling import load_model
    from etsdm_dist.run_dir import find_resume

    run = H.run_train("v-pred", base, data, 1, *H.REF_OVERRIDES, "diffusion.prediction=v",
                      "train.total_kimg=0.192", "train.checkpoint_kimg=0.192")
    assert run.result.returncodes == [0], run.result.output()
    losses = [loss for _, loss in run.steps]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses  # 0.73 -> 0.56 here
    found, _ = find_resume(run.run_dir)
    assert found[1]["config"]["diffusion"]["prediction"] == "v"
    assert load_model(run.run_dir).model.prediction == "v"
    out = tmp_path / "samples"
    assert cli.main(["sample", run.run_dir, "--num", "4", "--out", str(out), "--format", "png",
                     "--steps", "4", "--batch", "4", "--no-progress"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 4, pngs
    record = [json.loads(p.read_text()) for p in out.rglob("*.json")]
    assert record  # the job's identity / chunk records
