"""One cell x seed of the study: train -> FID/KID per sampler setting -> diagnostics -> result.json.

Layout under OUT (every file is written atomically, and a step whose file is there is skipped):
  data/train, data/test          shards (unless the grid names existing ones), data/fid-ref.npz
  runs/CELL/seed-S/run/          the training run directory (checkpoints, stats.jsonl, config.yaml)
  runs/CELL/seed-S/train.json    training finished: its wall time and config digest
  runs/CELL/seed-S/eval/*.json   one `etsdm compare` row per (sampler, steps, N, sampling seed)
  runs/CELL/seed-S/diagnostics.json   time-Lipschitz estimate + perturbation sweep
  runs/CELL/seed-S/result.json   all of it for the summary (its digest covers every input)
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

from etsdm_dist import config, run_dir
from etsdm_dist.data import storage
from etsdm_dist.study.spec import GridSpec, StudyError

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "PMI_RANK", "PMI_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
FLAG_OF_SAMPLER = {"ddim": "--ddim", "dpm_solver++": "--dpm", "ddpm": "--ddpm"}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: str, obj) -> None:
    storage.write_bytes_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def cell_dir(out: str, cell: str, seed: int) -> str:
    return os.path.join(out, "runs", cell, f"seed-{seed}")


def overrides_of(spec: GridSpec, cell: str, seed: int, out: str, data: dict) -> list[str]:
    """The training command's overrides: profile, cell, then what the study decides itself."""
    return [*spec.train.overrides, *spec.cells[cell].overrides, f"train.total_kimg={spec.train.kimg}",
            f"train.seed={seed}", f"train.run_dir={os.path.join(cell_dir(out, cell, seed), 'run')}",
            f"data.url={data.get('train', 'data/train')}"]


def resolve_config(spec: GridSpec, base: str, cell: str) -> config.Config:
    """The cell's validated training config; a bad override fails here, naming the cell."""
    try:
        return config.load(base, overrides_of(spec, cell, 0, "unused", {}))
    except config.ConfigError as e:
        raise StudyError(f"cells.{cell}: {e}") from None


def model_digest(cfg: config.Config) -> str:
    """Everything that decides the trained weights except the seed and where files go."""
    d = cfg.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("run_dir", "seed")}
    d["data"] = {k: v for k, v in d["data"].items() if k != "url"}
    return digest(d)


# --------------------------------------------------------------------------- processes


def cuda() -> bool:
    return torch.cuda.is_available()


def threads_per_rank(ranks: int, threads: int | None) -> int:
    return int(threads or max(1, (os.cpu_count() or 1) // ranks))


def child_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    if not cuda():
        env.update(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo")
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def module_cmd(module: str, ranks: int) -> list[str]:
    """`python -m module` for one rank, the deepspeed launcher for several."""
    if ranks == 1:
        return [sys.executable, "-m", module]
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    port = str(29500 + (os.getpid() + int(time.time())) % 2000)
    # `--`: the launcher's parser would take --num / --run as abbreviations of its own options
    return [exe if os.path.exists(exe) else "deepspeed", "--num_nodes", "1", "--num_gpus", str(ranks),
            "--master_port", port, "--module", module, "--"]


def run_logged(cmd: list[str], env: dict, log_path: str, what: str, log) -> float:
    """Run a command with its output appended to log_path; its wall seconds, or StudyError."""
    log("[study] $ " + " ".join(cmd))
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "ab") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        with open(log_path, "rb") as f:
            tail = f.read()[-1500:].decode("utf-8", "replace")
        hint = " (preempted after a checkpoint: rerun the same command to resume)" if rc == 75 else ""
        raise StudyError(f"{what} failed (exit {rc}){hint}; log {log_path}:\n{tail}")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- data


def prepare_data(spec: GridSpec, out: str, log=print) -> dict:
    """Training and held-out shards, and FID reference statistics of the held-out images."""
    d, actions = spec.data, []
    urls = {"train": d.train_url or os.path.join(out, "data", "train"),
            "test": d.test_url or os.path.join(out, "data", "test")}
    env = child_env(threads_per_rank(1, spec.train.threads))
    # Shards and reference made under another `data` section would silently stand in for these.
    made = os.path.join(out, "data", "data.json")
    if read_json(made) not in (None, spec.data.model_dump()):
        raise StudyError(f"{out}/data was made from another `data` section ({made}); use another --out")
    os.makedirs(os.path.dirname(made), exist_ok=True)
    write_json(made, spec.data.model_dump())
    for split, idx_split, n in (("train", "train", d.train_images), ("test", "t10k", d.test_images)):
        if storage.exists(storage.join(urls[split], "index.json")):
            continue
        if getattr(d, f"{split}_url"):
            raise StudyError(f"data.{split}_url {urls[split]}: no index.json there")
        if not os.path.exists(d.source):
            raise StudyError(f"data.source {d.source}: missing (Fashion-MNIST: apt-get install "
                             f"dataset-fashion-mnist, which tools/install.sh does)")
        run_logged([sys.executable, "-m", "etsdm_dist.cli", "shard", d.source, urls[split], "--split", idx_split,
                    "--resolution", "32", "--mode", "pad", "--limit", str(n), "--shuffle-seed", "0",
                    "--max-samples", "1000", "--workers", "1", "--no-progress", "--prefix", split],
                   env, os.path.join(out, "data", "shard.log"), f"etsdm shard ({split})", log)
        actions.append(f"shard-{split}")
    ref = os.path.join(out, "data", "fid-ref.npz")
    if not os.path.exists(ref):
        run_logged([sys.executable, "-m", "etsdm_dist.eval.fid", "ref", urls["test"], "--out", ref,
                    "--max-images", str(d.test_images), "--kid-rows", str(d.test_images), "--no-progress"],
                   env, os.path.join(out, "data", "fid-ref.log"), "etsdm fid-ref", log)
        actions.append("fid-ref")
    return {**urls, "ref": ref, "actions": actions}


# --------------------------------------------------------------------------- one cell x seed


def run_cell(spec: GridSpec, base: str, cfg: config.Config, cell: str, seed: int, out: str, data: dict,
             log=print) -> list[str]:
    """Bring OUT/runs/CELL/seed-S/result.json up to date; returns the steps that ran ([] = cached)."""
    from etsdm_dist.study import diagnostics

    where = cell_dir(out, cell, seed)
    key = {"model": model_digest(cfg), "kimg": spec.train.kimg, "eval": spec.eval.model_dump(),
           "diagnostics": spec.diagnostics.model_dump(), "data": spec.data.model_dump()}
    result_path = os.path.join(where, "result.json")
    old = read_json(result_path)
    if old is not None and old.get("key") == digest(key):
        return []
    actions = []
    train = read_json(os.path.join(where, "train.json"))
    if train is not None and train["model_digest"] != key["model"]:
        raise StudyError(f"{where}: trained with another config than cells.{cell} now gives (the grid file "
                         f"changed); use another --out or delete {where}")
    if train is None:
        train = _train(spec, base, cell, seed, out, data, key["model"], log)
        actions.append("train")
    rows, ran = _evaluate(spec, where, cell, seed, data, log)
    actions += ran
    diag_path = os.path.join(where, "diagnostics.json")
    diag = read_json(diag_path)
    diag_key = digest({"diagnostics": key["diagnostics"], "weights": train["weights"], "test": data["test"]})
    if diag is None or diag.get("key") != diag_key:
        log(f"[study] {cell} seed {seed}: diagnostics")
        threads = threads_per_rank(1, spec.train.threads)
        diag = {"key": diag_key, **diagnostics.run(os.path.join(where, "run"), data["test"], spec.diagnostics,
                                                   threads=threads)}
        write_json(diag_path, diag)
        actions.append("diagnostics")
    result = {"key": digest(key), "cell": cell, "seed": seed, "label": spec.cells[cell].label or cell,
              "overrides": list(spec.cells[cell].overrides), "config": _config_summary(cfg),
              "train": train, "eval": rows, "lipschitz": diag["lipschitz"], "perturbation": diag["perturbation"],
              "seconds": {"train": train["seconds"], "eval": round(sum(r["job_seconds"] for r in rows), 1),
                          "diagnostics": diag["seconds"]},
              "hardware": hardware(threads_per_rank(spec.train.ranks, spec.train.threads))}
    write_json(result_path, result)
    actions.append("result")
    log(f"[study] {cell} seed {seed}: " + ", ".join(
        f"{r['sampler']} {r['steps']}: FID {r['fid']:.2f}" for r in rows))
    return actions


def _train(spec, base, cell, seed, out, data, model_key, log) -> dict:
    where = cell_dir(out, cell, seed)
    run = os.path.join(where, "run")
    total = round(spec.train.kimg * 1000)
    found, _ = run_dir.find_resume(run) if os.path.isdir(run) else (None, [])
    seconds = 0.0
    if not found or found[1]["images"] < total:
        threads = threads_per_rank(spec.train.ranks, spec.train.threads)
        cmd = [*module_cmd("etsdm_dist.train", spec.train.ranks), base, *overrides_of(spec, cell, seed, out, data)]
        log(f"[study] {cell} seed {seed}: training to kimg {spec.train.kimg:g}"
            + (f" (resuming from kimg {found[1]['images'] / 1000:g})" if found else ""))
        seconds = run_logged(cmd, child_env(threads), os.path.join(where, "train.log"),
                             f"training of {cell} seed {seed}", log)
        found, _ = run_dir.find_resume(run)
        if not found or found[1]["images"] < total:
            raise StudyError(f"{run}: training exited 0 but no checkpoint at kimg {spec.train.kimg:g}")
    stats = [json.loads(x) for x in open(os.path.join(run, "stats.jsonl")) if x.strip()] \
        if os.path.exists(os.path.join(run, "stats.jsonl")) else []
    reports = [r for r in stats if "loss" in r and "fid" not in r]
    last = reports[-1] if reports else {}
    ips = sorted(r["images_per_s"] for r in reports[1:] or reports)
    info = {"model_digest": model_key, "seconds": round(seconds, 1), "images": found[1]["images"],
            "checkpoint": os.path.basename(found[0]), "weights": digest([found[0], found[1].get("files")]),
            "loss": last.get("loss"), "loss_early": last.get("loss_early"), "loss_late": last.get("loss_late"),
            "images_per_s": ips[len(ips) // 2] if ips else None, "ranks": spec.train.ranks,
            "threads": threads_per_rank(spec.train.ranks, spec.train.threads)}
    write_json(os.path.join(where, "train.json"), info)
    return info


def eval_name(sampler: str, steps: int, num: int, seed: int) -> str:
    return f"{sampler}-{steps}-n{num}-seed{seed}.json"


def _evaluate(spec, where, cell, seed, data, log) -> tuple[list[dict], list[str]]:
    """One `etsdm compare` job for the settings that have no result yet; one file per setting."""
    e = spec.eval
    evals = os.path.join(where, "eval")
    path = {s: os.path.join(evals, eval_name(s[0], s[1], e.num, e.seed)) for s in e.settings}
    missing = [s for s in e.settings if not os.path.exists(path[s])]
    ran = []
    if missing:
        job = os.path.join(evals, "compare-job")
        cmd = [*module_cmd("etsdm_dist.eval.compare", e.ranks), os.path.join(where, "run"), "--ref", data["ref"],
               "--num", str(e.num), "--seed", str(e.seed), "--sample-batch", str(e.sample_batch),
               "--kid-rows", str(e.num), "--labels", cell, "--out", job, "--no-progress"]
        for sampler, flag in FLAG_OF_SAMPLER.items():
            cmd += [flag, ",".join(str(n) for s, n in missing if s == sampler)]
        log(f"[study] {cell} seed {seed}: FID/KID of {', '.join(f'{s} {n}' for s, n in missing)} (N={e.num})")
        threads = threads_per_rank(e.ranks, spec.train.threads)
        seconds = run_logged(cmd, child_env(threads), os.path.join(evals, "compare.log"),
                             f"etsdm compare of {cell} seed {seed}", log)
        args = [x for x in cmd[cmd.index("etsdm_dist.eval.compare") + 1:] if x != "--"]
        rows = read_json(os.path.join(job, "compare.json"))["rows"]
        got = {(r["sampler"], r["steps"]): r for r in rows}
        for s in missing:
            if s not in got:
                raise StudyError(f"{job}/compare.json has no row for {s[0]} {s[1]}")
            measured = sum(r["seconds"] for r in rows) or 1.0
            row = {**got[s], "job_seconds": round(seconds * got[s]["seconds"] / measured, 1),
                   "command": "etsdm compare " + shlex.join(args)}
            write_json(path[s], row)
        ran.append("eval")
    return [read_json(path[s]) for s in e.settings], ran


def _config_summary(cfg: config.Config) -> dict:
    d = cfg.to_dict()
    return {"diffusion": d["diffusion"], "etsdm": d["etsdm"], "network_preset": d["network"].get("preset"),
            "batch_images": d["train"]["batch_images"], "lr": d["optim"]["lr"], "total_kimg": d["train"]["total_kimg"],
            "ema_decays": d["train"]["ema_decays"], "precision": d["train"]["precision"]}


def hardware(threads: int) -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_per_rank": threads, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if cuda() else None}
