"""Non-finite steps are skipped, named, counted and, after too many in a row, stop training with the last good
weights on disk (codetr.lightning.nonfinite through CoDETRModule, in a real Lightning Trainer)."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from codetr.data import DetectionBatch
from codetr.lightning import CoDETRModule
from codetr.lightning.nonfinite import NonFiniteStepGuard, nonfinite_terms
from codetr.models.losses.matcher import HungarianMatcher, NonFiniteCostError

OPTIMIZER = {"lr": 0.1, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8, "backbone_lr_mult": 1.0}
SCHEDULER = {"milestones": [100], "gamma": 0.1}


class ScriptedDetector(nn.Module):
    """A two-parameter "detector" whose training losses turn bad at chosen calls: ``nan_loss`` (a NaN loss term),
    ``nan_grad`` (finite loss, NaN gradient) or ``nan_match`` (NaN predictions through the real Hungarian matcher)."""

    def __init__(self, script: dict[int, str]):
        super().__init__()
        self.backbone = nn.Linear(2, 1)
        self.script, self.calls = script, 0

    def forward(self, images, image_sizes, targets=None):
        kind, self.calls = self.script.get(self.calls), self.calls + 1
        w = self.backbone.weight
        losses = {"loss_cls": ((w - 3.0) ** 2).sum(), "loss_bbox": (self.backbone.bias - 1.0).abs().sum()}
        if kind == "nan_loss":
            losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        elif kind == "nan_grad":
            losses["loss_cls"] = losses["loss_cls"] + torch.sqrt((w - w.detach()).abs()).sum()  # value 0, grad NaN
        elif kind == "nan_match":
            logits = torch.full((3, 2), float("nan")) * w.sum()  # (Q, K) NaN class logits that depend on w
            boxes = torch.full((3, 4), 0.5)
            rows, _ = HungarianMatcher()(logits[None], boxes[None], [torch.tensor([[0.5, 0.5, 0.2, 0.2]])],
                                        [torch.tensor([1])], torch.tensor([[8.0, 8.0, 8.0, 8.0]]))[0]
            losses["loss_cls"] = losses["loss_cls"] + logits[rows].sum()
        return losses


def batches(count: int) -> list[DetectionBatch]:
    image = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    return [DetectionBatch(images=image, image_sizes=torch.tensor([[8, 8]]), padding_mask=torch.zeros(1, 8, 8,
            dtype=torch.bool), targets=[{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}],
            orig_sizes=torch.tensor([[8, 8]]), scale_factors=torch.ones(1, 2), image_ids=torch.tensor([i]))
            for i in range(count)]


def fit(tmp_path, script: dict[int, str], steps: int, max_consecutive: int = 5):
    detector = ScriptedDetector(script)
    module = CoDETRModule(detector, OPTIMIZER, SCHEDULER, max_consecutive_nonfinite=max_consecutive)
    history = []

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            history.append(detector.backbone.weight.detach().clone())

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Recorder(), checkpoint], gradient_clip_val=0.1,
                         default_root_dir=tmp_path)
    error = None
    try:
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(steps), batch_size=None))
    except FloatingPointError as raised:
        error = raised
    return module, history, error


def test_nonfinite_terms_are_named():
    losses = {"loss_cls": torch.tensor(1.0), "d3.loss_bbox": torch.tensor(float("nan")), "acc": torch.tensor(
        float("nan")), "loss_list": [torch.tensor(2.0), torch.tensor(float("inf"))]}
    assert nonfinite_terms(losses) == ["d3.loss_bbox=nan", "loss_list[1]=inf"]


@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad", "nan_match"])
def test_bad_step_is_skipped_and_named(tmp_path, caplog, kind):
    with caplog.at_level(logging.WARNING, logger="codetr.lightning.nonfinite"):
        module, history, error = fit(tmp_path, {1: kind}, steps=4)
    assert error is None
    assert torch.equal(history[1], history[0]), "the bad step changed the weights"
    assert not torch.equal(history[2], history[1]), "training did not go on after the bad step"
    assert all(torch.isfinite(h).all() for h in history)
    expected = {"nan_loss": "loss_bbox=nan",
                "nan_grad": "non-finite gradients with finite loss terms (backbone.weight)",
                "nan_match": "loss_cls=nan"}
    assert "step 1 skipped" in caplog.text and expected[kind] in caplog.text
    assert module.nonfinite_guard.skipped_total == 1 and module.nonfinite_guard.consecutive == 0


def test_nan_predictions_raise_in_the_matcher_outside_training():
    with pytest.raises(NonFiniteCostError, match="image 0 of the batch has 2 non-finite costs"):
        HungarianMatcher()(torch.full((1, 2, 2), float("nan")), torch.full((1, 2, 4), 0.5),
                           [torch.tensor([[0.5, 0.5, 0.2, 0.2]])], [torch.tensor([1])], torch.full((1, 4), 8.0))


def test_a_good_step_resets_the_count(tmp_path):
    module, _, error = fit(tmp_path, {1: "nan_loss", 2: "nan_loss", 4: "nan_loss", 5: "nan_loss"}, steps=7,
                           max_consecutive=3)
    assert error is None and module.nonfinite_guard.skipped_total == 4


def test_consecutive_bad_steps_stop_training_and_keep_the_last_good_checkpoint(tmp_path):
    _, history, error = fit(tmp_path, {i: "nan_loss" for i in range(2, 20)}, steps=20, max_consecutive=3)
    assert error is not None and "3 consecutive" in str(error) and "loss_bbox=nan" in str(error)
    assert len(history) == 4  # steps 0-3 finished; step 4 (the third bad one) raised
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    weight = last["state_dict"]["detector.backbone.weight"]
    assert torch.isfinite(weight).all() and torch.equal(weight, history[1])  # weights of the last good step


def _ddp_worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        guard = NonFiniteStepGuard(max_consecutive=2)
        parameter = nn.Parameter(torch.ones(3))
        parameter.grad = torch.ones(3)
        guard.note(["loss_cls=nan"] if rank == 0 else [])
        reasons = guard.decide([parameter], torch.device("cpu"))
        if reasons:
            guard.skip([parameter], reasons, step=0)
        results[rank] = (reasons, parameter.grad is None)
    finally:
        dist.destroy_process_group()


def test_a_bad_step_on_one_rank_is_skipped_on_every_rank(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        context = mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=False,
                                     start_method="spawn")
        for process in context.processes:
            process.join(timeout=120)
        assert all(p.exitcode == 0 for p in context.processes), "a rank hung or failed"
        results = dict(results)
    assert results[0] == (["loss_cls=nan"], True)
    assert results[1][1] is True and "another rank" in results[1][0][0]


def test_guard_rejects_a_negative_limit():
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteStepGuard(-1)
