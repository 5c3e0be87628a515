"""``python -m codetr.claim [key=value ...]`` (``make claim``): trains every model of the selected pairs with every
seed under one budget (``conf/claim.yaml``), then writes ``claim.md``, ``claim.json`` and ``claim.png`` into
``<out_dir>/<budget>/``. ``report_only=true`` writes them from the runs finished so far without training.

Examples::

    python -m codetr.claim                                   # every pair whose model configs exist, 3 seeds
    python -m codetr.claim select=[co_dino] seeds=[0] epochs=1 steps_per_epoch=8
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from codetr.claim.report import summarise, write_report
from codetr.claim.runs import Budget, available_models, plan_runs, run_all, select_pairs
from codetr.utils import check_known_keys

log = logging.getLogger(__name__)

KEYS = ("task_name", "paths", "pairs", "select", "seeds", "experiment", "epochs", "steps_per_epoch", "val_batches",
        "train_overrides", "shared_data", "out_dir", "report_only")


def claim(cfg: DictConfig) -> dict[str, Path]:
    """Runs (or, with ``report_only``, only collects) the comparison; returns the paths of the written report."""
    check_known_keys(cfg, (*KEYS, "hydra"), "claim")
    pairs, skipped = select_pairs(OmegaConf.to_container(cfg.pairs), None if cfg.select is None
                                  else list(cfg.select), available_models())
    for message in skipped:
        log.warning(message)
    budget = Budget(experiment=cfg.experiment, epochs=int(cfg.epochs),
                    steps_per_epoch=None if cfg.steps_per_epoch is None else int(cfg.steps_per_epoch),
                    val_batches=None if cfg.val_batches is None else int(cfg.val_batches),
                    train_overrides=tuple(cfg.train_overrides),
                    shared_data=bool(cfg.shared_data))
    budget_dir = Path(cfg.out_dir).absolute() / budget.name
    runs = plan_runs(pairs, list(cfg.seeds), budget, budget_dir)
    log.info("claim: %d runs (%s; seeds %s) under %s", len(runs), ", ".join(f"{a} vs {b}" for a, b in pairs),
             list(cfg.seeds), budget_dir)
    results = run_all(runs, train_missing=not cfg.report_only, echo=log.info)
    if not results:
        raise RuntimeError(f"claim: no finished run under {budget_dir} to report")
    paths = write_report(summarise(results, pairs, budget.to_dict()), budget_dir)
    log.info("claim: wrote %s", ", ".join(str(p) for p in paths.values()))
    print(paths["markdown"].read_text())
    return paths


@hydra.main(version_base="1.3", config_path="pkg://codetr.conf", config_name="claim")
def main(cfg: DictConfig) -> None:
    claim(cfg)


if __name__ == "__main__":
    main()
