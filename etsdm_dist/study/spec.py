"""The study's grid file: a base config, a profile and cells x seeds (configs/study/*.yaml), validated.

Errors name the grid file and the key (`cells.NAME`, `tables[i]`, `eval.settings`, ...).
"""
from __future__ import annotations

import fnmatch
import os
import re
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SAMPLERS = ("ddim", "dpm_solver++", "ddpm")  # what `etsdm compare` measures (--ddim / --dpm / --ddpm)
CELL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyError(ValueError):
    """A bad grid file or a failed step; the message names the file, key, cell or log."""


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Spec):
    source: str = Field("/usr/share/datasets/fashion-mnist",
                        description="MNIST-format idx folder sharded with `etsdm shard --split train|t10k`.")
    train_images: int = Field(20000, ge=1, description="Training images sharded from the train split.")
    test_images: int = Field(1000, ge=2, description="Held-out t10k images: the FID/KID reference and the "
                                                     "diagnostics' images.")
    train_url: Optional[str] = Field(None, description="Existing training shards instead of sharding `source`.")
    test_url: Optional[str] = Field(None, description="Existing held-out shards instead of sharding `source`.")


class TrainSpec(Spec):
    config: str = Field(..., description="Base training config, relative to the grid file.")
    kimg: float = Field(..., gt=0, description="train.total_kimg of every cell.")
    overrides: list[str] = Field(default_factory=list, description="key=value for every cell, before the cell's.")
    ranks: int = Field(1, ge=1, description="Training ranks (>1: under the deepspeed launcher).")
    threads: Optional[int] = Field(None, ge=1, description="Intra-op threads per rank on CPU "
                                                            "(default: cores // ranks).")


class EvalSpec(Spec):
    num: int = Field(..., ge=2, description="Images per FID/KID measurement.")
    settings: list[tuple[Literal[SAMPLERS], int]] = Field(..., min_length=1,
                                                          description="[sampler, steps] pairs measured.")
    seed: int = Field(0, ge=0, description="Image i of every cell and setting is sampled from seed (seed, i).")
    sample_batch: int = Field(64, ge=1, description="Images per sampling batch.")
    ranks: int = Field(1, ge=1, description="Ranks of each `etsdm compare` job.")

    @field_validator("settings")
    @classmethod
    def _positive_steps(cls, v):
        bad = [s for s in v if s[1] < 1]
        if bad or len(set(v)) != len(v):
            raise ValueError(f"steps must be >= 1 and settings distinct, got {v}")
        return v


class DiagSpec(Spec):
    images: int = Field(16, ge=1, description="Held-out test images for both diagnostics.")
    seed: int = Field(0, ge=0, description="Seed of the noise and perturbations (the same for every cell).")
    near: float = Field(100.0, gt=0, description="'Near t = 0': pairs / times with t < near, the same window "
                                                 "for every cell whatever its t_tilde.")
    t_max: float = Field(200.0, gt=0, description="Lipschitz grid [0, t_max] (discrete: 41 points).")
    perturb_scales: list[float] = Field([0.05, 0.1, 0.2, 0.3, 0.4], min_length=1,
                                        description="Input perturbation scales swept.")
    perturb_t: list[float] = Field([0, 10, 25, 50, 75, 100, 200, 500], min_length=1,
                                   description="Timesteps at which the perturbation error is measured.")


class CellSpec(Spec):
    overrides: list[str] = Field(default_factory=list, description="key=value on top of the profile's.")
    seeds: Optional[list[int]] = Field(None, description="Training seeds (default: the grid's seeds).")
    label: Optional[str] = Field(None, description="Name in tables (default: the cell name).")


class TableSpec(Spec):
    title: str
    question: str = Field("", description="What the table asks, one sentence.")
    cells: list[str] = Field(..., min_length=1)
    baseline: Optional[str] = Field(None, description="The cell the others are compared with (default: first).")


class GridSpec(Spec):
    name: str
    description: str = ""
    data: DataSpec = DataSpec()
    train: TrainSpec
    eval: EvalSpec
    diagnostics: DiagSpec = DiagSpec()
    seeds: list[int] = Field(..., min_length=1)
    cells: dict[str, CellSpec] = Field(..., min_length=1)
    tables: list[TableSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names(self) -> "GridSpec":
        for name in self.cells:
            if not CELL_NAME.match(name):
                raise ValueError(f"cells.{name}: names may hold letters, digits, '_', '.', '-' only")
        for i, t in enumerate(self.tables):
            unknown = [c for c in [*t.cells, *([t.baseline] if t.baseline else [])] if c not in self.cells]
            if unknown:
                raise ValueError(f"tables[{i}] ({t.title!r}): unknown cells {unknown}")
        return self

    def seeds_of(self, cell: str) -> list[int]:
        return list(self.cells[cell].seeds or self.seeds)


def load_grid(path: str) -> tuple[GridSpec, str]:
    """The validated grid and the base config's absolute path; errors name the file and key."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise StudyError(f"{path}: cannot read the grid file: {e}") from e
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {e}") from e
    try:
        spec = GridSpec.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()]
        raise StudyError(f"{path}: " + "; ".join(lines)) from None
    base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), spec.train.config))
    if not os.path.exists(base):
        raise StudyError(f"{path}: train.config {spec.train.config!r} -> {base} does not exist")
    return spec, base


def select(spec: GridSpec, only: str | None, exclude: str | None = None) -> list[tuple[str, int]]:
    """(cell, seed) pairs, seed-major (every cell at the first seed, then the next seed), so an
    interrupted grid already holds paired comparisons; `only`/`exclude`: comma-separated globs."""
    def match(name, patterns):
        return any(fnmatch.fnmatchcase(name, p.strip()) for p in patterns.split(",") if p.strip())

    cells = [c for c in spec.cells if (only is None or match(c, only)) and not (exclude and match(c, exclude))]
    if not cells:
        raise StudyError(f"--only {only!r} / --exclude {exclude!r} select no cell of {sorted(spec.cells)}")
    seeds = sorted({s for c in cells for s in spec.seeds_of(c)})
    return [(c, s) for s in seeds for c in cells if s in spec.seeds_of(c)]
