"""Empirical privacy auditing: lower bounds ε̂ on the ε a training run really has, from one run with canaries.

* [bounds][flashnorm.auditing.bounds]: ε̂ from attack scores of canaries that were in and out of the training set
  (Steinke, Nasr and Jagielski 2023; Mahloujifar, Melis and Chaudhuri 2024), AUROC and TPR at a given FPR.
  numpy and scipy only.
* [canaries][flashnorm.auditing.canaries]: white-box canaries that audit a real run through ``make_private``.

A correct DP pipeline gives ε̂ ≤ ε (the accountant's) with probability ≥ 95% at the default significance; a
pipeline that leaks more than it reports can give ε̂ > ε. See the documentation page "Auditing a DP training run".
"""

from .bounds import auroc, epsilon_one_run, epsilon_one_run_fdp, gaussian_mu_for_epsilon, tpr_at_fpr
from .canaries import AuditResult, CanaryAudit, CanaryDataset, CanaryModel

__all__ = [
    "AuditResult",
    "CanaryAudit",
    "CanaryDataset",
    "CanaryModel",
    "auroc",
    "epsilon_one_run",
    "epsilon_one_run_fdp",
    "gaussian_mu_for_epsilon",
    "tpr_at_fpr",
]
