"""Chaos: a run killed with -9 at random moments, restarted on changing layouts, ends exact.

Each segment launches the ci_tiny run with a layout drawn from LAYOUTS (rank count x ZeRO stage),
kills one random rank with SIGKILL once the step log passes a random step, after a random delay
(so the kill also lands inside checkpoint writes), and the next segment resumes on another layout.
The last segment runs to the end. Its losses and final weights must equal the uninterrupted 2-rank
ZeRO-2 reference bit for bit: any lost optimizer/EMA state, replayed or skipped data, noise keyed
by the layout, or a half-written checkpoint taken as committed would break that.

ZeRO-3 is left out of the bit-exact layouts: it regroups gradient sums (test_training.py explains
the 1-ulp differences), so it is compared only to 1e-6 there.

The seed is drawn fresh each run and printed; ETSDM_CHAOS_SEED=... replays one.
"""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

import train_harness as H
from etsdm_dist.train import checkpoint

pytestmark = pytest.mark.slow

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (1, 0), (2, 0)]
TOTAL = 256  # ci_tiny: 16 steps of 16 images, checkpoint every 64
KILLS = 3


def _kill_randomly(rng: random.Random, after_images: int, world: int):
    """Poll callback: once this launch's steps pass `after_images` (lines the step log already held
    from earlier launches do not count), wait a random moment and SIGKILL one random rank (the whole
    process, as a dead node would be)."""
    rank = rng.randrange(world)
    delay = rng.uniform(0.0, 0.4)  # a step takes ~0.1-0.3 s here: the kill may land in a checkpoint

    def factory(step_log):
        state = {"skip": len(step_log.read_text().splitlines()) if step_log.exists() else 0,
                 "seen": None, "done": False}

        def poll(procs):
            if state["done"] or not step_log.exists():
                return
            if state["seen"] is None:
                lines = step_log.read_text().splitlines()[state["skip"]:]
                if lines and int(lines[-1].split()[0]) >= after_images:
                    state["seen"] = time.monotonic()
            elif time.monotonic() - state["seen"] >= delay:
                if procs[rank].popen.poll() is None:
                    os.kill(procs[rank].popen.pid, signal.SIGKILL)
                state["done"] = True

        return poll

    return factory, rank, delay


def test_random_kills_on_changing_layouts_end_equal_to_uninterrupted(base, data, reference):
    seed = int(os.environ.get("ETSDM_CHAOS_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (replay: ETSDM_CHAOS_SEED={seed})")
    history = []
    layouts = rng.sample(LAYOUTS, len(LAYOUTS))
    done = 0
    for k in range(KILLS + 1):
        world, stage = layouts[k % len(layouts)]
        if k < KILLS and done > TOTAL - 48:
            continue  # too little left to kill inside: go on to the last segment
        # Micro-batch 8 on every layout (1 rank: 2 accumulation steps): the same per-micro-batch
        # gradient sums, so the comparison can be bit for bit (test_loss.py covers the default
        # layout, where only summation order differs).
        overrides = (f"train.zero_stage={stage}", "train.micro_batch_images=8")
        if k < KILLS:
            # 1-5 steps past the resume point: every segment has a chance to commit a checkpoint
            # (every 64 images) and to die before, inside or after writing it.
            after = min(TOTAL - 32, done + 16 * rng.randint(1, 5))
            factory, rank, delay = _kill_randomly(rng, after, world)
            run = H.run_train("chaos", base, data, world, *overrides, poll_factory=factory)
            history.append(f"segment {k}: {world} rank(s) ZeRO-{stage}, kill rank {rank} {delay:.2f} s after "
                           f"image {after}: rc={run.result.returncodes}")
        else:
            run = H.run_train("chaos", base, data, world, *overrides)
            history.append(f"segment {k}: {world} rank(s) ZeRO-{stage} to the end: rc={run.result.returncodes}")
            assert run.result.returncodes == [0] * world, (seed, history, run.result.output())
        assert not run.result.timed_out, (seed, history, run.result.output())
        # Where the next launch resumes: the newest committed checkpoint (the step log runs ahead).
        found, _ = checkpoint.find_resume(run.run_dir)
        done = found[1]["images"] if found else 0
    print("\n".join(history))
    ref = dict(reference.steps)
    # The step log holds every step every segment ran (replayed ones again after a resume): each one,
    # on any layout, must equal the reference's step at the same image count.
    bad = [(i, loss, ref[i]) for i, loss in run.steps if loss != ref[i]]
    assert not bad, (seed, history, bad[:5])
    assert max(i for i, _ in run.steps) == TOTAL
    H.assert_same_weights(run.run_dir, reference.run_dir)
