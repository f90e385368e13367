"""The `etsdm` command: one entry point, each subcommand owned by the module of its data-flow step.

Subcommand modules are imported lazily so `etsdm config` does not pay for importing DeepSpeed.
Each module exposes `main(argv: list[str]) -> int`.
"""
from __future__ import annotations

import importlib
import sys

from etsdm_dist.redact import redacted_yaml

SUBCOMMANDS = {
    "config": ("etsdm_dist.cli", "config_main", "print the resolved config (YAML) after overrides"),
    "toy": ("etsdm_dist.study.toy", "main", "reproduce the paper's claims on a Gaussian mixture (CPU)"),
    "shard": ("etsdm_dist.data.shard_writer", "main", "turn images / idx files into webdataset shards"),
    "verify": ("etsdm_dist.data.verify", "main", "check shards against their index.json"),
    "index": ("etsdm_dist.data.tar_scan", "main", "index webdataset tars of other tools (headers only)"),
    "train": ("etsdm_dist.train.loop", "main", "train (DeepSpeed; run under a launcher)"),
    "export": ("etsdm_dist.train.export", "main", "write a run's EMA weights as one file"),
    "sample": ("etsdm_dist.eval.sample", "main", "N images from a run or export as shards/PNGs (any launcher)"),
    "fid-ref": ("etsdm_dist.eval.fid", "ref_main", "reference FID/KID statistics of an image set (.npz)"),
    "fid": ("etsdm_dist.eval.measure", "main", "FID and KID of samples against reference statistics"),
    "report": ("etsdm_dist.eval.report", "main", "a run as report.md with figures (samples, loss, FID, Lipschitz)"),
    "compare": ("etsdm_dist.eval.compare", "main", "FID/KID of runs x samplers x step counts: table + plot"),
    "demo": ("etsdm_dist.demo", "main", "the main job: shard, train 2 ranks (kill -9 + resume), FID, report"),
    "study": ("etsdm_dist.study.grid", "main", "the E-TSDM study grid (configs/study/*.yaml), resumable -> docs/study.md"),
    "bench": (None, None, "benchmarks: loader | train | eval | scan"),
}

def config_main(argv: list[str]) -> int:
    import argparse

    from etsdm_dist import config

    p = argparse.ArgumentParser(prog="etsdm config", description="Print the resolved config.")
    p.add_argument("config", nargs="?", help="YAML run file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--reference", action="store_true",
                   help="print the reference of every field (docs/config.md) instead; takes no config")
    args = p.parse_args(argv)
    path, overrides = args.config, list(args.overrides)
    if args.reference:
        if path is not None or overrides:
            print("etsdm config: --reference describes the config classes; give it no config or overrides",
                  file=sys.stderr)
            return 2
        from etsdm_dist.config_reference import reference

        sys.stdout.write(reference())
        return 0
    if path is not None and "=" in path:  # only overrides were given
        overrides.insert(0, path)
        path = None
    try:
        cfg = config.load(path, overrides)
    except config.ConfigError as e:
        print(f"etsdm config: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(redacted_yaml(cfg.to_dict()))  # credentials masked; cfg keeps them
    return 0


def bench_main(argv: list[str]) -> int:
    from etsdm_dist import bench

    names = bench.NAMES
    if not argv or argv[0] not in names:
        print(f"usage: etsdm bench {{{'|'.join(names)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"etsdm_dist.bench.{argv[0]}")
    try:
        return int(module.main(argv[1:]) or 0)
    except SystemExit as e:  # argparse --help / usage errors
        return int(e.code or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: etsdm COMMAND [args]\n\ncommands:")
        for name, (_, _, doc) in SUBCOMMANDS.items():
            print(f"  {name:8s} {doc}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    if name == "bench":
        return bench_main(rest)
    module, func, _ = SUBCOMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
