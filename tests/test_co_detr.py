"""Detector-level behaviour on a small random Co-DINO: inference isolation, parameter accounting, plain DINO."""

import torch

from codetr.models.backbones.resnet import ResNet
from codetr.models.co_detr import CoDETR
from codetr.models.heads.atss_head import ATSSHead
from codetr.models.heads.co_dino_head import CoDINOHead
from codetr.models.heads.roi_head import RoIHead
from codetr.models.heads.rpn_head import RPNHead
from codetr.models.necks import ChannelMapper
from codetr.models.transformer.dino_transformer import DinoTransformer

K = 3


def detector(aux=True):
    torch.manual_seed(0)
    transformer = DinoTransformer(embed_dims=64, num_heads=4, num_levels=5, num_points=2, num_encoder_layers=1,
                                  # width 64: GN(32) needs >1 value per group
                                  num_decoder_layers=2, ffn_dims=64, num_queries=30,
                                  num_co_heads=2 if aux else 0)
    head = CoDINOHead(K, transformer, num_dn_queries=6)
    heads = {}
    if aux:
        heads = {"rpn_head": RPNHead(in_channels=64, feat_channels=64),
                     "roi_head": [RoIHead(num_classes=K, in_channels=64, fc_channels=64)],
                     "bbox_head": [ATSSHead(num_classes=K, in_channels=64, feat_channels=64)]}
    return CoDETR(ResNet(base_channels=8), ChannelMapper([32, 64, 128, 256], 64, 5), head, **heads)


def batch():
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[96, 128], [80, 96]])
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 120.0, 90.0]]),
                "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 70.0]]), "labels": torch.tensor([1])}]
    return images, sizes, targets


def test_training_returns_every_reference_loss_group_and_trains_the_encoder_not_frozen_stages():
    model = detector().train()
    images, sizes, targets = batch()
    losses = model(images, sizes, targets)
    for key in ("loss_cls", "d0.loss_iou", "enc_loss_cls", "dn_loss_bbox", "loss_rpn_cls", "loss_rpn_bbox",
                "loss_cls0", "loss_bbox0", "acc0", "loss_cls1", "loss_bbox1", "loss_centerness1", "loss_cls_aux0",
                "d0.loss_iou_aux1"):
        assert key in losses, key
    # 2 decoder layers: matching 6, enc 3, dn 6, rpn 2, roi 2 + acc, atss 3, positive queries 2 x 6
    assert len(losses) == 6 + 3 + 6 + 2 + 3 + 3 + 12
    sum(v for k, v in losses.items() if "loss" in k).backward()
    encoder = model.query_head.transformer.encoder.layers[0].self_attn.value_proj.weight
    assert encoder.grad is not None and encoder.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad is None and model.backbone.layer1[0].conv1.weight.grad is None
    assert model.backbone.layer2[0].conv1.weight.grad is not None


def test_inference_runs_only_backbone_neck_and_query_head():
    model = detector().eval()
    called = []
    for name in ("rpn_head", "roi_head", "bbox_head"):
        for module in getattr(model, name).modules():
            module.register_forward_pre_hook(lambda *a, n=name: called.append(n))
    images, sizes, _ = batch()
    outputs = model(images, sizes)
    assert called == []
    assert len(outputs) == 2 and set(outputs[0]) == {"boxes", "scores", "labels"}
    inference = sum(p.numel() for m in (model.backbone, model.neck, model.query_head) for p in m.parameters())
    aux = sum(p.numel() for m in (model.rpn_head, model.roi_head, model.bbox_head) for p in m.parameters())
    assert inference + aux == sum(p.numel() for p in model.parameters()) and aux > 0


def test_plain_dino_variant_has_only_detr_losses():
    model = detector(aux=False).train()
    images, sizes, targets = batch()
    losses = model(images, sizes, targets)
    assert set(losses) == {
        f"{p}{q}loss_{t}" for p in ("", "d0.") for q in ("", "dn_") for t in ("cls", "bbox", "iou")
    } | {"enc_loss_cls", "enc_loss_bbox", "enc_loss_iou"}


def test_training_without_targets_is_a_clear_error():
    model = detector(aux=False).train()
    images, sizes, _ = batch()
    try:
        model(images, sizes)
    except ValueError as error:
        assert "needs targets" in str(error)
    else:
        raise AssertionError("expected a ValueError")
