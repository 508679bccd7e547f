from nhle.config import GateConfig
from nhle.gates import all_passed, evaluate_gates, failure_reason

GOOD_PARITY = {"argmax_agreement": 1.0, "max_abs_prob_diff": 5e-7, "tolerance": 1e-5, "non_finite": 0}


def report(forget=0.0, unmasked=0.01, retain_before=0.98, retain_after=0.975):
    return {"metrics": {"original": {"retain_test_acc": retain_before},
                        "unlearned": {"forget_test_acc": forget, "unmasked_forget_test_acc": unmasked,
                                      "retain_test_acc": retain_after}}}


def test_every_gate_holds_for_a_good_unlearning():
    results = evaluate_gates(report(), GOOD_PARITY, GateConfig())
    assert all_passed(results) and {r.name for r in results} >= {"forget_test_acc", "unmasked_forget_test_acc",
                                                                 "retained_drop_pp", "parity_max_abs_prob_diff"}


def test_each_gate_fails_on_its_own_figure():
    config = GateConfig()
    cases = {"forget_test_acc": report(forget=0.01), "unmasked_forget_test_acc": report(unmasked=0.9),
             "retained_drop_pp": report(retain_after=0.9)}
    for name, bad in cases.items():
        results = evaluate_gates(bad, GOOD_PARITY, config)
        assert [r.name for r in results if not r.passed] == [name], name
        assert name in failure_reason(results)


def test_parity_gate_fails_on_disagreement_nan_or_no_check():
    for parity in ({**GOOD_PARITY, "argmax_agreement": 0.999}, {**GOOD_PARITY, "max_abs_prob_diff": float("nan")},
                   None):
        assert not all_passed(evaluate_gates(report(), parity, GateConfig()))
    assert all_passed(evaluate_gates(report(), None, GateConfig(require_parity=False)))
