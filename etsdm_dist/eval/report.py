"""`etsdm report RUN`: one Markdown page that shows what a run did, with PNG figures.

    etsdm report RUN [--out RUN/report.md] [--data URL] [--no-lipschitz]

Reads (local run directories only):
  RUN/stats.jsonl      loss per timestep bucket ([0, t_tilde) split out), images/s, data wait,
                       and `fid` lines written during training (train.fid_kimg)
  RUN/samples/*.png    the sample grids written every train.sample_kimg
  RUN/eval/*.json      results of `etsdm fid` / `etsdm fid --run` (the demo writes them there)
  RUN/events.jsonl     things that happened to the run (the demo logs its kill -9 and the resume)
  RUN/compare/         `etsdm compare` output, if present (table and FID-vs-steps plot)
and the newest committed checkpoint's EMA for the network's time-Lipschitz estimate near t = 0.
Writes RUN/report.md and RUN/report/*.png.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys

import numpy as np
import torch


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def grids_figure(grids: list[str], path: str, most: int = 6) -> list[str]:
    """Up to `most` sample grids, evenly spaced over training, side by side."""
    from PIL import Image

    if not grids:
        return []
    pick = [grids[round(i * (len(grids) - 1) / max(1, most - 1))] for i in range(min(most, len(grids)))]
    pick = sorted(set(pick), key=pick.index)
    plt = _plt()
    fig, axes = plt.subplots(1, len(pick), figsize=(2.6 * len(pick), 2.9), squeeze=False)
    for ax, g in zip(axes[0], pick):
        ax.imshow(np.asarray(Image.open(g)), cmap="gray", vmin=0, vmax=255)
        kimg = int(os.path.basename(g).split("-")[-1].split(".")[0]) / 1000
        ax.set_title(f"kimg {kimg:g}", fontsize=9)
        ax.axis("off")
    _save(fig, path)
    return pick


def loss_figure(reports: list[dict], t_tilde: float, path: str) -> dict:
    """Left: loss per timestep bucket in the last report; right: [0, t_tilde) vs the rest over time."""
    plt = _plt()
    last = reports[-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    buckets = last.get("loss_buckets") or []
    xs = [0.5 * (k["t0"] + k["t1"]) for k in buckets]
    ws = [k["t1"] - k["t0"] for k in buckets]
    ys = [k["loss"] if k["loss"] is not None else float("nan") for k in buckets]
    a.bar(xs, ys, width=ws, color="#888", edgecolor="white")
    if buckets:
        a.axvspan(0, t_tilde, color="tab:orange", alpha=0.25, label=f"[0, t_tilde={t_tilde:g})")
    a.set_xlabel("timestep t")
    a.set_ylabel("loss (last report interval)")
    a.set_title(f"loss per timestep bucket at kimg {last['kimg']:g}", fontsize=9)
    a.legend(fontsize=8)
    kimg = [r["kimg"] for r in reports]
    b.plot(kimg, [r.get("loss_early") for r in reports], label="t < t_tilde", color="tab:orange")
    b.plot(kimg, [r.get("loss_late") for r in reports], label="t >= t_tilde", color="tab:blue")
    b.plot(kimg, [r.get("loss") for r in reports], label="all", color="black", lw=0.8)
    b.set_yscale("log")
    b.set_xlabel("kimg")
    b.set_title("training loss", fontsize=9)
    b.legend(fontsize=8)
    _save(fig, path)
    return {"loss": last.get("loss"), "loss_early": last.get("loss_early"), "loss_late": last.get("loss_late")}


def lipschitz_estimate(run: str, data_url: str | None, path: str, images: int = 8) -> dict | None:
    """The EMA network's time-Lipschitz constant near t = 0 (paper Fig. 1b form: the raw network
    between the time conditions it is trained on), on real images noised to each t."""
    from etsdm_dist.eval.sampling import load_model
    from etsdm_dist.eval.sources import open_source
    from etsdm_dist.study import lipschitz as L

    loaded = load_model(run)
    settings = loaded.model.settings
    url = data_url
    if url is None:
        return None
    x0 = next(open_source(url, images).batches(0, 1, images))[0].to(torch.float32) / 127.5 - 1.0
    discrete = settings.time == "discrete"
    t_max = 2 * settings.t_tilde
    grid = torch.arange(0, t_max + 1, max(1, int(t_max) // 40), dtype=torch.float64) if discrete else \
        torch.linspace(1e-4, t_max, 41, dtype=torch.float64)
    net_fn, cond_fn, scale = L.conditioned_parts(loaded.model)
    with torch.no_grad():
        res = L.lipschitz_network_input(net_fn, cond_fn, x0, loaded.schedule, grid, time_scale=scale,
                                        t_tilde=settings.t_tilde,
                                        generator=torch.Generator().manual_seed(0))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.step(res["t_left"], res["K"], where="post", color="tab:blue")
    ax.axvspan(0, settings.t_tilde, color="tab:orange", alpha=0.2, label="[0, t_tilde)")
    ax.set_xlabel("t (left end of each pair of trained conditions)")
    ax.set_ylabel("E ||net(x, c') - net(x, c)|| / |c' - c|")
    ax.set_yscale("log")
    ax.set_title(f"time-Lipschitz estimate of the EMA network ({'E-TSDM' if settings.enabled else 'DDPM'})",
                 fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)
    return {"below_t_tilde": res["summary"]["below_t_tilde"], "all": res["summary"]["all"],
            "images": images, "t_tilde": settings.t_tilde, "etsdm": settings.enabled}


def _fmt(v, digits=2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def fid_table(results: list[dict]) -> list[str]:
    lines = ["| model | sampler | steps | N | FID | KID (mean ± std) | s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        kid = r.get("kid")
        kid_s = "n/a" if not kid else f"{kid['mean']:.4f} ± {kid['std']:.4f}"
        w = r.get("weights") or {}
        model = r.get("label") or (f"EMA at kimg {w['images'] / 1000:g}" if isinstance(w, dict) and w.get("images")
                                   else str(w.get("kind", "?")) if isinstance(w, dict) else str(w))
        lines.append(f"| {model} | {r.get('sampler')} | {r.get('steps')} | {r.get('n')} | {_fmt(r.get('fid'))} | "
                     f"{kid_s} | {_fmt(r.get('seconds'), 0)} |")
    return lines


def build(run: str, out: str, data_url: str | None = None, lipschitz: bool = True) -> str:
    run = run.rstrip("/")
    figdir = os.path.join(os.path.dirname(out) or ".", "report")
    os.makedirs(figdir, exist_ok=True)
    lines_stats = read_jsonl(os.path.join(run, "stats.jsonl"))
    reports = [r for r in lines_stats if "loss" in r and "fid" not in r]
    fids_training = [r for r in lines_stats if "fid" in r]
    events = read_jsonl(os.path.join(run, "events.jsonl"))
    evals = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(run, "eval", "*.json")))]
    cfg = {}
    if os.path.exists(os.path.join(run, "config.yaml")):
        import yaml

        cfg = yaml.safe_load(open(os.path.join(run, "config.yaml"))) or {}
    et, net, train = cfg.get("etsdm", {}), cfg.get("network", {}), cfg.get("train", {})
    t_tilde = et.get("t_tilde") or 100
    data_url = data_url or cfg.get("data", {}).get("url")

    md = [f"# Run report: `{run}`", ""]
    md += [f"{'E-TSDM' if et.get('enabled', True) else 'DDPM baseline'} (t_tilde {t_tilde:g}, n {et.get('n')}), "
           f"network preset `{net.get('preset')}` at {net.get('resolution')}x{net.get('resolution')}x"
           f"{net.get('in_channels')}, global batch {train.get('batch_images')}, lr {cfg.get('optim', {}).get('lr')}, "
           f"EMA decays {train.get('ema_decays')} (ramp-up ratio {train.get('ema_rampup_ratio')}), "
           f"{reports[-1]['world_size'] if reports else '?'} ranks, ZeRO-{train.get('zero_stage')}, "
           f"{train.get('precision')}; trained to kimg {reports[-1]['kimg'] if reports else 0:g}.", ""]

    grids = sorted(glob.glob(os.path.join(run, "samples", "samples-*.png")))
    if grids:
        shutil.copyfile(grids[-1], os.path.join(figdir, "final_grid.png"))
        grids_figure(grids, os.path.join(figdir, "grids_over_training.png"))
        md += ["## Samples", "", f"Final grid (EMA weights, kimg {int(grids[-1][-13:-4]) / 1000:g}; image i from "
               "seed (0, i)):", "", "![final samples](report/final_grid.png)", "",
               "Over training:", "", "![grids over training](report/grids_over_training.png)", ""]

    if evals:
        md += ["## FID and KID", ""]
        protocols = sorted({str(r.get("protocol")) for r in evals})
        refs = sorted({json.dumps((r.get("ref") or {}).get("data", {}).get("location")) for r in evals})
        md += [f"Protocol {', '.join(protocols)}; reference: {', '.join(refs)} (N_ref "
               f"{evals[0].get('n_ref')}). FID is biased upwards at small N: compare rows with the same N.", ""]
        md += fid_table(evals) + [""]
    if fids_training:
        md += ["FID during training (`train.fid_kimg`): " + ", ".join(
            f"kimg {r['kimg']:g}: {r['fid']:.1f}" for r in fids_training), ""]

    if reports:
        last = loss_figure(reports, float(t_tilde), os.path.join(figdir, "loss.png"))
        md += ["## Loss", "", f"Last interval: all {_fmt(last['loss'], 4)}, t < t_tilde {_fmt(last['loss_early'], 4)}, "
               f"t >= t_tilde {_fmt(last['loss_late'], 4)}.", "", "![loss](report/loss.png)", ""]

    if lipschitz:
        try:
            lip = lipschitz_estimate(run, data_url, os.path.join(figdir, "lipschitz.png"))
        except Exception as e:  # noqa: BLE001 - a missing checkpoint or data: say so, keep the report
            lip, md = None, md + [f"(time-Lipschitz estimate skipped: {type(e).__name__}: {e})", ""]
        if lip:
            b, a = lip["below_t_tilde"], lip["all"]
            md += ["## Time-Lipschitz estimate near t = 0", "",
                   f"Mean over pairs of trained time conditions with t < t_tilde: {_fmt(b['mean'], 3)} "
                   f"(max {_fmt(b['max'], 3)}, {b['count']} pairs); over [0, 2 t_tilde]: {_fmt(a['mean'], 3)} "
                   f"({lip['images']} real images noised to each t).", "", "![lipschitz](report/lipschitz.png)", ""]

    if events:
        md += ["## Faults and resumes", ""]
        md += [f"- {e.get('time', '')} {e['event']}: {e.get('detail', '')}" for e in events] + [""]

    if reports:
        ips = [r["images_per_s"] for r in reports[1:] or reports]
        wait = [r["data_wait_pct"] for r in reports[1:] or reports]
        md += ["## Throughput", "", f"Images/s over report intervals: median {np.median(ips):.1f} "
               f"(min {min(ips):.1f}, max {max(ips):.1f}); waiting for data: median {np.median(wait):.1f}% of the "
               f"step time; peak resident memory per rank {max(r.get('rss_bytes') or 0 for r in reports) / 2**20:.0f} MiB.", ""]

    cmp_dir = os.path.join(run, "compare")
    if os.path.exists(os.path.join(cmp_dir, "compare.md")):
        shutil.copyfile(os.path.join(cmp_dir, "fid_vs_steps.png"), os.path.join(figdir, "fid_vs_steps.png"))
        md += ["## E-TSDM vs DDPM (`etsdm compare`)", "", open(os.path.join(cmp_dir, "compare.md")).read(), "",
               "![FID vs steps](report/fid_vs_steps.png)", ""]
    with open(out, "w") as f:
        f.write("\n".join(md))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="etsdm report", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="local run directory")
    p.add_argument("--out", help="Markdown file (default RUN/report.md; figures next to it in report/)")
    p.add_argument("--data", help="shards for the Lipschitz estimate's real images (default: the run's data.url)")
    p.add_argument("--no-lipschitz", action="store_true")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isdir(a.run):
        print(f"etsdm report: {a.run}: not a local run directory", file=sys.stderr)
        return 2
    out = build(a.run, a.out or os.path.join(a.run, "report.md"), a.data, not a.no_lipschitz)
    print(f"etsdm report: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
