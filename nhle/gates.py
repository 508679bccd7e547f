"""Promotion gates: the conditions an unlearned model must meet before it may serve.

    from nhle.gates import evaluate_gates, all_passed
    results = evaluate_gates(report, parity, GateConfig())
    all_passed(results)   # -> bool; each result names the figure, the bound and whether it held

Pure functions over the report (nhle.experiment.forget) and the parity check (nhle.export).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nhle.config import GateConfig


@dataclass(frozen=True)
class GateResult:
    name: str
    value: float
    bound: float
    passed: bool
    rule: str

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.name}: {self.value:.4g} {self.rule} {self.bound:.4g} -> {'pass' if self.passed else 'FAIL'}"


def at_most(name, value, bound):
    value = float(value)
    return GateResult(name, value, float(bound), not math.isnan(value) and value <= bound, "<=")


def at_least(name, value, bound):
    value = float(value)
    return GateResult(name, value, float(bound), not math.isnan(value) and value >= bound, ">=")


def evaluate_gates(report: dict, parity: dict | None, config: GateConfig) -> list[GateResult]:
    """One result per gate. `parity` is nhle.export.check_parity's report (None = not run)."""
    unlearned = report["metrics"]["unlearned"]
    original = report["metrics"]["original"]
    drop_pp = 100 * (original["retain_test_acc"] - unlearned["retain_test_acc"])
    results = [
        at_most("forget_test_acc", unlearned["forget_test_acc"], config.max_forget_test_acc),
        at_most("unmasked_forget_test_acc", unlearned["unmasked_forget_test_acc"],
                 config.max_unmasked_forget_test_acc),
        at_most("retained_drop_pp", drop_pp, config.max_retained_drop_pp),
        at_least("retain_test_acc", unlearned["retain_test_acc"], config.min_retain_test_acc),
    ]
    if config.require_parity:
        results += parity_gates(parity)
    return results


def parity_gates(parity: dict | None) -> list[GateResult]:
    if parity is None:
        return [GateResult("parity", float("nan"), 1.0, False, "ran")]
    return [at_least("parity_argmax_agreement", parity["argmax_agreement"], 1.0),
            at_most("parity_max_abs_prob_diff", parity["max_abs_prob_diff"], parity["tolerance"]),
            at_most("parity_non_finite", parity.get("non_finite", 0), 0)]


def all_passed(results: list[GateResult]) -> bool:
    return all(r.passed for r in results)


def failure_reason(results: list[GateResult]) -> str:
    return "; ".join(r.describe() for r in results if not r.passed)
