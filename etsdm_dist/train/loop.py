"""`etsdm train CONFIG [key=value ...] [--dry-run]`: the training loop, one function in phases.

Progress is counted in images (kimg), as in NVlabs EDM: the run's whole state is one image counter
plus what DeepSpeed and the EMA keep. Everything else is a pure function of the counter:
  - the data cursor (the loader reads global positions [counter, counter + batch) next),
  - the learning rate (engine.lr_at),
  - the diffusion noise and timesteps of a micro-batch (a generator seeded by the run seed and the
    micro-batch's first global position, so they do not depend on ZeRO stage, rank count or resume),
  - when to report, checkpoint and sample (every interval is a whole number of global batches).
So a resume from a committed checkpoint continues bit-for-bit (fp32) where the run left off.

Preemption: SIGTERM / SIGUSR1 set a flag; every step all ranks all-reduce [flag, non-finite loss,
loss sum, sample count] (one tiny collective), so they agree on the same step to save a checkpoint
and exit with train.requeue_exit_code (75, EX_TEMPFAIL: "run me again"). Rerunning the same
command resumes from the newest committed checkpoint.

Environment knobs for tests and debugging:
  ETSDM_STEP_LOG=path   rank 0 appends "<images> <global mean loss as float.hex>" per optimizer step
  ETSDM_FAULT=...       fault injection, read by checkpoint.py (e.g. crash_in_checkpoint)
  DEEPSPEED_TIMEOUT=min how long a collective waits for a dead or stuck rank
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

from etsdm_dist import config as config_mod
from etsdm_dist import dist
from etsdm_dist.diffusion.build import build_model, build_schedule

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_DATA = 0, 2, 3, 4


# --------------------------------------------------------------------------- helpers


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 of the sequence): noise keyed by position."""
    from etsdm_dist.data.order import _hash

    return _hash(*values) & ((1 << 63) - 1)


def install_faults(spec: str | None) -> None:
    """ETSDM_FAULT fault injection for tests.
    `crash_in_checkpoint[@IMAGES]`: the process that commits a checkpoint (rank 0) dies with
    os._exit(17) after every file and the manifest are written but before the COMMITTED marker,
    i.e. the worst moment for a crash. With @IMAGES only the checkpoint of that image counter is hit.
    `nan_loss@IMAGES`: the last rank's loss is NaN in the step that reaches IMAGES (read by the loop)."""
    if not spec:
        return
    kind, _, at = spec.partition("@")
    if kind == "nan_loss":
        return
    if kind != "crash_in_checkpoint":
        raise ValueError(f"ETSDM_FAULT={spec!r}: unknown fault; known: crash_in_checkpoint[@IMAGES], "
                         f"nan_loss@IMAGES")
    from etsdm_dist.train import checkpoint
    from etsdm_dist.data import storage

    original = storage.write_json_atomic

    def write_json_atomic(path, obj, **kw):
        if path.rstrip("/").endswith("/" + checkpoint.MARKER) and (
                not at or checkpoint.ckpt_name(int(at)) in path):
            print(f"[etsdm] ETSDM_FAULT: crashing before writing {path}", flush=True)
            os._exit(17)
        return original(path, obj, **kw)

    storage.write_json_atomic = write_json_atomic


def _strip_prefix(state: dict, prefix: str) -> dict:
    """EMA names are the engine module's (ConditionedModel: "net.<param>"); the UNet wants bare ones."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


class _Preemption:
    """SIGTERM / SIGUSR1 -> a flag the loop reads once per step."""

    def __init__(self):
        self.signum: int | None = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum


def _param_dtype(cfg) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]


class _EngineModel:
    """model(x_t, t, y) for diffusion_loss: casts inputs to the engine's parameter dtype and runs
    the DeepSpeed engine's forward (required under ZeRO-3, whose hooks gather parameters)."""

    def __init__(self, engine, settings, dtype):
        self.engine, self.settings, self.dtype = engine, settings, dtype

    def __call__(self, x, t, y=None):
        return self.engine(x.to(self.dtype), t, y)


def _invalid_batch(index, micro: int, position: int) -> dict:
    """A micro-batch of the right shape with every sample invalid: keeps a rank whose data failed
    in step with the others' collectives until all ranks agree to stop."""
    h, w = index.resolution if index.resolution else (1, 1)
    return {"images": torch.zeros(micro, index.channels, h, w, dtype=torch.uint8),
            "labels": torch.full((micro,), -1, dtype=torch.long),
            "positions": torch.arange(position, position + micro),
            "valid": torch.zeros(micro, dtype=torch.bool)}


# --------------------------------------------------------------------------- dry run


def make_engine(cfg, model, world_size: int, *, load_universal: bool = False):
    """The DeepSpeed engine of the loop (and of bench/train.py): the network's stored dtypes made
    fit for ZeRO's flat buffers, deepspeed.initialize, then torch.compile when asked."""
    from etsdm_dist.train import engine as engine_mod

    if _param_dtype(cfg) != torch.float32 and cfg.train.zero_stage >= 1:
        # FIX (found by tests/test_training_faults.py): with the time-MLP stored in fp32, a bf16
        # ZeRO-1/2 run trained entirely in fp32 and a bf16 ZeRO-3 run crashed at initialize.
        # DeepSpeed (0.19.8) casts parameters one by one (p.data = ...), then module.to(device)
        # runs TimeEmbedding._apply, which turns the time-MLP back to fp32. ZeRO-1/2 then flatten
        # the mixed bf16+fp32 group with torch.cat (promotes to fp32) and re-point EVERY parameter
        # at that fp32 buffer (UNet.forward follows the weight dtype); ZeRO-3's defragment asserts
        # one dtype. ZeRO's flat buffers need one parameter dtype: store the time path in
        # bf16/fp16 like the rest. It still COMPUTES in fp32 (TimeEmbedding up-casts its weights,
        # autocast off), and its fp32 masters (and the EMA) live in the optimizer as for every
        # other parameter. ZeRO-0's unfused wrapper keeps one fp32 copy per parameter and copes
        # with mixed dtypes, so there the time path stays stored in fp32.
        model.net.keep_time_path_fp32(False)
    engine = engine_mod.build_engine(cfg, model, world_size, load_universal=load_universal)
    if cfg.network.compile:
        # DeepSpeed's own compile keeps parameter names (checkpoints stay loadable either way) and
        # knows ZeRO-3's gather hooks; the first steps pay the compilation time.
        engine.compile()
    return engine


def describe_layout(cfg, launch: dist.Launch, world_size: int) -> str:
    from etsdm_dist.data import order as shards

    micro, accum = config_mod.batch_layout(cfg.train.batch_images, world_size, cfg.train.micro_batch_images)
    lines = [f"launcher: {launch.launcher}  world_size: {world_size}  this process: rank {launch.rank} "
             f"(local {launch.local_rank}/{launch.local_world_size}, node {launch.node_rank})  "
             f"master: {launch.master_addr or '(broadcast over MPI)'}:{launch.master_port or '(auto)'}",
             f"global batch: {cfg.train.batch_images} images = {world_size} ranks x {accum} accumulation "
             f"steps x {micro} images per micro-batch",
             "global batch 0, positions per rank and micro-step:"]
    for r in range(world_size):
        parts = []
        for j in range(accum):
            p = shards.rank_micro_batch_positions(0, j, cfg.train.batch_images, world_size, r, micro)
            parts.append(f"[{p.start},{p.stop})")
        lines.append(f"  rank {r:>4}: {' '.join(parts)}")
        if r == 7 and world_size > 9:
            lines.append(f"  ... ({world_size - 9} more)")
            r = world_size - 1
            parts = [f"[{p.start},{p.stop})" for p in (
                shards.rank_micro_batch_positions(0, j, cfg.train.batch_images, world_size, r, micro)
                for j in range(accum))]
            lines.append(f"  rank {r:>4}: {' '.join(parts)}")
            break
    t = cfg.train
    lines.append(f"intervals (images): report {t.report_kimg * 1000:g}, checkpoint {t.checkpoint_kimg * 1000:g}, "
                 f"sample {t.sample_kimg * 1000:g}, total {t.total_kimg * 1000:g}")
    return "\n".join(lines)


def dry_run(cfg, launch: dist.Launch, world_size: int | None) -> int:
    from etsdm_dist.train import engine as engine_mod

    world = world_size or launch.world_size
    print("# resolved config")
    print(cfg.to_yaml())
    print(f"# DeepSpeed config (world_size={world})")
    print(json.dumps(engine_mod.deepspeed_config(cfg, world), indent=2))
    print("# rank layout")
    print(describe_layout(cfg, launch, world))
    return EXIT_OK


# --------------------------------------------------------------------------- the loop


def training_loop(cfg, local_rank_arg: int | None = None) -> int:
    from etsdm_dist.train import checkpoint
    from etsdm_dist.train import ema as ema_mod
    from etsdm_dist.train import engine as engine_mod
    from etsdm_dist.eval import grid as generate
    from etsdm_dist.train import stats
    from etsdm_dist.data import storage
    from etsdm_dist.data.loader import load_index, make_loader, to_model_input
    from etsdm_dist.diffusion.loss import bucket_losses, diffusion_loss

    t_cfg = cfg.train
    B = t_cfg.batch_images
    total_images = int(round(t_cfg.total_kimg * 1000))
    report_images = int(round(t_cfg.report_kimg * 1000))
    ckpt_images = int(round(t_cfg.checkpoint_kimg * 1000))
    sample_images = int(round(t_cfg.sample_kimg * 1000))

    # ---- Phase 1: launch. Ranks, process group, device; signal handlers before anything slow.
    preempt = _Preemption()
    install_faults(os.environ.get("ETSDM_FAULT"))
    launch = dist.init(local_rank_arg)
    world, rank = dist.world_size(), dist.rank()
    main = dist.is_main()
    device = dist.device_for(launch)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    micro, accum = config_mod.batch_layout(B, world, t_cfg.micro_batch_images)
    table = dist.rank_table(launch, device)

    def log(msg: str) -> None:
        if main:
            print(f"[etsdm] {msg}", flush=True)

    log(f"rank layout\n{table}")
    log(f"global batch {B} = {world} ranks x {accum} accumulation x {micro} micro-batch")

    # ---- Phase 2: run directory and resume lookup (newest committed checkpoint wins).
    run_dir = t_cfg.run_dir
    if main:
        storage.makedirs(run_dir)
        storage.write_bytes_atomic(storage.join(run_dir, "config.yaml"), cfg.to_yaml().encode())
    dist.barrier()
    found, ignored = checkpoint.find_resume(run_dir)
    for path, reason in ignored:
        log(f"ignoring checkpoint {path}: {reason}")
    resume_path, manifest = found if found is not None else (None, None)
    log(f"resuming from {resume_path} (kimg {manifest['images'] / 1000:.3f}, written by "
        f"{manifest['world_size']} ranks)" if found is not None else
        "starting a new run (no committed checkpoint)")

    # ---- Phase 3: network (identical initialisation on every rank) and schedule.
    torch.manual_seed(t_cfg.seed)
    model = build_model(cfg)
    schedule = build_schedule(cfg)
    model.settings.check_schedule(schedule)
    from etsdm_dist.diffusion.network import count_parameters

    log(f"network: {count_parameters(model.net) / 1e6:.3f}M parameters, preset {cfg.network.preset}")

    # ---- Phase 4: DeepSpeed engine (universal-checkpoint loading when the layout changed).
    universal = bool(manifest is not None and checkpoint.needs_universal(manifest, cfg, world))
    if universal:
        log("checkpoint was written under another world size / ZeRO stage: loading it as universal")
    engine = make_engine(cfg, model, world, load_universal=universal)
    dtype = _param_dtype(cfg)
    if cfg.network.compile:
        log("network compiled with torch.compile (first steps include compilation time)")

    # ---- Phase 5: EMA of the weights (one copy per decay).
    ema = ema_mod.EMA.from_config(engine, cfg)

    # ---- Phase 6: restore. Image counter (which fixes data cursor, LR, noise), engine, EMA.
    cur_images = 0
    if found is not None:
        state = checkpoint.load(engine, ema, resume_path, manifest, cfg, world)
        cur_images = int(state["images"])
        cursor = (state.get("loader_cursor") or {}).get("position", cur_images)
        if cursor != cur_images:
            raise RuntimeError(f"{resume_path}: loader cursor {cursor} != image counter {cur_images}")
        log(f"resumed at kimg {cur_images / 1000:.3f}")
    if cur_images % B:
        raise RuntimeError(f"checkpoint image counter {cur_images} is not a whole number of global "
                           f"batches of {B}: train.batch_images changed since it was written")

    # ---- Phase 7: data, from the cursor (= the image counter).
    index = load_index(cfg.data.url)
    if cfg.data.use_labels and not (index.num_classes and model.net.config.num_classes):
        raise config_mod.ConfigError(
            f"data.use_labels: needs labelled shards (index num_classes={index.num_classes} at "
            f"{cfg.data.url}) and a class-conditional network (network.num_classes="
            f"{model.net.config.num_classes})")
    loader = make_loader(cfg.data, index, seed=t_cfg.seed, start_position=cur_images, batch_images=B,
                         world_size=world, rank=rank, micro_batch_images=micro)

    # ---- Phase 8: reporting state.
    acc = stats.LossAccumulator(10, device)
    t_tilde = config_mod.etsdm_t_tilde(cfg)
    slog = stats.StatsLog(run_dir, resume_images=cur_images, enabled=main, tensorboard=t_cfg.tensorboard)
    step_log = os.environ.get("ETSDM_STEP_LOG") if main else None
    watch = stats.Stopwatch()
    ckpt_bytes = 0
    last_report_time, last_report_images = time.perf_counter(), cur_images
    bar = None
    if main and sys.stderr.isatty() or os.environ.get("ETSDM_PROGRESS") == "1":
        try:
            from tqdm import tqdm

            bar = tqdm(total=total_images, initial=cur_images, unit="img", unit_scale=True,
                       dynamic_ncols=True, disable=not main)
        except ImportError:
            bar = None
    model_fn = _EngineModel(engine, model.settings, dtype)
    use_labels = cfg.data.use_labels
    stop_reason = None
    data_error: str | None = None
    exit_code = EXIT_OK
    fault = os.environ.get("ETSDM_FAULT", "")
    nan_at = int(fault.split("@")[1]) if fault.startswith("nan_loss@") and rank == world - 1 else -1

    def save(reason: str) -> None:
        nonlocal ckpt_bytes
        t0 = time.perf_counter()
        path = checkpoint.save(engine, ema, cfg, images=cur_images,
                               loader_cursor={"seed": t_cfg.seed, "position": cur_images})
        slog.sync()
        watch.add("checkpoint", time.perf_counter() - t0)
        if main:
            try:
                files = storage.read_json(storage.join(path, checkpoint.MANIFEST))["files"]
                ckpt_bytes += sum(int(m["size"]) for m in files.values())
            except Exception:  # noqa: BLE001 - the size is a statistic only
                pass
        log(f"checkpoint ({reason}) at kimg {cur_images / 1000:.3f} in {time.perf_counter() - t0:.1f}s")

    # ---- Phase 9: train. One iteration = one global batch = `accum` micro-batches per rank.
    log(f"training from kimg {cur_images / 1000:.3f} to {total_images / 1000:.3f}")
    while cur_images < total_images:
        engine_mod.set_lr(engine, engine_mod.lr_at(cfg, cur_images + B))
        torch.manual_seed(_mix(t_cfg.seed, cur_images, rank))  # dropout etc.: reproducible on resume
        step_sum = torch.zeros(2, dtype=torch.float64, device=device)  # valid-sample loss sum, count
        # Counted on the device: a Python bool here would sync host and GPU every micro-step.
        nonfinite = torch.zeros((), dtype=torch.float64, device=device)
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = None
            if data_error is None:
                try:
                    batch = next(loader)
                except Exception as e:  # noqa: BLE001 - shard error, skip budget, dead worker
                    # Raising here would leave the other ranks waiting in this step's gradient
                    # collectives until the timeout. Instead this rank finishes the step on an
                    # all-invalid batch (no loss, no gradient) and the flag all-reduce below stops
                    # every rank together, without a checkpoint of this step.
                    data_error = f"{type(e).__name__}: {e}"
                    print(f"[etsdm] rank {rank}: data failure at kimg {cur_images / 1000:.3f}: {data_error}",
                          file=sys.stderr, flush=True)
            if batch is None:
                batch = _invalid_batch(index, micro, cur_images)
            watch.add("data", time.perf_counter() - t0)
            x0 = to_model_input(batch["images"], device, torch.float32)
            valid = batch["valid"].to(device)
            # Invalid (skipped) samples carry label -1; they are masked out, any class will do.
            y = batch["labels"].to(device).clamp(min=0) if use_labels else None
            gen = torch.Generator(device=device).manual_seed(_mix(t_cfg.seed, int(batch["positions"][0])))
            per_sample, t = diffusion_loss(model_fn, x0, schedule, y=y, generator=gen,
                                           stratified=cfg.diffusion.stratified_t)
            if cur_images + B == nan_at:
                per_sample = per_sample * float("nan")
            # Skipped (invalid) samples contribute neither loss nor gradient.
            vf = valid.to(per_sample.dtype)
            loss = (per_sample * vf).sum() / vf.sum().clamp(min=1.0)
            engine_mod.engine_micro_step(engine, loss)
            detached = per_sample.detach()
            nonfinite += (~torch.isfinite(detached) & valid).sum()
            step_sum[0] += torch.where(valid, detached.double(), 0.0).sum()
            step_sum[1] += vf.double().sum()
            acc.add(bucket_losses(detached, t, schedule, t_tilde, weight=vf))
        ema.update(cur_images + B)
        cur_images += B

        # One small all-reduce per step: every rank learns the same stop / NaN decision.
        flags = torch.tensor([1.0 if preempt.signum is not None else 0.0, 0.0,
                              1.0 if data_error is not None else 0.0], dtype=torch.float64, device=device)
        flags[1] = (nonfinite > 0).to(torch.float64)
        agreed = dist.all_reduce(torch.cat([flags, step_sum]), "sum").cpu()
        step_loss = float(agreed[3] / agreed[4]) if agreed[4] > 0 else float("nan")
        if step_log:
            with open(step_log, "a") as f:
                f.write(f"{cur_images} {step_loss.hex()}\n")
        if bar is not None:
            bar.update(B)
            bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
        if agreed[1] > 0:
            log(f"non-finite loss at step {cur_images // B} (kimg {cur_images / 1000:.3f}) on "
                f"{int(agreed[1])} rank(s); stopping without a checkpoint. The last committed "
                f"checkpoint is intact: lower optim.lr, raise optim.warmup_kimg or check the data, "
                f"then rerun to resume from it")
            exit_code = EXIT_NONFINITE
            break
        if agreed[2] > 0:
            log(f"data failure on {int(agreed[2])} rank(s) in step {cur_images // B} (kimg "
                f"{cur_images / 1000:.3f}); every rank stops without a checkpoint of this step (the "
                f"failing rank printed the shard and key above). Fix or re-shard the data (or set "
                f"data.on_error=skip / raise data.skip_budget), then rerun to resume")
            exit_code = EXIT_DATA
            break

        done = cur_images >= total_images
        # Report (collective: every rank reaches it at the same image counter).
        if done or (report_images and cur_images % report_images == 0):
            summary = acc.reduce()
            acc.reset()
            extras = torch.tensor([sum(loader.error_counts().values()), watch.pop("data")],
                                  dtype=torch.float64, device=device)
            extras = dist.all_reduce(extras, "sum").cpu()
            now = time.perf_counter()
            elapsed = max(now - last_report_time, 1e-9)
            record = {"images": cur_images, "kimg": cur_images / 1000, **summary,
                      "lr": engine_mod.current_lr(engine), "grad_norm": engine_mod.grad_norm(engine),
                      "loss_scale": engine_mod.loss_scale(engine),
                      "skipped_steps": engine_mod.skipped_steps(engine),
                      "images_per_s": (cur_images - last_report_images) / elapsed,
                      "data_wait_pct": 100.0 * float(extras[1]) / world / elapsed,
                      "rss_bytes": stats.rss_bytes(), "cuda_max_allocated": stats.cuda_max_allocated(device),
                      "checkpoint_s": watch.pop("checkpoint"), "checkpoint_bytes": ckpt_bytes,
                      "sample_s": watch.pop("sample"), "data_errors": int(extras[0]), "world_size": world}
            ckpt_bytes = 0
            slog.write(record)
            if bar is None:
                log(stats.progress_line(cur_images, total_images, record["loss"], record["images_per_s"]))
            last_report_time, last_report_images = now, cur_images

        # Sample grid with EMA weights (rank 0 draws; the others wait at the barrier).
        if sample_images and (cur_images % sample_images == 0 or done):
            t0 = time.perf_counter()
            ema_state = ema.full_state(cfg.sample.ema)  # collective
            if main:
                ema_model = build_model(cfg).to(device)
                ema_model.net.load_state_dict(_strip_prefix(ema_state, "net."))
                ema_model.eval()
                generate.save_sample_grid(cfg, ema_model, schedule, device,
                                 storage.join(run_dir, "samples", f"samples-{cur_images:09d}.png"))
                del ema_model
            dist.barrier()
            watch.add("sample", time.perf_counter() - t0)

        if agreed[0] > 0:
            name = signal.Signals(preempt.signum).name if preempt.signum else "a signal on another rank"
            save(f"preempted by {name}")
            stop_reason = "preempted"
            exit_code = t_cfg.requeue_exit_code
            break
        if done or (ckpt_images and cur_images % ckpt_images == 0):
            save("end" if done else "interval")

    # ---- Phase 10: wrap up.
    if bar is not None:
        bar.close()
    loader.close()
    slog.close()
    if stop_reason == "preempted":
        log(f"stopped at kimg {cur_images / 1000:.3f}: checkpoint saved; exit {exit_code} means "
            f"'rerun the same command to resume'")
    elif exit_code == EXIT_OK:
        log(f"done: kimg {cur_images / 1000:.3f}")
    dist.barrier()
    return exit_code


# --------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, local_rank = dist.strip_local_rank(argv)
    p = argparse.ArgumentParser(prog="etsdm train", description=(
        "Train E-TSDM with DeepSpeed. Run under a launcher (see launchers/) or plainly for one rank. "
        f"Exit code 75 (train.requeue_exit_code) = preempted after saving a checkpoint: rerun to resume."))
    p.add_argument("config", help="YAML run file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.zero_stage=3")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the DeepSpeed JSON and the rank layout; do not train")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: show the layout for this many ranks instead of the launcher's")
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.overrides)
        try:
            launch = dist.parse_launch(os.environ, local_rank)
        except ValueError as e:  # contradictory launcher variables: a set-up error, like config
            raise config_mod.ConfigError(f"launch environment: {e}") from e
        if args.dry_run:
            return dry_run(cfg, launch, args.world_size)
        config_mod.batch_layout(cfg.train.batch_images, launch.world_size, cfg.train.micro_batch_images)
        if not cfg.data.url:
            raise config_mod.ConfigError("data.url: empty; point it at a folder or URL holding shards "
                                         "and index.json (see `etsdm shard --help`)")
    except config_mod.ConfigError as e:
        print(f"etsdm train: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from etsdm_dist.train import engine as engine_mod

    if engine_mod.on_cpu():
        engine_mod.keep_freed_host_memory()
    code = training_loop(cfg, local_rank)
    # The process is about to exit with everything saved. A launcher that sees the first rank exit
    # may SIGTERM the others while they are still shutting down, when our handler is gone: they
    # would die with 143 and the requeue code would be lost (seen under srun
    # --kill-on-bad-exit=1, 1 run in 12). Here, not in training_loop: only the entry point owns
    # the process's signal dispositions.
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
