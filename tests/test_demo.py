"""The main job (`etsdm demo --s3 --compare`, what launchers/quickstart.sh runs) at its CI size, end
to end: shard to a SeaweedFS server the demo starts -> FID reference -> train on 2 ranks under the
deepspeed launcher streaming from S3 -> kill -9 one rank and rerun (resume) -> sample on 2 ranks
and measure FID/KID -> DDPM baseline and `etsdm compare` -> report. One launch of the whole
pipeline; the checks read what it wrote."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_harness as H

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST missing: tools/install.sh apt-installs dataset-fashion-mnist", pytrace=False)
    out = tmp_path_factory.mktemp("demo") / "run"
    env = H.base_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    proc = subprocess.run([sys.executable, "-m", "etsdm_dist.demo", "--profile", "ci", "--s3", "--compare",
                           "--out", str(out)],
                          cwd=str(H.REPO), env=env, capture_output=True, text=True, timeout=1200)
    return out, proc


def test_demo_runs_to_a_report(demo):
    out, proc = demo
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"the report: {out}/report.md" in proc.stdout
    report = (out / "report.md").read_text()
    for section in ("## Samples", "## FID and KID", "## Loss", "## Time-Lipschitz estimate",
                    "## Faults and resumes", "## Throughput", "## E-TSDM vs DDPM"):
        assert section in report, section
    for fig in ("final_grid.png", "grids_over_training.png", "loss.png", "lipschitz.png", "fid_vs_steps.png"):
        assert (out / "report" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig


def test_demo_killed_a_rank_and_resumed_to_the_end(demo):
    out, proc = demo
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["kill -9", "resume"], events
    log = (out / "train.log").read_text()
    assert "resuming from" in log and "done: kimg 2.560" in log
    stats = [json.loads(x) for x in (out / "stats.jsonl").read_text().splitlines()]
    assert max(r["images"] for r in stats) == 2560
    assert all(math.isfinite(r["loss"]) for r in stats if "loss" in r)


def test_demo_fid_is_finite_and_beats_the_untrained_network(demo):
    out, proc = demo
    results = {p.name: json.loads(p.read_text()) for p in (out / "eval").glob("fid-*.json")}
    trained = results["fid-ddim-20.json"]
    untrained = results["fid-untrained-ddim-20.json"]
    assert trained["n"] == untrained["n"] == 32 and trained["ranks"] == 2
    assert math.isfinite(trained["fid"]) and trained["protocol"] == untrained["protocol"]
    assert trained["fid"] < untrained["fid"], (trained["fid"], untrained["fid"])
    assert os.path.exists(out / "fid-ref-test.npz")


def test_demo_streamed_from_its_own_s3_server_and_stopped_it(demo):
    out, proc = demo
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["url"].startswith("s3://etsdm-demo/"), cfg["data"]["url"]
    assert "SeaweedFS stopped" in proc.stdout
    pid = int(proc.stdout.split("(pid ")[1].split(")")[0])
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_demo_compare_table_has_both_runs(demo):
    out, proc = demo
    summary = json.loads((out / "compare" / "compare.json").read_text())
    assert [r["etsdm"]["enabled"] for r in summary["runs"]] == [True, False]
    assert {(r["run"], r["sampler"], r["steps"]) for r in summary["rows"]} == {
        ("E-TSDM", "ddim", 20), ("DDPM", "ddim", 20)}
    assert all(math.isfinite(r["fid"]) for r in summary["rows"])
