"""``python -m codetr.claim``: pair selection, reading AP per epoch from a CSV log, and one tiny comparison
(Co-DINO vs plain DINO, 1 seed, 2 epochs of 2 steps on 8 images of 64 px) that writes the table, the JSON and the
plot, then skips its finished runs when run again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from codetr.claim import available_models
from codetr.claim.__main__ import claim
from codetr.claim.runs import Budget, ClaimRun, read_epoch_metrics, select_pairs

TINY_TRAIN = ["data.generate.num_train=8", "data.generate.num_val=4", "data.generate.image_size=64",
              "data.datamodule.val_batch_size=2", "aug.scales=[64]", "aug.crop_scales=[64]", "aug.crop_size=[48,64]",
              "aug.test_scale=64"]


def test_select_pairs_skips_or_refuses_missing_model_configs():
    pairs = [["co_dino", "dino"], ["co_new", "new"]]
    kept, skipped = select_pairs(pairs, None, {"co_dino", "dino"})
    assert kept == [("co_dino", "dino")]
    assert len(skipped) == 1 and "conf/model/co_new.yaml" in skipped[0] and "conf/model/new.yaml" in skipped[0]
    with pytest.raises(ValueError, match="conf/model/new.yaml"):
        select_pairs(pairs, ["co_new"], {"co_dino", "dino", "co_new"})
    with pytest.raises(ValueError, match="not the first model of a pair"):
        select_pairs(pairs, ["dino"], {"co_dino", "dino"})
    with pytest.raises(ValueError, match="each entry of pairs"):
        select_pairs([["co_dino"]], None, {"co_dino"})
    assert {"co_dino", "dino"} <= available_models()


def test_read_epoch_metrics_takes_the_last_row_of_a_replayed_epoch(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train/loss,val/AP,val/AP50\n0,9,1.5,,\n0,9,,0.1,0.2\n1,19,,0.25,0.5\n"
                   "1,19,,0.3,0.6\n")
    assert read_epoch_metrics(log) == {"val/AP": [0.1, 0.3], "val/AP50": [0.2, 0.6]}
    log.write_text("epoch,step,val/AP\n1,19,0.3\n")
    with pytest.raises(ValueError, match="epochs \\[1\\]"):
        read_epoch_metrics(log)


def test_budget_names_and_commands(tmp_path):
    budget = Budget("demo", 3, 64, None)
    assert budget.name == "demo_e3_s64_vall"
    assert Budget("demo", 3, 64, None, ("aug.test_scale=64",)).name.startswith("demo_e3_s64_vall_")
    run = ClaimRun("dino", 1, tmp_path / budget.name / "dino" / "seed1", budget)
    command = run.command("python")
    assert command[:3] == ["python", "-m", "codetr.train"]
    assert {"model=dino", "seed=1", "trainer.max_epochs=3", "++trainer.limit_train_batches=64",
            f"data.root={tmp_path / budget.name / 'data'}"} <= set(command)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Budget("demo", 3, 0, None)


@pytest.mark.slow  # two codetr.train child processes: about 75 s of CPU in all, most of it their start-up
def test_claim_tiny_budget_writes_table_json_and_plot(compose_cfg, tmp_path):
    overrides = ["select=[co_dino]", "seeds=[0]", "epochs=2", "steps_per_epoch=2", "val_batches=1",
                 "train_overrides=[" + ",".join(f'"{o}"' for o in TINY_TRAIN) + "]"]
    paths = claim(compose_cfg("claim", overrides))
    summary = json.loads(paths["json"].read_text())
    (pair,) = summary["pairs"]
    assert (pair["with_aux"], pair["without_aux"]) == ("co_dino", "dino")
    for model in ("co_dino", "dino"):
        data = pair["models"][model]
        assert data["seeds"] == [0] and len(data["ap"][0]) == 2 and len(data["per_epoch"]) == 2
        assert all(0.0 <= ap <= 100.0 for ap in data["ap"][0])
    assert len(pair["delta_mean"]) == 2
    table = paths["markdown"].read_text()
    assert "| epoch | co_dino (seeds 0) | dino (seeds 0) | Δ mean |" in table
    assert "\n| 1 | " in table and "\n| 2 | " in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = sorted(Path(paths["json"].parent).glob("*/seed0/claim_run.json"))
    assert len(results) == 2

    # a second call finds both runs finished: nothing is retrained, the report is rewritten from the same results
    stamps = [p.stat().st_mtime for p in results]
    start = time.perf_counter()
    again = claim(compose_cfg("claim", overrides))
    assert time.perf_counter() - start < 30
    assert [p.stat().st_mtime for p in results] == stamps
    assert json.loads(again["json"].read_text())["pairs"] == summary["pairs"]
