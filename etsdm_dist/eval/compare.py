"""`etsdm compare RUN_A RUN_B ... --ref ref.npz`: FID (and KID) of each run for each sampler at
several step counts, the form in which the paper states its claims.

    etsdm compare runs/etsdm runs/ddpm --ref ref.npz --num 1000 [--ddim 10,20,50,100] [--dpm 10,20]
                  [--out runs/compare] [--seed 0] [sampler options]

Every run is sampled with the SAME sampler settings (the `sample` defaults plus the flags, not each
run's own section) and the same per-image seeds, so a difference in a row is the models'. Writes
OUT/compare.json (every figure), OUT/compare.md (a table per metric) and OUT/fid_vs_steps.png.
Distributed like `etsdm fid --run`: every rank samples its block of each setting.
"""
from __future__ import annotations

import argparse
import json
import sys

from etsdm_dist import dist
from etsdm_dist.eval.measure import measure
from etsdm_dist.eval.sampling import SAMPLER_FLAGS, ImageSampler, add_sampler_flags, load_model, sampler_settings
from etsdm_dist.redact import redact

SAMPLER_OF_FLAG = {"ddim": "ddim", "dpm": "dpm_solver++", "ddpm": "ddpm"}


def parse_steps(text: str, flag: str) -> list[int]:
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{flag} {text!r}: expected step counts like 10,20,50") from None
    if any(s < 1 for s in steps):
        raise ValueError(f"--{flag} {text!r}: step counts must be >= 1")
    return steps


def settings_grid(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(sampler, steps) pairs in table order."""
    out = []
    for flag, sampler in SAMPLER_OF_FLAG.items():
        text = getattr(args, flag)
        out += [(sampler, s) for s in parse_steps(text, flag)] if text else []
    if not out:
        raise ValueError("no sampler settings: give at least one of --ddim, --dpm, --ddpm")
    return out


def label_of(run: str, taken: set[str]) -> str:
    base = run.rstrip("/").rsplit("/", 1)[-1] or run
    label, k = base, 2
    while label in taken:
        label, k = f"{base}-{k}", k + 1
    taken.add(label)
    return label


def markdown(rows: list[dict], labels: list[str], num: int, protocol: str) -> str:
    """One table per metric: rows (sampler, steps), columns the runs; best of each row in bold."""
    keys = sorted({(r["sampler"], r["steps"]) for r in rows}, key=lambda k: (k[0], k[1]))
    value = {(r["run"], r["sampler"], r["steps"]): r for r in rows}
    lines = [f"N = {num} images per setting, protocol {protocol}; lower is better.", ""]
    for metric in ("fid", "kid"):
        lines += [f"### {metric.upper()}", "", "| sampler | steps | " + " | ".join(labels) + " |",
                  "|---|---|" + "---|" * len(labels)]
        for sampler, steps in keys:
            cells = [value.get((lab, sampler, steps)) for lab in labels]
            nums = [None if c is None or c[metric] is None else
                    (c[metric] if metric == "fid" else c[metric]["mean"]) for c in cells]
            best = min((v for v in nums if v is not None), default=None)
            text = []
            for c, v in zip(cells, nums):
                if v is None:
                    text.append("n/a")
                    continue
                t = f"{v:.2f}" if metric == "fid" else f"{v:.4f} ± {c['kid']['std']:.4f}"
                text.append(f"**{t}**" if v == best and len(labels) > 1 else t)
            lines.append(f"| {sampler} | {steps} | " + " | ".join(text) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], labels: list[str], path: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from etsdm_dist.data import storage

    fig, ax = plt.subplots(figsize=(6, 4))
    for lab in labels:
        for sampler in sorted({r["sampler"] for r in rows}):
            pts = sorted((r["steps"], r["fid"]) for r in rows if r["run"] == lab and r["sampler"] == sampler)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{lab} / {sampler}")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps (network calls per image, DPM-Solver multistep: = steps)")
    ax.set_ylabel("FID (lower is better)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes_atomic(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    from etsdm_dist.data import storage
    from etsdm_dist.eval import fid
    from etsdm_dist.eval.fid import load_reference

    p = argparse.ArgumentParser(prog="etsdm compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories or `etsdm export` files")
    p.add_argument("--ref", required=True, help="reference statistics (.npz from etsdm fid-ref)")
    p.add_argument("--num", type=int, default=1000, help="images per run and setting")
    p.add_argument("--ddim", default="10,20,50,100", help="DDIM step counts ('' for none)")
    p.add_argument("--dpm", default="10,20", help="DPM-Solver++ step counts ('' for none)")
    p.add_argument("--ddpm", default="", help="DDPM step counts")
    p.add_argument("--labels", help="comma-separated names of the runs (default: their folder names)")
    p.add_argument("--out", default="compare", help="output folder (local or URL)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--kid-rows", type=int, default=1000)
    p.add_argument("--kid-subsets", type=int, default=100)
    fid.add_common_args(p)
    add_sampler_flags(p)

    def body(argv, launch, device) -> int:
        a = p.parse_args(argv)
        grid = settings_grid(a)
        taken: set[str] = set()
        labels = a.labels.split(",") if a.labels else [label_of(r, taken) for r in a.runs]
        if len(labels) != len(a.runs):
            raise ValueError(f"--labels names {len(labels)} runs, {len(a.runs)} were given")
        ref = load_reference(a.ref)
        net = fid.setup_network(a, launch, device)
        flags = {k: getattr(a, k) for k in SAMPLER_FLAGS if k not in ("sampler", "steps")}
        rows, runs = [], []
        for run, label in zip(a.runs, labels):
            loaded = load_model(run, device=device)
            settings = loaded.model.settings
            runs.append({"run": label, "path": run, "weights": loaded.source,
                         "etsdm": {"enabled": settings.enabled, "t_tilde": settings.t_tilde, "n": settings.n}})
            for sampler_name, steps in grid:
                s = sampler_settings(None, **flags, sampler=sampler_name, steps=steps)
                res = measure(ImageSampler(loaded, s, seed=a.seed, device=device), a.num, ref, net,
                              sample_batch=a.sample_batch, kid_rows=a.kid_rows, kid_subsets=a.kid_subsets,
                              seed=a.seed, progress=not a.no_progress)
                if res is not None:
                    rows.append({"run": label, **res})
                    kid = "n/a" if res["kid"] is None else f"{res['kid']['mean']:.4f}"
                    print(f"etsdm compare: {label} {sampler_name} {steps} steps: FID {res['fid']:.2f} "
                          f"KID {kid} ({res['seconds']:.0f}s)", file=sys.stderr, flush=True)
        if dist.is_main():
            protocol = rows[0]["protocol"] if rows else "?"
            summary = {"runs": runs, "num": a.num, "seed": a.seed, "ref": {"path": a.ref, "data": ref.meta.get("data")},
                       "rows": rows}
            storage.makedirs(a.out)
            storage.write_bytes_atomic(storage.join(a.out, "compare.json"),
                                       json.dumps(redact(summary), indent=1).encode())
            table = markdown(rows, labels, a.num, protocol)
            storage.write_bytes_atomic(storage.join(a.out, "compare.md"), table.encode())
            plot(rows, labels, storage.join(a.out, "fid_vs_steps.png"))
            print(table)
            print(f"etsdm compare: wrote {storage.join(a.out, 'compare.md')}, compare.json, fid_vs_steps.png")
        dist.barrier()
        return 0

    return fid.run_job("etsdm compare", sys.argv[1:] if argv is None else argv, body)


if __name__ == "__main__":
    sys.exit(main())
