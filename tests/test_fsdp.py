"""Sharded data parallelism.

``trainer=fsdp`` (FSDP2, ``fully_shard``) runs here on two CPU processes (gloo): one sharded step gives the
gradients and clipping norm of the same step under DDP, and a Lightning run trains, writes a full checkpoint that
loads on one device (EMA included), and resumes. ``trainer=fsdp1`` (Lightning's FSDPStrategy) needs a GPU, so only
the strategy its yaml builds is checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_support import run_ranks
from test_co_detr import batch, detector
from test_train_e2e import TINY
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor

from codetr.lightning.nonfinite import NonFiniteStepGuard, nonfinite_terms
from codetr.lightning.strategies import FullyShardedStrategy, apply_activation_checkpointing, fsdp_strategy
from codetr.models.backbones.vit import ViTBlock
from codetr.models.losses.matcher import tolerate_nonfinite_costs
from codetr.models.transformer.decoder import DinoDecoderLayer
from codetr.models.transformer.encoder import DeformableEncoderLayer
from codetr.utils import instantiate_checked

LAYERS = ["codetr.models.transformer.encoder.DeformableEncoderLayer",
          "codetr.models.transformer.decoder.DinoDecoderLayer", "torchvision.models.resnet.Bottleneck"]


def test_fsdp1_config_wraps_layers_and_saves_full_checkpoints(compose_cfg):
    cfg = compose_cfg("train", ["experiment=co_dino_vit_l_coco", "trainer=fsdp1"])
    strategy = instantiate_checked(cfg.trainer.strategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    wrapped = set(policy._module_classes)
    assert {DeformableEncoderLayer, DinoDecoderLayer, ViTBlock} <= wrapped and len(wrapped) == 6
    assert strategy._state_dict_type == "full"
    assert cfg.trainer.gradient_clip_val == 0.1


def test_fsdp2_config_and_bad_values(compose_cfg):
    cfg = compose_cfg("train", ["experiment=co_dino_vit_l_coco", "trainer=fsdp",
                                "trainer.strategy.reduce_dtype=bfloat16"])
    strategy = instantiate_checked(cfg.trainer.strategy)
    assert isinstance(strategy, FullyShardedStrategy)
    assert {DeformableEncoderLayer, DinoDecoderLayer, ViTBlock} <= set(strategy.wrap_layers)
    assert len(strategy.wrap_layers) == 6 and strategy.reshard_after_forward
    assert strategy.mp_policy.param_dtype is None and strategy.mp_policy.reduce_dtype == torch.bfloat16
    assert not strategy._save_distributed_checkpoint and cfg.trainer.gradient_clip_val == 0.1
    with pytest.raises(ValueError, match="float33"):
        FullyShardedStrategy(wrap_layers=LAYERS, reduce_dtype="float33")
    with pytest.raises(ValueError, match="codetr.models.nope.Layer"):
        FullyShardedStrategy(wrap_layers=["codetr.models.nope.Layer"])


def test_fsdp1_checkpoint_policy_and_bad_class_paths():
    strategy = fsdp_strategy(checkpoint_layers=["codetr.models.transformer.encoder.DeformableEncoderLayer"])
    assert strategy._activation_checkpointing_kwargs
    with pytest.raises(ValueError, match="codetr.models.nope.Layer"):
        fsdp_strategy(wrap_layers=["codetr.models.nope.Layer"])
    with pytest.raises(TypeError, match="not an nn.Module"):
        fsdp_strategy(wrap_layers=["codetr.lightning.strategies.fsdp_strategy"])


def test_activation_checkpointing_policy_recomputes_with_identical_gradients():
    images, sizes, targets = batch()
    plain, checkpointed = detector().train(), detector().train()
    names = apply_activation_checkpointing(checkpointed, (DinoDecoderLayer,))
    assert names == ["query_head.transformer.decoder.layers.0", "query_head.transformer.decoder.layers.1"]
    assert apply_activation_checkpointing(checkpointed, (DinoDecoderLayer,)) == []  # never wrapped twice
    calls = []
    checkpointed.query_head.transformer.decoder.layers[0].ffn.register_forward_pre_hook(lambda *a: calls.append(1))
    for model in (plain, checkpointed):
        torch.manual_seed(7)
        sum(v for k, v in model(images, sizes, targets).items() if "loss" in k).backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    # forward runs of decoder layer 0 (seen by its FFN) in one step: main + DN queries and two groups of positive
    # queries, each once in forward and once recomputed in backward -- twice the un-checkpointed count
    plain_calls = []
    plain.query_head.transformer.decoder.layers[0].ffn.register_forward_pre_hook(lambda *a: plain_calls.append(1))
    torch.manual_seed(7)
    plain(images, sizes, targets)
    assert len(calls) == 2 * len(plain_calls)
    with torch.no_grad():  # inference: nothing to recompute
        calls.clear()
        checkpointed.eval()(images, sizes)
        assert len(calls) == 1


def _step(model: torch.nn.Module, rank: int) -> tuple[float, float]:
    """One training step's loss and clipped total gradient norm on this rank's image."""
    images, sizes, targets = batch()
    torch.manual_seed(100 + rank)  # the same denoising noise for the DDP and the FSDP model
    losses = model(images[rank : rank + 1], sizes[rank : rank + 1], targets[rank : rank + 1])
    loss = sum(v for k, v in losses.items() if "loss" in k)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.1)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    return float(loss.detach()), float(norm)


def _worker(rank: int, world: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        reference = detector().train()
        reference.query_head.transformer.encoder.checkpoint_layers = 1  # FSDP2 composes with the model's checkpointing
        ddp = torch.nn.parallel.DistributedDataParallel(reference)
        results[f"ddp{rank}"] = _step(ddp, rank)
        sharded = detector().train()
        sharded.query_head.transformer.encoder.checkpoint_layers = 1
        mesh = dist.device_mesh.init_device_mesh("cpu", (world,))
        # decoder layers checkpointed by the strategy's policy, the first encoder layer by the model itself
        FullyShardedStrategy(wrap_layers=LAYERS, checkpoint_layers=LAYERS[1:2]).shard(sharded, mesh)
        units = [m for m in sharded.modules() if isinstance(m, FSDPModule)]
        results[f"units{rank}"] = len(units)
        results[f"fsdp{rank}"] = _step(sharded, rank)
        worst = 0.0
        for (name, p_ddp), (_, p_fsdp) in zip(reference.named_parameters(), sharded.named_parameters(), strict=True):
            assert isinstance(p_fsdp, DTensor) and p_fsdp.to_local().numel() <= p_ddp.numel(), name
            if p_ddp.grad is None:
                assert p_fsdp.grad is None, name
                continue
            full = p_fsdp.grad.full_tensor()
            worst = max(worst, float(((full - p_ddp.grad).abs() / (p_ddp.grad.abs().max() + 1e-12)).max()))
        results[f"worst{rank}"] = worst
        # NaN predictions on rank 0 only: matching tolerates them (raising there would leave rank 1 waiting in the
        # sharded backward's collectives), both ranks finish the step and both decide to skip it
        sharded.zero_grad(set_to_none=True)
        images, sizes, targets = batch()
        image = images[rank : rank + 1].clone().fill_(float("nan") if rank == 0 else 0.0)
        with tolerate_nonfinite_costs():
            losses = sharded(image, sizes[rank : rank + 1], targets[rank : rank + 1])
        sum(v for k, v in losses.items() if "loss" in k).backward()
        guard = NonFiniteStepGuard()
        guard.note(nonfinite_terms(losses))
        results[f"skip{rank}"] = guard.decide(list(sharded.parameters()), torch.device("cpu"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_fsdp2_step_has_the_gradients_of_the_ddp_step_and_skips_nan_steps_on_every_rank(tmp_path):
    results = run_ranks(_worker, tmp_path)
    model = detector()
    expected_units = 1 + sum(isinstance(m, (DeformableEncoderLayer, DinoDecoderLayer)) for m in model.modules()) + sum(
        type(m).__name__ == "Bottleneck" for m in model.modules())
    for rank in range(2):
        assert results[f"units{rank}"] == expected_units
        ddp_loss, ddp_norm = results[f"ddp{rank}"]
        fsdp_loss, fsdp_norm = results[f"fsdp{rank}"]
        assert fsdp_loss == pytest.approx(ddp_loss, rel=1e-6)
        assert fsdp_norm == pytest.approx(ddp_norm, rel=1e-5)  # the norm over all shards = the norm of the whole
        assert results[f"worst{rank}"] < 1e-5  # clipped, rank-averaged gradients (relative to each tensor's max)
    assert "loss_cls=nan" in results["skip0"] and results["skip1"]  # rank 1: NaN gradient shards or rank 0's flag


def _backbones() -> dict[str, torch.nn.Module]:
    """Small ResNet / Swin / ViT (each with its own activation checkpointing on), the same on every rank."""
    from test_backbones import _small_swin, _small_vit

    from codetr.models.backbones import ResNet

    torch.manual_seed(0)
    return {"resnet": ResNet(base_channels=8), "swin": _small_swin(with_cp=True),
            "vit": _small_vit(use_checkpoint=True)}


def _backbone_worker(rank: int, world: int, init_file: str, wrap_layers: list[str], results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        mesh = dist.device_mesh.init_device_mesh("cpu", (world,))
        plain, sharded = _backbones(), _backbones()
        strategy = FullyShardedStrategy(wrap_layers=wrap_layers)
        images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
        for name, model in plain.items():
            model.train()
            shard = strategy.shard(sharded[name].train(), mesh)
            units = sum(isinstance(m, FSDPModule) for m in shard.modules())
            # both ranks see the same image, so the rank-averaged gradient is the single-process one
            expected, got = model(images), shard(images)
            sum(o.square().mean() for o in expected).backward()
            sum(o.square().mean() for o in got).backward()
            worst = max(float((a - b).detach().abs().max()) for a, b in zip(expected, got, strict=True))
            for (key, p), (_, q) in zip(model.named_parameters(), shard.named_parameters(), strict=True):
                if p.grad is not None:
                    worst = max(worst, float((q.grad.full_tensor() - p.grad).abs().max()
                                             / (p.grad.abs().max() + 1e-12)))
            results[f"{name}{rank}"] = (units, worst)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_fsdp2_yaml_policy_shards_each_backbone_the_way_it_is_called(compose_cfg, tmp_path):
    """Parameters of a unit are gathered only when the unit is called as a module: a wrap class whose instances
    the backbone bypasses (e.g. Swin blocks, whose parts it calls directly) would fail here."""
    wrap_layers = list(compose_cfg("train", ["trainer=fsdp"]).trainer.strategy.wrap_layers)
    results = run_ranks(_backbone_worker, tmp_path, wrap_layers)
    for name in ("resnet", "swin", "vit"):
        for rank in range(2):
            units, worst = results[f"{name}{rank}"]
            assert units > 2, name  # the root and several wrapped layers
            assert worst < 1e-5, (name, worst)


def _train(run_dir: Path, log_dir: Path, epochs: int, *extra: str) -> subprocess.CompletedProcess:
    overrides = [item for item in TINY if item != "callbacks=none"]
    command = [sys.executable, "-m", "codetr.train", *overrides, "callbacks=ema", "~callbacks.progress_bar",
               "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", f"trainer.max_epochs={epochs}",
               "+trainer.limit_val_batches=1", "scheduler.milestones=[1]", f"paths.log_dir={log_dir}",
               f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_lightning_fsdp2_run_writes_a_full_checkpoint_and_resumes(compose_cfg, tmp_path):
    first = tmp_path / "first"
    _train(first, tmp_path, 1)
    state = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2  # 8 images over 2 ranks x batch 2
    # one full checkpoint: whole tensors that load into a single-device detector; EMA gathered as whole tensors too
    cfg = compose_cfg("train", [item for item in TINY if item != "callbacks=none"])
    single = instantiate_checked(cfg.model.detector)
    own = single.state_dict()
    weights = {k.removeprefix("detector."): v for k, v in state["state_dict"].items()}
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in own.items()}
    single.load_state_dict(weights)
    ema = {k.removeprefix("detector."): v for k, v in state["ema_state_dict"].items()}
    assert {k: v.shape for k, v in ema.items()} == {k: v.shape for k, v in own.items()}
    changed = weights["query_head.transformer.encoder.layers.0.ffn.fc1.weight"]
    assert not torch.equal(ema["query_head.transformer.encoder.layers.0.ffn.fc1.weight"], changed)
    optimizer = state["optimizer_states"][0]
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == sum(p.requires_grad for p in single.parameters())
    assert all(entry["exp_avg"].shape == entry["exp_avg_sq"].shape for entry in optimizer["state"].values())

    second = tmp_path / "second"
    _train(second, tmp_path, 2, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    final = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # the final last.ckpt is the epoch-end one of the second epoch (index 1; codetr.lightning.step_checkpoint)
    assert final["global_step"] == 4 and final["epoch"] == 1
    assert final["lr_schedulers"][0]["last_epoch"] == 2
    steps = {float(entry["step"]) for entry in final["optimizer_states"][0]["state"].values()}
    assert steps == {4.0}  # AdamW's moments continued from the checkpoint (not restarted)
    assert final["callbacks"]["ExpMomentumEMA"]["steps"] == 4
