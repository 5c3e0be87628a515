"""The paper's claim in miniature: each detector with and without its auxiliary branches, same schedule, several
seeds, validation AP per epoch (``python -m codetr.claim``, config ``conf/claim.yaml``).

:mod:`codetr.claim.runs` plans and runs the training jobs (one subprocess and one directory per model and seed,
finished runs skipped, interrupted ones resumed); :mod:`codetr.claim.report` turns their AP per epoch into the
table (markdown + JSON) and the plot.
"""

from codetr.claim.report import summarise, write_report
from codetr.claim.runs import ClaimRun, available_models, plan_runs, run_all

__all__ = ["ClaimRun", "available_models", "plan_runs", "run_all", "summarise", "write_report"]
