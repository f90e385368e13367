"""`etsdm train CONFIG [key=value ...] [--dry-run]`: the training loop, in phases.

Progress is counted in images (kimg), as in NVlabs EDM: the run's whole state is one image counter
plus what DeepSpeed and the EMA keep. Everything else is a pure function of the counter:
  - the data (the loader reads global positions [counter, counter + batch) next),
  - the learning rate (engine.lr_at),
  - the diffusion noise, timesteps and dropout of a step (step.py: keyed by positions and counter),
  - when to report, checkpoint and sample (every interval is a whole number of global batches).
So a resume from a committed checkpoint continues bit-for-bit (fp32) where the run left off.

The per-step work is step.TrainStep, shared with `etsdm bench train` and the in-process tests.
`Trainer` wraps it with the run's I/O: start (launch, resume, network, engine, EMA, data),
report, sample grid, checkpoint, close. `training_loop` is the loop over them.

Collectives: every rank makes these calls at the same image counter, in this order, or the ranks
hang until DEEPSPEED_TIMEOUT (minutes):
  Trainer.start     process group, the run dir's lease (rank 0 takes it, one all-gather tells
                    every rank), barrier after the run dir, checkpoint.load, DeepSpeed init
  Trainer.step      gradient reduction + one all-reduce of the stop / NaN / data-failure flags
  Trainer.report    one all-reduce of the loss sums, one of the data counters
  Trainer.sample_grid  the EMA gather (ema.full_state), then a barrier while rank 0 draws
  Trainer.save      checkpoint.save (gathers and barriers)
  Trainer.close     a final barrier
  Trainer.lease_lost  one all-reduce before every step that writes (report, sample, FID, checkpoint)
The loop's decisions (stop, report, sample, save) depend only on the step's all-reduced result and
the image counter, so every rank takes the same branch.

Preemption: SIGTERM / SIGUSR1 set a flag that goes into the step's all-reduce; all ranks save a
checkpoint after the same step and exit with train.requeue_exit_code (75, EX_TEMPFAIL: "run me
again"). Rerunning the same command resumes from the newest committed checkpoint.

Hook point for code outside the product: `training_loop(cfg, callbacks=[f])` calls
f(trainer, result) on every rank after every step, before the loop acts on the result
(tests/hooks/sitecustomize.py installs its step log this way).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Callable, Iterator, Sequence

import torch

from etsdm_dist import config as config_mod
from etsdm_dist import dist
from etsdm_dist.redact import redact_text, redacted_yaml
from etsdm_dist.diffusion.build import build_model, build_schedule
from etsdm_dist.train import lease as lease_mod
from etsdm_dist.train.dry_run import dry_run
from etsdm_dist.train.step import StepResult, TrainStep, invalid_micro_batch, make_engine

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_DATA = 0, 2, 3, 4
EXIT_LEASE = 5  # train.run_dir is leased by another run, or this run lost its lease (lease.py)

StepCallback = Callable[["Trainer", StepResult], None]


class _Preemption:
    """SIGTERM / SIGUSR1 -> a flag that each step's all-reduce carries to every rank."""

    def __init__(self):
        self.signum: int | None = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum

    def requested(self) -> bool:
        return self.signum is not None


class _RankData:
    """This rank's micro-batches for the step: the loader's, with the time spent waiting for them.

    A loader error (a shard error under on_error=raise, the skip budget, a dead worker) is not
    raised: that would leave the other ranks waiting in this step's gradient collectives until the
    timeout. The rank instead trains on placeholders (no loss, no gradient) marked `failed`, and
    the step's flag all-reduce stops every rank together, without a checkpoint of this step."""

    def __init__(self, loader, net_config, micro: int, rank: int, watch):
        self.loader, self.micro, self.rank, self.watch = loader, micro, rank, watch
        self.shape = (net_config.in_channels, net_config.resolution)
        self.error: str | None = None
        self.at_images = 0  # the image counter at the start of the current step (for messages)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        try:
            if self.error is None:
                return next(self.loader)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            self.error = f"{type(e).__name__}: {e}"
            print(f"[etsdm] rank {self.rank}: data failure at kimg {self.at_images / 1000:.3f}: "
                  f"{self.error}", file=sys.stderr, flush=True)
        finally:
            self.watch.add("data", time.perf_counter() - t0)
        # Only the shape matters: every sample is invalid, so nothing of it reaches a gradient.
        return invalid_micro_batch(self.micro, *self.shape, position=0)


def _strip_prefix(state: dict, prefix: str) -> dict:
    """EMA names are the engine module's (ConditionedModel: "net.<param>"); the UNet wants bare ones."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _progress_bar(main: bool, total: int, initial: int):
    if not (main and (sys.stderr.isatty() or os.environ.get("ETSDM_PROGRESS") == "1")):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="img", unit_scale=True, dynamic_ncols=True)


# --------------------------------------------------------------------------- the trainer


def _kimg_images(kimg: float) -> int:
    return int(round(kimg * 1000))


class Trainer:
    """One rank's run: TrainStep plus the run's I/O. See the module docstring for which methods
    are collective (all of them but `due` and `log`)."""

    def __init__(self, cfg, *, launch, device, model, schedule, engine, ema, loader, train_step: TrainStep,
                 lease: lease_mod.Lease | None = None):
        from etsdm_dist.train import stats

        self.cfg, self.launch, self.device = cfg, launch, device
        self.model, self.schedule, self.engine, self.ema = model, schedule, engine, ema
        self.loader, self.train_step = loader, train_step
        self.lease = lease  # rank 0's; None on the others
        self.rank, self.world, self.main = dist.rank(), dist.world_size(), dist.is_main()
        t = cfg.train
        self.total_images = _kimg_images(t.total_kimg)
        self.intervals = {"report": _kimg_images(t.report_kimg), "checkpoint": _kimg_images(t.checkpoint_kimg),
                          "sample": _kimg_images(t.sample_kimg), "fid": _kimg_images(t.fid_kimg)}
        self.watch = stats.Stopwatch()
        self.data = _RankData(loader, model.net.config, train_step.micro_batch_images, self.rank, self.watch)
        self.slog = stats.StatsLog(t.run_dir, resume_images=self.images, enabled=self.main,
                                   tensorboard=t.tensorboard)
        self.bar = _progress_bar(self.main, self.total_images, self.images)
        self.checkpoint_bytes = 0
        self._last_report = (time.perf_counter(), self.images)
        self._fid_tools = None  # (Inception network, reference statistics), loaded at the first FID

    @property
    def images(self) -> int:
        return self.train_step.images

    @property
    def done(self) -> bool:
        return self.images >= self.total_images

    @property
    def kimg(self) -> str:
        return f"kimg {self.images / 1000:.3f}"

    def due(self, interval: str) -> bool:
        """Whether `interval` (report | checkpoint | sample | fid) falls on this image counter. The
        last step always reports and checkpoints; it draws samples and measures FID only when those
        are on (an interval of 0 is off)."""
        every = self.intervals[interval]
        if every and self.images % every == 0:
            return True
        return self.done and (bool(every) or interval not in ("sample", "fid"))

    def log(self, msg: str) -> None:
        if self.main:
            print(f"[etsdm] {redact_text(msg)}", flush=True)

    # ---------------------------------------------------------------- start

    @classmethod
    def start(cls, cfg, local_rank_arg: int | None = None) -> "Trainer":
        from etsdm_dist.data import storage
        from etsdm_dist.data.loader import load_index, make_loader
        from etsdm_dist.diffusion.network import count_parameters
        from etsdm_dist.train import checkpoint
        from etsdm_dist.train import ema as ema_mod

        t = cfg.train
        # Launch: ranks, process group, device.
        launch = dist.init(local_rank_arg)
        world, rank, main = dist.world_size(), dist.rank(), dist.is_main()
        device = dist.device_for(launch)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        micro, accum = config_mod.batch_layout(t.batch_images, world, t.micro_batch_images)

        def log(msg: str) -> None:
            if main:
                print(f"[etsdm] {redact_text(msg)}", flush=True)

        log(f"rank layout\n{dist.rank_table(launch, device)}")
        log(f"global batch {t.batch_images} = {world} ranks x {accum} accumulation x {micro} micro-batch")

        # The run directory's lease, before anything is written there (collective).
        held = lease_mod.acquire_on_rank0(t.run_dir, lease_s=t.lease_s, log=log)

        # Run directory and resume lookup (the newest committed checkpoint wins).
        if main:
            storage.makedirs(t.run_dir)
            storage.write_bytes_atomic(storage.join(t.run_dir, "config.yaml"), redacted_yaml(cfg.to_dict()).encode())
        dist.barrier()
        # Every file checked against its manifest; each checkpoint passed over is logged there.
        found, _ = checkpoint.resume(t.run_dir)
        resume_path, manifest = found if found is not None else (None, None)
        log(f"resuming from {resume_path} (kimg {manifest['images'] / 1000:.3f}, written by "
            f"{manifest['world_size']} ranks)" if found is not None else
            "starting a new run (no committed checkpoint)")

        # Network (identical initialisation on every rank) and schedule.
        torch.manual_seed(t.seed)
        model = build_model(cfg)
        schedule = build_schedule(cfg)
        model.settings.check_schedule(schedule)
        log(f"network: {count_parameters(model.net) / 1e6:.3f}M parameters, preset {cfg.network.preset}")

        # DeepSpeed engine (universal-checkpoint loading when the layout changed) and EMA.
        universal = bool(manifest is not None and checkpoint.needs_universal(manifest, cfg, world))
        if universal:
            log("checkpoint was written under another world size / ZeRO stage: loading it as universal")
        engine = make_engine(cfg, model, world, load_universal=universal)
        if cfg.network.compile:
            log("network compiled with torch.compile (first steps include compilation time)")
        ema = ema_mod.EMA.from_config(engine, cfg)

        # Restore: the image counter (which fixes data, LR and noise), engine, EMA.
        images = 0
        if found is not None:
            images = int(checkpoint.load(engine, ema, resume_path, manifest, cfg, world)["images"])
            log(f"resumed at kimg {images / 1000:.3f}")
        if images % t.batch_images:
            raise RuntimeError(f"checkpoint image counter {images} is not a whole number of global "
                               f"batches of {t.batch_images}: train.batch_images changed since it was written")

        # Data, from the image counter.
        index = load_index(cfg.data.url)
        if cfg.data.use_labels and not (index.num_classes and model.net.config.num_classes):
            raise config_mod.ConfigError(
                f"data.use_labels: needs labelled shards (index num_classes={index.num_classes} at "
                f"{cfg.data.url}) and a class-conditional network (network.num_classes="
                f"{model.net.config.num_classes})")
        net = model.net.config
        if index.resolution and (tuple(index.resolution) != (net.resolution, net.resolution)
                                 or index.channels != net.in_channels):
            raise config_mod.ConfigError(
                f"network.resolution / network.in_channels ({net.in_channels}x{net.resolution}x{net.resolution}) "
                f"do not match the images at data.url {cfg.data.url} ({index.channels}x"
                f"{'x'.join(map(str, index.resolution))}, from its index.json; `etsdm index --resolution` "
                f"/ `etsdm shard --resolution` set it)")
        loader = make_loader(cfg.data, index, seed=t.seed, start_position=images, batch_images=t.batch_images,
                             world_size=world, rank=rank, micro_batch_images=micro,
                             num_classes=model.net.config.num_classes)
        step = TrainStep(cfg, engine, ema, schedule, device=device, images=images)
        return cls(cfg, launch=launch, device=device, model=model, schedule=schedule, engine=engine,
                   ema=ema, loader=loader, train_step=step, lease=held)

    # ---------------------------------------------------------------- per step

    def step(self, stop_requested: Callable[[], bool]) -> StepResult:
        """One global batch (collective): see step.TrainStep."""
        self.data.at_images = self.images
        result = self.train_step(self.data, stop_requested)
        if self.bar is not None:
            self.bar.update(self.cfg.train.batch_images)
            self.bar.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
        return result

    def report(self) -> None:
        """A stats.jsonl line for the interval since the last report (collective: 2 all-reduces)."""
        from etsdm_dist.train import engine as engine_mod
        from etsdm_dist.train import stats

        summary = self.train_step.losses.reduce()
        self.train_step.losses.reset()
        extras = torch.tensor([sum(self.loader.error_counts().values()), self.watch.pop("data")],
                              dtype=torch.float64, device=self.device)
        extras = dist.all_reduce(extras, "sum").cpu()
        now = time.perf_counter()
        last_time, last_images = self._last_report
        elapsed = max(now - last_time, 1e-9)
        engine = self.engine
        record = {"images": self.images, "kimg": self.images / 1000, **summary,
                  "lr": engine_mod.current_lr(engine), "grad_norm": engine_mod.grad_norm(engine),
                  "loss_scale": engine_mod.loss_scale(engine), "skipped_steps": engine_mod.skipped_steps(engine),
                  "images_per_s": (self.images - last_images) / elapsed,
                  "data_wait_pct": 100.0 * float(extras[1]) / self.world / elapsed,
                  "rss_bytes": stats.rss_bytes(), "cuda_max_allocated": stats.cuda_max_allocated(self.device),
                  "checkpoint_s": self.watch.pop("checkpoint"), "checkpoint_bytes": self.checkpoint_bytes,
                  "sample_s": self.watch.pop("sample"), "data_errors": int(extras[0]), "world_size": self.world}
        self.checkpoint_bytes = 0
        self.slog.write(record)
        if self.bar is None:
            self.log(stats.progress_line(self.images, self.total_images, record["loss"], record["images_per_s"]))
        self._last_report = (now, self.images)

    def sample_grid(self) -> None:
        """A grid of samples from the EMA weights: every rank takes part in the EMA gather, rank 0
        draws, the others wait at the barrier."""
        from etsdm_dist.data import storage
        from etsdm_dist.eval import grid

        with self.watch.time("sample"):
            ema_state = self.ema.full_state(self.cfg.sample.ema)
            if self.main:
                grid.save_sample_grid(self.cfg, self._ema_model(ema_state), self.schedule, self.device, storage.join(
                    self.cfg.train.run_dir, "samples", f"samples-{self.images:09d}.png"))
            dist.barrier()

    def _ema_model(self, ema_state: dict) -> torch.nn.Module:
        """A plain (non-DeepSpeed) model holding gathered EMA weights, for sampling."""
        model = build_model(self.cfg).to(self.device)
        model.net.load_state_dict(_strip_prefix(ema_state, "net."))
        return model.eval().requires_grad_(False)

    def measure_fid(self) -> None:
        """FID/KID of the EMA weights (collective: every rank gathers the EMA, samples its block of
        train.fid_num images and feeds the all-reduced Inception statistics); a stats.jsonl line."""
        from etsdm_dist.eval import measure
        from etsdm_dist.eval.fid import load_reference
        from etsdm_dist.eval.inception import Inception
        from etsdm_dist.eval.sampling import ImageSampler, LoadedModel, sampler_settings

        t0 = time.perf_counter()
        if self._fid_tools is None:
            batch = 128 if self.device.type == "cuda" else 8
            self._fid_tools = (Inception(device=self.device, batch_images=batch),
                               load_reference(self.cfg.data.fid_ref))
        net, ref = self._fid_tools
        ema_model = self._ema_model(self.ema.full_state(self.cfg.sample.ema))
        loaded = LoadedModel.in_memory(ema_model, self.schedule, kind="training", path=self.cfg.train.run_dir,
                                       images=self.images, ema_index=self.cfg.sample.ema,
                                       ema_decay=self.cfg.train.ema_decays[self.cfg.sample.ema])
        # Image seeds (0, i), as `etsdm fid --run` and `etsdm compare` by default: not the training
        # seed, so runs trained with different seeds are judged on the same noise.
        sampler = ImageSampler(loaded, sampler_settings(self.cfg.sample.model_dump()), seed=0,
                               device=self.device)
        result = measure.measure(sampler, self.cfg.train.fid_num, ref, net)
        seconds = time.perf_counter() - t0
        if result is not None:
            kid = result["kid"]
            self.slog.write({"images": self.images, "kimg": self.images / 1000, "fid": result["fid"],
                             "kid": None if kid is None else kid["mean"], "kid_std": None if kid is None else kid["std"],
                             "fid_num": result["n"], "fid_protocol": result["protocol"],
                             "fid_sampler": result["settings"], "fid_s": seconds})
            self.log(f"FID {result['fid']:.2f} at {self.kimg} ({result['n']} images, "
                     f"{result['sampler']} {result['steps']} steps, {seconds:.0f}s)")
        self.watch.add("sample", seconds)

    def save(self, reason: str) -> None:
        """Commit a checkpoint at the current image counter (collective)."""
        from etsdm_dist.data import storage
        from etsdm_dist.train import checkpoint

        t0 = time.perf_counter()
        path = checkpoint.save(self.engine, self.ema, self.cfg, images=self.images)
        self.slog.sync()
        self.watch.add("checkpoint", time.perf_counter() - t0)
        if self.main:
            try:
                files = storage.read_json(storage.join(path, checkpoint.MANIFEST))["files"]
                self.checkpoint_bytes += sum(int(m["size"]) for m in files.values())
            except Exception:  # noqa: BLE001 - the size is a statistic only
                pass
        self.log(f"checkpoint ({reason}) at kimg {self.images / 1000:.3f} in {time.perf_counter() - t0:.1f}s")

    def lease_lost(self) -> bool:
        """Whether rank 0 lost the run directory's lease: another run took it over, or it could not be
        renewed in time (collective: one all-reduce). Then nothing more may be written."""
        return lease_mod.lost_on_rank0(self.lease, self.device, self.log)

    def release_lease(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.loader.close()
        self.slog.close()
        dist.barrier()


# --------------------------------------------------------------------------- the loop


def training_loop(cfg, local_rank_arg: int | None = None, *, callbacks: Sequence[StepCallback] = ()) -> int:
    """Train until train.total_kimg; returns the exit code (the same on every rank)."""
    preempt = _Preemption()  # before anything slow: a signal during start-up still counts
    try:
        trainer = Trainer.start(cfg, local_rank_arg)
    except lease_mod.LeaseError as e:  # held by another run, or the storage refused
        if dist.is_main():
            print(f"etsdm train: {e}", file=sys.stderr, flush=True)
        return EXIT_LEASE
    trainer.log(f"training from {trainer.kimg} to {trainer.total_images / 1000:.3f}")
    code = _train(trainer, preempt, callbacks)
    if code == EXIT_LEASE:
        return code  # close() would upload stats.jsonl into a run directory that is not ours now
    # Not in a `finally`: after an exception the other ranks are not at this barrier.
    trainer.close()
    trainer.release_lease()  # after close's barrier: every rank has written everything
    return code


def _train(trainer: Trainer, preempt: _Preemption, callbacks: Sequence[StepCallback]) -> int:
    cfg = trainer.cfg
    while not trainer.done:
        # Evaluate the loss, accumulate gradients, step the optimizer and the EMA; agree on flags.
        result = trainer.step(preempt.requested)
        for callback in callbacks:
            callback(trainer, result)

        # Stop together, without a checkpoint of a poisoned step.
        step_no = trainer.images // cfg.train.batch_images
        if result.nonfinite_ranks:
            trainer.log(f"non-finite loss at step {step_no} ({trainer.kimg}) on {result.nonfinite_ranks} "
                        f"rank(s); stopping without a checkpoint. The last committed checkpoint is "
                        f"intact: lower optim.lr, raise optim.warmup_kimg or check the data, then "
                        f"rerun to resume from it")
            return EXIT_NONFINITE
        if result.data_failure_ranks:
            trainer.log(f"data failure on {result.data_failure_ranks} rank(s) in step {step_no} "
                        f"({trainer.kimg}); every rank stops without a checkpoint of this step (the "
                        f"failing rank printed the shard and key above). Fix or re-shard the data (or "
                        f"set data.on_error=skip / raise data.skip_budget), then rerun to resume")
            return EXIT_DATA

        # Nothing is written into a run directory whose lease another run has taken over.
        writes = result.stop_ranks or any(trainer.due(k) for k in ("report", "sample", "fid", "checkpoint"))
        if writes and trainer.lease_lost():
            return EXIT_LEASE

        # Report status, draw samples, save state.
        if trainer.due("report"):
            trainer.report()
        if trainer.due("sample"):
            trainer.sample_grid()
        if trainer.due("fid"):
            trainer.measure_fid()
        if result.stop_ranks:
            name = signal.Signals(preempt.signum).name if preempt.signum else "a signal on another rank"
            trainer.save(f"preempted by {name}")
            trainer.log(f"stopped at {trainer.kimg}: checkpoint saved; exit {cfg.train.requeue_exit_code} "
                        f"means 'rerun the same command to resume'")
            return cfg.train.requeue_exit_code
        if trainer.due("checkpoint"):
            trainer.save("end" if trainer.done else "interval")
    trainer.log(f"done: {trainer.kimg}")
    return EXIT_OK


# --------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, local_rank = dist.strip_local_rank(argv)
    p = argparse.ArgumentParser(prog="etsdm train", description=(
        "Train E-TSDM with DeepSpeed. Run under a launcher (see launchers/) or plainly for one rank. "
        "Exit code 75 (train.requeue_exit_code) = preempted after saving a checkpoint: rerun to resume."))
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
    try:
        code = training_loop(cfg, local_rank)
    except config_mod.ConfigError as e:  # found at start against the data (shapes, labels)
        print(f"etsdm train: {e}", file=sys.stderr)
        return EXIT_CONFIG
    # The process is about to exit with everything saved. A launcher that sees the first rank exit
    # may SIGTERM the others while they are still shutting down, when our handler is gone: they
    # would die with 143 and the requeue code would be lost (seen under srun
    # --kill-on-bad-exit=1). Here, not in training_loop: only the entry point owns the process's
    # signal dispositions.
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
