"""GPU check, parts 2, 3 and 5: Co-DINO training and inference steps at the recipes' canvases.

A training step is the recipe's optimiser step without the data loader: forward with every auxiliary branch
(under ``torch.autocast(bfloat16)`` for bf16-mixed, as Lightning's ``bf16-mixed`` does), the summed loss, the
non-finite guard's two checks (``codetr.lightning.nonfinite``, on by default in training), backward, gradient
clipping at ``trainer.gradient_clip_val``, the recipe's AdamW (``codetr.lightning.optim``, fused on CUDA) and
``zero_grad``. The batch is a synthetic one already on the device (``codetr.bench.model.synthetic_batch``: the
recipe's batch size, 20 boxes per image, the LSJ canvas), so images/s are the model's, not the loader's.
Throughput steps run without any instrumentation; peak memory is ``torch.cuda.max_memory_allocated`` over the
timed steps (after warm-up, so AdamW's moments are included).

The per-component breakdown runs separate steps with :class:`codetr.bench.model.ComponentTimer`: it wraps the
backbone, neck, encoder, decoder (every pass: main, denoising and the positive-query passes), the Hungarian matcher
and the auxiliary heads' loss methods and synchronises the device before and after each, so each component's time
is its whole cost (kernels and host work) without overlap; "other forward" is the rest of the forward (query
selection, denoising queries, losses). Backward and optimiser are timed the same way. Synchronising costs a little,
so the breakdown's total is slightly above the throughput step.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from codetr.bench.gpu_child import CheckSizes, DetectorSizes, Reporter, device
from codetr.bench.model import ComponentTimer, compose_config, synthetic_batch
from codetr.bench.timing import peak_rss_mib, sync
from codetr.lightning.module import total_loss
from codetr.lightning.nonfinite import gradients_finite, nonfinite_terms
from codetr.lightning.optim import build_optimizer

AMP = {"bf16-mixed": torch.bfloat16, "fp32": None}
NO_CHECKPOINTING = "model.encoder_checkpoint_layers=0"
TRITON_ATTENTION = "model.detector.query_head.transformer.attention_impl=triton"
TRITON_SUFFIX = ", attention triton"


class Bench:
    """A detector built from a composed recipe, its AdamW, and one synthetic batch on the device."""

    def __init__(self, overrides: tuple[str, ...]):
        self.cfg = compose_config(overrides)
        self.device = device()
        torch.manual_seed(0)
        self.detector = instantiate(self.cfg.model.detector).to(self.device)
        self.optimizer = build_optimizer(self.detector, OmegaConf.to_container(self.cfg.optimizer, resolve=True))
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.batch_size, self.size = int(self.cfg.data.batch_size), int(self.cfg.model.lsj_canvas)
        images, sizes, targets = synthetic_batch(self.batch_size, self.size,
                                                 num_classes=int(self.cfg.model.num_classes))
        self.images, self.image_sizes = images.to(self.device), sizes.to(self.device)
        self.targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
        self.skipped_steps = 0

    def autocast(self, precision: str):
        dtype = AMP[precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def train_step(self, precision: str, phases: dict | None = None) -> float:
        """One optimiser step; returns the loss. ``phases`` (optional) accumulates synchronised seconds of
        ``forward (all)``, ``backward`` and ``optimiser``."""
        clock = _PhaseClock(self.device, phases)
        self.detector.train()
        with self.autocast(precision):
            losses = self.detector(self.images, self.image_sizes, self.targets)
        loss = total_loss(losses)
        bad = nonfinite_terms(losses)
        clock.lap("forward (all)")
        loss.backward()
        clock.lap("backward")
        if bad or not gradients_finite(self.params):
            self.skipped_steps += 1  # the guard's decision: no update
        else:
            torch.nn.utils.clip_grad_norm_(self.params, float(self.cfg.trainer.gradient_clip_val))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.lap("optimiser")
        return float(loss.detach())

    @torch.no_grad()
    def inference_step(self, precision: str) -> None:
        self.detector.eval()
        with self.autocast(precision):
            self.detector(self.images, self.image_sizes)
        sync(self.device)

    def close(self) -> None:
        del self.detector, self.optimizer, self.params, self.images, self.targets
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _PhaseClock:
    def __init__(self, dev: torch.device, phases: dict | None):
        self.device, self.phases = dev, phases
        self.start = self._now()

    def _now(self) -> float:
        if self.phases is not None:
            sync(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.phases is not None:
            now = self._now()
            self.phases[name] += now - self.start
            self.start = now


def timed_steps(bench: Bench, step, sizes: DetectorSizes) -> dict:
    """Warm-up steps, then up to ``sizes.repeats`` synchronised steps (fewer once ``case_seconds`` have passed).
    Peak memory is counted over the timed steps only."""
    for _ in range(sizes.warmup):
        step()
    sync(bench.device)
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    times, begin = [], time.monotonic()
    while len(times) < sizes.repeats and (not times or time.monotonic() - begin < sizes.case_seconds):
        start = time.perf_counter()
        step()
        sync(bench.device)
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    metrics = {"step_s": median, "step_min_s": times[0], "steps": len(times),
               "images_per_s": bench.batch_size / median, "batch": bench.batch_size, "image_size": bench.size,
               "encoder_checkpoint_layers": int(bench.cfg.model.encoder_checkpoint_layers)}
    if bench.device.type == "cuda":
        metrics["peak_allocated_gib"] = torch.cuda.max_memory_allocated(bench.device) / 2**30
        metrics["peak_reserved_gib"] = torch.cuda.max_memory_reserved(bench.device) / 2**30
    else:
        metrics["peak_rss_gib"] = peak_rss_mib() / 2**10  # process-wide high-water mark (no device allocator)
    return metrics


def _summary(metrics: dict) -> str:
    peak = metrics.get("peak_allocated_gib", metrics.get("peak_rss_gib"))
    label = "peak alloc" if "peak_allocated_gib" in metrics else "peak RSS"
    return (f"{metrics['images_per_s']:.2f} img/s (step {metrics['step_s']:.3f} s, n={metrics['steps']}), "
            f"{label} {peak:.2f} GiB")


def train_case(reporter: Reporter, case: str, bench: Bench, precision: str, sizes: DetectorSizes) -> None:
    losses = []
    metrics = timed_steps(bench, lambda: losses.append(bench.train_step(precision)), sizes)
    metrics.update(precision=precision, last_loss=losses[-1], skipped_steps=bench.skipped_steps)
    reporter.measured(case, metrics, _summary(metrics))


def inference_case(reporter: Reporter, case: str, bench: Bench, precision: str, sizes: DetectorSizes) -> None:
    metrics = timed_steps(bench, lambda: bench.inference_step(precision), sizes)
    metrics.update(precision=precision)
    reporter.measured(case, metrics, _summary(metrics))


def breakdown_case(reporter: Reporter, case: str, bench: Bench, precision: str, steps: int) -> None:
    bench.train_step(precision)  # warm-up outside the timer
    timer = ComponentTimer(bench.detector, bench.device)
    phases: dict[str, float] = defaultdict(float)
    try:
        for _ in range(steps):
            bench.train_step(precision, phases)
    finally:
        timer.close()
    per_step = {k: v / steps for k, v in {**timer.totals, **phases}.items()}
    aux = sum(v for k, v in per_step.items() if k.startswith(("rpn", "roi", "atss")))
    parts = ("backbone", "neck", "encoder", "decoder passes", "matching")
    components = {k: per_step.get(k, 0.0) for k in parts} | {"aux heads": aux}
    components["other forward"] = per_step["forward (all)"] - sum(components.values())
    components.update({k: per_step[k] for k in ("backward", "optimiser")})
    metrics = {"precision": precision, "steps": steps, "seconds_per_step": components, "raw": per_step,
               "encoder_checkpoint_layers": int(bench.cfg.model.encoder_checkpoint_layers)}
    reporter.measured(case, metrics, ", ".join(f"{k} {v:.3f}" for k, v in components.items()) + " s")


def detector_cases(reporter: Reporter, overrides: tuple[str, ...], sizes: DetectorSizes, precisions, *,
                   inference: bool, breakdown: bool, suffix: str = "") -> float:
    """The training cases (one per precision) of one recipe variant, then optionally inference and the breakdown.
    Returns the seconds of the slowest training case (an estimate for the next)."""
    bench = Bench(overrides)
    layers = int(bench.cfg.model.encoder_checkpoint_layers)
    label = (f"ckpt {layers} enc layers" if layers else "ckpt off") + suffix
    slowest = 0.0
    try:
        for precision in precisions:
            case = f"train {precision}, {label}"
            took = reporter.attempt(case, slowest, lambda p=precision, c=case: train_case(reporter, c, bench, p, sizes))
            slowest = max(slowest, took)
            if inference and precision == precisions[0]:
                for inf_precision in precisions:
                    case = f"inference {inf_precision}{suffix}"
                    reporter.attempt(case, 0.0,
                                     lambda p=inf_precision, c=case: inference_case(reporter, c, bench, p, sizes))
            if breakdown and precision == precisions[0] and sizes.breakdown_steps:
                case = f"breakdown {precision}, {label}"
                reporter.attempt(case, slowest, lambda p=precision, c=case: breakdown_case(
                    reporter, c, bench, p, sizes.breakdown_steps))
    finally:
        bench.close()
    return slowest


def run_r50(reporter: Reporter, sizes: CheckSizes) -> None:
    """Part 2: R50 Co-DINO at its canvas and batch: training (bf16-mixed, fp32) with the recipe's encoder
    checkpointing and without, inference, the per-component breakdown; then bf16-mixed training and inference with
    the Triton attention kernels (what ``attention_impl=auto`` would give on CUDA if it picked them)."""
    part = sizes.r50
    precisions = ("bf16-mixed", "fp32")
    slowest = detector_cases(reporter, part.overrides, part, precisions, inference=True, breakdown=True)
    if reporter.fits("train, ckpt off", slowest):
        detector_cases(reporter, (*part.overrides, NO_CHECKPOINTING), part, precisions, inference=False,
                       breakdown=False)
    triton_case = f"train bf16-mixed{TRITON_SUFFIX}"
    if device().type != "cuda":
        reporter.skipped(triton_case, "the Triton kernels need CUDA (the triton part runs them in the interpreter)")
    elif reporter.fits(triton_case, slowest):
        detector_cases(reporter, (*part.overrides, TRITON_ATTENTION), part, precisions[:1], inference=True,
                       breakdown=False, suffix=TRITON_SUFFIX)


def run_swin_l(reporter: Reporter, sizes: CheckSizes) -> None:
    """Part 3: Swin-L at its canvas, batch 1, with the recipe's encoder checkpointing: step time and peak memory."""
    detector_cases(reporter, sizes.swin_l.overrides, sizes.swin_l, ("bf16-mixed", "fp32"), inference=False,
                   breakdown=False)


def run_compile(reporter: Reporter, sizes: CheckSizes) -> None:
    """Part 5: ``torch.compile`` of the recipe's regions (``model.compile.*``): eager steps, then the first compiled
    step (compilation of forward and backward included), then compiled steps; bf16-mixed."""
    part, precision = sizes.compiled, "bf16-mixed"
    bench = Bench(part.overrides)
    compile_cfg = bench.cfg.model.compile
    state: dict = {}

    def eager() -> None:
        state["eager"] = timed_steps(bench, lambda: bench.train_step(precision), part)
        reporter.measured("eager (same process)", state["eager"], _summary(state["eager"]))

    def first_compiled_step() -> None:
        from codetr.models.compile import compile_regions

        names = compile_regions(bench.detector, list(compile_cfg.regions), mode=compile_cfg.mode,
                                dynamic=compile_cfg.dynamic, backend=compile_cfg.backend)
        start = time.perf_counter()
        bench.train_step(precision)
        sync(bench.device)
        state["first"] = time.perf_counter() - start
        metrics = {"first_step_s": state["first"], "compile_s": state["first"] - state["eager"]["step_s"],
                   "backend": compile_cfg.backend, "mode": compile_cfg.mode, "dynamic": compile_cfg.dynamic,
                   "regions": names}
        reporter.measured("compile (first step)", metrics,
                          f"first step {state['first']:.1f} s ({len(names)} regions, {compile_cfg.backend})")

    def compiled() -> None:
        metrics = timed_steps(bench, lambda: bench.train_step(precision), part)
        metrics["speedup_vs_eager"] = state["eager"]["step_s"] / metrics["step_s"]
        reporter.measured("compiled steps", metrics, _summary(metrics) + f", {metrics['speedup_vs_eager']:.2f}x eager")

    try:
        took = reporter.attempt("eager (same process)", 0.0, eager)
        if "eager" in state:
            reporter.attempt("compile (first step)", took, first_compiled_step)
        if "first" in state:
            reporter.attempt("compiled steps", took, compiled)
    finally:
        bench.close()
