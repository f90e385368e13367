"""docs/config.md: generated from the config classes, current, complete, and true to the validation."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest
import yaml
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from etsdm_dist import cli
from etsdm_dist import config as C
from etsdm_dist import config_reference as R
from etsdm_dist.diffusion.settings import PRESETS, NetworkConfig, PosInt, Settings

DOC = Path(__file__).resolve().parents[1] / R.DOC_PATH


def _tree_fields():
    """(section, field, FieldInfo) of the whole tree, read from the classes, not from the generator."""
    for section, info in C.Config.model_fields.items():
        for name, finfo in info.annotation.model_fields.items():
            yield section, name, finfo


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows of the doc keyed by their first cell (backticks stripped)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def _cell_value(cell: str):
    return yaml.safe_load(cell.strip("`"))


def test_doc_matches_the_config_classes():
    assert DOC.exists(), f"{R.DOC_PATH} is missing; generate it with `{R.REGENERATE}`"
    problem = R.drift(DOC.read_text())
    assert problem is None, problem


def test_drift_is_reported_with_the_regenerate_command():
    current = R.reference()
    assert R.drift(current) is None
    stale = current.replace("| `train.seed` |", "| `train.sead` |")
    message = R.drift(stale)
    assert message is not None and R.REGENERATE in message and "train.sead" in message


def test_generation_is_deterministic_and_the_cli_prints_it(capsys):
    assert R.reference() == R.reference()
    assert cli.main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == R.reference()
    assert cli.main(["config", "--reference", "train.seed=1"]) == 2
    assert "--reference" in capsys.readouterr().err
    # Without the flag `etsdm config` still prints the resolved tree.
    assert cli.main(["config", "train.seed=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["seed"] == 7


def test_every_section_and_field_is_in_the_doc_with_a_meaning():
    text = DOC.read_text()
    rows = _rows(text)
    for section in C.Config.model_fields:
        assert f"\n## {section}\n" in text, f"section {section} has no heading in {R.DOC_PATH}"
    missing = []
    for section, name, finfo in _tree_fields():
        row = rows.get(f"{section}.{name}")
        if row is None or len(row) != 4 or not row[3] or not (finfo.description or "").strip():
            missing.append(f"{section}.{name}")
    assert not missing, f"fields without a documented row (run `{R.REGENERATE}`): {missing}"
    documented = {k for k in rows if "." in k and "=" not in k}
    assert documented == {f"{s}.{n}" for s, n, _ in _tree_fields()}, "rows for fields that do not exist"


def test_a_field_without_description_is_an_error():
    class Undocumented(Settings):
        documented: PosInt = Field(1, description="Has one.")
        bare: PosInt = 2

    with pytest.raises(ValueError, match=r"demo\.bare: no description.*etsdm config --reference"):
        R.field_rows(Undocumented, "demo", {"demo": {"documented": 1, "bare": 2}})


def test_a_cross_field_rule_without_docstring_is_an_error():
    class Ruled(Settings):
        a: PosInt = Field(1, description="A.")

        @model_validator(mode="after")
        def _rule(self) -> "Ruled":
            return self

    with pytest.raises(ValueError, match=r"Ruled\._rule has no docstring"):
        R.validator_rules(Ruled, "demo")


def test_defaults_in_the_doc_are_the_resolved_defaults():
    rows, defaults = _rows(DOC.read_text()), C.Config().to_dict()
    for section, name, _ in _tree_fields():
        assert _cell_value(rows[f"{section}.{name}"][1]) == defaults[section][name], f"{section}.{name}"


def _adapter(finfo) -> TypeAdapter:
    ann = finfo.annotation
    return TypeAdapter(Annotated[ann, *finfo.metadata] if finfo.metadata else ann)


def _accepts(adapter: TypeAdapter, value) -> bool:
    try:
        adapter.validate_python(value)
        return True
    except ValidationError:
        return False


@pytest.mark.parametrize("section,name,finfo", list(_tree_fields()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_allowed_values_in_the_doc_are_what_validation_allows(section, name, finfo):
    spec, adapter = R.field_spec(finfo), _adapter(finfo)
    assert _accepts(adapter, None) is spec.nullable
    checks = [(spec, lambda v: v)]
    if spec.kind == "list":
        base = [1 if spec.item.kind == "int" else 0.5] * (spec.min_len or 1)
        if spec.max_len is not None:
            assert not _accepts(adapter, base * (spec.max_len + 1))
        if spec.min_len:
            assert not _accepts(adapter, base[: spec.min_len - 1])
        checks = [(spec.item, lambda v: base[:-1] + [v])]
    for s, wrap in checks:
        if s.kind == "choice":
            assert all(_accepts(adapter, wrap(c)) for c in s.choices)
            assert not _accepts(adapter, wrap("no-such-choice"))
        elif s.kind in ("int", "float"):
            step = 1 if s.kind == "int" else 1e-6
            b = s.bounds
            for key, edge in b.items():
                where = f"{section}.{name} at {key}={edge}"
                outward = -step if key in ("gt", "ge") else step
                assert _accepts(adapter, wrap(edge)) is (key in ("ge", "le")), where
                assert not _accepts(adapter, wrap(edge + outward)), where
                assert _accepts(adapter, wrap(edge - outward)), where
            if not b:  # unbounded: a large and a negative value pass
                assert _accepts(adapter, wrap(10**6)) and _accepts(adapter, wrap(-3))
            assert not _accepts(adapter, wrap(True)), "a bool is not a number"
        elif s.kind == "bool":
            assert _accepts(adapter, wrap(True)) and not _accepts(adapter, wrap(1))
    rows = _rows(DOC.read_text())
    assert rows[f"{section}.{name}"][2] == R.allowed_text(spec).replace("|", "\\|")


def test_presets_table_is_each_preset_resolved():
    assert set(R.PRESET_NOTES) == set(PRESETS)
    rows = _rows(DOC.read_text())
    columns = list(PRESETS) + ["null"]
    for field in {f for v in PRESETS.values() for f in v}:
        cells = rows[field]  # preset table rows are keyed by the bare field name
        assert len(cells) == len(columns)
        for preset, cell in zip(columns, cells):
            resolved = NetworkConfig.parse({"preset": None if preset == "null" else preset})
            assert _cell_value(cell) == getattr(resolved, field), (preset, field)
            if preset != "null":
                assert _cell_value(cell) == PRESETS[preset].get(field, getattr(resolved, field))


def test_override_examples_show_what_the_parser_reads():
    rows = _rows(DOC.read_text())
    expected = {"optim.lr=1e-4": 1e-4, "etsdm.enabled=false": False, "train.micro_batch_images=null": None,
                "network.preset=64": "64", "data.url=": "", "network.attention_resolutions=[32,16]": [32, 16]}
    for override, value in expected.items():
        assert _cell_value(rows[override][0]) == value, override


def test_cross_field_rules_are_listed_and_enforced():
    text = DOC.read_text()
    rules = text.split("## Rules across fields", 1)[1]
    for needle in ("whole number of global batches", "data.fid_ref", "sample.clip_denoised and "
                   "sample.thresholding are exclusive", "n divides it", "0 < t_tilde <= 1"):
        assert needle in rules, needle
    # What the rules say is what loading does.
    for overrides, field in ((["train.report_kimg=0.1"], "train.report_kimg"),
                             (["train.fid_kimg=1.28"], "data.fid_ref"),
                             (["sample.thresholding=true"], "sample.clip_denoised"),
                             (["etsdm.n=3"], "etsdm.n"),
                             (["diffusion.time=continuous", "etsdm.t_tilde=1.5"], "etsdm.t_tilde"),
                             (["sample.ema=1"], "sample.ema")):
        with pytest.raises(C.ConfigError, match=field.replace(".", r"\.")):
            C.load(None, overrides)
    assert C.batch_layout(128, 4, 16) == (16, 2)
    for world, micro in ((3, None), (4, 12)):
        with pytest.raises(C.ConfigError, match="train"):
            C.batch_layout(128, world, micro)

