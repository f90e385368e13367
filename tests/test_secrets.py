"""Credentials never reach what we print or store, and launcher arguments reach the nodes verbatim.

- etsdm_dist/redact.py: URL user info and secret query parameters masked, in text and in nested
  structures, without touching the values the run uses;
- `etsdm config`, `etsdm train --dry-run` and the evaluation records (fid JSON, reference .npz
  metadata) print and store the masked form; config.yaml and manifest.json are checked on the real
  multi-node launch in tests/test_launchers_multinode.py, which also sends an override full of shell
  metacharacters through deepspeed.sh, pdsh and sshd;
- launchers/deepspeed_remote.sh: the env-file warning names the variable, never its value, and
  pdsh_word's quoting survives DeepSpeed's pdsh runner + pdsh + a real remote shell (sshd on loopback).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import yaml

from etsdm_dist.redact import MASK, is_secret_name, redact, redact_text

import train_harness as H

LIB = H.REPO / "launchers" / "deepspeed_remote.sh"


# --------------------------------------------------------------------------- redact.py


@pytest.mark.parametrize("text, secret, shown", [
    ("s3://AKIAEXAMPLE:wJalr/XUtn+FEMI@bucket/prefix", "wJalr/XUtn+FEMI", "s3://AKIAEXAMPLE:***@bucket/prefix"),
    ("https://user:hunter2@host:9000/x?y=1", "hunter2", "https://user:***@host:9000/x?y=1"),
    ("https://user:p@ss@host/x", "p@ss", "https://user:***@host/x"),  # unencoded @: the last one ends it
    ("https://ghp_TOKEN123@github.com/o/r.git", "ghp_TOKEN123", "https://***@github.com/o/r.git"),
    ("url: ftp://anon:pw%21@h/a\nnext: line", "pw%21", "url: ftp://anon:***@h/a\nnext: line"),
    ('["s3://k:sec@b/x","a@b"]', "sec", '["s3://k:***@b/x","a@b"]'),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F&X-Amz-Signature=deadbeef&X-Amz-Expires=60",
     "deadbeef", "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"),
    ("https://acct.blob.core.windows.net/c?sv=2022&sig=abc%3D", "abc%3D",
     "https://acct.blob.core.windows.net/c?sv=2022&sig=***"),
])
def test_redact_text_masks_url_credentials(text, secret, shown):
    out = redact_text(text)
    assert out == shown
    assert secret not in out


@pytest.mark.parametrize("text", [
    "s3://bucket/prefix", "https://host:8080/path/user@example.com", "file:///tmp/a@b", "me@example.com",
    "/local/dir with spaces", "https://h/x?page=2&sort=asc", "train.run_dir=runs/a&b",
])
def test_redact_text_leaves_other_text_alone(text):
    assert redact_text(text) == text


def test_redact_walks_nested_structures_without_touching_the_input():
    cfg = {"data": {"url": "s3://k:topsecret@b/x", "hflip": True},
           "train": {"ema_decays": [0.99], "deepspeed_extra": {"comet": {"api_key": "k-123", "enabled": False}},
                     "pair": ("https://t0ken@h/a", 3)},
           "AWS_SHARED_CREDENTIALS_FILE": "/shared/creds", "tags": {"x"}}
    before = json.dumps(cfg, default=sorted)
    out = redact(cfg)
    assert json.dumps(cfg, default=sorted) == before  # the caller's values are untouched
    assert out["data"] == {"url": f"s3://k:{MASK}@b/x", "hflip": True}
    assert out["train"]["deepspeed_extra"]["comet"] == {"api_key": MASK, "enabled": False}
    assert out["train"]["pair"] == (f"https://{MASK}@h/a", 3) and out["train"]["ema_decays"] == [0.99]
    assert out["AWS_SHARED_CREDENTIALS_FILE"] == "/shared/creds" and out["tags"] == {"x"}


NAMES = ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "GITHUB_TOKEN", "WANDB_API_KEY", "DB_PASSWORD",
         "MLFLOW_TRACKING_PASSWORD", "AZURE_STORAGE_KEY", "SSH_PRIVATE_KEY", "MY_SECRET", "sig", "api-key",
         "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
         "AWS_ENDPOINT_URL", "DS_ACCELERATOR", "OMP_NUM_THREADS", "PATH", "PYTHONPATH", "NCCL_IB_HCA", "MONKEY"]
SECRET = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "GITHUB_TOKEN", "WANDB_API_KEY", "DB_PASSWORD",
          "MLFLOW_TRACKING_PASSWORD", "AZURE_STORAGE_KEY", "SSH_PRIVATE_KEY", "MY_SECRET", "sig", "api-key"}


def test_secret_names_same_in_python_and_in_the_launchers():
    assert {n for n in NAMES if is_secret_name(n)} == SECRET
    script = f'source {LIB}; for n in "$@"; do if ds_is_secret_name "$n"; then echo "$n"; fi; done'
    r = subprocess.run(["bash", "-c", script, "x", *NAMES], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == SECRET


# --------------------------------------------------------------------------- printed and stored


PASSWORD = f"pw-{uuid.uuid4().hex[:12]}"
URL = f"s3://AKIAEXAMPLE:{PASSWORD}@bucket/shards"
REF = f"https://etsdm:{PASSWORD}@example.invalid/ref.npz"


def test_etsdm_config_prints_no_password(capsys):
    from etsdm_dist import cli, config

    assert cli.main(["config", H.CI_CONFIG, f"data.url={URL}", f"data.fid_ref={REF}"]) == 0
    out = capsys.readouterr().out
    assert PASSWORD not in out
    printed = yaml.safe_load(out)
    assert printed["data"]["url"] == f"s3://AKIAEXAMPLE:{MASK}@bucket/shards"
    assert printed["data"]["fid_ref"] == f"https://etsdm:{MASK}@example.invalid/ref.npz"
    # what the run uses keeps the credentials
    assert config.load(H.CI_CONFIG, [f"data.url={URL}"]).data.url == URL


def test_train_dry_run_prints_no_password(capsys):
    from etsdm_dist.train import loop

    extra = "train.deepspeed_extra={comet: {enabled: false, api_key: " + PASSWORD + "}}"
    assert loop.main([H.CI_CONFIG, f"data.url={URL}", f"data.fid_ref={REF}", extra, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "# DeepSpeed config" in out
    assert PASSWORD not in out
    assert f"url: s3://AKIAEXAMPLE:{MASK}@bucket/shards" in out
    assert f'"api_key": "{MASK}"' in out


def test_eval_records_store_no_password(tmp_path, capsys):
    from etsdm_dist.eval import features, fid

    out = tmp_path / "fid.json"
    fid.report({"fid": 1.0, "ref": {"path": REF}, "samples": {"location": URL}, "notes": []}, str(out), "etsdm fid")
    printed = capsys.readouterr().out
    stored = out.read_text()
    assert PASSWORD not in printed and PASSWORD not in stored
    assert json.loads(stored)["ref"]["path"] == f"https://etsdm:{MASK}@example.invalid/ref.npz"

    npz = tmp_path / "ref.npz"
    fid.save_reference(str(npz), features.Statistics(n=2, mu=np.zeros(2), sigma=np.eye(2),
                                                    meta={"data": {"location": URL}, "protocol": "x"}))
    raw = npz.read_bytes()
    assert PASSWORD.encode() not in raw
    meta = json.loads(str(np.load(io.BytesIO(raw))["meta"]))
    assert meta["data"]["location"] == f"s3://AKIAEXAMPLE:{MASK}@bucket/shards"


# --------------------------------------------------------------------------- launchers


def test_deepspeed_launcher_warns_on_secret_in_env_file_without_its_value(tmp_path):
    """The real launcher and DeepSpeed runner; the one host does not resolve, so DeepSpeed stops at
    its ssh check, before it would print the env file itself (which is what the warning is about)."""
    secret = f"wJalrXUtnFEMI-{uuid.uuid4().hex}"
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text(f"AWS_SECRET_ACCESS_KEY={secret}\nAWS_PROFILE=etsdm\n"
                        f"AWS_ENDPOINT_URL=https://minio:{secret}@store.example:9000\nOMP_NUM_THREADS=1\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("etsdm-unreachable.invalid slots=1\n")
    r = subprocess.run(["bash", str(H.REPO / "launchers" / "deepspeed.sh"), "1", H.CI_CONFIG, "--dry-run"],
                       env=H.base_env(HOSTFILE=str(hostfile), DS_ENV_FILE=str(env_file),
                                      MLFLOW_TRACKING_TOKEN=secret, MASTER_ADDR="127.0.0.1"),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out  # nothing reachable: the launch itself must fail
    assert secret not in out
    assert f"deepspeed.sh: warning: {env_file} sets AWS_SECRET_ACCESS_KEY, which looks like a secret" in out
    assert f"{env_file} sets AWS_ENDPOINT_URL to a URL with a user name or password" in out
    assert "MLFLOW_TRACKING_TOKEN is set; DeepSpeed forwards every MLFLOW* variable" in out
    assert "AWS_PROFILE" in out and "AWS_SHARED_CREDENTIALS_FILE" in out  # the safe ways
    assert "sets AWS_PROFILE" not in out and "sets OMP_NUM_THREADS" not in out


WORDS = ["plain", "train.run_dir=runs/$(touch {m})", "a&b", "x;touch {m}", "`touch {m}`", "it's", '"dq"',
         "two words $(touch {m}) `touch {m}` \\ \" ' &", "100%", "%n %h %u %%", "%n%h", "a\\b", "tab\there",
         "new\nline", "", "[32,16]", "{a:1,b:2}", "*", "~", "#hash", "$HOME", "a'b c", "trailing\\",
         "data.url=https://u:p@h/x?a=1&b=2"]


def test_pdsh_words_arrive_verbatim_over_pdsh_and_ssh(tmp_path):
    """pdsh_word's quoting through DeepSpeed's own PDSHRunner.parse_user_args, pdsh's %-expansion,
    ssh and the remote login shell: every word comes out as it went in, nothing is executed."""
    import sshd_server as S
    from daemons import running
    from deepspeed.launcher.multinode_runner import PDSHRunner

    marker = tmp_path / "executed"
    words = [w.replace("{m}", str(marker)) for w in WORDS]
    r = subprocess.run(["bash", "-c", f'source {LIB}; pdsh_words "$@"; printf "%s\\0" "${{PDSH_WORDS[@]}}"', "x",
                        *words], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    quoted = r.stdout.split("\0")[:-1]
    assert len(quoted) == len(words)
    user_args = PDSHRunner(argparse.Namespace(user_args=quoted, user_script="x"), "").parse_user_args()
    with running(S.SshServer(tmp_path / "sshd", hosts=("localhost",)), S.missing_binaries(),
                 "tools/install.sh apt-installs pdsh and openssh-server", S.SshError) as sshd:
        env = dict(os.environ, PATH=f"{sshd.bin_dir}:{os.environ['PATH']}", PDSH_RCMD_TYPE="ssh")
        probe = "'import json, sys; print(json.dumps(sys.argv[1:]))'"
        res = subprocess.run(["pdsh", "-S", "-w", "localhost", sys.executable, "-c", probe, *user_args], env=env,
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{sshd.logs()}"
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("localhost: [")]
    assert len(line) == 1, res.stdout
    assert json.loads(line[0][len("localhost: "):]) == words
    assert not marker.exists()
