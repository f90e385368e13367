"""`etsdm toy --quick` end to end, plus the pieces whose correctness the report relies on."""

import copy
import json
import os

import torch

from etsdm_dist import cli
from etsdm_dist.study import toy
from etsdm_dist.diffusion.etsdm import ConditionedModel, EtsdmSettings
from etsdm_dist.study.gmm import ring_mixture
from etsdm_dist.study.lipschitz import FORM_NETWORK, FORM_WRAPPED
from etsdm_dist.diffusion.schedule import make_schedule

torch.set_num_threads(1)


def test_training_pair_starts_identical_and_differs_only_by_condition():
    # DDPM and E-TSDM must see the same init, data, t and noise: with t_tilde = n (E-TSDM is the
    # identity) the two trained networks must come out bit-identical.
    cfg = toy.ToyConfig.quick(train_steps=5, batch=32, t_tilde=20, n=20)
    models, _ = toy.train_pair(cfg, ring_mixture(), make_schedule())
    for a, b in zip(models["ddpm"].parameters(), models["etsdm"].parameters()):
        assert torch.equal(a, b)
    cfg = toy.ToyConfig.quick(train_steps=5, batch=32)
    models, _ = toy.train_pair(cfg, ring_mixture(), make_schedule())
    assert not all(torch.equal(a, b) for a, b in zip(models["ddpm"].parameters(),
                                                       models["etsdm"].parameters()))


def test_time_mlp_depends_on_time_and_is_wrapped_correctly():
    torch.manual_seed(0)
    net = toy.TimeMLP()
    m = ConditionedModel(copy.deepcopy(net), EtsdmSettings(enabled=True, t_tilde=100, n=5))
    x = torch.randn(4, 2)
    t = torch.tensor([0, 19, 20, 150])
    out = m(x, t)
    torch.testing.assert_close(out, net(x, torch.tensor([0.0, 0.0, 20.0, 150.0])))
    assert not torch.allclose(net(x, torch.zeros(4)), net(x, torch.full((4,), 50.0)))


def test_quick_cli_writes_json_and_plots(tmp_path, capsys):
    out = str(tmp_path / "toy")
    rc = cli.main(["toy", "--out", out, "--quick", "--seed", "1", "--steps", "5", "10"])
    assert rc == 0
    res = json.load(open(os.path.join(out, "toy.json")))
    for key in ("config", "analytic", "training", "lipschitz", "perturbation", "sample_quality",
                "summary", "timing_s", "plots"):
        assert key in res, key
    for png in ("lipschitz.png", "analytic_lipschitz.png", "perturbation.png", "quality.png"):
        assert png in res["plots"] and os.path.getsize(os.path.join(out, png)) > 1000
    # every Lipschitz result is labelled with its form
    for form in (FORM_NETWORK, FORM_WRAPPED):
        for name, r in res["lipschitz"][form].items():
            assert r["form"] == form and len(r["K"]) == len(r["t_left"]) > 0
    assert set(res["lipschitz"][FORM_WRAPPED]) == {"ddpm", "etsdm", "exact"}
    # the analytic exponent of the exact eps is about -1/2 on the continuous schedule
    assert abs(res["analytic"]["continuous"]["fit_small_t"]["exponent"] + 0.5) < 0.02
    q = res["sample_quality"]
    assert {r["steps"] for r in q["results"]} == {5, 10}
    assert {r["model"] for r in q["results"]} == {"ddpm", "etsdm", "exact"}
    for r in q["results"]:
        assert len(r["mmd2"]["per_seed"]) == q["num_seeds"] and r["mmd2"]["std"] >= 0
    # winners are consistent with the numbers they summarise
    by = {(r["sampler"], r["grid"], r["steps"], r["model"]): r["mmd2"]["mean"] for r in q["results"]}
    for c in q["comparisons"]:
        d, e = (by[(c["sampler"], c["grid"], c["steps"], m)] for m in ("ddpm", "etsdm"))
        assert c["winner"] == ("etsdm" if e < d else "ddpm" if d < e else "tie")
    lip = res["summary"]["lipschitz"][FORM_NETWORK]
    m = lip["below_t_tilde_mean"]
    assert lip["winner_below_t_tilde_mean"] == ("etsdm" if m["etsdm"] < m["ddpm"] else "ddpm")
    printed = capsys.readouterr().out
    assert "Sampling wins" in printed and "winner" in printed
