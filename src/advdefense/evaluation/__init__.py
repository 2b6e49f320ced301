"""Honest evaluation: per-example results, repeated stochastic verdicts, confidence intervals,
AutoAttack-style suites, attack-failure checks and reports.

``evaluate(model, data, specs)`` (:mod:`.harness`), ``run_suite(model, data, suite=...)``
(:mod:`.suite`), ``run_checks`` (:mod:`.checks`), ``write_report`` (:mod:`.report`);
``cas_attack_specs`` (:mod:`.cas_specs`) builds the main-logit and adaptive rows for CAS models.
"""

from .cas_specs import cas_attack_specs
from .checks import CheckResult, format_checks, run_checks
from .harness import AttackSpec, evaluate, load_data, standard_attack_specs
from .protocols import PROTOCOLS, Verdict, run_protocol, verdict
from .results import EntryResult, EvalResult, TraceSummary
from .stats import Accuracy, accuracy, clopper_pearson

__all__ = ["PROTOCOLS", "Accuracy", "AttackSpec", "CheckResult", "EntryResult", "EvalResult",
           "TraceSummary", "Verdict", "accuracy", "cas_attack_specs", "clopper_pearson",
           "evaluate", "format_checks", "load_data", "run_checks", "run_protocol",
           "standard_attack_specs", "verdict"]
