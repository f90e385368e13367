"""`etsdm train --dry-run`: what a launch would do, printed without starting anything.

The resolved config and the DeepSpeed JSON (credentials in URLs masked) and the rank layout: which
global positions each rank reads in each micro-step of the first global batch.
"""
from __future__ import annotations

import json

from etsdm_dist import config as config_mod
from etsdm_dist import dist
from etsdm_dist.redact import redact, redacted_yaml


def describe_layout(cfg, launch: dist.Launch, world_size: int) -> str:
    from etsdm_dist.data import order

    micro, accum = config_mod.batch_layout(cfg.train.batch_images, world_size, cfg.train.micro_batch_images)
    lines = [f"launcher: {launch.launcher}  world_size: {world_size}  this process: rank {launch.rank} "
             f"(local {launch.local_rank}/{launch.local_world_size}, node {launch.node_rank})  "
             f"master: {launch.master_addr or '(broadcast over MPI)'}:{launch.master_port or '(auto)'}",
             f"global batch: {cfg.train.batch_images} images = {world_size} ranks x {accum} accumulation "
             f"steps x {micro} images per micro-batch",
             "global batch 0, positions per rank and micro-step:"]

    def row(r: int) -> str:
        parts = [order.rank_micro_batch_positions(0, j, cfg.train.batch_images, world_size, r, micro)
                 for j in range(accum)]
        return f"  rank {r:>4}: {' '.join(f'[{p.start},{p.stop})' for p in parts)}"

    shown = range(world_size) if world_size <= 9 else range(8)
    lines += [row(r) for r in shown]
    if world_size > 9:
        lines += [f"  ... ({world_size - 9} more)", row(world_size - 1)]
    t = cfg.train
    lines.append(f"intervals (images): report {t.report_kimg * 1000:g}, checkpoint {t.checkpoint_kimg * 1000:g}, "
                 f"sample {t.sample_kimg * 1000:g}, total {t.total_kimg * 1000:g}")
    return "\n".join(lines)


def dry_run(cfg, launch: dist.Launch, world_size: int | None) -> int:
    from etsdm_dist.train import engine as engine_mod

    world = world_size or launch.world_size
    print("# resolved config")
    print(redacted_yaml(cfg.to_dict()))
    print(f"# DeepSpeed config (world_size={world})")
    print(json.dumps(redact(engine_mod.deepspeed_config(cfg, world)), indent=2))
    print("# rank layout")
    print(describe_layout(cfg, launch, world))
    return 0
