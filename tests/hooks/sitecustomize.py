"""Test-side hooks for the processes that tests launch; never part of the product.

tests/train_harness.py puts this folder on the PYTHONPATH of everything it starts (ranks, launchers,
Slurm jobs; DeepSpeed's multi-node runner forwards PYTHON* variables over ssh), so Python imports
this module at start-up there. It does nothing unless one of these variables is set:

  ETSDM_TEST_STEP_LOG=path
      rank 0 appends "<images> <global mean loss as float.hex>" after every step, through the
      product's one hook point: training_loop(..., callbacks=[...]).
  ETSDM_TEST_FAULT=crash_in_checkpoint[@IMAGES]
      the process that commits a checkpoint (rank 0) dies with os._exit(17) after every file and
      the manifest are written but before the COMMITTED marker: the worst moment for a crash.
      With @IMAGES only the checkpoint of that image counter is hit.
  ETSDM_TEST_FAULT=nan_loss@IMAGES
      the last rank's network output, hence its loss, is NaN in the step that reaches IMAGES.

Each patch is applied right after its module is first imported (a meta path finder), so a process
that never imports etsdm_dist (a launcher) pays nothing.
"""
from __future__ import annotations

import importlib.abc
import os
import sys

STEP_LOG = os.environ.get("ETSDM_TEST_STEP_LOG")
FAULT = os.environ.get("ETSDM_TEST_FAULT", "")
EXIT_CRASH = 17


def _patch_loop(loop) -> None:
    """Add the step-log callback to every training_loop call (main() looks the name up per call)."""
    original = loop.training_loop

    def write_step(trainer, result) -> None:
        if trainer.main:
            with open(STEP_LOG, "a") as f:
                f.write(f"{result.images} {result.loss.hex()}\n")

    def training_loop(cfg, local_rank_arg=None, *, callbacks=()):
        return original(cfg, local_rank_arg, callbacks=[*callbacks, write_step])

    loop.training_loop = training_loop


def _patch_nan_loss(step_mod, at: int) -> None:
    original = step_mod.TrainStep.__call__

    def __call__(self, micro_batches, *args, **kwargs):
        if self.images + self.batch_images != at or self.rank != self.world - 1:
            return original(self, micro_batches, *args, **kwargs)
        model = self.model
        self.model = lambda *a: model(*a) * float("nan")
        self.model.settings = model.settings
        try:
            return original(self, micro_batches, *args, **kwargs)
        finally:
            self.model = model

    step_mod.TrainStep.__call__ = __call__


def _patch_crash_in_checkpoint(storage, at: str) -> None:
    original = storage.write_json_atomic

    def write_json_atomic(path, obj, **kw):
        from etsdm_dist.train import checkpoint

        if path.rstrip("/").endswith("/" + checkpoint.MARKER) and (
                not at or checkpoint.ckpt_name(int(at)) in path):
            print(f"[test hook] ETSDM_TEST_FAULT: crashing before writing {path}", flush=True)
            os._exit(EXIT_CRASH)
        return original(path, obj, **kw)

    storage.write_json_atomic = write_json_atomic


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs patches[name](module) right after `name` is first executed."""

    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        patch = self.patches.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _install() -> None:
    patches = {}
    if STEP_LOG:
        patches["etsdm_dist.train.loop"] = _patch_loop
    kind, _, at = FAULT.partition("@")
    if kind == "nan_loss":
        patches["etsdm_dist.train.step"] = lambda m: _patch_nan_loss(m, int(at))
    elif kind == "crash_in_checkpoint":
        patches["etsdm_dist.data.storage"] = lambda m: _patch_crash_in_checkpoint(m, at)
    elif FAULT:
        raise SystemExit(f"ETSDM_TEST_FAULT={FAULT!r}: unknown fault; known: "
                         f"crash_in_checkpoint[@IMAGES], nan_loss@IMAGES")
    if patches:
        sys.meta_path.insert(0, _AfterImport(patches))


_install()
