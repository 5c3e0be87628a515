"""The GPU check (``make gpu-check``) cannot rot: its CPU rehearsal runs every part end to end through the same
bootstrap script as on the GPU machine, and its time-keeping (budgets, killing a part that overruns) works."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from codetr.bench.gpu_check import PARTS, ROW_PREFIX, run_check, run_child
from codetr.bench.gpu_verdicts import TARGET_IMAGES_PER_S, verdicts

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 75 s on an idle 2-core machine: five child processes, one of them a codetr.train run
def test_dry_run_measures_every_part_and_writes_the_table_and_json(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    log = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, log
    state = json.loads((out / "gpu_check.json").read_text())
    assert state["mode"] == "dry-run" and "finished" in state
    # the bootstrap's package folder maps this checkout's src/codetr (and conf/ as codetr.conf)
    assert Path(state["machine"]["codetr"]) == REPO / "src" / "codetr"
    assert set(state["parts"]) == set(PARTS)
    for part in PARTS:
        assert state["parts"][part]["status"] == "done", (part, state["parts"][part], log)
        rows = [r for r in state["rows"] if r["part"] == part]
        assert rows, (part, log)
        for row in rows:
            assert row["status"] in ("measured", "skipped"), (row, log)
            assert row["status"] == "measured" or row["reason"], row
    measured = {(r["part"], r["case"]): r["metrics"] for r in state["rows"] if r["status"] == "measured"}
    if importlib.util.find_spec("triton") is not None:
        assert measured[("triton", "triton fp32")]["matches_reference"], measured[("triton", "triton fp32")]
    assert measured[("r50", "train bf16-mixed, ckpt 1 enc layers")]["images_per_s"] > 0
    assert ("r50", "train fp32, ckpt off") in measured
    breakdown = measured[("r50", "breakdown bf16-mixed, ckpt 1 enc layers")]["seconds_per_step"]
    assert {"backbone", "encoder", "decoder passes", "aux heads", "matching", "backward", "optimiser"} <= set(breakdown)
    assert "val/AP" in measured[("train", "python -m codetr.train")]["val"]
    assert measured[("compile", "compiled steps")]["step_s"] > 0
    assert next(v["name"] for v in state["verdicts"]).startswith("H100 target")
    table = (out / "gpu_check.txt").read_text()
    assert "codetr GPU check (dry-run)" in table and "codetr GPU check (dry-run)" in result.stdout
    for part in (*PARTS, "verdict"):
        assert part in table


def test_a_part_that_overruns_its_budget_is_killed_and_keeps_its_finished_rows():
    row = json.dumps({"part": "p", "case": "first", "status": "measured"})
    script = (f"import time; print('@gpu-check case first'); print({ROW_PREFIX + row!r});"
              "print('@gpu-check case second', flush=True); time.sleep(120)")
    lines = []
    outcome = run_child([sys.executable, "-c", script], budget_s=3, on_line=lines.append, heartbeat_s=1)
    assert outcome.status == "killed" and outcome.seconds < 30
    assert outcome.last_case == "second" and "second" in outcome.reason
    assert ROW_PREFIX + row in lines


def test_a_failing_part_reports_its_exit_code_and_last_output():
    outcome = run_child([sys.executable, "-c", "import sys; print('out of cheese'); sys.exit(3)"], budget_s=60,
                        on_line=lambda line: None)
    assert outcome.status == "failed" and "exit code 3" in outcome.reason and "out of cheese" in outcome.reason


def test_parts_without_time_left_are_skipped_with_the_reason(tmp_path):
    results = run_check(list(PARTS), dry_run=True, out_dir=tmp_path, total_budget_s=1.0,
                        console=Console(file=io.StringIO()))
    state = json.loads((tmp_path / "gpu_check.json").read_text())
    assert state == json.loads(json.dumps(results.state, default=str))
    for part in PARTS:
        assert state["parts"][part]["status"] == "skipped"
        assert "time budget" in state["parts"][part]["reason"]
    assert state["rows"] == [] and all(v["status"] == "not measured" for v in state["verdicts"])


def _row(part, case, **metrics):
    return {"part": part, "case": case, "status": "measured", "metrics": metrics}


def test_verdicts_compare_the_r50_bf16_row_with_the_target_and_judge_the_triton_kernels():
    train = {"image_size": 1024, "batch": 2, "encoder_checkpoint_layers": 4, "peak_allocated_gib": 9.0}
    exact = {"fwd_ms": 30.0, "fwd_bwd_ms": 90.0, "max_rel_error": 1e-7, "matches_reference": True, "tolerance": 1e-4}
    rows = [_row("r50", "train bf16-mixed, ckpt 4 enc layers", images_per_s=TARGET_IMAGES_PER_S + 1, **train),
            _row("r50", "train bf16-mixed, ckpt off", images_per_s=1.0, **train),
            _row("r50", "train bf16-mixed, ckpt 4 enc layers, attention triton", images_per_s=31.5, **train),
            _row("triton", "exact fp32", **exact),
            _row("triton", "triton fp32", **{**exact, "fwd_ms": 3.0, "fwd_bwd_ms": 10.0})]
    target, triton, memory = verdicts(rows, "full")
    assert target["status"] == "meets" and "Triton kernels 31.50 img/s" in target["text"]
    assert triton["status"] == "yes" and "9.0x" in triton["text"]
    assert "9.00 GiB" in memory["text"]
    rows[0]["metrics"]["images_per_s"] = TARGET_IMAGES_PER_S - 1
    rows[4]["metrics"]["matches_reference"] = False
    target, triton, _ = verdicts(rows, "full")
    assert target["status"] == "below" and triton["status"] == "no"
