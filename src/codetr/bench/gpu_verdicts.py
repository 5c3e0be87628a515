"""What the GPU check's rows decide, and the machine they were measured on.

* the H100 target: R50 Co-DINO at 1024 x 1024, bf16-mixed, batch 2, the recipe's checkpointing, every auxiliary
  branch: at least 15 training images/s per GPU (the project's throughput goal);
* whether ``attention_impl=auto`` may pick the Triton kernels: they match the float64 reference in fp32 (the dtype
  the model runs them in) and beat the exact path's forward + backward;
* the measured peak memory per case, for the README's memory table (until now estimates).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

TARGET_IMAGES_PER_S = 15.0


def machine() -> dict:
    """Host, library versions, GPU and the float32 matmul / convolution modes the numbers were taken with."""
    import codetr
    from codetr.bench.__main__ import machine as host

    info = {**host(), "python": platform.python_version(),
            "codetr": os.path.dirname(os.path.realpath(codetr.__file__)),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    for package in ("triton", "lightning", "timm", "hydra-core", "faster-coco-eval"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda_runtime=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def _measured(rows: list[dict], part: str, case_test) -> list[dict]:
    return [r for r in rows if r["part"] == part and r["status"] == "measured" and case_test(r["case"])]


def target_verdict(rows: list[dict]) -> dict:
    name = f"H100 target >= {TARGET_IMAGES_PER_S:g} train img/s"
    recipe = _measured(rows, "r50", lambda c: c.startswith("train bf16-mixed, ckpt") and c.endswith("enc layers"))
    if not recipe:
        return {"name": name, "status": "not measured", "text": "no R50 bf16-mixed training row (see the r50 part)"}
    metrics = recipe[0]["metrics"]
    meets = metrics["images_per_s"] >= TARGET_IMAGES_PER_S
    text = (f"{metrics['images_per_s']:.2f} img/s at {metrics['image_size']} px, batch {metrics['batch']}, "
            f"bf16-mixed, {metrics['encoder_checkpoint_layers']} encoder layers checkpointed, exact attention")
    triton = _measured(rows, "r50", lambda c: c.startswith("train bf16-mixed") and c.endswith("attention triton"))
    if triton:
        text += f"; with the Triton kernels {triton[0]['metrics']['images_per_s']:.2f} img/s"
    return {"name": name, "status": "meets" if meets else "below", "text": text}


def triton_verdict(rows: list[dict]) -> dict:
    name = "attention_impl=auto -> triton"
    triton = _measured(rows, "triton", lambda c: c == "triton fp32")
    exact = _measured(rows, "triton", lambda c: c == "exact fp32")
    if not triton or not exact:
        return {"name": name, "status": "not measured", "text": "no fp32 rows for both paths (see the triton part)"}
    t, e = triton[0]["metrics"], exact[0]["metrics"]
    speedup = e["fwd_bwd_ms"] / t["fwd_bwd_ms"]
    bf16 = _measured(rows, "triton", lambda c: c == "triton bf16")
    bf16_text = f"; bf16 max rel err {bf16[0]['metrics']['max_rel_error']:.1e}" if bf16 else ""
    ok = t["matches_reference"] and speedup > 1.0
    return {"name": name, "status": "yes" if ok else "no",
            "text": f"fp32 max rel err {t['max_rel_error']:.1e} (tolerance {t['tolerance']:.0e}), fwd+bwd "
                    f"{speedup:.1f}x the exact path, fwd {e['fwd_ms'] / t['fwd_ms']:.1f}x{bf16_text}"}


def memory_verdict(rows: list[dict]) -> dict:
    found = [r for part in ("r50", "swin_l") for r in _measured(rows, part, lambda c: c.startswith("train"))]
    key = "peak_allocated_gib" if found and "peak_allocated_gib" in found[0]["metrics"] else "peak_rss_gib"
    text = "; ".join(f"{r['part']} {r['case']}: {r['metrics'][key]:.2f} GiB (batch {r['metrics']['batch']})"
                     for r in found)
    return {"name": f"peak memory ({'max_memory_allocated' if key == 'peak_allocated_gib' else 'process RSS'})",
            "status": "info" if found else "not measured", "text": text or "no training rows"}


def verdicts(rows: list[dict], mode: str) -> list[dict]:
    found = [target_verdict(rows), triton_verdict(rows), memory_verdict(rows)]
    if mode != "full":
        for verdict in found:
            verdict["text"] += " [dry run: tiny sizes on the CPU, not evidence]"
    return found
