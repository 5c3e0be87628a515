"""Co-DINO query head behaviour on a small random model: shapes, loss keys, gradient paths, inference isolation."""

from types import SimpleNamespace

import torch

from codetr.models.co_detr import image_padding_mask
from codetr.models.heads.co_dino_head import CoDINOHead
from codetr.models.transformer.dino_transformer import DinoTransformer


def small_head(num_classes=5, **kwargs):
    torch.manual_seed(0)
    transformer = DinoTransformer(embed_dims=32, num_heads=4, num_levels=3, num_points=2, num_encoder_layers=2,
                                  num_decoder_layers=3, ffn_dims=64, num_queries=20, num_co_heads=2)
    return CoDINOHead(num_classes, transformer, num_dn_queries=6, **kwargs)


def inputs(batch_shape=(64, 96)):
    sizes = torch.tensor([[64, 96], [48, 80]])
    feats = [torch.randn(2, 32, batch_shape[0] // s, batch_shape[1] // s) for s in (8, 16, 32)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0], [50.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([1, 4])},
        {"boxes": torch.tensor([[5.0, 5.0, 20.0, 25.0]]), "labels": torch.tensor([0])},
    ]
    return feats, image_padding_mask(sizes, batch_shape), sizes, targets


def test_loss_keys_follow_the_reference_naming():
    head = small_head().train()
    feats, mask, sizes, targets = inputs()
    losses, state = head.loss(feats, mask, sizes, targets)[:2]
    expected = {"loss_cls", "loss_bbox", "loss_iou", "enc_loss_cls", "enc_loss_bbox", "enc_loss_iou",
                "dn_loss_cls", "dn_loss_bbox", "dn_loss_iou"}
    expected |= {f"d{k}.{p}loss_{t}" for k in range(2) for p in ("", "dn_") for t in ("cls", "bbox", "iou")}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    assert state.memory.shape == (2, sum(f.shape[2] * f.shape[3] for f in feats), 32)


def test_aux_pyramid_has_an_extra_coarser_level_and_passes_gradients_to_the_encoder():
    head = small_head().train()
    feats, mask, sizes, targets = inputs()
    state = head.loss(feats, mask, sizes, targets).encoder
    pyramid = head.aux_pyramid(state)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(8, 12), (4, 6), (2, 3), (1, 2)]
    pyramid[-1].square().sum().backward()
    encoder_grad = head.transformer.encoder.layers[0].ffn.fc1.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0


def test_positive_query_losses_train_their_projection_and_the_shared_decoder():
    head = small_head().train()
    feats, mask, sizes, targets = inputs()
    state = head.loss(feats, mask, sizes, targets).encoder

    positives = SimpleNamespace(
        coords=[torch.tensor([[10.0, 12.0, 38.0, 30.0], [0.0, 0.0, 5.0, 5.0]]), torch.tensor([[4.0, 6.0, 21.0, 24.0]])],
        labels=[torch.tensor([1, 5]), torch.tensor([0])],
        targets=[
            torch.tensor([[10.0, 10.0, 40.0, 30.0], [0.0, 0.0, 0.0, 0.0]]), torch.tensor([[5.0, 5.0, 20.0, 25.0]])
        ],
    )
    losses = head.loss_positive_queries(state, positives, 1, sizes)
    assert set(losses) == {f"{p}loss_{t}_aux" for p in ("", "d0.", "d1.") for t in ("cls", "bbox", "iou")}
    sum(losses.values()).backward()
    assert head.transformer.aux_pos_trans[1].weight.grad.abs().sum() > 0
    assert head.transformer.aux_pos_trans[0].weight.grad is None
    assert head.transformer.decoder.layers[0].cross_attn.value_proj.weight.grad.abs().sum() > 0


def test_batch_without_ground_truth_still_uses_every_trained_parameter():
    head = small_head().train()
    feats, mask, sizes, _ = inputs()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = head.loss(feats, mask, sizes, empty).losses
    sum(losses.values()).backward()
    assert head.dn_generator.label_embedding.weight.grad is not None


def test_prediction_never_touches_training_only_parts():
    head = small_head().eval()
    feats, mask, sizes, _ = inputs()
    called = []
    for name in ("downsample", "dn_generator"):
        getattr(head, name).register_forward_hook(lambda *args, n=name: called.append(n))
    for module in head.transformer.aux_pos_trans:
        module.register_forward_hook(lambda *args: called.append("aux_pos_trans"))
    detections = head.predict(feats, mask, sizes)
    assert called == []
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4
    assert (detections[1]["boxes"][:, 2] <= 80).all() and (detections[1]["boxes"][:, 3] <= 48).all()


def test_bf16_autocast_keeps_losses_finite_and_close_to_float32():
    head = small_head().train()
    feats, mask, sizes, targets = inputs()
    torch.manual_seed(3)
    exact = head.loss(feats, mask, sizes, targets).losses
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head.loss(feats, mask, sizes, targets).losses
    for key, value in mixed.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
        assert abs(value.item() - exact[key].item()) <= 0.1 * abs(exact[key].item()) + 0.05, key


def test_encoder_activation_checkpointing_gives_identical_losses_and_gradients():
    feats, mask, sizes, targets = inputs()
    results = []
    for layers in (0, 2):
        head = small_head().train()
        head.transformer.encoder.checkpoint_layers = layers
        torch.manual_seed(5)
        losses = head.loss([f.clone().requires_grad_() for f in feats], mask, sizes, targets).losses
        total = sum(losses.values())
        total.backward()
        grads = [p.grad.clone() for p in head.transformer.encoder.parameters() if p.grad is not None]
        results.append((total.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
