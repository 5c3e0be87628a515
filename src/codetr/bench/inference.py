"""Inference engines side by side on the CPU: the eager detector (its default fast paths), the exported ONNX model
in onnxruntime and, when it compiles within ``CODETR_BENCH_AOTI_TIMEOUT`` seconds (default 900; 0 skips it), the
AOTInductor package; R50 Co-DINO (random weights, batch 1) at 512x512 and at the reference test size (LSJ canvas
1024x1024), all in one run, with the official code's 512x512 CPU figure
(``codetr.bench.model.official_timings``) beside them.

The exported graphs decode NMS-free (deploy mode) and run deformable attention through its exact ``grid_sample``
path; the eager rows use the recipe's soft-NMS and the compiled CPU attention kernel. Each engine runs in its own
subprocess (peak RSS its own); export and compile times are reported in the notes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from codetr.bench.model import official_timings
from codetr.bench.timing import Measurement, peak_rss_mib

RECIPE = "co_dino_r50_lsj_1x"
SIZES = (512, 1024)  # 1024: the R50 recipes' LSJ test canvas


def build(recipe: str = RECIPE):
    from codetr.inference import Detector, describe_recipe
    from codetr.inference.detector import build_model

    torch.manual_seed(0)
    description = describe_recipe(recipe)
    return Detector(build_model(description), description)


def inputs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=generator)
    return images, torch.tensor([[size, size]])


def engine_runner(engine: str, artifact: str | None):
    """A callable ``(images uint8, sizes) -> detections`` for one engine."""
    from codetr.inference.export import load_exported

    if engine == "eager":
        from codetr.data.collate import normalize_images
        from codetr.models.co_detr import image_padding_mask

        detector = build()
        mean, std = detector.pixel_mean, detector.pixel_std

        def eager(images, sizes):
            with torch.inference_mode():
                normalized = normalize_images(images, image_padding_mask(sizes, images.shape[-2:]), mean, std)
                return detector.model(normalized, sizes)

        return eager
    return load_exported(artifact, "onnx" if engine == "onnxruntime" else "aoti",
                         threads=torch.get_num_threads())


def time_case(engine: str, size: int, repeats: int, artifact: str | None) -> dict:
    """One engine at one size in this process: warm-up + ``repeats`` timed calls."""
    run = engine_runner(engine, artifact)
    images, sizes = inputs(size)
    run(images, sizes)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images, sizes)
        times.append(time.perf_counter() - start)
    return {"times_s": times, "peak_mem_mib": peak_rss_mib()}


def export_artifact(fmt: str, path: Path) -> float:
    """Export (and for ``aoti`` compile) the R50 inference model; returns the seconds it took."""
    from codetr.inference.export import export_detector

    start = time.perf_counter()
    export_detector(build(), path, fmt)
    return time.perf_counter() - start


def _subprocess(args: list[str], timeout: float | None = None) -> dict:
    command = [sys.executable, "-m", "codetr.bench.inference", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"inference bench {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(device: str = "cpu", repeats: int = 2) -> list[Measurement]:
    if device != "cpu":
        return [Measurement("inference engines", {"device": device}, [], None, {"skipped": "CPU suite"})]
    official_s = official_timings().get("r50_512", {}).get("eval_forward_median_s")
    aoti_timeout = float(os.environ.get("CODETR_BENCH_AOTI_TIMEOUT", "900"))
    rows: list[Measurement] = []
    with tempfile.TemporaryDirectory() as tmp:
        artifacts: dict[str, tuple[str | None, dict]] = {"eager": (None, {})}
        onnx_path = str(Path(tmp) / "r50.onnx")
        artifacts["onnxruntime"] = (onnx_path, {"export_s": round(_subprocess(["export", "onnx", onnx_path])["s"])})
        if aoti_timeout > 0:
            aoti_path = str(Path(tmp) / "r50_aoti.pt2")
            try:
                took = _subprocess(["export", "aoti", aoti_path], timeout=aoti_timeout)["s"]
                artifacts["aoti"] = (aoti_path, {"compile_s": round(took)})
            except (subprocess.TimeoutExpired, RuntimeError) as error:
                reason = f"no package within {aoti_timeout:.0f} s" if isinstance(error, subprocess.TimeoutExpired) \
                    else str(error).splitlines()[-1][:120]
                rows.append(Measurement("aoti", {"model": "r50"}, [], None, {"not measured": reason}))
        for size in SIZES:
            eager_s = None
            for engine, (artifact, notes) in artifacts.items():
                data = _subprocess(["time", engine, str(size), str(repeats), artifact or "-"])
                row = Measurement(engine, {"model": "r50", "batch": 1, "size": f"{size}x{size}"}, data["times_s"],
                                  data["peak_mem_mib"], dict(notes))
                row.extra["images/s"] = round(1 / row.median_s, 3)
                eager_s = row.median_s if engine == "eager" else eager_s
                if engine != "eager" and eager_s:
                    row.extra["vs eager"] = f"{eager_s / row.median_s:.2f}x"
                if size == 512 and official_s:
                    row.extra.update({"official_s": official_s, "vs official": f"{official_s / row.median_s:.2f}x"})
                rows.append(row)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("CODETR_BENCH_THREADS", torch.get_num_threads())))
    if sys.argv[1] == "export":
        print(json.dumps({"s": export_artifact(sys.argv[2], Path(sys.argv[3]))}))
    else:
        engine, size, repeats, artifact = sys.argv[2:6]
        print(json.dumps(time_case(engine, int(size), int(repeats), None if artifact == "-" else artifact)))
