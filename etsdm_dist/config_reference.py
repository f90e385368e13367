"""docs/config.md, generated from the config classes so the reference cannot drift from the code.

Every field's type, allowed values and range are read from its pydantic annotation, its meaning from
its `Field(description=...)`, its default from the resolved default tree (what `etsdm config` prints),
the presets' values from resolving each preset, and the cross-field rules from the docstrings of the
model validators that enforce them. The worked examples are computed by running the real parser.
A field or a validator without documentation is an error here, so it cannot be added silently.

Regenerate with `etsdm config --reference > docs/config.md` (tests/test_config_reference.py checks).
"""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from etsdm_dist import config as C
from etsdm_dist.diffusion.settings import PRESETS, NetworkConfig, check_etsdm

REGENERATE = "etsdm config --reference > docs/config.md"
DOC_PATH = "docs/config.md"

# One line per preset of diffusion.settings.PRESETS (what it is for); a preset without one is an error.
PRESET_NOTES = {
    "tiny": "CPU tests and toy runs (32x32 grayscale, e.g. Fashion-MNIST padded).",
    "32": "DDPM's CIFAR-10 network (Ho et al. 2020), 35.7M parameters; the default.",
    "64": "ADM-style 64x64: attention at three resolutions with 64-channel heads, scale-shift norm, "
          "residual up/down sampling.",
    "256": "DDPM's 256x256 network (CelebA-HQ / LSUN), ~114M parameters.",
}

# Overrides whose parsed value the reference shows (each is run through config.load).
OVERRIDE_EXAMPLES = ("optim.lr=1e-4", "etsdm.enabled=false", "network.attention_resolutions=[32,16]",
                     "train.micro_batch_images=null", "network.preset=64", "data.url=",
                     "train.deepspeed_extra.wall_clock_breakdown=true")


@dataclass(frozen=True)
class Spec:
    """What a field accepts, read from its annotation: the facts behind the type and allowed columns."""

    kind: str  # int | float | bool | string | choice | list | mapping
    nullable: bool = False
    choices: tuple = ()
    bounds: dict[str, float] = field(default_factory=dict)  # keys among gt, ge, lt, le
    min_len: int | None = None
    max_len: int | None = None
    item: "Spec | None" = None


_BOUND_KEYS = ("gt", "ge", "lt", "le")


def _peel(ann: Any, meta: list) -> Any:
    """The type inside Annotated[...] layers; their constraints are appended to `meta`."""
    while typing.get_origin(ann) is Annotated:
        ann, *extra = typing.get_args(ann)
        for m in extra:
            meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
    return ann


def spec_of(ann: Any, metadata: list | tuple = ()) -> Spec:
    """The Spec of annotation `ann` carrying pydantic constraint objects `metadata`."""
    meta = list(metadata)
    ann = _peel(ann, meta)
    nullable = False
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(inner) != 1:
            raise ValueError(f"config reference: cannot describe the union {ann!r}")
        nullable, ann = True, _peel(inner[0], meta)
    bounds = {k: getattr(m, k) for m in meta for k in _BOUND_KEYS if getattr(m, k, None) is not None}
    min_len = next((m.min_length for m in meta if getattr(m, "min_length", None) is not None), None)
    max_len = next((m.max_length for m in meta if getattr(m, "max_length", None) is not None), None)
    origin = typing.get_origin(ann)
    if origin is Literal:
        return Spec("choice", nullable, choices=typing.get_args(ann))
    if origin is list:
        item = spec_of(typing.get_args(ann)[0])
        return Spec("list", nullable, min_len=min_len, max_len=max_len, item=item)
    if origin is dict or ann is dict:
        return Spec("mapping", nullable)
    kinds = {bool: "bool", int: "int", float: "float", str: "string"}
    if ann not in kinds:
        raise ValueError(f"config reference: no rendering for the type {ann!r}")
    return Spec(kinds[ann], nullable, bounds=bounds)


def field_spec(info: FieldInfo) -> Spec:
    return spec_of(info.annotation, info.metadata)


# --------------------------------------------------------------------------- rendering


def show(value: Any) -> str:
    """A value as it is written in YAML / on the command line."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def _num(x: float) -> str:
    return f"{x:g}"


def _items(n: int) -> str:
    return f"{n} item" if n == 1 else f"{n} items"


def type_text(s: Spec) -> str:
    text = f"list of {type_text(s.item)}" if s.kind == "list" and s.item else s.kind
    return f"{text} or null" if s.nullable else text


def allowed_text(s: Spec) -> str:
    if s.kind == "choice":
        # As written on the command line: `network.preset=32` is read as the name '32'.
        text = ", ".join(f"`{c if isinstance(c, str) else show(c)}`" for c in s.choices)
    elif s.kind == "bool":
        text = "`true`, `false`"
    elif s.kind in ("int", "float"):
        b = s.bounds
        low = ("(", b["gt"]) if "gt" in b else ("[", b["ge"]) if "ge" in b else None
        high = (")", b["lt"]) if "lt" in b else ("]", b["le"]) if "le" in b else None
        if low and high:
            text = f"{low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
        elif low:
            text = f"{'>' if low[0] == '(' else '>='} {_num(low[1])}"
        elif high:
            text = f"{'<' if high[0] == ')' else '<='} {_num(high[1])}"
        else:
            text = "any finite" if s.kind == "float" else "any"
    elif s.kind == "list":
        if s.min_len is not None and s.min_len == s.max_len:
            count = f"exactly {_items(s.min_len)}"
        else:
            count = ", ".join(p for p in (s.min_len and f"at least {_items(s.min_len)}",
                                          s.max_len is not None and f"at most {_items(s.max_len)}") if p)
        each = allowed_text(s.item) if s.item else ""
        text = "; ".join(p for p in (count, each and f"each {each}") if p) or "any"
    elif s.kind == "mapping":
        text = "any mapping"
    else:
        text = "any text"
    return f"{text}, or `null`" if s.nullable else text


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def meaning(model: type[BaseModel], name: str, prefix: str) -> str:
    """A field's documented meaning; a field without one is an error naming it."""
    text = (model.model_fields[name].description or "").strip()
    if not text:
        raise ValueError(f"{prefix}.{name}: no description; give the field Field(description=...) in "
                         f"{inspect.getsourcefile(model)} ({model.__name__}), then run `{REGENERATE}`")
    return _cell(text)


def _default_at(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        node = node[key]
    return node


def field_rows(model: type[BaseModel], prefix: str, defaults: dict) -> list[str]:
    """The markdown table of one section: field, type, default, allowed, meaning."""
    rows = ["| field | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        s = field_spec(info)
        default = show(_default_at(defaults, f"{prefix}.{name}"))
        rows.append(f"| `{prefix}.{name}` | {type_text(s)} | `{_cell(default)}` | {allowed_text(s)} "
                    f"| {meaning(model, name, prefix)} |")
    return rows


def _paragraphs(doc: str | None) -> list[str]:
    return [" ".join(p.split()) for p in inspect.cleandoc(doc or "").split("\n\n") if p.strip()]


def validator_rules(model: type[BaseModel], where: str) -> list[str]:
    """The docstrings of a model's after-validators (its cross-field rules); one missing is an error."""
    rules = []
    for name, dec in model.__pydantic_decorators__.model_validators.items():
        if dec.info.mode != "after":
            continue
        doc = _paragraphs(dec.func.__doc__)
        if not doc:
            raise ValueError(f"{where}: validator {model.__name__}.{name} has no docstring stating its rule; "
                             f"add one, then run `{REGENERATE}`")
        rules.append(" ".join(doc))
    return rules


# --------------------------------------------------------------------------- sections of the page


def _header() -> list[str]:
    return [
        "# Configuration reference", "",
        f"<!-- Generated by `{REGENERATE}` from etsdm_dist/config.py and "
        "etsdm_dist/diffusion/settings.py. Do not edit: tests/test_config_reference.py fails when this "
        "file and the classes disagree. -->", "",
        "A run is a YAML file (see `configs/`) plus command-line overrides. "
        "`etsdm config CONFIG [key.sub=value ...]` prints the resolved, validated tree; every error names "
        "the dotted field and what is allowed. Sections: "
        + ", ".join(f"[`{n}`](#{n})" for n in C.Config.model_fields) + ".", "",
    ]


def _override_syntax() -> list[str]:
    lines = [
        "## Overrides", "",
        "`section.field=value` sets one field; the value is parsed as YAML, so `1e-4`, `true`, `null` and "
        "`[32,16]` mean what they say, and an empty value is the empty string. Overrides apply after the "
        "file, last one wins; a mapping field takes keys (`train.deepspeed_extra.KEY=value`), and an "
        "override of `train.deepspeed_extra` replaces the file's whole mapping. Unknown fields are errors "
        "that list the section's fields; booleans are only `true` / `false`; a boolean where a number "
        "belongs, NaN and inf are rejected; a number where text belongs is taken as its text. A section "
        "written with nothing under it (`network:`) takes its defaults.", "",
        "| override | value read |", "|---|---|",
    ]
    for item in OVERRIDE_EXAMPLES:
        dotted = item.split("=", 1)[0]
        value = _default_at(C.load(None, [item]).to_dict(), dotted)
        lines.append(f"| `{item}` | `{_cell(show(value))}` |")
    return lines + [""]


def _presets() -> list[str]:
    missing = [p for p in PRESETS if p not in PRESET_NOTES]
    if missing:
        raise ValueError(f"network presets {missing} have no line in config_reference.PRESET_NOTES")
    example = NetworkConfig.parse({"preset": "64", "num_heads": 4})
    lines = [
        "## Network presets", "",
        "`network.preset` names a base architecture (`PRESETS` in etsdm_dist/diffusion/settings.py). "
        "Resolution: the preset's values fill every network field the file and the overrides leave out; "
        "a field given explicitly wins; fields the preset does not list keep their declared defaults; "
        "`preset: null` uses the declared defaults alone. Setting only one of `num_heads` / "
        "`head_channels` to a positive value selects it and disables the preset's other one (e.g. "
        f"`network.preset=64 network.num_heads=4` resolves to num_heads={example.num_heads}, "
        f"head_channels={example.head_channels}). The printed and stored `network` section is the "
        "resolved one, so a saved config rebuilds the same network even if the presets change later.", "",
    ]
    lines += [f"- `{p}`: {PRESET_NOTES[p]}" for p in PRESETS] + [""]
    resolved = {p: NetworkConfig.parse({"preset": p}) for p in PRESETS}
    resolved["null"] = NetworkConfig.parse({"preset": None})
    listed = [f for f in NetworkConfig.model_fields if any(f in v for v in PRESETS.values())]
    lines += ["| field | " + " | ".join(f"`{p}`" for p in resolved) + " |",
              "|---|" + "---|" * len(resolved)]
    for f in listed:
        lines.append(f"| `{f}` | " + " | ".join(f"`{show(getattr(c, f))}`" for c in resolved.values()) + " |")
    lines += ["", "The `null` column is the declared defaults. Parameter counts and FLOPs are in README.md.", ""]
    return lines


def _sections() -> list[str]:
    defaults = C.Config().to_dict()
    lines: list[str] = []
    for name, info in C.Config.model_fields.items():
        model = info.annotation
        lines += [f"## {name}", ""]
        for paragraph in _paragraphs(model.__doc__ or info.description):
            lines += [paragraph, ""]
        if model is NetworkConfig:
            preset = NetworkConfig.model_fields["preset"].default
            lines += [f"The defaults are those of the default preset `{preset}`, resolved.", ""]
        lines += field_rows(model, name, defaults) + [""]
    return lines


def _cross_rules() -> list[str]:
    lines = ["## Rules across fields", "",
             "Checked whenever a config is read (`etsdm config`, every launcher, every command):", ""]
    for name, info in C.Config.model_fields.items():
        lines += [f"- {r}" for r in validator_rules(info.annotation, name)]
    lines += [f"- {r}" for r in validator_rules(C.Config, "config")]
    lines += ["", "The E-TSDM rules (`check_etsdm`): " + " ".join(_paragraphs(check_etsdm.__doc__)[1:]), ""]
    micro, accum = C.batch_layout(128, 4, 16)
    lines += ["Checked at launch, when the world size is known: `train.batch_images` is a multiple of the "
              "number of ranks, and `train.micro_batch_images` (if set) divides the per-rank batch; the "
              "gradient accumulation steps are per-rank batch / micro batch (e.g. batch 128 on 4 ranks "
              f"with micro batch 16: micro {micro}, {accum} accumulation steps). `optim.offload=true` needs "
              "`train.zero_stage` >= 1.", ""]
    return lines


def reference() -> str:
    """The whole of docs/config.md (deterministic: a function of the config classes alone)."""
    lines = _header() + _override_syntax() + _presets() + _sections() + _cross_rules()
    return "\n".join(lines).rstrip("\n") + "\n"


def drift(text: str, max_lines: int = 40) -> str | None:
    """None when `text` is the current reference; else what differs and the command that fixes it."""
    import difflib

    current = reference()
    if text == current:
        return None
    diff = list(difflib.unified_diff(text.splitlines(), current.splitlines(), DOC_PATH, "generated",
                                     lineterm="", n=1))
    shown = "\n".join(diff[:max_lines]) + ("\n..." if len(diff) > max_lines else "")
    return f"{DOC_PATH} is out of date with the config classes; regenerate it with `{REGENERATE}`\n{shown}"
