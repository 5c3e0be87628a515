"""Training entry point: ``python -m codetr.train [experiment=...] [group=choice] [key=value]``.

Composes ``conf/train.yaml`` (package ``codetr.conf``), builds data, detector, Lightning module, callbacks,
loggers and trainer (only ``codetr.``/``torch.``/``torchvision.``/``lightning.`` targets are instantiated), fits
(``ckpt_path=...`` resumes), optionally tests, prints the AP table and returns ``optimized_metric`` (for sweeps).
The run directory is locked while the run writes there (:mod:`codetr.utils.run_lock`); partial checkpoint files
of killed runs are removed and ``ckpt_path=last`` / ``last_if_exists`` resolved (:mod:`codetr.lightning.resume`).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from codetr.checkpoint_io import load_detector_weights
from codetr.utils import check_known_keys, check_targets, instantiate_checked
from codetr.utils.logs import route_library_logs
from codetr.utils.printing import print_metrics
from codetr.utils.run_guard import RunEnvironmentError, exit_on_environment_error
from codetr.utils.run_lock import RunLock, is_launcher_rank_zero

if TYPE_CHECKING:
    from codetr.lightning import CoDETRModule

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """Generates the synthetic set first when the data config has a ``generate`` node (data=demo)."""
    if cfg.data.get("generate") is not None:
        instantiate_checked(cfg.data.generate)
    return instantiate_checked(cfg.data.datamodule)


def build_module(cfg: DictConfig, datamodule: Any | None = None) -> CoDETRModule:
    from codetr.inference.description import describe
    from codetr.lightning import CoDETRModule  # heavy import kept out of `--cfg` / `--help` paths

    detector = instantiate_checked(cfg.model.detector)
    if cfg.get("weights"):
        load_detector_weights(detector, cfg.weights, strict_classes=False)  # fine-tuning: K may differ
    compile_cfg = cfg.model.get("compile")
    if compile_cfg is not None and compile_cfg.enabled:
        from codetr.models.compile import compile_regions

        names = compile_regions(detector, list(compile_cfg.regions), mode=compile_cfg.mode,
                                dynamic=compile_cfg.dynamic, backend=compile_cfg.backend)
        log.info("torch.compile (%s, lazy): %s", compile_cfg.backend, ", ".join(names))
    class_names = getattr(datamodule, "class_names", None) if datamodule is not None else None
    category_ids = getattr(datamodule, "category_ids", None) if datamodule is not None else None
    description = describe(cfg, class_names, category_ids).to_dict()
    nonfinite = cfg.get("nonfinite")  # train.yaml only: evaluation and prediction never take an optimiser step
    guard = {} if nonfinite is None else {"check_finite": nonfinite.check,
                                          "max_consecutive_nonfinite": nonfinite.max_consecutive}
    return CoDETRModule(
        detector,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        pixel_mean=list(cfg.data.pixel_mean),
        pixel_std=list(cfg.data.pixel_std),
        class_names=class_names,
        description=description,
        **guard,
    )


def fetch_backbone_weights(cfg: DictConfig) -> None:
    """Resolve ``model.detector.backbone.weights`` to a local file before anything else is built, so that a missing
    pretrained file stops the run at once (:mod:`codetr.models.backbones.pretrained`: ``paths.weights_dir``, torch.hub
    and Hugging Face caches, then a download). The node then holds the local path. Skipped, with the node set to
    null, when detector ``weights`` or a resumed ``ckpt_path`` will overwrite the whole backbone anyway; a null
    node without either trains the backbone from scratch, which is logged as a warning."""
    from codetr.models.backbones.pretrained import resolve_weights

    backbone = cfg.model.detector.get("backbone")
    if backbone is None or "weights" not in backbone:
        return
    overwritten_by = ("weights" if cfg.get("weights") else
                      "ckpt_path" if cfg.get("ckpt_path") not in (None, "last_if_exists") else None)
    spec = backbone.weights
    if spec is not None and overwritten_by:
        log.info("%s=%s replaces every backbone weight: pretrained %s not loaded", overwritten_by,
                 cfg.get(overwritten_by), spec)
        spec = None
    elif spec is None and not overwritten_by:
        log.warning("model.detector.backbone.weights=null: the backbone (%s) starts from random weights, no "
                    "pretrained file is loaded", backbone.get("_target_"))
    elif spec is not None:
        spec = str(resolve_weights(spec, cfg.paths.get("weights_dir")))
    with open_dict(backbone):
        backbone.weights = spec


def check_config_keys(cfg: DictConfig) -> None:
    """Refuse keys nothing reads in nodes passed on as mappings (``nonfinite``, ``model.compile``; ``optimizer`` /
    ``scheduler`` and ``aug`` are checked where they are read) and group entries that are not objects to build."""
    if cfg.get("nonfinite") is not None:
        check_known_keys(cfg.nonfinite, ("check", "max_consecutive"), "nonfinite")
    if cfg.get("model") is not None and cfg.model.get("compile") is not None:
        check_known_keys(cfg.model.compile, ("enabled", "regions", "mode", "dynamic", "backend"), "model.compile")
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if node is not None and not (isinstance(node, DictConfig) and "_target_" in node):
                raise ValueError(f"{group}.{name} is not a {group[:-1] if group == 'callbacks' else group} to build "
                                 f"(no _target_): {node!r}; entries of {group} are objects, or null to drop one")


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate_checked(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    return instantiate_checked(
        cfg.trainer, callbacks=_instantiate_group(cfg.get("callbacks")), logger=_instantiate_group(cfg.get("logger"))
        or False,
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one training job with its run directory locked; returns the final callback metrics as floats."""
    check_targets(cfg)
    check_config_keys(cfg)
    with RunLock(Path(cfg.paths.output_dir), enabled=is_launcher_rank_zero()):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, float]:
    from codetr.lightning.resume import remove_partial_checkpoints, resolve_ckpt_path

    pl.seed_everything(cfg.seed, workers=True)
    fetch_backbone_weights(cfg)
    datamodule = build_datamodule(cfg)
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    if hasattr(datamodule, "setup"):
        datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    metrics: dict[str, float] = {}
    if trainer.is_global_zero:
        remove_partial_checkpoints(trainer)
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(trainer, cfg.get("ckpt_path")))
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.get("test", False):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    ap_metrics = {
        k: v for k, v in metrics.items()
        if k.startswith(("val/", "test/")) and k.split("/", 1)[1].removeprefix("segm_").startswith(("AP", "AR"))
    }
    if ap_metrics and trainer.is_global_zero:
        print_metrics(ap_metrics)
    return metrics


def last_stop_signal() -> int | None:
    from codetr.lightning.signals import last_stop_signal as recorded

    return recorded()


def _finish_wandb() -> None:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@hydra.main(version_base="1.3", config_path="pkg://codetr.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` (None if it was not logged)."""
    route_library_logs()  # Lightning's messages into Hydra's <run dir>/train.log too
    try:
        metrics = train(cfg)
    except RunEnvironmentError as error:  # full disk, unwritable directory: one line, not a traceback
        exit_on_environment_error(error)
    except SIGTERMException:  # stopped by SIGTERM / Ctrl-C after writing last.ckpt: 128 + signal, as shells expect
        stopped_by = last_stop_signal() or signal.SIGTERM
        log.info("stopped by %s: exit status %d", signal.Signals(stopped_by).name, 128 + stopped_by)
        raise SystemExit(128 + stopped_by) from None
    finally:
        _finish_wandb()
    name = cfg.get("optimized_metric")
    if name and name in metrics:
        return metrics[name]
    if name:
        log.warning("optimized_metric %s was not logged (available: %s)", name, sorted(metrics))
    return None


if __name__ == "__main__":
    main()
