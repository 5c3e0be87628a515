"""Co-Deformable-DETR as an application model: plain Deformable-DETR (auxiliary heads off) trains a CPU step with
every trainable parameter receiving a gradient, the demo experiment runs with ``model=co_deformable_detr``, the
4-level neck is cut from a 5-level backbone group, and derived config values resolve."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from test_train_e2e import TINY

from codetr.models.necks import ChannelMapper
from codetr.train import train
from codetr.utils import resolvers


def _targets():
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 60.0, 30.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[10.0, 12.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
    ]


def test_plain_deformable_detr_trains_one_cpu_step(compose_cfg):
    cfg = compose_cfg("train", ["experiment=demo", "model=deformable_detr", "model.num_queries=20",
                                "model.detector.query_head.transformer.attention_impl=pytorch"])
    torch.manual_seed(0)
    detector = instantiate(cfg.model.detector).train()
    assert detector.rpn_head is None and not len(detector.bbox_head) and not len(detector.roi_head)
    assert not hasattr(detector.query_head.transformer, "head_pos_embed")
    optimizer = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad], lr=1e-4)
    before = {n: p.detach().clone() for n, p in detector.named_parameters() if p.requires_grad}
    losses = detector(torch.randn(2, 3, 64, 80), torch.tensor([[64, 80], [56, 64]]), _targets())
    assert set(losses) == {f"{lead}{kind}" for lead in ("", "d0.", "enc_") for kind in
                           ("loss_cls", "loss_bbox", "loss_iou")}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    no_grad = [n for n, p in detector.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"trainable parameters without gradient: {no_grad[:5]}"
    optimizer.step()
    changed = [n for n, p in detector.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_demo_experiment_runs_with_co_deformable_detr(compose_cfg):
    cfg = compose_cfg("train", [*TINY, "model=co_deformable_detr", "model.num_queries=20",
                                "model.detector.query_head.transformer.attention_impl=pytorch",
                                "+trainer.fast_dev_run=true"])
    assert cfg.model.detector.query_head._target_.endswith("CoDeformableDETRHead")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))
    assert "val/AP" in metrics


def test_channel_mapper_skips_the_finest_backbone_map():
    neck = ChannelMapper([8, 16, 32, 64], 32, num_outs=5, num_groups=4, skip_finest=1)
    feats = [torch.randn(1, c, 64 // 2**i, 64 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    outs = neck(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert neck.convs[0].conv.in_channels == 16 and neck.extra_convs[0].conv.in_channels == 64


def test_derived_config_values():
    assert resolvers.div(256, 2) == 128 and resolvers.mul(12.0, 10) == 120.0
    try:
        resolvers.div(65, 2)
    except ValueError as error:
        assert "65" in str(error)
    else:
        raise AssertionError("an indivisible integer division must fail")


def test_lr_multiplier_keys_scale_matching_parameters():
    from torch import nn

    from codetr.lightning.optim import param_groups

    model = nn.ModuleDict({"backbone": nn.Linear(2, 2), "sampling_offsets": nn.Linear(2, 2), "other": nn.Linear(2, 2)})
    groups = param_groups(model, lr=1.0, weight_decay=0.0, backbone_lr_mult=0.1,
                          lr_mult_keys={"sampling_offsets": 0.5, "sampling": 0.2})
    by_scale = {g["lr_scale"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert by_scale == {1.0: 6, 0.5: 6, 0.1: 6}


def test_co_deformable_detr_batch_without_boxes_trains_every_parameter(compose_cfg):
    """No image has a box (LSJ crops do that): every loss stays finite and every trainable parameter, auxiliary
    heads and positive-query projections included, gets a gradient (DDP needs every parameter used)."""
    cfg = compose_cfg("train", ["experiment=demo", "model=co_deformable_detr", "model.num_queries=20",
                                "model.detector.query_head.transformer.attention_impl=pytorch"])
    torch.manual_seed(0)
    detector = instantiate(cfg.model.detector).train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = detector(torch.randn(2, 3, 64, 80), torch.tensor([[64, 80], [56, 64]]), empty)
    assert {"loss_cls_aux0", "loss_cls_aux1", "enc_loss_cls", "loss_rpn_cls"} <= set(losses)
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    no_grad = [n for n, p in detector.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"trainable parameters without gradient: {no_grad[:5]}"
