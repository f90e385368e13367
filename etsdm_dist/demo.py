"""`etsdm demo`: the main job on the embedded default, from shards to a report.

    etsdm demo [--profile full|quick|ci] [--s3] [--compare] [--out runs/demo] [key=value ...]

1. shards the Fashion-MNIST train split (Debian's dataset-fashion-mnist) and, with --s3, serves the
   shards from a SeaweedFS server it starts on 127.0.0.1 and stops by its PID; builds FID
   reference statistics of the test split;
2. trains E-TSDM on 2 ranks under the deepspeed launcher; midway it kills one rank with -9, says
   so, and reruns the same command, which resumes from the last committed checkpoint;
3. samples on 2 ranks with DDIM and DPM-Solver++ and measures FID and KID against the test split,
   and the same for the untrained network (the floor the training must beat);
4. writes OUT/report.md (`etsdm report`) and prints its path;
5. --compare also trains the DDPM baseline with identical seeds and adds `etsdm compare`'s table.
Every step is skipped when its output is already there, so a rerun continues where it stopped.
Config overrides (key=value) apply to the training runs. On a CUDA machine the profile `gpu`
(longer, larger) is the default.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

FMNIST = "/usr/share/datasets/fashion-mnist"
CONFIG = "fmnist32.yaml"


@dataclass(frozen=True)
class Profile:
    train_images: int  # Fashion-MNIST train images sharded
    ref_images: int  # test-split images in the FID reference
    kimg: float
    checkpoint_kimg: float
    sample_kimg: float
    eval_num: int  # images per FID measurement
    settings: tuple  # (sampler, steps) measured at the end
    batch: int = 64
    lr: float = 1e-3
    preset: str = "tiny"
    overrides: tuple = field(default_factory=tuple)


PROFILES = {
    # The README's default: recognisable clothing on 2 CPU cores, ~17 minutes without the install.
    # Sampling dominates the evaluation on CPU (~4.5 s per network call per 1000 images here), so
    # N = 500 per setting and no 50-step setting.
    "full": Profile(20000, 1000, 25.6, 3.2, 3.2, 500, (("ddim", 10), ("ddim", 25), ("dpm_solver++", 10),
                                                       ("dpm_solver++", 20))),
    "quick": Profile(5000, 500, 6.4, 1.6, 1.6, 300, (("ddim", 20), ("dpm_solver++", 10))),
    "ci": Profile(2000, 64, 2.56, 0.64, 1.28, 32, (("ddim", 20),)),
    # Untested here (no GPU was lent): the same pipeline, longer and on the 32 preset.
    "gpu": Profile(60000, 10000, 200.0, 20.0, 20.0, 10000, (("ddim", 10), ("ddim", 50), ("dpm_solver++", 10),
                                                            ("dpm_solver++", 20)), batch=128, lr=2e-4, preset="32"),
}


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


class Demo:
    def __init__(self, a: argparse.Namespace):
        self.a, self.p = a, PROFILES[a.profile]
        self.out = a.out.rstrip("/")
        self.data_root = os.path.join(self.out + "-data")
        self.env = dict(os.environ)
        self.cpu = not _cuda()
        if self.cpu:
            self.env.update(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        self.server = None
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------ helpers

    def run(self, cmd: list[str], *, check: bool = True, log_to: str | None = None) -> int:
        log("$ " + " ".join(cmd))
        if log_to:
            with open(log_to, "ab") as f:
                rc = subprocess.run(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT).returncode
        else:
            rc = subprocess.run(cmd, env=self.env).returncode
        if check and rc:
            raise SystemExit(f"[demo] failed (exit {rc}): {' '.join(cmd)}" + (f"; see {log_to}" if log_to else ""))
        return rc

    def launcher(self, module: str, nproc: int = 2) -> list[str]:
        port = str(29500 + (os.getpid() + int(time.time())) % 2000)
        # `--`: the launcher's own parser would take --num / --run as abbreviations of its options
        return ["deepspeed", "--num_nodes", "1", "--num_gpus", str(nproc), "--master_port", port, "--module",
                module, "--"]

    def event(self, name: str, detail: str) -> None:
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "events.jsonl"), "a") as f:
            f.write(json.dumps({"time": time.strftime("%H:%M:%S"), "event": name, "detail": detail}) + "\n")

    # ------------------------------------------------------------ 1. data

    def data(self) -> tuple[str, str]:
        p = self.p
        local = {"train": os.path.join(self.data_root, "train"), "test": os.path.join(self.data_root, "test")}
        urls = dict(local)
        if self.a.s3:
            from etsdm_dist.data.local_s3 import SeaweedServer

            self.server = SeaweedServer(os.path.join(self.data_root, "s3")).start()
            self.env.update(self.server.env)
            os.environ.update(self.server.env)  # for this process's own reads (the report)
            bucket = self.server.make_bucket_if_missing("etsdm-demo")
            urls = {k: f"{bucket}/fmnist-{k}" for k in local}
            log(f"SeaweedFS S3 server on {self.server.endpoint} (pid {self.server.proc.pid}); shards go to {bucket}")
        for split, idx_split, n in (("train", "train", p.train_images), ("test", "t10k", p.ref_images)):
            if self._exists(urls[split] + "/index.json"):
                continue
            self.run(["etsdm", "shard", FMNIST, urls[split], "--split", idx_split, "--resolution", "32",
                      "--mode", "pad", "--limit", str(n), "--shuffle-seed", "0", "--max-samples", "1000",
                      "--workers", "2", "--no-progress", "--prefix", split])
        ref = os.path.join(self.out, "fid-ref-test.npz")
        if not os.path.exists(ref):
            os.makedirs(self.out, exist_ok=True)
            self.run([*self.launcher("etsdm_dist.eval.fid"), "ref", urls["test"], "--out", ref,
                      "--kid-rows", str(p.ref_images), "--no-progress"])
        return urls["train"], ref

    def _exists(self, url: str) -> bool:
        from etsdm_dist.data import storage

        return storage.exists(url)

    # ------------------------------------------------------------ 2. training

    def train_overrides(self, run_dir: str, data_url: str, *extra: str) -> list[str]:
        p = self.p
        return [f"train.run_dir={run_dir}", f"data.url={data_url}", f"train.total_kimg={p.kimg}",
                f"train.batch_images={p.batch}", f"optim.lr={p.lr}", "optim.warmup_kimg=0.64",
                f"train.report_kimg={min(1.28, p.checkpoint_kimg)}", f"train.checkpoint_kimg={p.checkpoint_kimg}",
                f"train.sample_kimg={p.sample_kimg}", f"network.preset={p.preset}", "network.resolution=32",
                "network.in_channels=1", *p.overrides, *extra, *self.a.overrides]

    def train(self, run_dir: str, data_url: str, *extra: str, crash: bool = False) -> None:
        from etsdm_dist import run_dir as rd

        found, _ = rd.find_resume(run_dir) if os.path.isdir(run_dir) else (None, [])
        if found and found[1]["images"] >= round(self.p.kimg * 1000):
            log(f"{run_dir}: already trained to kimg {self.p.kimg:g}")
            return
        config = _config_path()
        cmd = [*self.launcher("etsdm_dist.train"), config, *self.train_overrides(run_dir, data_url, *extra)]
        os.makedirs(run_dir, exist_ok=True)
        log_to = os.path.join(run_dir, "train.log")
        if crash and not found:
            half = round(self.p.kimg * 500 / (self.p.checkpoint_kimg * 1000)) * round(self.p.checkpoint_kimg * 1000)
            log(f"$ {' '.join(cmd)}   (log: {log_to})")
            with open(log_to, "ab") as f:
                proc = subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            victim = _wait_and_kill_rank(proc, run_dir, half, rank=1)
            if victim is not None:
                found, _ = rd.find_resume(run_dir)
                at = found[1]["images"] / 1000 if found else 0
                msg = (f"killed rank 1 (pid {victim}) with SIGKILL after the checkpoint at kimg {at:g}; the "
                       f"launcher took the other rank down (exit {proc.returncode}). Rerunning the same command "
                       f"resumes from the newest committed checkpoint.")
                log(msg)
                self.event("kill -9", msg)
            elif proc.returncode:
                raise SystemExit(f"[demo] training failed (exit {proc.returncode}); see {log_to}")
        if crash or not found or found[1]["images"] < round(self.p.kimg * 1000):
            before = rd.find_resume(run_dir)[0] if os.path.isdir(run_dir) else None
            self.run(cmd, log_to=log_to)
            if crash and before is not None:
                self.event("resume", f"the rerun resumed from {os.path.basename(before[0])} (kimg "
                                     f"{before[1]['images'] / 1000:g}) and trained to kimg {self.p.kimg:g}")

    # ------------------------------------------------------------ 3. evaluation

    def untrained(self, run_dir: str) -> str:
        """The network as the run initialised it (train.seed), as an export file."""
        import torch

        from etsdm_dist import config, run_dir as rd
        from etsdm_dist.diffusion.build import build_model
        from etsdm_dist.train.export import write_export

        path = os.path.join(self.out, "untrained.safetensors")
        if not os.path.exists(path):
            cfg = config.load(_config_path(), self.train_overrides(run_dir, "unused"))
            torch.manual_seed(cfg.train.seed)
            model = build_model(cfg)
            d = cfg.to_dict()
            write_export(path, model.state_dict(), {"format": rd.EXPORT_FORMAT, "network": d["network"],
                                                    "diffusion": d["diffusion"], "etsdm": d["etsdm"],
                                                    "images": 0, "source": "untrained"})
        return path

    def evaluate(self, run_dir: str, ref: str) -> None:
        evals = os.path.join(run_dir, "eval")
        os.makedirs(evals, exist_ok=True)
        jobs = [(run_dir, s, n, f"{s}-{n}") for s, n in self.p.settings]
        s0, n0 = self.p.settings[0]  # the floor: the untrained network under the first setting
        jobs.append((self.untrained(run_dir), s0, n0, f"untrained-{s0}-{n0}"))
        for source, sampler, steps, name in jobs:
            out = os.path.join(evals, f"fid-{name}.json")
            if os.path.exists(out):
                continue
            self.run([*self.launcher("etsdm_dist.eval.measure"), "--run", source, "--num", str(self.p.eval_num),
                      "--ref", ref, "--sampler", sampler, "--steps", str(steps), "--out", out, "--no-progress"],
                     log_to=os.path.join(evals, "eval.log"))
            res = json.load(open(out))
            if name.startswith("untrained"):
                res["label"] = "untrained network"
                with open(out, "w") as f:
                    json.dump(res, f, indent=1)
            kid = res["kid"]["mean"] if res.get("kid") else float("nan")
            log(f"{name}: FID {res['fid']:.2f}, KID {kid:.4f} (N={res['n']}, {res['protocol']})")

    # ------------------------------------------------------------ main

    def main(self) -> int:
        try:
            data_url, ref = self.data()
            self.train(self.out, data_url, crash=True)
            self.evaluate(self.out, ref)
            if self.a.compare:
                base = self.out + "-ddpm"
                self.train(base, data_url, "etsdm.enabled=false")
                steps = ",".join(str(n) for s, n in self.p.settings if s == "ddim") or "20"
                dpm = ",".join(str(n) for s, n in self.p.settings if s != "ddim")
                if not os.path.exists(os.path.join(self.out, "compare", "compare.json")):
                    self.run([*self.launcher("etsdm_dist.eval.compare"), self.out, base, "--ref", ref,
                              "--num", str(self.p.eval_num), "--ddim", steps, "--dpm", dpm, "--labels",
                              "E-TSDM,DDPM", "--out", os.path.join(self.out, "compare"), "--no-progress"],
                             log_to=os.path.join(self.out, "compare.log"))
            self.run(["etsdm", "report", self.out, "--data", data_url])
        finally:
            if self.server is not None:
                self.server.stop()
                log("SeaweedFS stopped")
        log(f"done in {(time.perf_counter() - self.t0) / 60:.1f} min; the report: {os.path.join(self.out, 'report.md')}")
        return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _config_path() -> str:
    """configs/fmnist32.yaml of the checkout the package runs from."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", CONFIG)
    if not os.path.exists(path):
        raise SystemExit(f"[demo] {path} not found: run the demo from a source checkout")
    return path


def _rank_pids(launcher_pid: int, rank: int) -> list[int]:
    """PIDs of training ranks started under `launcher_pid`'s session with LOCAL_RANK / --local_rank=rank."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.getsid(int(d)) != launcher_pid:
                continue
            cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if b"etsdm_dist.train" in cmd and f"--local_rank={rank}".encode() in cmd:
            out.append(int(d))
    return out


def _wait_and_kill_rank(proc: subprocess.Popen, run_dir: str, after_images: int, rank: int) -> int | None:
    """Wait until a checkpoint at >= after_images is committed, then SIGKILL one rank; returns its PID
    (None if training ended first). Waits for the launcher to exit."""
    from etsdm_dist import run_dir as rd

    victim = None
    while proc.poll() is None:
        found, _ = rd.find_resume(run_dir)
        if found and found[1]["images"] >= after_images:
            pids = _rank_pids(proc.pid, rank)
            if pids:
                victim = pids[0]
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.5)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return victim


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="etsdm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="full (default on CPU), quick (QUICK=1), ci (the test's), gpu (default on CUDA)")
    p.add_argument("--s3", action="store_true", help="stream the shards from a local SeaweedFS S3 server")
    p.add_argument("--compare", action="store_true", help="also train the DDPM baseline and compare")
    p.add_argument("--out", default="runs/demo", help="the E-TSDM run directory (local)")
    p.add_argument("overrides", nargs="*", help="config overrides for the training runs (key.sub=value)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.profile is None:
        a.profile = "gpu" if _cuda() else ("quick" if os.environ.get("QUICK") == "1" else "full")
    if not os.path.exists(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")):
        print(f"etsdm demo: {FMNIST} missing: apt-get install dataset-fashion-mnist (tools/install.sh does)",
              file=sys.stderr)
        return 2
    log(f"profile {a.profile}: {PROFILES[a.profile]}")
    return Demo(a).main()


if __name__ == "__main__":
    sys.exit(main())
