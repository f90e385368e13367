"""Bad values are refused where they enter, naming what is wrong: class labels, numeric config
fields, sample sizes claimed by index.json, shard names and `--prefix`. All in-process, on real
files written here."""
from __future__ import annotations

import io
import json
import os
import shutil
import typing

import numpy as np
import pytest
from PIL import Image

from etsdm_dist import cli
from etsdm_dist import config as C
from etsdm_dist.config import DataConfig
from etsdm_dist.data import loader as L
from etsdm_dist.data import shard_index as SI
from etsdm_dist.data import shard_writer, tarformat, verify

RES = 8


def png(seed: int, side: int = RES, channels: int = 3, fmt: str = "PNG") -> bytes:
    """Random pixels: the least compressible image of its size."""
    shape = (side, side, channels) if channels == 3 else (side, side)
    arr = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_labelled_shard(d, labels: list[bytes], num_classes: int = 10) -> str:
    """One shard in our layout (tarformat), sample i with .cls bytes labels[i]; returns the URL."""
    os.makedirs(d, exist_ok=True)
    body, offsets = b"", [0]
    for i, cls in enumerate(labels):
        body += tarformat.sample_bytes(f"{i:06d}", {"png": png(i), "cls": cls, "json": b"{}"})
        offsets.append(len(body))
    body += tarformat.end_of_archive(len(body))
    with open(os.path.join(d, "train-000000.tar"), "wb") as f:
        f.write(body)
    index = {"format": SI.INDEX_FORMAT, "total_samples": len(labels), "resolution": [RES, RES],
             "channels": 3, "image_format": "png", "label_map": None, "num_classes": num_classes,
             "fingerprint": "t", "shards": [{"name": "train-000000.tar", "samples": len(labels),
                                             "bytes": len(body), "sha256": "", "offsets": offsets,
                                             "first_key": "000000"}]}
    with open(os.path.join(d, "index.json"), "w") as f:
        json.dump(index, f)
    return str(d)


def one_batch(url: str, n: int, num_classes: int | None = None, **data) -> tuple[dict, L.ShardLoader]:
    c = DataConfig(url=url, hflip=False, num_workers=0, on_error="raise", skip_budget=1, retries=0,
                   retry_backoff_s=0.0).replace(**data)
    extra = {} if num_classes is None else {"num_classes": num_classes}
    ld = L.make_loader(c, url, seed=0, start_position=0, batch_images=n, world_size=1, rank=0,
                       micro_batch_images=n, num_workers=0, **extra)
    return next(ld), ld


# --------------------------------------------------------------------------- labels


LABELS = [b"3", b"12", b"-3", b"abc", b" 9\n", b"1_0", b"7"]  # classes 0..9 in the index


def test_labels_outside_the_classes_are_bad_samples_named_by_shard_and_key(tmp_path):
    url = write_labelled_shard(tmp_path / "s", LABELS)
    with pytest.raises(L.ShardDataError) as e:
        one_batch(url, len(LABELS), use_labels=True)
    msg = str(e.value)
    assert "train-000000.tar" in msg and "key 000001" in msg and "outside [0, 10)" in msg, msg

    batch, ld = one_batch(url, len(LABELS), use_labels=True, on_error="skip")
    assert batch["keys"] == [f"{i:06d}" for i in range(len(LABELS))]
    assert batch["valid"].tolist() == [True, False, False, False, True, False, True]
    assert batch["labels"].tolist() == [3, -1, -1, -1, 9, -1, 7]
    assert ld.error_counts() == {"train-000000.tar": 4}

    # The network's class count bounds the labels too (its embedding has that many rows).
    with pytest.raises(L.ShardDataError, match=r"key 000000.*label 3 outside \[0, 2\) "
                                                r"\(network\.num_classes=2\)"):
        one_batch(url, 1, num_classes=2, use_labels=True)

    # Labels not fed to the network: a bad one does not make the image bad.
    batch, _ = one_batch(url, len(LABELS), use_labels=False)
    assert batch["valid"].all() and batch["labels"].tolist() == [3, -1, -1, -1, 9, -1, 7]


# --------------------------------------------------------------------------- config


def _numeric_leaves(ann) -> tuple[bool, bool]:
    """(numeric, list of numbers) for a field annotation."""
    args = typing.get_args(ann)
    origin = typing.get_origin(ann)
    if ann in (int, float):
        return True, False
    if origin is list:
        return _numeric_leaves(args[0])[0], True
    if origin is typing.Literal:
        return False, False
    found = [_numeric_leaves(a) for a in args if isinstance(a, type) or typing.get_args(a)]
    return any(n for n, _ in found), any(lst for _, lst in found)


def _config_cli(*overrides: str, capsys) -> tuple[int, str]:
    rc = cli.config_main(list(overrides))
    return rc, capsys.readouterr().err


# Values that passed validation before (and failed later with a traceback, or not at all).
GAPS = [
    ("train.deepspeed_extra={gradient_clipping: .nan}", "train.deepspeed_extra.gradient_clipping"),
    ("train.deepspeed_extra={optimizer: {params: {lr: [1, .inf]}}}",
     "train.deepspeed_extra.optimizer.params.lr[1]"),
    ("train.seed=18446744073709551616", "train.seed"),  # torch.manual_seed overflows past 64 bits
    ("diffusion.num_timesteps=1000000000000", "diffusion.num_timesteps"),  # a 1e12-entry schedule
    ("train.total_kimg=1.0e-9", "train.total_kimg"),  # rounds to 0 images: a run that trains nothing
]


def test_every_numeric_field_refuses_nan_inf_and_negatives_exit_2_naming_it(capsys):
    cases = list(GAPS)
    for section, model in C.Config.model_fields.items():
        for name, field in model.annotation.model_fields.items():
            numeric, is_list = _numeric_leaves(field.annotation)
            if not numeric:
                continue
            dotted = f"{section}.{name}"
            for bad in (".nan", ".inf", "-.inf", "-2"):
                cases.append((f"{dotted}={f'[{bad}]' if is_list else bad}", dotted))
    assert len(cases) > 4 * 35  # the sweep found the numeric fields
    for override, field in cases:
        rc, err = _config_cli(override, capsys=capsys)
        assert rc == 2 and err.startswith(f"etsdm config: {field}"), (override, rc, err)
        assert "Traceback" not in err
    # The bounds leave ordinary values alone.
    rc, err = _config_cli("train.seed=9223372036854775807", "diffusion.num_timesteps=4000",
                          "train.total_kimg=0.001", "train.deepspeed_extra={gradient_clipping: 0.5}",
                          capsys=capsys)
    assert rc == 0, err


# --------------------------------------------------------------------------- sizes in index.json


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """A real `etsdm shard` output: 6 RGB 8x8 PNGs in two shards."""
    root = tmp_path_factory.mktemp("set")
    src = root / "src"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.png").write_bytes(png(i))
    dst = root / "dst"
    assert shard_writer.main([str(src), str(dst), "--max-samples", "3", "--no-progress"]) == 0
    return dst


def _edited_copy(shard_set, tmp_path, edit) -> str:
    d = tmp_path / "copy"
    shutil.copytree(shard_set, d)
    index = json.loads((d / "index.json").read_text())
    edit(index)
    (d / "index.json").write_text(json.dumps(index))
    return str(d)


def test_an_absurd_sample_size_is_refused_before_any_read(shard_set, tmp_path, capsys):
    def claim_40gb(index):  # sample 1 of shard 0 claims 40 GB; offsets stay increasing
        s = index["shards"][0]
        s["offsets"] = s["offsets"][:2] + [o + 40 * 10**9 for o in s["offsets"][2:]]
        s["bytes"] += 40 * 10**9

    url = _edited_copy(shard_set, tmp_path, claim_40gb)
    with pytest.raises(SI.ShardIndexError, match=r"shards\[0\]\.offsets: sample 1 spans 40000\d+ bytes"):
        SI.load_index(url)
    with pytest.raises(L.ShardIndexError, match=r"shards\[0\]\.offsets"):
        one_batch(url, 2)
    assert verify.main([url, "--no-decode"]) == 1
    assert "shards[0].offsets: sample 1 spans" in capsys.readouterr().err

    # What the batch shape is allocated from is bounded too.
    for value in ([10**6, 10**6], [60000, 60000]):
        url = _edited_copy(shard_set, tmp_path / str(value[0]),
                           lambda index: index.update(resolution=value))
        with pytest.raises(SI.ShardIndexError, match="field 'resolution'"):
            SI.load_index(url)
    url = _edited_copy(shard_set, tmp_path / "nc", lambda index: index.update(num_classes="10"))
    with pytest.raises(SI.ShardIndexError, match="field 'num_classes'"):
        SI.load_index(url)


@pytest.mark.parametrize("side,channels,fmt", [(8, 3, "PNG"), (8, 1, "JPEG"), (64, 1, "JPEG"),
                                               (64, 3, "PNG")])
def test_the_sample_size_bound_admits_incompressible_images(side, channels, fmt):
    sample = tarformat.sample_bytes("000000000", {fmt.lower().replace("jpeg", "jpg"): png(1, side, channels, fmt),
                                                  "cls": b"9", "json": b'{"source": "x"}'})
    assert len(sample) <= SI.max_sample_bytes((side, side), channels) < 10 * side * side * channels + (2 << 20)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name,ok", [
    ("train", True), ("train-000001.tar", True), ("t10k_v2.1", True), ("_x", True),
    ("../train", False), ("a/b", False), ("a\\b", False), ("..", False), (".", False), ("a..b", False),
    ("", False), ("x\0.tar", False), ("x\n", False), ("x\x1b", False), ("a b", False), ("a?b", False),
    ("a#b", False), ("%2e%2e", False), (".hidden", False), ("-rf", False), ("é", False),
    ("x" * 201, False), (5, False),
])
def test_safe_name(name, ok):
    assert (SI.name_problem(name) is None) is ok, SI.name_problem(name)


def test_prefix_cannot_leave_dst(shard_set, tmp_path, capsys):
    src = shard_set.parent / "src"
    dst = tmp_path / "out" / "dst"
    for prefix in ("../evil", "a/b", "x\x01"):
        with pytest.raises(SystemExit) as e:
            shard_writer.main([str(src), str(dst), "--prefix", prefix, "--no-progress"])
        assert e.value.code == 2
        assert "--prefix" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written, inside DST or outside it
    for flag, value in (("--limit", "-1"), ("--workers", "0"), ("--quality", "101"), ("--min-size", "-5")):
        with pytest.raises(SystemExit) as e:
            shard_writer.main([str(src), str(dst), flag, value, "--no-progress"])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["train\0-000000.tar", "..", "a?b.tar"])
def test_unsafe_shard_names_in_index_are_refused_by_parser_and_verify(shard_set, tmp_path, capsys, name):
    url = _edited_copy(shard_set, tmp_path, lambda index: index["shards"][0].update(name=name))
    with pytest.raises(SI.ShardIndexError, match=r"shards\[0\]\.name: not a safe shard file name"):
        SI.load_index(url)
    assert verify.main([url, "--no-decode"]) == 1  # a finding, not a crash
    err = capsys.readouterr().err
    assert "shards[0].name: not a safe shard file name" in err, err
