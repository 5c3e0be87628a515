"""The Python API (``from codetr import Detector``), the post-processor's modes and test-time augmentation, on the
tiny Co-DINO with random weights and on small generated images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from codetr import Detector, TTAConfig
from codetr.checkpoint_io import CheckpointMismatchError
from codetr.inference.description import MissingDescriptionError, ModelDescription, describe_recipe
from codetr.inference.detector import build_model
from codetr.inference.tta import merge_views, unflip, weighted_box_fusion
from codetr.models.postprocess import PostProcessor

TINY_TEST = ["aug.test_scale=96", "aug.test_max_size=160"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    description = describe_recipe("demo", TINY_TEST, class_names=["circle", "square", "triangle", "diamond"])
    return build_model(description), description


def save_checkpoint(path, model, description: ModelDescription | None):
    checkpoint = {"state_dict": {f"detector.{k}": v for k, v in model.state_dict().items()}}
    if description is not None:
        checkpoint["codetr_model"] = description.to_dict()
    torch.save(checkpoint, path)
    return path


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_detector_from_checkpoint_accepts_paths_pil_numpy_and_tensors(tiny, tmp_path):
    model, description = tiny
    detector = Detector.from_checkpoint(save_checkpoint(tmp_path / "m.ckpt", model, description))
    array = image(90, 120)
    Image.fromarray(array).save(tmp_path / "a.png")
    as_path = detector.predict(tmp_path / "a.png")
    for other in (Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1)):
        found = detector.predict(other)
        torch.testing.assert_close(found.boxes, as_path.boxes)
        torch.testing.assert_close(found.scores, as_path.scores)
    assert as_path.image_size == (90, 120) and 0 < len(as_path) <= 300
    assert set(as_path.names) <= {"circle", "square", "triangle", "diamond"}
    assert (as_path.boxes[:, 2] <= 120 + 1e-3).all() and (as_path.boxes[:, 3] <= 90 + 1e-3).all()


def test_batches_of_different_sizes_return_one_result_per_image_in_order(tiny):
    model, description = tiny
    detector = Detector(model, description)
    images = [image(90, 120, 1), image(140, 70, 2), image(64, 64, 3)]
    batched = detector.predict(images, batch_size=2, score_threshold=0.0)
    single = [detector.predict(x) for x in images]
    assert [d.image_size for d in batched] == [(90, 120), (140, 70), (64, 64)]
    for b, s in zip(batched, single):  # padding in a batch changes the numbers only slightly
        assert abs(float(b.scores[0]) - float(s.scores[0])) < 0.05
    thresholded = detector.predict(images[0], score_threshold=float(single[0].scores[3]))
    assert len(thresholded) == 4


def test_a_checkpoint_without_description_gets_an_error_saying_what_to_do(tiny, tmp_path):
    model, _ = tiny
    path = save_checkpoint(tmp_path / "old.ckpt", model, None)
    with pytest.raises(MissingDescriptionError, match="recipe") as error:
        Detector.from_checkpoint(path)
    assert str(path) in str(error.value)
    detector = Detector.from_checkpoint(path, recipe="demo", overrides=TINY_TEST)
    assert detector.class_names is None
    found = detector.predict(image(80, 80))
    assert set(found.names) <= {"0", "1", "2", "3"}  # no names anywhere: class indices


def test_a_checkpoint_of_another_class_count_is_refused(tiny, tmp_path):
    model, _description = tiny
    other = describe_recipe("demo", [*TINY_TEST, "data.num_classes=7"])
    path = save_checkpoint(tmp_path / "m.ckpt", model, other)
    with pytest.raises(CheckpointMismatchError, match=r"m.ckpt was trained for 4 classes, the config / dataset has 7"):
        Detector.from_checkpoint(path)


def test_deploy_mode_equals_the_nms_free_top_k_of_the_evaluation_mode():
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 30, 5), torch.rand(2, 30, 4) * 0.5 + 0.25
    sizes = torch.tensor([[100, 200], [60, 50]])
    post = PostProcessor(max_per_image=20, soft_nms_iou=None)
    deploy_boxes, deploy_scores, deploy_labels = post.deploy(logits, boxes, sizes)
    for image_index, det in enumerate(post(logits, boxes, sizes)):
        torch.testing.assert_close(det["boxes"], deploy_boxes[image_index])
        torch.testing.assert_close(det["scores"], deploy_scores[image_index])
        assert torch.equal(det["labels"], deploy_labels[image_index])
    assert deploy_boxes.shape == (2, 20, 4)


class BrightBoxDetector(nn.Module):
    """Finds the box of the bright pixels (normalised > 0) of each image: exactly flip-equivariant."""

    def forward(self, images, image_sizes):
        out = []
        for picture, (h, w) in zip(images, image_sizes.tolist()):
            rows, cols = (picture[:, :h, :w].mean(0) > 0).nonzero(as_tuple=True)
            box = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float()
            out.append({"boxes": box[None], "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return out


def test_flip_tta_of_a_flip_equivariant_detector_gives_the_original_boxes(tiny):
    _, description = tiny
    picture = np.zeros((80, 100, 3), dtype=np.uint8)
    picture[10:30, 15:45] = 255  # off-centre: the mirrored view finds it elsewhere, unflipping must bring it back
    description = ModelDescription(**{**description.to_dict(), "test_transform": {
        "name": "detr", "test_scale": 80, "test_max_size": 1000}})
    detector = Detector(BrightBoxDetector(), description)
    plain = detector.predict(picture)
    torch.testing.assert_close(plain.boxes, torch.tensor([[15.0, 10.0, 45.0, 30.0]]))
    for merge in ("wbf", "soft_nms"):
        merged = detector.predict(picture, tta=TTAConfig(scales=(1.0,), flip=True, merge=merge))
        torch.testing.assert_close(merged.boxes, plain.boxes)
        torch.testing.assert_close(merged.scores, plain.scores)


def test_unflip_mirrors_x_only():
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    torch.testing.assert_close(unflip(boxes, 100), torch.tensor([[70.0, 5.0, 90.0, 25.0]]))


def test_wbf_fuses_overlapping_boxes_of_one_class_and_keeps_classes_apart():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [0.0, 0.0, 10.0, 10.0], [50, 50, 60, 60.0]])
    scores = torch.tensor([0.8, 0.4, 0.6, 0.5])
    labels = torch.tensor([0, 0, 1, 0])
    views = torch.tensor([0, 1, 0, 1])
    fused, fused_scores, fused_labels = weighted_box_fusion(boxes, scores, labels, views, 2, iou_threshold=0.55)
    assert fused_labels.tolist() == [0, 1, 0]
    # boxes 0 and 1 (same class, IoU 0.82): score-weighted mean box, score = mean of the views' best (0.8 + 0.4) / 2
    torch.testing.assert_close(fused[0], torch.tensor([1 / 3, 0.0, 10 + 1 / 3, 10.0]))
    torch.testing.assert_close(fused_scores, torch.tensor([0.6, 0.3, 0.25]))


def test_tta_merge_drops_low_scores_and_keeps_max_per_image():
    view = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]),
            "scores": torch.tensor([0.9, 0.5, 1e-4]), "labels": torch.tensor([0, 0, 0])}
    merged = merge_views([view, view], TTAConfig(max_per_image=1))
    assert merged["scores"].tolist() == pytest.approx([0.9])
    with pytest.raises(ValueError, match="tta.merge"):
        TTAConfig(merge="vote")
    with pytest.raises(ValueError, match="unknown tta keys"):
        TTAConfig.from_mapping({"scale": [1.0]})


def test_convert_with_a_recipe_adds_the_description_to_an_older_checkpoint(tiny, tmp_path):
    from codetr.convert import main as convert_main

    model, _ = tiny
    old = save_checkpoint(tmp_path / "old.ckpt", model, None)
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\n")
    assert convert_main([str(old), str(tmp_path / "new.ckpt"), "--recipe", "demo", "--override", TINY_TEST[0],
                         "--class-names", str(tmp_path / "names.txt")]) == 0
    detector = Detector.from_checkpoint(tmp_path / "new.ckpt")
    assert detector.class_names == ["a", "b", "c", "d"] and detector.description.recipe == "demo"
    expected = Detector(model, detector.description).predict(image(70, 70))
    torch.testing.assert_close(detector.predict(image(70, 70)).boxes, expected.boxes)
