"""One part of the GPU check, run in a child process by :mod:`codetr.bench.gpu_check`:
``python -m codetr.bench.gpu_child PART --budget-s S [--dry-run]``.

The child reports to its parent through its standard output: ``@gpu-check case <name>`` when a case starts and
``@gpu-check row <json>`` when it has a result, so that a parent that has to kill it (budget spent, a hang) still
holds every finished row and knows which case was running. Every other line is progress for the reader.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

ROW_PREFIX = "@gpu-check row "
CASE_PREFIX = "@gpu-check case "


@dataclass(frozen=True)
class DetectorSizes:
    """A detector part: the Hydra overrides of its recipe (the image side is ``model.lsj_canvas`` and the batch
    ``data.batch_size`` of the composed config), warm-up steps, timed steps at most, and the seconds after which
    a timed loop stops early (after at least one timed step)."""

    overrides: tuple[str, ...]
    warmup: int
    repeats: int
    case_seconds: float
    breakdown_steps: int = 0


@dataclass(frozen=True)
class CheckSizes:
    """Everything the five parts run. :data:`FULL` is the real check on one H100 / H200; :data:`DRY` the CPU
    rehearsal (tiny models, small images, 1-2 steps) that CI runs so that the check cannot rot."""

    attention: DetectorSizes  # the encoder shapes come from this config (canvas, batch, heads, levels, points)
    r50: DetectorSizes
    swin_l: DetectorSizes
    compiled: DetectorSizes
    train_overrides: tuple[str, ...]  # python -m codetr.train


# The rehearsal's model: the tiny recipe with fewer queries and samples, 64 px images, the exact attention path (what
# `auto` picks on CUDA; it also spares the rehearsal the CPU kernel's build).
TINY_HEADS = ("model.num_queries=30", "model.num_dn_queries=5", "model.roi_num_samples=32",
              "model.rpn_train_nms_pre=200", "model.rpn_train_max_per_img=100",
              "model.detector.query_head.max_pos_queries=30",
              "model.detector.query_head.transformer.attention_impl=pytorch")
TINY_TRANSFORMER = ("model.embed_dims=64", "model.ffn_dims=256", "model.num_encoder_layers=2",
                    "model.num_decoder_layers=2", "model.roi_fc_channels=128", *TINY_HEADS)
TINY_SWIN = ("backbone=swin_l", "model.detector.backbone.embed_dims=32", "model.detector.backbone.depths=[2,2,2,2]",
             "model.detector.backbone.num_heads=[1,2,4,8]", "model.detector.neck.in_channels=[32,64,128,256]")
# The tiny recipe checkpoints no encoder layer; one here so that "recipe" and "off" differ in the rehearsal too.
DRY_IMAGE = ("model.lsj_canvas=64", "model.encoder_checkpoint_layers=1")
TINY_R50 = ("backbone=tiny", *TINY_HEADS, *DRY_IMAGE)

FULL = CheckSizes(
    attention=DetectorSizes(("experiment=co_dino_r50_lsj_1x",), warmup=2, repeats=10, case_seconds=10),
    r50=DetectorSizes(("experiment=co_dino_r50_lsj_1x",), warmup=2, repeats=8, case_seconds=20, breakdown_steps=3),
    swin_l=DetectorSizes(("experiment=co_dino_swin_l_lsj_3x",), warmup=1, repeats=2, case_seconds=20),
    compiled=DetectorSizes(("experiment=co_dino_r50_lsj_1x",), warmup=2, repeats=6, case_seconds=15),
    train_overrides=("experiment=demo", "trainer=gpu", "trainer.precision=bf16-mixed", "trainer.max_epochs=2",
                     "++trainer.limit_train_batches=24", "trainer.log_every_n_steps=8"),
)
DRY = CheckSizes(
    attention=DetectorSizes(("backbone=tiny", "model.lsj_canvas=16", "data.batch_size=1",
                             "model.detector.query_head.transformer.num_heads=1"), warmup=0, repeats=1, case_seconds=1),
    r50=DetectorSizes(TINY_R50, warmup=1, repeats=1, case_seconds=1, breakdown_steps=1),
    swin_l=DetectorSizes((*TINY_SWIN, *TINY_TRANSFORMER, *DRY_IMAGE, "data.batch_size=1"), warmup=1, repeats=1,
                         case_seconds=1),
    # aot_eager traces (graph capture + AOT autograd) without generating code; the neck alone keeps it to seconds
    compiled=DetectorSizes((*TINY_R50, "model.compile.backend=aot_eager", "model.compile.regions=[neck]"), warmup=1,
                           repeats=1, case_seconds=1),
    train_overrides=("experiment=demo", "trainer=cpu", "trainer.precision=bf16-mixed", "trainer.max_epochs=1",
                     "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1", "data.generate.num_train=8",
                     "data.generate.num_val=8", "model.detector.query_head.transformer.attention_impl=pytorch"),
)


class Reporter:
    """Sends rows to the parent and keeps this part's time budget."""

    def __init__(self, part: str, budget_s: float, dry_run: bool):
        self.part, self.dry_run = part, dry_run
        self.deadline = time.monotonic() + budget_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def case(self, name: str) -> None:
        print(CASE_PREFIX + name, flush=True)

    def _emit(self, case: str, status: str, **fields) -> None:
        print(ROW_PREFIX + json.dumps({"part": self.part, "case": case, "status": status, **fields}, default=str),
              flush=True)

    def measured(self, case: str, metrics: dict, summary: str) -> None:
        self._emit(case, "measured", metrics=metrics, summary=summary)

    def skipped(self, case: str, reason: str) -> None:
        self._emit(case, "skipped", reason=reason)

    def failed(self, case: str, reason: str) -> None:
        self._emit(case, "failed", reason=reason)

    def fits(self, case: str, needed_s: float) -> bool:
        """True when ``needed_s`` (an estimate: the last comparable case's time) is left; else a skipped row."""
        left = self.remaining()
        if left >= needed_s:
            return True
        self.skipped(case, f"time budget: {left:.0f} s of this part left, about {needed_s:.0f} s needed")
        return False

    def attempt(self, case: str, needed_s: float, body: Callable[[], None]) -> float:
        """Runs one case if it fits: a start line, ``body`` (which reports its own row), and a failed row for any
        exception (out of memory included: it says what does not fit). Returns the seconds it took."""
        if not self.fits(case, needed_s):
            return 0.0
        self.case(case)
        start = time.monotonic()
        try:
            body()
        except Exception as error:  # noqa: BLE001 -- the row names it; the next case may still run
            traceback.print_exc()
            self.failed(case, f"{type(error).__name__}: {str(error)[:300]}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return time.monotonic() - start


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# part -> (module, function). Only the part's own module is imported: the Triton part must set TRITON_INTERPRET
# before anything imports Triton (Lightning, which the other parts import, does), as Triton reads it once.
PARTS = {"triton": ("gpu_attention", "run"), "r50": ("gpu_detector", "run_r50"),
         "swin_l": ("gpu_detector", "run_swin_l"), "train": ("gpu_train", "run"),
         "compile": ("gpu_detector", "run_compile")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("part", choices=list(PARTS))
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    module_name, function = PARTS[args.part]
    module = importlib.import_module(f"codetr.bench.{module_name}")
    reporter = Reporter(args.part, args.budget_s, args.dry_run)
    getattr(module, function)(reporter, DRY if args.dry_run else FULL)


if __name__ == "__main__":
    main()
