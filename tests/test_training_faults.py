"""Training end to end under bf16 and under data failures: 2 CPU ranks (gloo), tiny UNet,
Fashion-MNIST shards, compared with the shared fp32 ZeRO-2 reference run (train_harness).

The damage: a copy of the shared shards in which the shard under this short run (epoch 0 starts
with one 256-sample shard; seed 1) is truncated right before global position FAIL_AT = 56. Each
step is 16 positions, 8 per rank, so positions 56-63 are rank 1's half of step 4 and rank 0 never
touches a lost byte. Runs are 4 steps with checkpoints at 32 and 64.

- on_error=raise: rank 1 alone fails; every rank stops together at step 4 with exit 4
  (EXIT_DATA) instead of rank 0 hanging in the gradient all-reduce until the collective timeout;
  rank 1 names the shard and key; only the step-2 checkpoint is committed.
- on_error=skip, skip_budget=0, the shard deleted: both ranks are over budget in step 1: exit 4.
- bf16 ZeRO-2 (stage 0 would all-reduce gradients in bf16) on the truncated shards with
  skip_budget=5, one launch for two checks: the losses track the fp32 reference, the engine's
  weights are really bf16 with fp32 masters (time path included), the EMA (checkpointed and
  exported) is fp32; the run finishes (exit 0) with the 8 lost samples masked out of step 4 and
  reported as data_errors.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest

import train_harness as H

pytestmark = pytest.mark.slow

EXIT_DATA = 4
B, MICRO = 16, 8  # ci_tiny on 2 ranks: one micro-batch of 8 images per rank per step
FAIL_AT = 56  # first lost global position: rank (56 % 16) // 8 = 1, step 4 (images 48 -> 64)
RUN = ("train.zero_stage=2", "train.total_kimg=0.064", "train.checkpoint_kimg=0.032")
# A hung rank would wait DEEPSPEED_TIMEOUT=2 min in a collective; a run takes ~15-25 s.
TIMEOUT_S = 90


def _damaged_copy(base, data: str, name: str, mode: str) -> tuple[str, dict]:
    """A copy of the shared shards with the shard holding global position FAIL_AT truncated right
    before that sample ("truncate") or deleted ("delete"). Returns (url, facts about the shard)."""
    from etsdm_dist.data import order as shards
    from etsdm_dist.data import tarformat
    from etsdm_dist.data.loader import load_index

    dst = base / f"shards-{name}"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(data, dst)
    index = load_index(str(dst))
    plan = shards.ShardPlan(index.shard_samples, seed=1)  # ci_tiny's train.seed
    epoch, shard, sample = plan.locate(FAIL_AT)
    # The whole run (positions 0-63) reads this shard, so nothing else is damaged.
    assert epoch == 0 and plan.locate(0)[1] == shard and plan.locate(B * 4 - 1)[1] == shard
    info = index.shards[shard]
    path = dst / info.name
    if mode == "truncate":
        with open(path, "r+b") as f:
            f.truncate(info.offsets[sample])
    else:
        path.unlink()
    key = tarformat.key_at(info.first_key, sample) if info.first_key and info.first_key.isdigit() else None
    return str(dst), {"url": index.shard_url(shard), "sample": sample, "key": key}


def _rank_of(position: int) -> int:
    return (position % B) // MICRO


# --------------------------------------------------------------------------- data failures


def test_truncated_shard_under_one_rank_stops_all_ranks_with_exit_4(base, data, reference):
    url, bad = _damaged_copy(base, data, "raise", "truncate")
    bad_rank = _rank_of(FAIL_AT)
    assert bad_rank == 1 and _rank_of(FAIL_AT - 1) == 0  # rank 0's half of step 4 is intact
    run = H.run_train("data-raise", base, url, 2, *RUN, "data.on_error=raise", timeout_s=TIMEOUT_S)
    res = run.result
    assert not res.timed_out, f"a rank hung after the data failure ({res.elapsed_s:.0f}s)\n{res.output()}"
    assert res.returncodes == [EXIT_DATA, EXIT_DATA], res.output()
    failing, healthy = res.outputs[bad_rank], res.outputs[1 - bad_rank]
    # The failing rank names the shard URL, the sample and its key, and the cause.
    assert f"[etsdm] rank {bad_rank}: data failure at kimg 0.048: ShardDataError: shard {bad['url']}: " \
           f"sample {bad['sample']} " in failing, failing[-3000:]
    assert "truncated" in failing, failing[-3000:]
    if bad["key"]:
        assert f"(key {bad['key']})" in failing, failing[-3000:]
    assert "data failure at kimg" not in healthy  # rank 0's own data was fine...
    # ...and rank 0 (the one that logs) says why every rank stops.
    assert "data failure on 1 rank(s) in step 4 (kimg 0.064)" in res.outputs[0], res.outputs[0][-3000:]
    assert "Traceback" not in res.output()
    # Steps 1-3 read intact data: bit-identical to the reference (checkpointing changes nothing).
    ref = dict(reference.steps)
    assert [i for i, _ in run.steps] == [16, 32, 48, 64]
    assert all(loss == ref[i] for i, loss in run.steps[:3])
    from etsdm_dist.train import checkpoint

    found, _ = checkpoint.find_resume(run.run_dir)
    assert found is not None and found[1]["images"] == 32  # nothing committed at/after step 4
    assert H.stats_images(run.run_dir) == [32]  # and no report line for it


def test_deleted_shard_over_skip_budget_0_exits_4_naming_budget_and_shard(base, data):
    url, bad = _damaged_copy(base, data, "budget0", "delete")
    run = H.run_train("data-budget0", base, url, 2, *RUN, "data.on_error=skip", "data.skip_budget=0",
                      timeout_s=TIMEOUT_S)
    res = run.result
    assert not res.timed_out, res.output()
    assert res.returncodes == [EXIT_DATA, EXIT_DATA], res.output()
    for r in (0, 1):  # the deleted shard is under both ranks' first micro-batch
        assert f"[etsdm] rank {r}: data failure at kimg 0.000: DataBudgetExceeded: 1 bad shards exceed " \
               f"data.skip_budget=0: {bad['url']} ({MICRO} samples)" in res.outputs[r], res.outputs[r][-3000:]
    assert "data failure on 2 rank(s) in step 1 (kimg 0.016)" in res.outputs[0], res.outputs[0][-3000:]
    assert "Traceback" not in res.output()
    from etsdm_dist.train import checkpoint

    assert checkpoint.find_resume(run.run_dir)[0] is None


# --------------------------------------------------------------------------- bf16 (+ skip in budget)


def test_bf16_zero2_tracks_fp32_and_skips_within_budget(base, data, reference, tmp_path):
    import torch

    from etsdm_dist.train import checkpoint
    from etsdm_dist import run_dir
    from etsdm_dist.train import export
    from etsdm_dist.train import reshard

    url, _ = _damaged_copy(base, data, "budget5", "truncate")
    run = H.run_train("bf16-skip", base, url, 2, *RUN, "train.precision=bf16", "data.on_error=skip",
                      "data.skip_budget=5", timeout_s=TIMEOUT_S)
    assert run.result.returncodes == [0, 0], run.result.output()

    # -- losses: finite; steps 1-3 (intact data) within 2% of fp32 (seen: ~1e-4 relative; step 1
    # is equal, the zero-initialised output layer makes the first loss mean(eps^2)); not fp32.
    ref = dict(reference.steps)
    assert [i for i, _ in run.steps] == [16, 32, 48, 64]
    assert all(math.isfinite(loss) for _, loss in run.steps), run.steps
    for images, loss in run.steps[:3]:
        assert loss == pytest.approx(ref[images], rel=0.02), (images, loss, ref[images])
    assert any(loss != ref[i] for i, loss in run.steps[:3]), "bit-identical to the fp32 reference"

    # -- skip within budget: 8 samples of rank 1 masked out of step 4, counted once, at kimg 0.064
    lines = [json.loads(x) for x in open(f"{run.run_dir}/stats.jsonl")]
    assert [(r["images"], r["data_errors"]) for r in lines] == [(32, 0), (64, 64 - FAIL_AT)]
    assert "DataBudgetExceeded" not in run.result.output()

    # -- the EMA, checkpointed (consolidated from the fp32 masters) and exported, is fp32
    found, _ = checkpoint.find_resume(run.run_dir)
    assert found is not None and found[1]["images"] == 64
    ema, _ = H.final_states(run.run_dir)
    assert ema and {v.dtype for v in ema.values() if v.is_floating_point()} == {torch.float32}
    state, _ = run_dir.load_exported(export.export(run.run_dir, str(tmp_path / "ema.safetensors")))
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}

    # -- DeepSpeed's model-states file holds the engine's module parameters in their own dtype:
    # all bf16. (Before the fix in training_loop.py, a time-MLP stored in fp32 made ZeRO-2 flatten
    # a mixed group, which promoted every weight to fp32: the "bf16" run trained in fp32.)
    with checkpoint.weights_only_loads():  # torch.load(weights_only=True) + DeepSpeed's safe types
        sd = torch.load(f"{found[0]}/mp_rank_00_model_states.pt", map_location="cpu")
    buffers = set(sd.get("buffer_names") or [])
    params = {k: v for k, v in sd["module"].items() if k not in buffers}
    wrong = {k: v.dtype for k, v in params.items() if v.dtype != torch.bfloat16}
    assert params and not wrong, (f"not a bf16 engine: {len(wrong)} of {len(params)} weights are not "
                                  f"bf16, e.g. {dict(list(wrong.items())[:3])}")

    # -- the time path keeps fp32: its masters in the optimizer (recovered per parameter by the
    # converter resume uses) are fp32, hold more than bf16, and the bf16 weight is their rounding;
    # the network computes the time MLP in fp32 from that weight (tests/test_network.py).
    masters = tmp_path / "masters"
    reshard.convert(found[0], str(masters), 2, list(params))
    time_path = [k for k in params if ".time_embed." in k]
    assert len(time_path) >= 4, list(params)  # lin1, lin2: weight and bias
    richer = 0
    for k in time_path:
        master = torch.load(masters / "zero" / k / "fp32.pt", weights_only=True)["param"]
        assert master.dtype == torch.float32 and master.numel() == params[k].numel(), k
        master = master.reshape(params[k].shape)
        assert torch.equal(master.to(torch.bfloat16), params[k]), k
        richer += int((master != params[k].float()).sum())
        assert ema[k].dtype == torch.float32, k
    assert richer > 0, "the time-path masters hold nothing beyond bf16"
