"""The study's summary: mean and standard error over training seeds per cell x metric, one table per
question, FID-vs-steps plots, and conclusions drawn only where the standard errors separate means.

Reads OUT/runs/CELL/seed-S/result.json (study/cells.py); writes DOCS/study.md, DOCS/study.json and
DOCS/img/study/*.png. Every metric here is lower-is-better (the Lipschitz estimate and the
perturbation error: smoother, the paper's aim). "Separated" means both sides have >= 2 seeds and
|mean_a - mean_b| > se_a + se_b (the mean +- se intervals do not overlap): a loose, descriptive
criterion, not a significance test, and the text says so.
"""
from __future__ import annotations

import io
import json
import math
import os
import re

import numpy as np

from etsdm_dist.data import storage


def mean_se(values: list[float]) -> dict:
    """n, mean and standard error of the mean (sample std / sqrt(n); None below 2 values)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "se": None, "values": []}
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size >= 2 else None
    return {"n": int(v.size), "mean": float(v.mean()), "se": se, "values": v.tolist()}


def separated(a: dict, b: dict) -> bool:
    return (a["se"] is not None and b["se"] is not None
            and abs(a["mean"] - b["mean"]) > a["se"] + b["se"])


def setting_key(sampler: str, steps: int) -> str:
    return f"{sampler} {steps}"


def metrics_of(result: dict) -> dict[str, float | None]:
    """The per-seed numbers of one result, by metric name."""
    m = {}
    for r in result["eval"]:
        k = setting_key(r["sampler"], r["steps"])
        m[f"fid/{k}"] = r["fid"]
        m[f"kid/{k}"] = r["kid"]["mean"] if r.get("kid") else None
    m["lipschitz_near"] = result["lipschitz"]["near_mean"]
    for s in result["perturbation"]["scales"]:
        m[f"perturbation/{s['scale']:g}"] = s["near_mean"]
    m["loss"] = result["train"].get("loss")
    m["minutes"] = sum(result["seconds"].values()) / 60
    return m


def collect(spec, out: str) -> tuple[dict, list[dict]]:
    from etsdm_dist.study.cells import cell_dir, read_json

    cells, results = {}, []
    for cell in spec.cells:
        rs = [r for s in spec.seeds_of(cell) if (r := read_json(os.path.join(cell_dir(out, cell, s), "result.json")))]
        results += rs
        per_seed = [metrics_of(r) for r in rs]
        names = list(dict.fromkeys(k for m in per_seed for k in m))
        cells[cell] = {"label": spec.cells[cell].label or cell, "overrides": list(spec.cells[cell].overrides),
                       "seeds": [r["seed"] for r in rs], "planned_seeds": spec.seeds_of(cell),
                       "metrics": {k: mean_se([m.get(k) for m in per_seed]) for k in names},
                       "seconds": {part: mean_se([r["seconds"][part] for r in rs])["mean"]
                                   for part in ("train", "eval", "diagnostics")} if rs else {}}
    return cells, results


def fmt(ms: dict, digits: int | None = None) -> str:
    """mean ± se with `digits` decimals, or 3 significant digits when digits is None."""
    if not ms or ms["mean"] is None:
        return "—"
    f = (lambda v: f"{v:.{digits}f}") if digits is not None else (lambda v: f"{v:.3g}")
    return f"{f(ms['mean'])} (1 seed)" if ms["se"] is None else f"{f(ms['mean'])} ± {f(ms['se'])}"


def compare(cell: dict, base: dict, names: list[str]) -> dict:
    """{"lower": [...], "higher": [...], "not_separated": [...], "single_seed": bool} for metric names."""
    out = {"lower": [], "higher": [], "not_separated": [], "missing": []}
    for k in names:
        a, b = cell["metrics"].get(k), base["metrics"].get(k)
        if not a or not b or a["mean"] is None or b["mean"] is None:
            out["missing"].append(k)
        elif separated(a, b):
            out["lower" if a["mean"] < b["mean"] else "higher"].append(k)
        else:
            out["not_separated"].append(k)
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "table"


def plot(spec, cells: dict, names: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    styles = {"ddim": "-", "dpm_solver++": "--", "ddpm": ":"}
    for i, cell in enumerate(names):
        for sampler in dict.fromkeys(s for s, _ in spec.eval.settings):
            pts = [(n, cells[cell]["metrics"].get(f"fid/{setting_key(sampler, n)}")) for s, n in spec.eval.settings
                   if s == sampler]
            pts = sorted((n, m) for n, m in pts if m and m["mean"] is not None)
            if not pts:
                continue
            ax.errorbar([n for n, _ in pts], [m["mean"] for _, m in pts], yerr=[m["se"] or 0 for _, m in pts],
                        marker="o", capsize=3, ls=styles.get(sampler, "-"), color=f"C{i}",
                        label=f"{cells[cell]['label']} / {sampler}")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps (network calls per image)")
    ax.set_ylabel("FID (lower is better), mean ± se over seeds")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes_atomic(path, buf.getvalue())


def sentence(label: str, base_label: str, cmp: dict, single: bool, missing: bool = False) -> str:
    if missing:
        return f"{label} vs {base_label}: not run yet on at least one side."
    if single:
        return (f"{label} vs {base_label}: one training seed on at least one side, so nothing can be "
                f"separated at this size.")
    parts = []
    if cmp["lower"]:
        parts.append("lower " + ", ".join(cmp["lower"]))
    if cmp["higher"]:
        parts.append("higher " + ", ".join(cmp["higher"]))
    if cmp["not_separated"]:
        parts.append("not separated at this size: " + ", ".join(cmp["not_separated"]))
    return f"{label} vs {base_label}: " + "; ".join(parts or ["no common metrics"]) + "."


def table_section(spec, grid_path: str, out: str, cells: dict, t, img_rel: str, img_path: str) -> tuple[list, dict]:
    base = t.baseline or t.cells[0]
    keys = [setting_key(s, n) for s, n in spec.eval.settings]
    scales = [f"{s:g}" for s in spec.diagnostics.perturb_scales]
    cmd = f"etsdm study {grid_path} --out {out} --only {','.join(t.cells)}"
    md = [f"## {t.title}", ""] + ([t.question, ""] if t.question else [])
    md += [f"Reproduce: `{cmd}` (then `etsdm study {grid_path} --out {out} --summarize` for this page).", ""]
    head = "| cell | overrides | seeds |"
    md += ["FID (mean ± standard error over training seeds; N = "
           f"{spec.eval.num} images per setting, image i from seed ({spec.eval.seed}, i) in every cell):", "",
           head + " " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for c in t.cells:
        d = cells[c]
        ov = " ".join(f"`{o}`" for o in d["overrides"]) or "(profile only)"
        md.append(f"| {d['label']}{' (baseline)' if c == base else ''} | {ov} | {len(d['seeds'])} | "
                  + " | ".join(fmt(d["metrics"].get(f"fid/{k}"), 2) for k in keys) + " |")
    md += ["", "KID (mean ± se):", "", "| cell | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for c in t.cells:
        md.append(f"| {cells[c]['label']} | " + " | ".join(fmt(cells[c]["metrics"].get(f"kid/{k}"))
                                                          for k in keys) + " |")
    dg = spec.diagnostics
    md += ["", f"Diagnostics on {dg.images} held-out test images: the network's time-Lipschitz estimate "
           f"(mean over pairs of trained time conditions with t < {dg.near:g}) and the perturbation error "
           f"(relative change of eps, mean over t < {dg.near:g} of {list(dg.perturb_t)}) per scale; final "
           "training loss; wall minutes per seed (train + eval + diagnostics):", "",
           "| cell | Lipschitz near 0 | " + " | ".join(f"pert. {s}" for s in scales) + " | loss | min/seed |",
           "|---|---|" + "---|" * len(scales) + "---|---|"]
    for c in t.cells:
        m = cells[c]["metrics"]
        md.append(f"| {cells[c]['label']} | {fmt(m.get('lipschitz_near'))} | "
                  + " | ".join(fmt(m.get(f"perturbation/{s}")) for s in scales)
                  + f" | {fmt(m.get('loss'))} | {fmt(m.get('minutes'), 1)} |")
    plot(spec, cells, t.cells, img_path, t.title)
    md += ["", f"![FID vs steps: {t.title}]({img_rel})", ""]
    conclusions = []
    names = [f"fid/{k}" for k in keys] + [f"kid/{k}" for k in keys] + ["lipschitz_near"] + \
        [f"perturbation/{s}" for s in scales]
    for c in t.cells:
        if c == base:
            continue
        seeds = min(len(cells[c]["seeds"]), len(cells[base]["seeds"]))
        cmp = compare(cells[c], cells[base], names)
        conclusions.append({"cell": c, "baseline": base, "single_seed": seeds < 2, **cmp,
                            "text": sentence(cells[c]["label"], cells[base]["label"], cmp, seeds < 2, seeds == 0)})
    if conclusions:
        md += ["Read from the numbers (separated = both sides have >= 2 seeds and the mean ± se intervals do "
               "not overlap; a descriptive criterion, not a significance test):", ""]
        md += [f"- {x['text']}" for x in conclusions] + [""]
    return md, {"title": t.title, "question": t.question, "cells": t.cells, "baseline": base, "command": cmd,
                "plot": img_rel, "conclusions": conclusions}


def overall(tables: list[dict]) -> list[str]:
    helped, hurt, open_, smooth = [], [], [], []
    for t in tables:
        for x in t["conclusions"]:
            d = [f"{k} {side}" for side in ("lower", "higher") for k in x[side]
                 if not k.startswith(("fid/", "kid/"))]
            if d:
                smooth.append(f"{x['cell']} (vs {x['baseline']}): {', '.join(d)}")
            q = [k for k in x["lower"] if k.startswith(("fid/", "kid/"))]
            w = [k for k in x["higher"] if k.startswith(("fid/", "kid/"))]
            who = f"{x['cell']} (vs {x['baseline']}, {t['title']})"
            if q:
                helped.append(f"{who}: {', '.join(q)}")
            if w:
                hurt.append(f"{who}: {', '.join(w)}")
            if x["single_seed"] or not (q or w):
                open_.append(who)
    md = ["## What helped, what did not, what cannot be concluded", "",
          "Sample quality (FID/KID), separated as above:", ""]
    md += [f"- Helped: {h}" for h in helped] or ["- Helped: nothing separated."]
    md += [f"- Hurt: {h}" for h in hurt] or ["- Hurt: nothing separated."]
    md += ["", "Diagnostics (time-Lipschitz near 0, perturbation error per scale), separated: "
           + ("; ".join(smooth) if smooth else "none") + "."]
    md += ["", "Not concluded at this size (single seed, or no FID/KID setting separated): "
           + ("; ".join(open_) if open_ else "none") + ".", ""]
    return md


def write(spec, grid_path: str, out: str, docs: str, log=print) -> str:
    cells, results = collect(spec, out)
    img_dir = os.path.join(docs, "img", "study")
    os.makedirs(img_dir, exist_ok=True)
    hw = sorted({json.dumps(r["hardware"], sort_keys=True) for r in results})
    total = sum(sum(r["seconds"].values()) for r in results) / 3600
    cfg = results[0]["config"] if results else {}
    md = [f"# E-TSDM study: {spec.name}", "", spec.description.strip(), "",
          f"Grid `{grid_path}`: base config `{spec.train.config}` with `{' '.join(spec.train.overrides)}`, "
          f"trained to kimg {spec.train.kimg:g} (preset {cfg.get('network_preset')}, global batch "
          f"{cfg.get('batch_images')}, lr {cfg.get('lr')}, EMA {cfg.get('ema_decays')}, {cfg.get('precision')}), "
          f"{spec.train.ranks} rank(s); training seeds {spec.seeds} (per cell where a cell names fewer). Seed S "
          "fixes the initial weights, the data order and the training noise in every cell. Sampler settings "
          f"{[list(s) for s in spec.eval.settings]}, the `sample` defaults otherwise, N = {spec.eval.num}, "
          f"against {spec.data.test_images} held-out test images. {len(results)} cell x seed results, "
          f"{total:.2f} h of wall time in all.", "",
          "Hardware: " + "; ".join(
              f"{h['cpu']}, {h['cores']} cores, {h['threads_per_rank']} torch threads per rank"
              + (f", GPU {h['gpu']}" if h.get("gpu") else "") + f", torch {h['torch']}"
              for h in map(json.loads, hw)) + ".", ""]
    missing = [f"{c} seed {s}" for c in spec.cells for s in spec.seeds_of(c) if s not in cells[c]["seeds"]]
    if missing:
        md += [f"Not run yet: {', '.join(missing)}.", ""]
    tables = []
    for t in spec.tables:
        name = f"{slug(spec.name)}-{slug(t.title)}.png"
        part, info = table_section(spec, grid_path, out, cells, t, f"img/study/{name}", os.path.join(img_dir, name))
        md += part
        tables.append(info)
    md += overall(tables)
    text = "\n".join(md)
    os.makedirs(docs, exist_ok=True)
    md_path = os.path.join(docs, "study.md")
    storage.write_bytes_atomic(md_path, text.encode())
    storage.write_bytes_atomic(os.path.join(docs, "study.json"), json.dumps(
        {"grid": grid_path, "out": out, "spec": spec.model_dump(), "hardware": [json.loads(h) for h in hw],
         "cells": cells, "tables": tables, "results": results}, indent=1).encode())
    log(f"[study] wrote {md_path}, study.json and {len(tables)} plot(s) under {img_dir}")
    return md_path
