"""`etsdm toy`: the paper's claims on a 2-D Gaussian mixture, on CPU, in a few minutes.

Trains two identical small MLP eps-networks -- DDPM (E-TSDM disabled) and E-TSDM (t_tilde=100, n=5,
discrete T=1000 linear schedule) -- from the same initial weights with the same data / t / noise
streams, through ConditionedModel + diffusion_loss, so the only difference is the time condition.
Then it measures, against the closed-form ideal eps of the mixture (etsdm_dist.study.gmm):

* analytic: the exact eps's t-Lipschitz constant, continuous time (sigma -> 0, power-law fit) and
  discrete T=1000 (sigma_0 = 0.01 > 0, so K(0) is finite);
* Fig. 1b analogue: K(t) of both networks in both forms (lipschitz.py explains them);
* Fig. 2 analogue: relative output change under input perturbation of scale 0.2, vs t;
* sample quality of DDIM (uniform and quadratic grids) and DPM-Solver (log-SNR grid) at few steps,
  as unbiased RBF-MMD^2 (and sliced W2) to fresh samples of the exact marginal at the final time,
  mean / std over several sampling seeds, with the exact-eps model as the sampler's own floor.

Every comparison's "winner" is computed from the numbers. Writes DIR/toy.json and DIR/*.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np
import torch

from etsdm_dist.study import lipschitz as L
from etsdm_dist.diffusion.etsdm import ConditionedModel, EtsdmSettings
from etsdm_dist.study.gmm import mmd2_rbf, rbf_self_term, ring_mixture, sliced_wasserstein
from etsdm_dist.diffusion.loss import diffusion_loss
from etsdm_dist.diffusion.samplers import sample
from etsdm_dist.diffusion.schedule import make_schedule

# (sampler name, grid, options). DDIM on a uniform grid never activates f (every step below
# t_tilde is a left end); the quadratic and log-SNR grids do (PAPER.md).
SAMPLER_CONFIGS = [
    ("ddim", "uniform", {}),
    ("ddim", "quadratic", {}),
    ("dpm_solver++", "logsnr", {"order": 2}),
    ("dpm_solver", "logsnr", {"order": 3}),
]
MODELS = ("ddpm", "etsdm")


@dataclass
class ToyConfig:
    seed: int = 0
    num_modes: int = 8
    radius: float = 1.0
    std: float = 0.05           # small modes: the regime where eps* varies fastest near t = 0
    num_timesteps: int = 1000
    t_tilde: int = 100
    n: int = 5
    hidden: int = 128
    depth: int = 3
    emb_dim: int = 32
    train_steps: int = 6000
    batch: int = 512
    lr: float = 2e-3
    sampler_steps: List[int] = field(default_factory=lambda: [5, 10, 20])
    sample_seeds: int = 5
    num_samples: int = 1000     # generated per seed
    num_reference: int = 2000   # fresh true samples per seed
    eval_samples: int = 256     # x0 for the Lipschitz / perturbation averages
    mmd_bandwidth: float = 0.1  # fixed, about 2 mode stds
    pert_scale: float = 0.2

    @staticmethod
    def quick(**kw) -> "ToyConfig":
        base = dict(train_steps=300, batch=256, sample_seeds=2, num_samples=400,
                    num_reference=600, eval_samples=64)
        base.update(kw)
        return ToyConfig(**base)


class TimeMLP(torch.nn.Module):
    """eps-network for low-dim data: net(x, c) with c the float time condition (0..T-1 scale).

    The condition goes through the usual sinusoidal embedding (periods up to 10^4) and is
    concatenated with x; no normalisation layers, so the map from c to the output is smooth and
    the finite-difference Lipschitz estimates are meaningful."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, emb_dim: int = 32):
        super().__init__()
        self.emb_dim = emb_dim
        layers, w = [], dim + emb_dim
        for _ in range(depth):
            layers += [torch.nn.Linear(w, hidden), torch.nn.SiLU()]
            w = hidden
        layers.append(torch.nn.Linear(w, dim))
        self.mlp = torch.nn.Sequential(*layers)

    def embed(self, c: torch.Tensor) -> torch.Tensor:
        half = self.emb_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        a = c.to(torch.float32)[:, None] * freqs[None]
        return torch.cat([torch.cos(a), torch.sin(a)], dim=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor, y=None) -> torch.Tensor:
        return self.mlp(torch.cat([x, self.embed(c).to(x.dtype)], dim=1))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def train_pair(cfg: ToyConfig, mixture, schedule):
    """Train DDPM and E-TSDM from identical weights and identical random streams."""
    torch.manual_seed(cfg.seed)
    net0 = TimeMLP(mixture.dim, cfg.hidden, cfg.depth, cfg.emb_dim)
    models, stats = {}, {}
    for name in MODELS:
        st = EtsdmSettings(enabled=(name == "etsdm"), t_tilde=cfg.t_tilde, n=cfg.n, time="discrete")
        model = ConditionedModel(copy.deepcopy(net0), st)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        # Cosine decay to 0: with no EMA, the final weights are otherwise noisy at this batch size.
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.train_steps) / cfg.train_steps)))
        g_data, g_loss = _gen(cfg.seed + 101), _gen(cfg.seed + 202)
        tail_all, tail_early, t0 = [], [], time.perf_counter()
        for step in range(cfg.train_steps):
            x0 = mixture.sample(cfg.batch, g_data)
            per, t = diffusion_loss(model, x0, schedule, generator=g_loss)
            loss = per.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step >= 0.8 * cfg.train_steps:  # loss over the last 20% (low lr) of training
                early = t < cfg.t_tilde
                tail_all.append(float(loss.detach()))
                if bool(early.any()):
                    tail_early.append(float(per[early].detach().mean()))
        model.eval()
        models[name] = model
        stats[name] = {"final_loss": float(np.mean(tail_all)),
                       "final_loss_below_t_tilde": float(np.mean(tail_early)) if tail_early else None,
                       "train_seconds": time.perf_counter() - t0}
    return models, stats


def analytic_section(mixture, cfg: ToyConfig, x0_64: torch.Tensor) -> dict:
    """K(t) of the exact eps: continuous time (sigma_t -> 0) and the discrete T schedule."""
    out = {}
    sc = make_schedule("linear", "continuous", num_timesteps=cfg.num_timesteps)
    r = L.lipschitz_wrapped_true_t(mixture.eps_model(sc), x0_64, sc, L.log_grid(1e-8, 1.0, 161),
                                   generator=_gen(cfg.seed + 7))
    # 1/sqrt(t) needs sigma_t << mode std (gmm.py); fit where sigma_t <= 0.1 std in continuous
    # time (many grid points qualify) and <= 0.4 std in discrete time (only a few integers do).
    tl = torch.tensor(r["t_left"], dtype=torch.float64)
    t_hi = float(tl[sc.sigma(tl, torch.float64) <= 0.1 * cfg.std].max())
    out["continuous"] = {
        "model": "exact_eps", "lipschitz": r,
        "fit_small_t": dict(L.fit_power_law(r["t_left"], r["K"], 1e-8, t_hi),
                            criterion="sigma_t <= 0.1 * mode std"),
        "fit_sampler_range": L.fit_power_law(r["t_left"], r["K"], 1e-3, 1e-1),
        "note": "fit_small_t covers sigma_t << mode std (expected exponent -0.5); in "
                "fit_sampler_range sigma_t crosses the mode std and eps* is not a power law "
                "(look at r2)"}
    sd = make_schedule("linear", "discrete", num_timesteps=cfg.num_timesteps)
    rd = L.lipschitz_wrapped_true_t(mixture.eps_model(sd), x0_64, sd,
                                    torch.arange(cfg.num_timesteps, dtype=torch.float64),
                                    t_tilde=cfg.t_tilde, generator=_gen(cfg.seed + 7))
    K = np.asarray(rd["K"])
    # Index k has applied k+1 betas (continuous time ~ (k+1)/T), so fit against k+1.
    sig = sd.sigma(torch.arange(cfg.num_timesteps - 1, dtype=torch.float64), torch.float64).numpy()
    k_hi = int(np.nonzero(sig <= 0.4 * cfg.std)[0].max()) if (sig <= 0.4 * cfg.std).any() else 0
    out["discrete"] = {
        "model": "exact_eps", "lipschitz": rd, "sigma_0": float(sig[0]),
        "K_at_0": float(K[0]), "K_at_t_tilde": float(K[cfg.t_tilde]),
        "fit_small_t": dict(L.fit_power_law(np.arange(1, K.size + 1), K, 1, k_hi + 1),
                            criterion="sigma_t <= 0.4 * mode std; abscissa t + 1"),
        "fit_t_plus_1_in_1_10": L.fit_power_law(np.arange(1, K.size + 1), K, 1, 10)}
    return out


def lipschitz_section(models, mixture, schedule, cfg, x0, noise) -> dict:
    grid = torch.arange(cfg.num_timesteps, dtype=torch.float64)
    res = {L.FORM_NETWORK: {}, L.FORM_WRAPPED: {}}
    for name, m in models.items():
        net_fn, cond_fn, scale = L.conditioned_parts(m)
        res[L.FORM_NETWORK][name] = L.lipschitz_network_input(
            net_fn, cond_fn, x0, schedule, grid, time_scale=scale, t_tilde=cfg.t_tilde, noise=noise)
        res[L.FORM_WRAPPED][name] = L.lipschitz_wrapped_true_t(m, x0, schedule, grid,
                                                               t_tilde=cfg.t_tilde, noise=noise)
    res[L.FORM_WRAPPED]["exact"] = L.lipschitz_wrapped_true_t(
        mixture.eps_model(schedule), x0, schedule, grid, t_tilde=cfg.t_tilde, noise=noise)
    return res


def perturbation_section(models, mixture, schedule, cfg, x0, noise) -> dict:
    ts = np.unique(np.round(np.geomspace(1, cfg.num_timesteps, 40)) - 1).astype(int).tolist()
    delta = torch.randn(x0.shape, generator=_gen(cfg.seed + 33))
    fns = dict(models, exact=mixture.eps_model(schedule))
    out = {"scale": cfg.pert_scale}
    for name, fn in fns.items():
        out[name] = L.perturbation_error(fn, x0, schedule, ts, scale=cfg.pert_scale, noise=noise,
                                         delta=delta, t_tilde=cfg.t_tilde)
    return out


def _winner(ddpm: float, etsdm: float) -> str:
    """Lower is better for every metric compared here."""
    return "etsdm" if etsdm < ddpm else ("ddpm" if ddpm < etsdm else "tie")


def _stats(v) -> dict:
    v = np.asarray(v, dtype=np.float64)
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": sd, "sem": sd / math.sqrt(v.size), "per_seed": v.tolist()}


@torch.no_grad()
def quality_section(models, mixture, schedule, cfg) -> dict:
    fns = dict(models, exact=mixture.eps_model(schedule))
    a0, s0 = (float(f(torch.tensor(schedule.t_min), torch.float64)) for f in (schedule.alpha, schedule.sigma))
    rows, floor = [], []
    for seed in range(cfg.sample_seeds):
        # Samplers stop at t_min (sigma_0 = 0.01 in discrete time), so the target is the exact
        # marginal there: alpha_0 x0 + sigma_0 eps, drawn fresh for every seed.
        gr = _gen(cfg.seed + 1000 + seed)
        ref = a0 * mixture.sample(cfg.num_reference, gr) + s0 * torch.randn(cfg.num_reference, 2, generator=gr)
        true = a0 * mixture.sample(cfg.num_samples, gr) + s0 * torch.randn(cfg.num_samples, 2, generator=gr)
        ref_self = rbf_self_term(ref, cfg.mmd_bandwidth)  # shared by every model/sampler below
        floor.append(mmd2_rbf(true, ref, cfg.mmd_bandwidth, ref_self))
        x_T = torch.randn(cfg.num_samples, mixture.dim, generator=_gen(cfg.seed + 2000 + seed))
        for sname, grid, opts in SAMPLER_CONFIGS:
            for steps in cfg.sampler_steps:
                for mname, fn in fns.items():
                    x = sample(sname, fn, x_T, schedule, steps, grid=grid, **opts)
                    rows.append(((sname, grid, opts.get("order"), steps, mname), seed,
                                 mmd2_rbf(x, ref, cfg.mmd_bandwidth, ref_self),
                                 sliced_wasserstein(x, ref, seed=cfg.seed)))
    results = {}
    for key, seed, mmd, sw in rows:
        r = results.setdefault(key, {"mmd2": [], "sw2": []})
        r["mmd2"].append(mmd)
        r["sw2"].append(sw)
    table = [{"sampler": k[0], "grid": k[1], "order": k[2], "steps": k[3], "model": k[4],
              "mmd2": _stats(v["mmd2"]), "sliced_w2": _stats(v["sw2"])} for k, v in results.items()]
    comps = []
    for (sname, grid, order, steps, mname), v in results.items():
        if mname != "ddpm":
            continue
        e = np.asarray(results[(sname, grid, order, steps, "etsdm")]["mmd2"])
        d = np.asarray(v["mmd2"])
        diff = d - e  # paired by seed (same x_T): > 0 means E-TSDM is closer to the data
        sem = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else float("nan")
        z = float(diff.mean() / sem) if sem and sem > 0 else float("nan")
        comps.append({"sampler": sname, "grid": grid, "order": order, "steps": steps,
                      "mmd2_ddpm_minus_etsdm": float(diff.mean()), "paired_sem": sem, "z": z,
                      "winner": _winner(float(d.mean()), float(e.mean())),
                      "significant_2sem": bool(abs(z) > 2) if not math.isnan(z) else False})
    return {"metric": "mmd2_rbf_unbiased", "bandwidth": cfg.mmd_bandwidth,
            "secondary_metric": "sliced_w2", "target": "exact marginal at t_min (alpha_0 x0 + sigma_0 eps)",
            "num_seeds": cfg.sample_seeds, "num_samples": cfg.num_samples,
            "true_vs_true_floor": _stats(floor), "results": table, "comparisons": comps}


def summarize(res: dict, cfg: ToyConfig) -> dict:
    summ = {"lipschitz": {}, "note": "winner = lower value; computed from the numbers above. "
            "Sampling z / significant_2sem use the paired spread over sampling seeds only: each "
            "model is ONE training run, so training-seed variance is not in the error bars."}
    for form in (L.FORM_NETWORK, L.FORM_WRAPPED):
        s = {m: res["lipschitz"][form][m]["summary"] for m in MODELS}
        summ["lipschitz"][form] = {
            "below_t_tilde_mean": {m: s[m]["below_t_tilde"]["mean"] for m in MODELS},
            "below_t_tilde_max": {m: s[m]["below_t_tilde"]["max"] for m in MODELS},
            "all_mean": {m: s[m]["all"]["mean"] for m in MODELS},
            "winner_below_t_tilde_mean": _winner(s["ddpm"]["below_t_tilde"]["mean"],
                                                 s["etsdm"]["below_t_tilde"]["mean"]),
            "winner_below_t_tilde_max": _winner(s["ddpm"]["below_t_tilde"]["max"],
                                                s["etsdm"]["below_t_tilde"]["max"])}
    p = {m: res["perturbation"][m]["summary"]["below_t_tilde"]["mean"] for m in (*MODELS, "exact")}
    summ["perturbation_below_t_tilde_mean"] = dict(
        p, ratio_ddpm_over_etsdm=p["ddpm"] / p["etsdm"], paper_ratio=1.42,
        winner=_winner(p["ddpm"], p["etsdm"]))
    comps = res["sample_quality"]["comparisons"]
    summ["sampling"] = {w: sum(c["winner"] == w for c in comps) for w in ("etsdm", "ddpm", "tie")}
    summ["sampling"]["significant_2sem"] = {
        w: sum(c["winner"] == w and c["significant_2sem"] for c in comps) for w in MODELS}
    return summ


def _table(res: dict) -> str:
    s, lines = res["summary"], []
    ac, ad = res["analytic"]["continuous"], res["analytic"]["discrete"]
    fc, fd, fr = ac["fit_small_t"], ad["fit_small_t"], ac["fit_sampler_range"]
    fmt = lambda f: ("%.3f (r2 %.3f, %d pts, t in [%.3g, %.3g])" % (  # noqa: E731
        f["exponent"], f["r2"], f["num_points"], *f["t_range"])) if f["exponent"] is not None else "n/a"
    lines.append(f"Exact eps, K(t) ~ t^p: continuous small t p = {fmt(fc)}; "
                 f"t in [1e-3, 0.1] p = {fmt(fr)}")
    lines.append(f"  discrete T={res['config']['num_timesteps']} (sigma_0 = {ad['sigma_0']:.3g}): "
                 f"K(0) = {ad['K_at_0']:.4g}, K(t_tilde) = {ad['K_at_t_tilde']:.4g}, "
                 f"p vs t+1 = {fmt(fd)}")
    lines.append(f"{'Lipschitz K below t_tilde':40s} {'DDPM':>11s} {'E-TSDM':>11s}  winner")
    for form, v in s["lipschitz"].items():
        for stat in ("mean", "max"):
            d = v[f"below_t_tilde_{stat}"]
            lines.append(f"  {form + ' ' + stat:38s} {d['ddpm']:11.4g} {d['etsdm']:11.4g}  "
                         f"{v[f'winner_below_t_tilde_{stat}']}")
    p = s["perturbation_below_t_tilde_mean"]
    lines.append(f"  {'perturbation rel. err (scale %.2g)' % res['perturbation']['scale']:38s} "
                 f"{p['ddpm']:11.4g} {p['etsdm']:11.4g}  {p['winner']}  "
                 f"(DDPM/E-TSDM = {p['ratio_ddpm_over_etsdm']:.3f}, paper 1.42; exact eps {p['exact']:.4g})")
    q = res["sample_quality"]
    fl = q["true_vs_true_floor"]
    lines.append(f"Sample quality: MMD^2 x1e3 (RBF bw {q['bandwidth']}), mean+-std over "
                 f"{q['num_seeds']} seeds; true-vs-true floor {1e3 * fl['mean']:.3f}+-{1e3 * fl['std']:.3f}")
    lines.append(f"  {'sampler':14s}{'grid':10s}{'steps':>5s} {'exact':>14s} {'DDPM':>14s} "
                 f"{'E-TSDM':>14s}  winner (z)")
    by = {(r["sampler"], r["grid"], r["order"], r["steps"], r["model"]): r["mmd2"] for r in q["results"]}
    for c in q["comparisons"]:
        k = (c["sampler"], c["grid"], c["order"], c["steps"])
        cell = lambda m: "%7.3f+-%-6.3f" % (1e3 * by[k + (m,)]["mean"], 1e3 * by[k + (m,)]["std"])  # noqa: E731
        name = c["sampler"] + (f"-{c['order']}" if c["order"] else "")
        lines.append(f"  {name:14s}{c['grid']:10s}{c['steps']:5d} {cell('exact')} {cell('ddpm')} "
                     f"{cell('etsdm')}  {c['winner']} ({c['z']:+.1f})")
    sm = s["sampling"]
    lines.append(f"Sampling wins: E-TSDM {sm['etsdm']}, DDPM {sm['ddpm']}, tie {sm['tie']}; "
                 f"significant (|z|>2): E-TSDM {sm['significant_2sem']['etsdm']}, "
                 f"DDPM {sm['significant_2sem']['ddpm']}")
    return "\n".join(lines)


def plot_all(res: dict, out: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files, tt = [], res["config"]["t_tilde"]
    colors = {"ddpm": "C0", "etsdm": "C3", "exact": "k"}
    # Lipschitz, both forms; E-TSDM's exact zeros cannot sit on a log axis and are left out.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, form in zip(axes, (L.FORM_NETWORK, L.FORM_WRAPPED)):
        for name, r in res["lipschitz"][form].items():
            t, K = np.asarray(r["t_left"]) + 1, np.asarray(r["K"], dtype=float)
            K = np.where(K > 0, K, np.nan)
            ax.plot(t, K, ".-" if name == "etsdm" else "-", ms=3, lw=1, color=colors[name], label=name)
        ax.axvline(tt + 1, ls=":", color="gray")
        ax.set(xscale="log", yscale="log", xlabel="t + 1 (left end of interval)", ylabel="K(t)",
               title=f"form: {form}" + (" (zeros not drawn)" if form == L.FORM_WRAPPED else ""))
        ax.legend()
    files.append(_save(fig, out, "lipschitz.png"))
    a = res["analytic"]["continuous"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.loglog(a["lipschitz"]["t_left"], a["lipschitz"]["K"], "k-", label="exact eps, continuous")
    f = a["fit_small_t"]
    if f["exponent"] is not None:
        tl = np.geomspace(*f["t_range"], 10)
        ax.loglog(tl, np.exp(f["intercept"]) * tl ** f["exponent"], "r--",
                  label=f"fit: t^{f['exponent']:.3f}")
    ax.set(xlabel="t (continuous)", ylabel="K(t)", title="analytic t-Lipschitz of exact eps")
    ax.legend()
    files.append(_save(fig, out, "analytic_lipschitz.png"))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in (*MODELS, "exact"):
        r = res["perturbation"][name]
        ax.plot(np.asarray(r["t"]) + 1, r["rel_error"], "o-", ms=3, color=colors[name], label=name)
    ax.axvline(tt + 1, ls=":", color="gray")
    ax.set(xscale="log", xlabel="t + 1", ylabel="relative change",
           title=f"perturbation error, scale {res['perturbation']['scale']}")
    ax.legend()
    files.append(_save(fig, out, "perturbation.png"))
    q = res["sample_quality"]
    fig, axes = plt.subplots(1, len(SAMPLER_CONFIGS), figsize=(4 * len(SAMPLER_CONFIGS), 4), sharey=True)
    for ax, (sname, grid, opts) in zip(np.atleast_1d(axes), SAMPLER_CONFIGS):
        for name in (*MODELS, "exact"):
            rows = sorted((r for r in q["results"] if (r["sampler"], r["grid"], r["model"])
                           == (sname, grid, name)), key=lambda r: r["steps"])
            ax.errorbar([r["steps"] for r in rows], [r["mmd2"]["mean"] for r in rows],
                        yerr=[r["mmd2"]["std"] for r in rows], marker="o", capsize=3,
                        color=colors[name], label=name)
        ax.axhline(q["true_vs_true_floor"]["mean"], ls=":", color="gray")
        ax.set(xlabel="steps", title=f"{sname}{opts.get('order', '')} / {grid}", xscale="log")
        ax.set_xticks(res["config"]["sampler_steps"], [str(v) for v in res["config"]["sampler_steps"]])
        ax.minorticks_off()
    np.atleast_1d(axes)[0].set_ylabel("MMD^2 (mean +- std over seeds)")
    np.atleast_1d(axes)[0].legend()
    files.append(_save(fig, out, "quality.png"))
    return files


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def run(cfg: ToyConfig, out: str, log=print) -> dict:
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    timing = {}
    mixture = ring_mixture(cfg.num_modes, cfg.radius, cfg.std)
    schedule = make_schedule("linear", "discrete", num_timesteps=cfg.num_timesteps)
    x0 = mixture.sample(cfg.eval_samples, _gen(cfg.seed + 11))
    noise = torch.randn(x0.shape, generator=_gen(cfg.seed + 12))
    res = {"config": asdict(cfg), "schedule": {"kind": "linear", "time": "discrete",
                                               "num_timesteps": cfg.num_timesteps}}
    t = time.perf_counter()
    res["analytic"] = analytic_section(mixture, cfg, x0.to(torch.float64))
    timing["analytic"] = time.perf_counter() - t
    t = time.perf_counter()
    models, res["training"] = train_pair(cfg, mixture, schedule)
    timing["train"] = time.perf_counter() - t
    log(f"trained {cfg.train_steps} steps x 2 in {timing['train']:.1f}s; final loss "
        + ", ".join(f"{m}={v['final_loss']:.4f} (t<t_tilde {v['final_loss_below_t_tilde']:.4f})"
                    for m, v in res["training"].items()))
    t = time.perf_counter()
    res["lipschitz"] = lipschitz_section(models, mixture, schedule, cfg, x0, noise)
    res["perturbation"] = perturbation_section(models, mixture, schedule, cfg, x0, noise)
    timing["diagnostics"] = time.perf_counter() - t
    t = time.perf_counter()
    res["sample_quality"] = quality_section(models, mixture, schedule, cfg)
    timing["sampling"] = time.perf_counter() - t
    res["summary"] = summarize(res, cfg)
    t = time.perf_counter()
    res["plots"] = [os.path.basename(p) for p in plot_all(res, out)]
    timing["plots"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t_start
    res["timing_s"] = timing
    with open(os.path.join(out, "toy.json"), "w") as f:
        json.dump(res, f, indent=1, allow_nan=True)
    return res


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="etsdm toy", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (toy.json, *.png)")
    p.add_argument("--quick", action="store_true", help="tiny run for tests (< 1 minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, nargs="+", help="sampler step counts (default 5 10 20)")
    p.add_argument("--train-steps", type=int, help="training steps per model")
    p.add_argument("--sample-seeds", type=int, help="sampling seeds for the error bars")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    kw = {"seed": args.seed}
    if args.steps:
        kw["sampler_steps"] = list(args.steps)
    if args.train_steps:
        kw["train_steps"] = args.train_steps
    if args.sample_seeds:
        kw["sample_seeds"] = args.sample_seeds
    cfg = ToyConfig.quick(**kw) if args.quick else ToyConfig(**kw)
    res = run(cfg, args.out)
    print(_table(res))
    print(f"wrote {os.path.join(args.out, 'toy.json')} and {len(res['plots'])} plots "
          f"in {res['timing_s']['total']:.1f}s")
    return 0
