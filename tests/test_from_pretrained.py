"""``Detector.from_pretrained`` finds a published model in the local caches (a Hugging Face cache laid out as the
hub client lays it out, or ``weights_dir``), converts it once and keeps the converted checkpoint; offline without
the file it names the file, its address and where to put it. No network is used."""

from __future__ import annotations

import pytest
import torch

from codetr import Detector
from codetr.inference import pretrained_models
from codetr.inference.description import describe_recipe
from codetr.inference.detector import build_model

HUB_ID = "zongzhuofan/co-detr-vit-large-coco-instance"
TINY_INST = ["model=co_dino_inst", "model.mask_channels=16", "model.mask_fc_channels=32",
             "model.mask_stage_sizes=[8,16,32,64]", "aug.test_scale=96", "aug.test_max_size=160"]


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CODETR_CACHE", str(tmp_path / "codetr"))
    import huggingface_hub.constants

    # the hub client reads HF_HOME once, at import: point its cache at this test's folder as well
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path


def hub_cache_file(root, repo: str, filename: str, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """The file's place in a Hugging Face cache (``models--<owner>--<name>/snapshots/<rev>/``, ``refs/main``)."""
    folder = root / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    return snapshot / filename


def tiny_weights():
    torch.manual_seed(0)
    return build_model(describe_recipe("demo", TINY_INST)).state_dict()


def test_a_hub_model_in_the_local_cache_is_converted_once_and_kept(offline, monkeypatch):
    state = tiny_weights()
    torch.save({"state_dict": state, "meta": {}}, hub_cache_file(offline, HUB_ID, "pytorch_model.pth"))
    detector = Detector.from_pretrained(HUB_ID, recipe="demo", overrides=TINY_INST)
    loaded = detector.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert detector.model.mask_branch is not None
    converted = list((offline / "codetr" / "converted").glob("*.ckpt"))
    assert len(converted) == 1 and converted[0].name.startswith("pytorch_model-demo-")
    calls = []
    monkeypatch.setattr("codetr.convert.convert_file", lambda *a, **k: calls.append(a))
    again = Detector.from_pretrained(HUB_ID, recipe="demo", overrides=TINY_INST)
    assert calls == [] and torch.equal(again.model.state_dict()["query_head.cls_branches.0.weight"],
                                       state["query_head.cls_branches.0.weight"])


def test_a_copy_in_weights_dir_is_found_under_its_repository_name(offline):
    folder = offline / "weights" / "co-detr-vit-large-coco-instance"
    folder.mkdir(parents=True)
    torch.save(tiny_weights(), folder / "pytorch_model.pth")
    detector = Detector.from_pretrained(HUB_ID, recipe="demo", overrides=TINY_INST, weights_dir=offline / "weights")
    assert detector.model.mask_branch is not None


def test_offline_without_the_file_names_it_and_where_to_put_it(offline):
    with pytest.raises(FileNotFoundError) as error:
        Detector.from_pretrained(HUB_ID, weights_dir=offline / "weights")
    message = str(error.value)
    assert "pytorch_model.pth" in message
    assert f"https://huggingface.co/{HUB_ID}/resolve/main/pytorch_model.pth" in message
    assert str(offline / "weights" / "co-detr-vit-large-coco-instance" / "pytorch_model.pth") in message


def test_known_names_carry_their_recipe_and_unknown_ones_are_refused():
    assert pretrained_models.lookup(HUB_ID).recipe == "co_dino_inst_vit_l_coco"
    assert pretrained_models.lookup("zongzhuofan/co-detr-vit-large-lvis-instance").recipe == "co_dino_inst_vit_l_lvis"
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        pretrained_models.lookup("someone/unknown-model")
