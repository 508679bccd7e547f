"""Promotion gates: the conditions an unlearned model must meet before it may serve.

    from nhle.core.gates import evaluate_gates, all_passed
    results = evaluate_gates(report, parity, GateConfig())
    all_passed(results)   # -> bool; each result names the figure, the bound and whether it held

Pure functions over the report (nhle.core.experiment.forget_and_measure) and the parity check (nhle.core.export).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from nhle.core.config import GateConfig


@dataclass(frozen=True)
class GateResult:
    name: str
    value: float
    bound: float
    passed: bool
    rule: str
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        text = f"{self.name}: {self.value:.4g} {self.rule} {self.bound:.4g} -> {'pass' if self.passed else 'FAIL'}"
        return f"{text} ({self.detail})" if self.detail else text


def at_most(name, value, bound):
    value = float(value)
    return GateResult(name, value, float(bound), not math.isnan(value) and value <= bound, "<=")


def at_least(name, value, bound):
    value = float(value)
    return GateResult(name, value, float(bound), not math.isnan(value) and value >= bound, ">=")


def above(name, value, bound):
    value = float(value)
    return GateResult(name, value, float(bound), not math.isnan(value) and value > bound, ">")


def relearn_ratio(steps: float, reference_steps: float) -> float:
    """steps / reference_steps, the one ratio of relearn-attack steps (the relearn share, the
    relearn gate). A reference of 0 steps relearns at once, so no ratio exists: inf for a model
    that needs any step (it resists more than the reference), nan for one that needs none."""
    if reference_steps == 0:
        return math.inf if steps > 0 else math.nan
    return steps / reference_steps


def retained_drop_pp(original_acc: float, acc: float) -> float:
    """Retained test accuracy lost against the original model, in percentage points (the one
    definition of the retained drop: gates, audit, tracking and benchmarks use it)."""
    return 100 * (original_acc - acc)


def report_retained_drop_pp(report: dict) -> float:
    """A forget report's retained drop: its unlearned model against its original."""
    metrics = report["metrics"]
    return retained_drop_pp(metrics["original"]["retain_test_acc"], metrics["unlearned"]["retain_test_acc"])


def classes_left(num_classes: int, forgotten_before, forgetting) -> int:
    """How many classes a model still predicts once `forgetting` is forgotten on top of
    `forgotten_before` (the one "would this leave a class?" count)."""
    return num_classes - len(set(forgotten_before) | set(forgetting))


def check_a_class_is_left(num_classes: int, forgotten_before, forgetting, what: str) -> None:
    """ValueError naming `what` when forgetting it would leave no class to predict."""
    if classes_left(num_classes, forgotten_before, forgetting) < 1:
        raise ValueError(f"forgetting {what} would leave no class to predict")


def evaluate_gates(report: dict, parity: dict | None, config: GateConfig) -> list[GateResult]:
    """One result per gate. `parity` is nhle.core.export.check_parity's report (None = not run)."""
    unlearned = report["metrics"]["unlearned"]
    original = report["metrics"]["original"]
    drop_pp = report_retained_drop_pp(report)
    results = [
        at_most("forget_test_acc", unlearned["forget_test_acc"], config.max_forget_test_acc),
        at_most("unmasked_forget_test_acc", unlearned["unmasked_forget_test_acc"], config.max_unmasked_forget_test_acc),
        at_most("retained_drop_pp", drop_pp, config.max_retained_drop_pp),
        at_least("retain_test_acc", unlearned["retain_test_acc"], config.min_retain_test_acc),
    ]
    if "num_classes" in report:  # reports written before these gates existed lack it
        left = classes_left(report["num_classes"], report.get("previously_forgotten", []), report["forget_classes"])
        chance = 1 / left if left > 0 else 1.0
        skill = (unlearned["retain_test_acc"] - chance) / (1 - chance) if left > 1 else float("nan")
        results += [
            at_least("retained_classes", left, config.min_retained_classes),
            at_least("retain_skill", skill, config.min_retain_skill),
        ]
    results += relearn_gate(
        original, unlearned, config.min_relearn_gain, report.get("unlearn_config", {}).get("relearn_max_steps")
    )
    if config.require_parity:
        results += parity_gates(parity)
    return results


def base_gates(test_acc: float, parity: dict | None, config: GateConfig) -> list[GateResult]:
    """A base model's gates (trained or imported: nothing forgotten, so no report): the accuracy
    floor and, when required, parity."""
    return [at_least("test_acc", test_acc, config.min_retain_test_acc)] + (
        parity_gates(parity) if config.require_parity else []
    )


def relearn_gate(original: dict, unlearned: dict, bound: float, cap: int | None = None) -> list[GateResult]:
    """The relearn attack on the shipped weights must take more than `bound` times its steps on
    the mask-only model (the original's shipped weights): else the fine-tuning bought nothing
    that deleting the class's rows did not. Where the attack never brought the class back from
    the mask-only model within its `cap` (unlearn.relearn_max_steps), no gain can be measured:
    it passes while the shipped weights also hold to the cap. Off at bound 0, and for reports
    written before the two attackers existed."""
    key = "relearn_steps_shipped"
    if bound <= 0 or key not in original or key not in unlearned:
        return []
    gain = relearn_ratio(unlearned[key], original[key])
    if cap and original[key] >= cap:
        return [
            GateResult(
                "relearn_gain",
                gain,
                float(bound),
                unlearned[key] >= cap,
                ">",
                f"the mask-only model held to the attack's cap of {cap} steps: no gain to measure, "
                "the shipped weights must hold to it too",
            )
        ]
    return [above("relearn_gain", gain, bound)]


def deleted_but_predicted(forgotten, deleted: dict[int, list[int]]) -> tuple[list[int], list[int]]:
    """(classes deleted on record that a model forgetting `forgotten` still predicts, the done
    requests that deleted them). `deleted` maps class -> request ids (Ledger.deleted_classes)."""
    missing = sorted(set(deleted) - {int(c) for c in forgotten})
    return missing, sorted({r for c in missing for r in deleted[c]})


def deleted_classes_gate(forgotten, deleted: dict[int, list[int]]) -> GateResult:
    """Every class deleted on record (class -> the done requests that deleted it) must be
    forgotten by a version before it may become champion."""
    missing, _ = deleted_but_predicted(forgotten, deleted)
    detail = "; ".join(f"class {c} deleted by request {', '.join(map(str, deleted[c]))}" for c in missing)
    return GateResult("deleted_classes_predicted", float(len(missing)), 0.0, not missing, "<=", detail)


def parity_gates(parity: dict | None) -> list[GateResult]:
    if parity is None:
        return [GateResult("parity", float("nan"), 1.0, False, "ran")]
    return [
        at_least("parity_argmax_agreement", parity["argmax_agreement"], 1.0),
        at_most("parity_max_abs_prob_diff", parity["max_abs_prob_diff"], parity["tolerance"]),
        at_most("parity_non_finite", parity.get("non_finite", 0), 0),
    ]


def promotion_decision(
    gates: list[GateResult], champion_version: str | None, parent_version: str | None
) -> tuple[bool, str]:
    """(promote?, why): a version becomes champion only if every gate held and the champion is
    still the version it was made from (None: a base model, made from no version)."""
    if not all_passed(gates):
        return False, f"gate failed: {failure_reason(gates)}"
    if parent_version is not None and str(champion_version) != str(parent_version):
        return False, f"champion moved to version {champion_version} while this version was made from {parent_version}"
    return True, "every gate held"


def all_passed(results: list[GateResult]) -> bool:
    return all(r.passed for r in results)


def failure_reason(results: list[GateResult]) -> str:
    return "; ".join(r.describe() for r in results if not r.passed)


# What moves each gate's figure, from the measurements of docs/benchmarks.md (sections 5 and 7).
RETAINED_ADVICE = (
    "the fine-tuning cost retained accuracy. Settings that move it: a smaller unlearn.lr (e.g. --set "
    "unlearn.lr=1e-5; the pace rule still raises it when the model is saturated); a larger unlearn.anchor_weight "
    "(it holds the retained classes' prediction: without it the drop was 2-37 pp); unlearn.synthetic_per_class "
    ">= 4 (the synthetic anchor is what held ResNet-18 within 2 pp); unlearn.forget_rank 0 (deeper sinking costs "
    "accuracy); a smaller unlearn.shipped_weight (5 by default; 1 sinks the class less deep, a weaker relearn "
    "share); unlearn.anchor_temperature above 1 (at 1 the anchor is flat on the synthetic inputs: up to 3.7 pp "
    "lost on the small CNN, 1.5 at 4, docs/benchmarks.md section 9); --set unlearn.layers=head moves only the "
    "final layer (a drop of about 0 pp, but the features keep "
    "the class). A model that was under-trained to begin with loses more (docs/benchmarks.md, section 7)"
)
GATE_ADVICE = {
    "retained_drop_pp": RETAINED_ADVICE + "; the bound is gates.max_retained_drop_pp",
    "retain_test_acc": "retained accuracy is below the absolute floor gates.min_retain_test_acc: if the original "
    "model was already near it, lower the floor for this model (--set gates.min_retain_test_acc=...); "
    "else " + RETAINED_ADVICE,
    "retain_skill": "too little skill is left on the retained classes: " + RETAINED_ADVICE,
    "retained_classes": "too few classes would be left to predict (gates.min_retained_classes)",
    "unmasked_forget_test_acc": "with the mask taken off, the weights still recognise the class: a larger "
    "unlearn.forget_rank (0.5 to 1 sinks the class deeper; cost in docs/benchmarks.md, "
    "section 7), a lower unlearn.stop_forget_prob, or a larger unlearn.max_steps; the "
    "bound is gates.max_unmasked_forget_test_acc",
    "relearn_gain": "the shipped weights (mask off, forgotten rows zero) relearn the class no slower than the "
    "original with only the mask applied: the fine-tuning did not go far enough. A larger "
    "unlearn.shipped_weight, a larger unlearn.max_steps, a larger unlearn.lr or a lower "
    "unlearn.stop_forget_prob let it go further "
    "(each may cost retained accuracy); the bound is gates.min_relearn_gain (0: off)",
    "forget_test_acc": "the forgotten class is still predicted: unlearn.mask must be true (the -inf logit mask "
    "makes this exactly 0)",
    "deleted_classes_predicted": "a class deleted on record by a forget request is still predicted: forget it too "
    "(nhle run --classes CLASS), or reopen its request on record (nhle rollback --reopen "
    "ID --reason ...)",
    "parity_argmax_agreement": "ONNX Runtime and PyTorch disagree on the export: a model with operations the "
    "exporter does not keep exactly; export.parity_tolerance bounds the probability gap",
    "parity_max_abs_prob_diff": "ONNX Runtime's probabilities differ from PyTorch's by more than "
    "export.parity_tolerance (large logits widen fp32 differences; docs/benchmarks.md)",
    "parity_non_finite": "the exported model gives NaN or infinite outputs on some inputs",
    "parity": "the ONNX Runtime parity check did not run (gates.require_parity)",
}


def advice(results: list[GateResult]) -> list[str]:
    """For each failed gate: its name, value and bound, and the settings that move it."""
    return [
        f"{r.describe()}: {GATE_ADVICE.get(r.name, 'see docs/method.md for what it measures')}"
        for r in results
        if not r.passed
    ]


def advice_for_reason(reason: str) -> list[str]:
    """advice() for a stored promotion reason (promotion_decision's text, as a ledger row keeps
    it): the settings that move each gate it names as failed."""
    return [f"{name}: {text}" for name, text in GATE_ADVICE.items() if re.search(rf"(?<!\w){name}: ", reason)]
