"""Regional torch.compile of the detector: same detections and losses as eager, parameter names unchanged, wired to
``model.compile`` in the config. The tests trace with the ``aot_eager`` backend (graph capture + AOT autograd, no
code generation): inductor's CPU code generation takes minutes on a 2-core machine, and what can go wrong on our
side -- graph breaks changing results, checkpoint names, the training graph -- is the same."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from codetr.models.compile import compile_regions
from codetr.models.transformer.ms_deform_attn import MultiScaleDeformableAttention

SIZES = torch.tensor([[96, 128], [80, 112]])


def _detector(compose_cfg):
    cfg = compose_cfg("train", ["experiment=demo", "data.num_classes=5", "model.num_queries=30",
                                "model.roi_num_samples=64"])
    torch.manual_seed(0)
    return instantiate(cfg.model.detector)


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([2])}]
    return images, targets


def test_compiled_inference_and_training_equal_eager(compose_cfg):
    eager = _detector(compose_cfg)
    # Compiled regions sample with the exact PyTorch path; so does the eager reference here. (At initialisation
    # every encoder sampling point sits exactly on a pixel centre, where bilinear sampling has a kink; float32
    # rounding of x * W - 0.5 (kernel) vs grid_sample's unnormalisation puts some points on opposite sides, so the
    # two paths' forward agrees to 1e-6 but their sampling-offset gradients differ by ~10 % at initialisation.)
    for module in eager.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            module.impl = "pytorch"
    compiled = _detector(compose_cfg)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    names = compile_regions(compiled, backend="aot_eager", dynamic=False)
    assert names[:2] == ["backbone", "neck"] and "encoder.layers.0" in names and "decoder.layers.1" in names
    assert list(compiled.state_dict()) == keys  # checkpoints and converted weights load unchanged
    images, targets = _batch()

    with torch.no_grad():
        reference = eager.eval()(images, SIZES)
        result = compiled.eval()(images, SIZES)
    for ref, res in zip(reference, result):
        torch.testing.assert_close(res["boxes"], ref["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(res["scores"], ref["scores"], rtol=0, atol=1e-5)

    losses = []
    for model in (eager, compiled):
        model.train()
        torch.manual_seed(3)  # same denoising noise and samplers
        out = model(images, SIZES, targets)
        sum(v for k, v in out.items() if "loss" in k).backward()
        losses.append(out)
    for key, value in losses[0].items():
        torch.testing.assert_close(losses[1][key], value, rtol=1e-4, atol=1e-5, msg=key)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    for name, param in compiled.named_parameters():
        if name in grads:
            # Float reordering through the whole backward: compare each gradient tensor as a whole.
            error = (param.grad - grads[name]).norm() / grads[name].norm().clamp(min=1e-12)
            assert error < 1e-3, (name, float(error))
        else:
            assert param.grad is None, name


def test_unknown_region_is_refused(compose_cfg):
    with pytest.raises(ValueError, match="unknown compile region.*'roi'"):
        compile_regions(_detector(compose_cfg), ["backbone", "roi"])


def test_config_switch_compiles_the_regions(compose_cfg):
    from codetr.train import build_module

    cfg = compose_cfg("train", ["experiment=demo", "model.compile.enabled=true", "model.compile.backend=aot_eager",
                                "model.compile.regions=[backbone,decoder]"])
    detector = build_module(cfg).detector
    compiled = {n for n, m in detector.named_modules() if getattr(m, "_compiled_call_impl", None) is not None}
    layers = len(detector.query_head.transformer.decoder.layers)
    assert compiled == {"backbone"} | {f"query_head.transformer.decoder.layers.{i}" for i in range(layers)}
    off = build_module(compose_cfg("train", ["experiment=demo"])).detector
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in off.modules())
