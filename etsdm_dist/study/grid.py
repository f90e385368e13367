"""`etsdm study GRID.yaml`: the E-TSDM study as one resumable command.

    etsdm study configs/study/cpu.yaml [--out runs/study] [--only PATTERN[,PATTERN]] [--summarize]
                [--docs docs] [--dry-run]

A grid file names a base training config, a profile (training length and overrides, evaluation N,
sampler settings, diagnostics) and cells (name -> config overrides) x training seeds. For each
cell x seed (study/cells.py): train -> FID/KID of every sampler setting with the same sampling
seeds in every cell -> time-Lipschitz estimate near t = 0 and a perturbation-error sweep on held-out
test images (study/diagnostics.py) -> OUT/runs/CELL/seed-S/result.json. The grid file's schema is
study/spec.py. Whatever already has its file is skipped, so a
rerun continues where the last one stopped; deleting a result.json redoes that cell x seed only.
Then the summary (study/summary.py): mean and standard error over seeds per cell x setting, one
table per question, FID-vs-steps plots, written to DOCS/study.md + DOCS/study.json +
DOCS/img/study/*.png.

Training seed S (train.seed) decides weights, data order and training noise, and is the same in
every cell, so cells differ only by their overrides. The study package does not import eval/ (eval's
report imports study.lipschitz; the other direction would be an import cycle): FID/KID run as
`etsdm compare` jobs, the very command a reader reruns to check a figure.
"""
from __future__ import annotations

import argparse
import sys
import time

from etsdm_dist.study.spec import StudyError, load_grid, select


def run(grid_path: str, out: str, *, only: str | None = None, exclude: str | None = None,
        summarize_only: bool = False, docs: str | None = "docs", log=print) -> dict:
    """Run (or resume) the selected cells, then write the summary. Returns what was done:
    {"data": [steps run], "cells": {(cell, seed): [steps run]}, "summary": path or None}."""
    from etsdm_dist.study import cells as C
    from etsdm_dist.study import summary as S

    spec, base = load_grid(grid_path)
    plan = select(spec, only, exclude)
    done: dict = {"data": [], "cells": {}, "summary": None}
    if not summarize_only:
        configs = {cell: C.resolve_config(spec, base, cell) for cell in dict.fromkeys(c for c, _ in plan)}
        t0 = time.perf_counter()
        data = C.prepare_data(spec, out, log=log)
        done["data"] = data.pop("actions")
        for cell, seed in plan:
            done["cells"][(cell, seed)] = C.run_cell(spec, base, configs[cell], cell, seed, out, data, log=log)
        log(f"[study] {len(plan)} cell x seed runs in {(time.perf_counter() - t0) / 60:.1f} min")
    if docs:
        done["summary"] = S.write(spec, grid_path, out, docs, log=log)
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="etsdm study", description=__doc__.split("\n\n")[0])
    p.add_argument("grid", help="grid file (configs/study/*.yaml)")
    p.add_argument("--out", default="runs/study", help="where runs, measurements and results go (local)")
    p.add_argument("--only", help="comma-separated globs of cell names to run (default: all)")
    p.add_argument("--exclude", help="comma-separated globs of cell names to leave out")
    p.add_argument("--summarize", action="store_true", help="only write the summary from the results there")
    p.add_argument("--docs", default="docs", help="summary folder: study.md, study.json, img/study/ ('' : none)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (cell, seed, overrides) and exit")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if a.dry_run:
            from etsdm_dist.study import cells as C

            spec, base = load_grid(a.grid)
            for cell, seed in select(spec, a.only, a.exclude):
                C.resolve_config(spec, base, cell)
                print(f"{cell} seed {seed}: {' '.join(C.overrides_of(spec, cell, seed, a.out, {}))}")
            return 0
        run(a.grid, a.out, only=a.only, exclude=a.exclude, summarize_only=a.summarize, docs=a.docs or None)
    except StudyError as e:
        print(f"etsdm study: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
