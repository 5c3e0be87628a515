"""Detector speed and memory: inference (main head only) and a full training step (forward with every auxiliary
branch, backward, AdamW step) for the tiny and R50 Co-DINO at a fixed input size, each case in a fresh
subprocess so the peak RSS is its own. Compared with the official implementation's CPU timings where they exist
(R50 512x512, batch 1, 2 threads): the figures recorded with the official code (``OFFICIAL_R50_512``), or those of a
``timings.json`` you recorded yourself, named by ``CODETR_OFFICIAL_TIMINGS``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from codetr.bench.timing import Measurement, peak_rss_mib, sync


def compose_config(overrides: list[str] | tuple[str, ...]):
    """``conf/train.yaml`` composed with ``overrides`` (no Hydra run directory; nothing is instantiated). Benchmarks
    measure speed and memory: the backbone keeps random weights (no pretrained file is looked for)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import codetr.utils  # noqa: F401  (resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_module("codetr.conf", version_base="1.3"):
        return compose("train", overrides=["model.detector.backbone.weights=null", *overrides])


def build_detector(backbone: str, num_classes: int = 80, overrides: tuple[str, ...] = ()):
    """The detector exactly as the Hydra configs define it (``model=co_dino backbone=<name>`` + ``overrides``)."""
    from hydra.utils import instantiate

    cfg = compose_config([f"backbone={backbone}", f"data.num_classes={num_classes}", *overrides])
    return instantiate(cfg.model.detector)


def synthetic_batch(batch: int, size: int, num_boxes: int = 20, num_classes: int = 80, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = []
    for _ in range(batch):
        xy = torch.rand(num_boxes, 2, generator=g) * size * 0.7
        wh = torch.rand(num_boxes, 2, generator=g) * size * 0.25 + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).clamp(max=size),
                        "labels": torch.randint(0, num_classes, (num_boxes,), generator=g)})
    return images, torch.tensor([[size, size]] * batch), targets


class ComponentTimer:
    """Wall time spent inside chosen methods (CPU: synchronous; GPU: synchronised), by patching them on the
    instances for the duration of the measurement."""

    def __init__(self, detector, device):
        self.totals, self.device, self._start, self._patched = defaultdict(float), device, {}, []
        head = detector.query_head
        parts = [("backbone", detector.backbone, "forward"), ("neck", detector.neck, "forward"),
                 ("encoder", head.transformer.encoder, "forward"),
                 ("decoder passes", head.transformer.decoder, "forward"),
                 ("matching", head.criterion.matcher, "__call__")]
        if detector.rpn_head is not None:
            parts.append(("rpn", detector.rpn_head, "loss_and_proposals"))
        parts += [(f"roi{i}", m, "loss") for i, m in enumerate(detector.roi_head)]
        parts += [(f"atss{i}", m, "loss") for i, m in enumerate(detector.bbox_head)]
        for name, obj, method in parts:
            self._wrap(name, obj, method)

    def _wrap(self, name, obj, method):
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(self.device)
                self.totals[name] += time.perf_counter() - start

        if method == "__call__":  # special methods are looked up on the type: wrap via a per-instance subclass
            cls = type(obj)
            obj.__class__ = type(cls.__name__, (cls,), {"__call__": lambda inst, *a, **k: timed(*a, **k)})
            self._patched.append((obj, "__class__", cls))
        else:
            setattr(obj, method, timed)
            self._patched.append((obj, method, None))

    def close(self):
        for obj, attr, value in self._patched:
            if attr == "__class__":
                obj.__class__ = value
            else:
                delattr(obj, attr)


def run_case(backbone: str, mode: str, batch: int, size: int, repeats: int, device: str,
             overrides: tuple[str, ...] = ()) -> dict:
    """One measurement in this process (called in a subprocess by :func:`run`)."""
    device = torch.device(device)
    torch.manual_seed(0)
    detector = build_detector(backbone, overrides=overrides).to(device)
    images, sizes, targets = synthetic_batch(batch, size)
    images, sizes = images.to(device), sizes.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    optimizer = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad], lr=2e-4)

    def step():
        if mode == "inference":
            detector.eval()
            with torch.no_grad():
                detector(images, sizes)
            return {}
        detector.train()
        times = {}
        start = time.perf_counter()
        losses = detector(images, sizes, targets)
        total = sum(v for k, v in losses.items() if "loss" in k)
        sync(device)
        times["forward (all)"] = time.perf_counter() - start
        start = time.perf_counter()
        total.backward()
        sync(device)
        times["backward"] = time.perf_counter() - start
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(detector.parameters(), 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times["optimizer"] = time.perf_counter() - start
        return times

    step()  # warm-up (also builds the CPU kernel on first use)
    timer = ComponentTimer(detector, device)
    walls, phases = [], defaultdict(float)
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for k, v in step().items():
            phases[k] += v / repeats
        sync(device)
        walls.append(time.perf_counter() - start)
    timer.close()
    breakdown = {k: round(v / repeats, 3) for k, v in {**timer.totals}.items()}
    breakdown.update({k: round(v, 3) for k, v in phases.items()})
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
    return {"times_s": walls, "peak_mem_mib": peak, "breakdown": breakdown}


# The official Co-DINO (mmdet, random weights, 1x3x512x512, 2 threads, median after one warm-up) timed on a 2-core
# AMD EPYC VM on 2 Dec 2026; the host's speed drifts, so compare ratios within one run (docs/performance.md).
OFFICIAL_R50_512 = {"eval_forward_median_s": 14.84, "train_fwd_bwd_median_s": 49.55}


def official_timings() -> dict:
    """``{"r50_512": {...}}``: a ``timings.json`` named by ``CODETR_OFFICIAL_TIMINGS``, else the recorded figures."""
    path = os.environ.get("CODETR_OFFICIAL_TIMINGS")
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"CODETR_OFFICIAL_TIMINGS={path}: no such file")
        return json.loads(Path(path).read_text())
    return {"r50_512": dict(OFFICIAL_R50_512)}


def run(device: str = "cpu", repeats: int = 2, size: int = 512) -> list[Measurement]:
    official = official_timings().get("r50_512", {})
    reference = {"inference": official.get("eval_forward_median_s"),
                 "train step": official.get("train_fwd_bwd_median_s")}
    rows = []
    cases = [(b, m, n, ()) for b in ("tiny", "r50") for m in ("inference", "train step") for n in (1, 2)]
    # Our R50 config recomputes the first 4 encoder layers in backward (activation checkpointing, bitwise the same
    # numbers, as the reference config asks). The recorded official timing ran without it (fairscale was missing
    # there), so the like-for-like train-step comparison is the row with checkpointing off.
    no_checkpointing = ("model.encoder_checkpoint_layers=0",)
    cases.append(("r50", "train step", 1, no_checkpointing))
    for backbone, mode, batch, overrides in cases:
        command = [sys.executable, "-m", "codetr.bench.model", backbone, mode, str(batch), str(size), str(repeats),
                   device, *overrides]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"benchmark case {backbone}/{mode}/{batch} failed:\n{result.stderr[-2000:]}")
        data = json.loads(result.stdout.strip().splitlines()[-1])
        params = {"model": backbone, "batch": batch, "size": f"{size}x{size}", "device": device}
        if overrides:
            params["overrides"] = " ".join(overrides)
        row = Measurement(f"{mode}", params, data["times_s"], data["peak_mem_mib"], dict(data["breakdown"]))
        like_for_like = overrides == no_checkpointing if mode == "train step" else not overrides
        official_s = reference.get(mode) if backbone == "r50" and batch == 1 and device == "cpu" else None
        if not like_for_like:
            official_s = None
        if official_s:
            row.extra = {"official_s": official_s, "speedup": round(official_s / row.median_s, 2), **row.extra}
        rows.append(row)
    return rows


if __name__ == "__main__":
    backbone, mode, batch, size, repeats, device = sys.argv[1:7]
    torch.set_num_threads(int(os.environ.get("CODETR_BENCH_THREADS", torch.get_num_threads())))
    print(json.dumps(run_case(backbone, mode, int(batch), int(size), int(repeats), device, tuple(sys.argv[7:]))))
