"""`etsdm study`: a micro grid (E-TSDM and DDPM x 2 training seeds, 2 training steps, N = 4, one
sampler setting) runs end to end once per module; a second invocation does nothing; deleting one
cell's result and measurement redoes exactly that measurement, to the same figure; the summary's
means and standard errors are those of the per-cell JSON. Plus the grid file's errors and the
separation rule, in-process."""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import pytest
import yaml

import train_harness as H
from etsdm_dist.study import cells as C
from etsdm_dist.study import grid as G
from etsdm_dist.study import summary as S
from etsdm_dist.study.spec import StudyError, load_grid

pytestmark = pytest.mark.slow

CELLS, SEEDS = ("etsdm", "ddpm"), (0, 1)


def micro_grid(path: Path, **changes) -> str:
    grid = {
        "name": "micro", "description": "test grid",
        "data": {"train_images": 128, "test_images": 16},
        "train": {"config": H.CI_CONFIG, "kimg": 0.032, "threads": 1,
                  "overrides": ["train.report_kimg=0.016", "train.checkpoint_kimg=0.032", "data.num_workers=0"]},
        "eval": {"num": 4, "settings": [["ddim", 2]], "sample_batch": 4},
        "diagnostics": {"images": 4, "t_max": 40, "near": 30, "perturb_scales": [0.1, 0.4], "perturb_t": [0, 20, 50]},
        "seeds": list(SEEDS),
        "cells": {"etsdm": {"label": "E-TSDM"}, "ddpm": {"label": "DDPM", "overrides": ["etsdm.enabled=false"]}},
        "tables": [{"title": "E-TSDM vs DDPM", "cells": ["ddpm", "etsdm"], "baseline": "ddpm"}],
    }
    grid.update(changes)
    path.write_text(yaml.safe_dump(grid))
    return str(path)


def result_path(out: Path, cell: str, seed: int) -> Path:
    return out / "runs" / cell / f"seed-{seed}" / "result.json"


def mtimes(out: Path) -> dict:
    return {(c, s): result_path(out, c, s).stat().st_mtime_ns for c in CELLS for s in SEEDS}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST missing: tools/install.sh apt-installs dataset-fashion-mnist", pytrace=False)
    tmp = tmp_path_factory.mktemp("study")
    grid, out, docs = micro_grid(tmp / "grid.yaml"), tmp / "out", tmp / "docs"
    first = G.run(grid, str(out), docs=str(docs), log=lambda *_: None)
    results1 = {(c, s): json.loads(result_path(out, c, s).read_text()) for c in CELLS for s in SEEDS}
    t1 = mtimes(out)
    second = G.run(grid, str(out), docs=str(docs), log=lambda *_: None)
    t2 = mtimes(out)
    # Redo one cell x seed: its result and its one measurement go; training and diagnostics stay.
    victim = ("ddpm", 1)
    result_path(out, *victim).unlink()
    for f in (result_path(out, *victim).parent / "eval").glob("ddim-2-*.json"):
        f.unlink()
    third = G.run(grid, str(out), docs=str(docs), log=lambda *_: None)
    t3 = mtimes(out)
    return {"grid": grid, "out": out, "docs": docs, "runs": (first, second, third), "times": (t1, t2, t3),
            "results1": results1, "victim": victim}


def test_first_run_does_every_step(study):
    first = study["runs"][0]
    assert first["data"] == ["shard-train", "shard-test", "fid-ref"]
    assert first["cells"] == {(c, s): ["train", "eval", "diagnostics", "result"] for c in CELLS for s in SEEDS}
    for (cell, seed), r in study["results1"].items():
        assert r["cell"] == cell and r["seed"] == seed
        (row,) = r["eval"]
        assert (row["sampler"], row["steps"], row["n"], row["seed"]) == ("ddim", 2, 4, 0)
        assert math.isfinite(row["fid"]) and row["fid"] > 0 and row["command"].startswith("etsdm compare ")
        run_cfg = yaml.safe_load((result_path(study["out"], cell, seed).parent / "run" / "config.yaml").read_text())
        # same training seed (weights, data order, noise) in both cells; the cell's override took effect
        assert run_cfg["train"]["seed"] == seed and run_cfg["etsdm"]["enabled"] == (cell == "etsdm")
        assert run_cfg["train"]["total_kimg"] == pytest.approx(0.032)


def test_diagnostics_see_the_trained_time_conditions(study):
    """E-TSDM (t_tilde 100, n 5) has conditions 0, 20, 40 on [0, 40]; DDPM has every step."""
    for seed in SEEDS:
        et, dd = (study["results1"][(c, seed)] for c in ("etsdm", "ddpm"))
        assert et["lipschitz"]["t_left"] == [0.0, 20.0]
        assert dd["lipschitz"]["t_left"] == [float(t) for t in range(40)]
        for r in (et, dd):
            assert r["lipschitz"]["near_mean"] >= 0
            scales = r["perturbation"]["scales"]
            assert [s["scale"] for s in scales] == [0.1, 0.4] and all(len(s["rel_error"]) == 3 for s in scales)
            # a 4x larger input perturbation changes the output more, at every t
            assert all(b > a > 0 for a, b in zip(scales[0]["rel_error"], scales[1]["rel_error"]))


def test_second_invocation_does_nothing(study):
    second = study["runs"][1]
    assert second["data"] == [] and all(v == [] for v in second["cells"].values()), second
    assert study["times"][1] == study["times"][0]


def test_deleting_one_result_reruns_only_that_cell(study):
    third, victim = study["runs"][2], study["victim"]
    assert third["data"] == []
    assert {k: v for k, v in third["cells"].items() if v} == {victim: ["eval", "result"]}
    t1, t3 = study["times"][0], study["times"][2]
    assert {k for k in t1 if t1[k] != t3[k]} == {victim}
    redone = json.loads(result_path(study["out"], *victim).read_text())
    before = study["results1"][victim]
    # same weights, same image seeds, same Inception: the same figure
    assert redone["eval"][0]["fid"] == pytest.approx(before["eval"][0]["fid"], rel=1e-9)
    assert redone["lipschitz"] == before["lipschitz"]


def test_summary_means_and_standard_errors_match_the_results(study):
    summary = json.loads((study["docs"] / "study.json").read_text())
    results = {(c, s): json.loads(result_path(study["out"], c, s).read_text()) for c in CELLS for s in SEEDS}

    def check(cell, metric, values):
        got = summary["cells"][cell]["metrics"][metric]
        assert got["n"] == len(values) == 2
        assert got["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert got["se"] == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)), rel=1e-9, abs=1e-15)

    for cell in CELLS:
        rs = [results[(cell, s)] for s in SEEDS]
        check(cell, "fid/ddim 2", [r["eval"][0]["fid"] for r in rs])
        check(cell, "kid/ddim 2", [r["eval"][0]["kid"]["mean"] for r in rs])
        check(cell, "lipschitz_near", [r["lipschitz"]["near_mean"] for r in rs])
        for i, scale in enumerate((0.1, 0.4)):
            check(cell, f"perturbation/{scale:g}", [r["perturbation"]["scales"][i]["near_mean"] for r in rs])
    md = (study["docs"] / "study.md").read_text()
    assert "## E-TSDM vs DDPM" in md and f"etsdm study {study['grid']} --out {study['out']} --only ddpm,etsdm" in md
    fid = summary["cells"]["etsdm"]["metrics"]["fid/ddim 2"]
    assert f"{fid['mean']:.2f} ± {fid['se']:.2f}" in md
    assert "## What helped, what did not, what cannot be concluded" in md
    (table,) = summary["tables"]
    assert (study["docs"] / table["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table["conclusions"][0]["cell"] == "etsdm" and table["conclusions"][0]["baseline"] == "ddpm"


# --------------------------------------------------------------------------- in-process


def test_grid_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(StudyError, match=r"tables\[0\].*unknown cells \['nope'\]"):
        load_grid(micro_grid(tmp_path / "a.yaml", tables=[{"title": "x", "cells": ["nope"]}]))
    with pytest.raises(StudyError, match=r"b\.yaml: eval\.settings"):
        load_grid(micro_grid(tmp_path / "b.yaml", eval={"num": 4, "settings": [["euler", 2]]}))
    path = micro_grid(tmp_path / "c.yaml", cells={"bad": {"overrides": ["etsdm.n=0"]}}, tables=[])
    with pytest.raises(StudyError, match=r"cells\.bad: .*etsdm\.n"):
        G.run(path, str(tmp_path / "out"), docs=None)
    with pytest.raises(StudyError, match="select no cell"):
        G.select(load_grid(micro_grid(tmp_path / "d.yaml"))[0], "zzz*")
    out = tmp_path / "out2"
    (out / "data").mkdir(parents=True)
    (out / "data" / "data.json").write_text(json.dumps({"train_images": 999}))
    with pytest.raises(StudyError, match="another `data` section"):
        C.prepare_data(load_grid(micro_grid(tmp_path / "e.yaml"))[0], str(out))


def test_separation_needs_two_seeds_and_disjoint_intervals():
    a, b = S.mean_se([10.0, 10.2, 9.8]), S.mean_se([12.0, 12.2, 11.8])
    assert a["se"] == pytest.approx(0.2 / math.sqrt(3)) and S.separated(a, b)
    assert not S.separated(a, S.mean_se([10.2, 10.4, 10.0]))  # |diff| 0.2 < se_a + se_b = 0.23
    assert not S.separated(S.mean_se([10.0]), b)  # one seed: no standard error
    cell = {"metrics": {"fid/x": a, "kid/x": S.mean_se([1.0, 1.1])}}
    base = {"metrics": {"fid/x": b, "kid/x": S.mean_se([1.0, 1.2])}}
    assert S.compare(cell, base, ["fid/x", "kid/x", "lipschitz_near"]) == {
        "lower": ["fid/x"], "higher": [], "not_separated": ["kid/x"], "missing": ["lipschitz_near"]}


def test_the_shipped_grids_are_valid():
    root = Path(H.REPO) / "configs" / "study"
    for name in ("cpu.yaml", "full.yaml"):
        spec, base = load_grid(str(root / name))
        assert os.path.exists(base)
        plan = G.select(spec, None)
        assert {c for c, _ in plan} == set(spec.cells)
        assert sum(1 for c, _ in plan if c in ("etsdm", "ddpm")) == 6  # 3 seeds each
        for cell in spec.cells:  # every override names a field that exists, with a valid value
            C.resolve_config(spec, base, cell)
