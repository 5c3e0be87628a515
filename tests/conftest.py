"""Project-wide pytest set-up.

* Tests in files whose name contains ``oracle`` are marked ``oracle`` automatically.
* Under CI (env ``CI`` = true/1/yes) an oracle parity test must not be skipped silently: a skipped test that is
  marked ``oracle`` -- or whose skip reason mentions the oracle -- is reported as a failure, so ``make test``
  fails when the oracle data (``CODETR_ORACLE_DIR``, default ``<repo>/../shared/oracle``) is missing.
* Parity tests (file name with ``oracle`` or ``parity``) run with oneDNN switched off (``reference_kernels``): its
  float32 convolutions pick CPU-specific kernels (AMX / AVX-512 brgemm on Intel hosts), whose rounding moved one
  ReLU input of the Co-Deformable-DETR ATSS branch across zero (3.7e-7 instead of the reference's -1.5e-8) and so
  one training gradient by 3 % on an Intel AMX host. The native kernels reproduce the recorded numbers there (1 and
  2 threads, both Co-Deformable-DETR references); the model code is the same either way.
* Fixtures shared by the application tests: ``compose_cfg`` (Hydra compose of ``codetr.conf`` with a tmp output dir).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "oracle" in Path(str(item.fspath)).name:
            item.add_marker(pytest.mark.oracle)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not (CI and report.skipped):
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if item.get_closest_marker("oracle") is not None or "oracle" in reason.lower():
        report.outcome = "failed"
        report.longrepr = f"oracle parity test was skipped under CI ({reason}); CI must run it"


@pytest.fixture(autouse=True, scope="module")
def reference_kernels(request: pytest.FixtureRequest):
    """oneDNN off for parity tests (module docstring); other tests run with the default kernels."""
    name = Path(str(request.path)).name
    if "oracle" not in name and "parity" not in name:
        yield
        return
    import torch

    with torch.backends.mkldnn.flags(enabled=False):
        yield


def compose_for(tmp_path: Path, config_name: str = "train", overrides: list[str] | None = None):
    """The composed ``DictConfig`` of ``config_name`` with ``overrides`` (hydra node included, HydraConfig set,
    outputs under ``tmp_path``), ready for ``codetr.train.train``; module-scoped fixtures call it directly."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import codetr.utils  # noqa: F401  (registers the resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_module("codetr.conf", version_base="1.3"):
        cfg = compose(config_name, overrides=[f"paths.log_dir={tmp_path}", *(overrides or [])],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture()
def compose_cfg(tmp_path: Path):
    """``compose_cfg(config_name, overrides)`` -> :func:`compose_for` under this test's ``tmp_path``."""
    from hydra.core.global_hydra import GlobalHydra

    def _compose(config_name: str = "train", overrides: list[str] | None = None):
        return compose_for(tmp_path, config_name, overrides)

    yield _compose
    GlobalHydra.instance().clear()
