"""trainer=fsdp: the strategy built from the yaml wraps one FSDP unit per encoder / decoder layer and backbone
block, saves full state dicts, and names a layer class that does not import."""

from __future__ import annotations

import pytest
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from codetr.lightning.strategies import fsdp_strategy
from codetr.models.backbones.vit import ViTBlock
from codetr.models.transformer.decoder import DinoDecoderLayer
from codetr.models.transformer.encoder import DeformableEncoderLayer
from codetr.utils import instantiate_checked


def test_fsdp_config_wraps_layers_and_saves_full_checkpoints(compose_cfg):
    cfg = compose_cfg("train", ["experiment=co_dino_vit_l_coco", "trainer=fsdp"])
    strategy = instantiate_checked(cfg.trainer.strategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    wrapped = set(policy._module_classes)
    assert {DeformableEncoderLayer, DinoDecoderLayer, ViTBlock} <= wrapped and len(wrapped) == 5
    assert strategy._state_dict_type == "full"
    assert cfg.trainer.gradient_clip_val == 0.1


def test_checkpoint_policy_and_bad_class_paths():
    strategy = fsdp_strategy(checkpoint_layers=["codetr.models.transformer.encoder.DeformableEncoderLayer"])
    assert strategy._activation_checkpointing_kwargs
    with pytest.raises(ValueError, match="codetr.models.nope.Layer"):
        fsdp_strategy(wrap_layers=["codetr.models.nope.Layer"])
    with pytest.raises(TypeError, match="not an nn.Module"):
        fsdp_strategy(wrap_layers=["codetr.lightning.strategies.fsdp_strategy"])
