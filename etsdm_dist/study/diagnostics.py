"""The study's two diagnostics of a trained run, on held-out images, the same inputs for every cell:

* the network's time-Lipschitz estimate near t = 0 (study/lipschitz.py, the paper's Fig. 1b form:
  the raw network between the time conditions it is trained on; for a v network, the eps it
  represents), summarised over pairs whose left end t < `near` (one window for every cell,
  whatever its t_tilde) and below the cell's own t_tilde;
* the perturbation error rel(t) = sum ||m(x + s z, t) - m(x, t)|| / sum ||m(x, t)|| of the model
  as the samplers see it (eps at the true t), for every scale s of the sweep, with the same noise
  and the same z for every cell and scale.

The EMA weights are read with run_dir + diffusion.build (what eval.sampling.load_model does): the
study package may not import eval/, whose report imports study.lipschitz.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from etsdm_dist import config, run_dir
from etsdm_dist.study import lipschitz as L


def load_ema(run: str):
    """(ConditionedModel in eval mode, schedule) of the newest committed checkpoint's EMA
    (the run's `sample.ema` index)."""
    from etsdm_dist.diffusion import build

    state, run_cfg, info = run_dir.newest_ema(run)
    cfg = config.from_dict({k: run_cfg[k] for k in ("network", "diffusion", "etsdm") if k in run_cfg})
    try:
        return build.model_with_weights(cfg, state), build.build_schedule(cfg)
    except ValueError as e:
        raise ValueError(f"{info['checkpoint']}: EMA {e}") from e


def held_out(url: str, num: int) -> torch.Tensor:
    """The first `num` images of shards at `url` (stored order), float in [-1, 1], [N, C, H, W]."""
    from etsdm_dist.data.decode import to_model_input
    from etsdm_dist.data.loader import ShardStream, load_index

    index = load_index(url)
    if index.total_samples < num:
        raise ValueError(f"{url}: {index.total_samples} images, diagnostics.images asks for {num}")
    stream = ShardStream(index, seed=0, start_position=0, batch_images=num, world_size=1, rank=0,
                         micro_batch_images=num, hflip=False, on_error="raise")
    it = iter(stream)
    try:
        images = next(it)["images"][:num]
    finally:
        it.close()
        stream.close_reads()
    return to_model_input(torch.as_tensor(images)).to(torch.float32)


def mean_below(t, values, bound: float) -> float | None:
    t, v = np.asarray(t, dtype=np.float64), np.asarray(values, dtype=np.float64)
    sel = t < bound
    return float(v[sel].mean()) if sel.any() else None


def run(run: str, test_url: str, spec, *, threads: int | None = None) -> dict:
    """Both diagnostics of the run's EMA network ({"lipschitz", "perturbation", "seconds"})."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, schedule = load_ema(run)
        model = model.to(device)
        x0 = held_out(test_url, spec.images).to(device)
        with torch.no_grad():
            lip = lipschitz(model, schedule, x0, spec)
            pert = perturbation(model, schedule, x0, spec)
    finally:
        torch.set_num_threads(saved)
    return {"lipschitz": lip, "perturbation": pert, "seconds": round(time.perf_counter() - t0, 1)}


def time_unit(model, schedule) -> float:
    """Grid-file times are in discrete steps; continuous-time runs take them as fractions of 1000."""
    return 1.0 if model.settings.time == "discrete" else 1.0 / 1000.0


def lipschitz(model, schedule, x0: torch.Tensor, spec) -> dict:
    settings, unit = model.settings, time_unit(model, schedule)
    t_max = spec.t_max * unit
    if settings.time == "discrete":
        grid = torch.arange(0, int(t_max) + 1, max(1, int(t_max) // 40), dtype=torch.float64)
    else:
        grid = torch.linspace(1e-4, t_max, 41, dtype=torch.float64)
    net_fn, cond_fn, scale = L.conditioned_parts(model)
    # Noise drawn on the CPU from the seed, so every device and every cell sees the same x_t.
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(spec.seed), dtype=torch.float64)
    res = L.lipschitz_network_input(lambda x, c: net_fn(x, c.to(x.device)), cond_fn, x0, schedule, grid,
                                    time_scale=scale, t_tilde=settings.t_tilde, noise=noise.to(x0.device))
    return {"form": res["form"], "near": spec.near * unit, "near_mean": mean_below(res["t_left"], res["K"],
                                                                                     spec.near * unit),
            "below_t_tilde": res["summary"]["below_t_tilde"], "all": res["summary"]["all"],
            "t_tilde": settings.t_tilde, "etsdm": settings.enabled, "images": int(x0.shape[0]),
            "t_left": res["t_left"], "K": res["K"]}


def perturbation(model, schedule, x0: torch.Tensor, spec) -> dict:
    unit = time_unit(model, schedule)
    ts = [float(t) * unit for t in spec.perturb_t]
    gen = torch.Generator().manual_seed(spec.seed + 1)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    delta = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    out = {"t": ts, "near": spec.near * unit, "images": int(x0.shape[0]), "scales": []}
    for s in spec.perturb_scales:
        res = L.perturbation_error(lambda x, t: model(x, t.to(x.device)), x0, schedule, ts, scale=float(s),
                                   noise=noise.to(x0.device), delta=delta.to(x0.device),
                                   t_tilde=model.settings.t_tilde)
        out["scales"].append({"scale": float(s), "rel_error": res["rel_error"],
                              "near_mean": mean_below(ts, res["rel_error"], spec.near * unit),
                              "all_mean": float(np.mean(res["rel_error"]))})
    return out
