import re

from nhle.core.config import SECTIONS, GateConfig
from nhle.core.gates import (
    GATE_ADVICE,
    GateResult,
    advice,
    advice_for_reason,
    all_passed,
    deleted_classes_gate,
    evaluate_gates,
    failure_reason,
    promotion_decision,
)

GOOD_PARITY = {"argmax_agreement": 1.0, "max_abs_prob_diff": 5e-7, "tolerance": 1e-5, "non_finite": 0}


def report(forget=0.0, unmasked=0.01, retain_before=0.98, retain_after=0.975):
    return {
        "metrics": {
            "original": {"retain_test_acc": retain_before},
            "unlearned": {
                "forget_test_acc": forget,
                "unmasked_forget_test_acc": unmasked,
                "retain_test_acc": retain_after,
            },
        }
    }


def test_every_gate_holds_for_a_good_unlearning():
    results = evaluate_gates(report(), GOOD_PARITY, GateConfig())
    assert all_passed(results) and {r.name for r in results} >= {
        "forget_test_acc",
        "unmasked_forget_test_acc",
        "retained_drop_pp",
        "parity_max_abs_prob_diff",
    }


def test_each_gate_fails_on_its_own_figure():
    config = GateConfig()
    cases = {
        "forget_test_acc": report(forget=0.01),
        "unmasked_forget_test_acc": report(unmasked=0.9),
        "retained_drop_pp": report(retain_after=0.9),
    }
    for name, bad in cases.items():
        results = evaluate_gates(bad, GOOD_PARITY, config)
        assert [r.name for r in results if not r.passed] == [name], name
        assert name in failure_reason(results)


def test_parity_gate_fails_on_disagreement_nan_or_no_check():
    for parity in (
        {**GOOD_PARITY, "argmax_agreement": 0.999},
        {**GOOD_PARITY, "max_abs_prob_diff": float("nan")},
        None,
    ):
        assert not all_passed(evaluate_gates(report(), parity, GateConfig()))
    assert all_passed(evaluate_gates(report(), None, GateConfig(require_parity=False)))


def with_classes(num_classes, forget, earlier=(), retain_after=0.975):
    return {
        **report(retain_after=retain_after, retain_before=retain_after),
        "num_classes": num_classes,
        "forget_classes": list(forget),
        "previously_forgotten": list(earlier),
    }


def test_a_model_left_with_one_class_never_passes():
    """9 of 10 classes forgotten: the one left is always 'right', 100% retained accuracy."""
    results = evaluate_gates(with_classes(10, [8], earlier=range(8), retain_after=1.0), GOOD_PARITY, GateConfig())
    failed = [r.name for r in results if not r.passed]
    assert failed == ["retained_classes", "retain_skill"]
    assert all_passed(evaluate_gates(with_classes(10, [8], earlier=range(7)), GOOD_PARITY, GateConfig()))


def test_retained_accuracy_is_judged_against_chance_for_the_classes_left():
    skill_only = GateConfig(min_retain_test_acc=0.0)  # the absolute floor (0.9) would refuse 70% on its own
    # 2 classes left: 70% is 0.4 of the way from chance (50%) to perfect, under the 0.5 default.
    results = evaluate_gates(with_classes(10, [7], earlier=range(7), retain_after=0.70), GOOD_PARITY, skill_only)
    assert [r.name for r in results if not r.passed] == ["retain_skill"]
    # The same 70% with 10 classes left... of 11 (chance 10%) is 0.67: it holds.
    assert all_passed(evaluate_gates(with_classes(11, [0], retain_after=0.70), GOOD_PARITY, skill_only))
    assert not all_passed(
        evaluate_gates(
            with_classes(10, [7], earlier=range(7), retain_after=0.70),
            GOOD_PARITY,
            GateConfig(min_retain_test_acc=0.0, min_retained_classes=3),
        )
    )


def test_the_deleted_classes_gate_names_each_class_and_its_requests():
    assert deleted_classes_gate([3, 5], {5: [1]}).passed
    gate = deleted_classes_gate([3], {5: [1, 4], 7: [2]})
    assert not gate.passed and gate.value == 2
    assert gate.describe() == (
        "deleted_classes_predicted: 2 <= 0 -> FAIL (class 5 deleted by request 1, 4; class 7 deleted by request 2)"
    )


def test_a_failed_gate_comes_with_its_value_bound_and_the_settings_that_move_it():
    results = [
        GateResult("retained_drop_pp", 7.1, 2.0, False, "<="),
        GateResult("unmasked_forget_test_acc", 0.2, 0.05, False, "<="),
        GateResult("forget_test_acc", 0.0, 0.0, True, "<="),
    ]
    lines = advice(results)
    assert len(lines) == 2
    assert lines[0].startswith("retained_drop_pp: 7.1 <= 2 -> FAIL")
    assert "unlearn.lr" in lines[0] and "unlearn.anchor_weight" in lines[0] and "gates.max_retained_drop_pp" in lines[0]
    assert "unlearn.forget_rank" in lines[1] and "gates.max_unmasked_forget_test_acc" in lines[1]

    for text in GATE_ADVICE.values():  # every setting named in the advice exists
        for section, key in re.findall(r"\b(unlearn|gates|export)\.([a-z_]+)", text):
            assert key in {f for f in SECTIONS[section].__dataclass_fields__}, (section, key)


def test_the_advice_for_a_stored_reason_names_only_the_gates_that_failed():
    gates = [
        GateResult("unmasked_forget_test_acc", 0.3, 0.05, False, "<="),
        GateResult("forget_test_acc", 0.0, 0.0, True, "<="),
    ]
    promoted, reason = promotion_decision(gates, "1", "1")
    lines = advice_for_reason(reason)
    assert not promoted and [line.split(":")[0] for line in lines] == ["unmasked_forget_test_acc"]


def with_relearn(mask_only, shipped):
    """A report whose original's shipped attacker (the mask-only model) and unlearned model's took these steps."""
    good = report()
    good["metrics"]["original"]["relearn_steps_shipped"] = mask_only
    good["metrics"]["unlearned"]["relearn_steps_shipped"] = shipped
    return good


def test_the_relearn_gate_needs_the_shipped_weights_to_take_more_steps_than_the_mask_only_model():
    def failed(steps, config=GateConfig()):
        return [r.name for r in evaluate_gates(with_relearn(*steps), GOOD_PARITY, config) if not r.passed]

    assert failed((6, 6)) == ["relearn_gain"] and failed((6, 3)) == ["relearn_gain"]  # not above: refused
    assert failed((6, 7)) == [] and failed((0, 4)) == []  # above (a mask-only model that relearns at once: inf)
    assert failed((0, 0)) == ["relearn_gain"]
    assert failed((6, 10), GateConfig(min_relearn_gain=2.0)) == ["relearn_gain"]
    gate = next(r for r in evaluate_gates(with_relearn(6, 9), GOOD_PARITY, GateConfig()) if r.name == "relearn_gain")
    assert (gate.value, gate.rule, gate.bound) == (1.5, ">", 1.0)


def test_where_the_mask_only_model_holds_to_the_attacks_cap_the_shipped_weights_must_hold_to_it_too():
    """Classes the relearn attack cannot bring back from the mask alone within its cap (seen: 1 and
    8 together on a 6-epoch digits model, 300 of 300 steps) leave no gain to measure: equal capped
    counts pass, a shipped model that relearns sooner does not, and each says why."""

    def gate(mask_only, shipped, cap=300):
        capped = with_relearn(mask_only, shipped)
        capped["unlearn_config"] = {"relearn_max_steps": cap}
        return next(r for r in evaluate_gates(capped, GOOD_PARITY, GateConfig()) if r.name == "relearn_gain")

    held, relearnt = gate(300, 300), gate(300, 120)
    assert held.passed and "cap of 300 steps" in held.describe()
    assert not relearnt.passed and "no gain to measure" in relearnt.describe()
    assert not gate(250, 250).passed  # below the cap the rule is as before: strictly above


def test_the_relearn_gate_is_off_at_bound_0_and_skipped_for_reports_without_the_two_attackers():
    off = evaluate_gates(with_relearn(6, 3), GOOD_PARITY, GateConfig(min_relearn_gain=0.0))
    assert all_passed(off) and "relearn_gain" not in {r.name for r in off}
    old = report()
    old["metrics"]["unlearned"]["relearn_steps"] = 1  # the single attacker of older reports
    assert "relearn_gain" not in {r.name for r in evaluate_gates(old, GOOD_PARITY, GateConfig())}


def test_a_failed_relearn_gate_names_the_settings_that_move_it():
    [line] = advice(evaluate_gates(with_relearn(6, 6), GOOD_PARITY, GateConfig()))
    assert line.startswith("relearn_gain: 1 > 1 -> FAIL")
    assert all(
        s in line for s in ("unlearn.max_steps", "unlearn.lr", "unlearn.stop_forget_prob", "gates.min_relearn_gain")
    )
