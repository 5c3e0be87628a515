"""Two-process DDP (gloo, CPU): the same normalised losses as one process on the same global batch, and a full
training step with DDP (no find_unused_parameters) even when one rank has no ground truth."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_support import run_ranks
from test_co_detr import batch, detector

SYNCED = ["loss_cls", "loss_bbox", "loss_iou", "d0.loss_cls", "d0.loss_bbox", "d0.loss_iou",
          "enc_loss_cls", "enc_loss_bbox", "enc_loss_iou"]


def _losses(model, images, sizes, targets):
    model.query_head.use_denoising = False  # DN groups depend on the local batch's largest GT count
    model.query_head.criterion.sync_cls_avg_factor = True
    return model(images, sizes, targets)


def _worker(rank: int, world: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        images, sizes, targets = batch()
        model = detector().train()
        losses = _losses(model, images[rank : rank + 1], sizes[rank : rank + 1], targets[rank : rank + 1])
        results[f"losses{rank}"] = {k: float(losses[k].detach()) for k in SYNCED}
        # one DDP step where rank 1 has no ground truth at all
        wrapped = torch.nn.parallel.DistributedDataParallel(detector().train(), find_unused_parameters=False)
        local = ([targets[0]] if rank == 0
                 else [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
        step = wrapped(images[rank : rank + 1], sizes[rank : rank + 1], local)
        sum(v for k, v in step.items() if "loss" in k).backward()
        grad = wrapped.module.query_head.transformer.encoder.layers[0].ffn.fc1.weight.grad
        results[f"grad{rank}"] = grad.clone()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_process_ddp_matches_single_process_and_survives_a_rank_without_ground_truth(tmp_path):
    results = run_ranks(_worker, tmp_path)
    images, sizes, targets = batch()
    single = _losses(detector().train(), images, sizes, targets)
    for key in SYNCED:
        # DDP averages gradients, i.e. optimises the mean of the ranks' losses
        mean = (results["losses0"][key] + results["losses1"][key]) / 2
        assert abs(mean - float(single[key])) <= 1e-5 * abs(float(single[key])) + 1e-6, key
    torch.testing.assert_close(results["grad0"], results["grad1"])  # gradients all-reduced identically
