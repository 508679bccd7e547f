"""nhle.core.experiment: what a report leaves for after the promotion, measured then, is what
would have been measured at once.

    .venv/bin/python -m pytest -q tests/core/test_experiment.py
"""

from nhle.core.config import DataConfig, GateConfig, TrainConfig, UnlearnConfig
from nhle.core.experiment import completed_report, forget_and_measure, train_base_model, validate_forget
from nhle.core.gates import evaluate_gates


def test_a_report_completed_later_equals_the_one_measured_at_once(digits):
    """What no gate reads (the evidence metrics of both models, the retrained reference) is
    measured after the promotion from the shipped checkpoints: the same numbers as at once."""
    model, checkpoint = train_base_model(DataConfig(), TrainConfig(epochs=3), data=digits, progress=False)
    classes = validate_forget(model, "3", checkpoint["class_names"])
    quick = UnlearnConfig(max_steps=5, synthetic_per_class=0, rows_steps=0, feature_pull=0.0, relearn_max_steps=20)
    options = dict(seed=0, config=quick, retrain_baseline=True, data=digits, device="cpu", progress=False)
    now = forget_and_measure(model, checkpoint, classes, **options).report
    deferred_outcome = forget_and_measure(model, checkpoint, classes, defer_evidence=True, **options)
    deferred = deferred_outcome.report
    assert deferred["pending"] == ["evidence_metrics", "reference"] and now["pending"] == []
    assert deferred["reference"]["kind"] == "pending" and "retrained" not in deferred["metrics"]
    assert "mia_efficacy" not in deferred["metrics"]["unlearned"] and deferred["relearn"]["reference"] == "mask_only"
    parity = {"passed": True, "argmax_agreement": 1.0, "max_abs_prob_diff": 0.0, "non_finite": 0, "tolerance": 1e-4}
    assert evaluate_gates(deferred, parity, GateConfig()) == evaluate_gates(now, parity, GateConfig())  # none pending
    later = completed_report(deferred, checkpoint, model, deferred_outcome.result.model, digits)
    assert later["reference"] == now["reference"] and later["metrics"] == now["metrics"]
    assert all(list(later["metrics"][c]) == list(now["metrics"][c]) for c in now["metrics"])  # same order
    assert later["relearn"] == now["relearn"] and "retrain" in later["seconds"] and later["pending"] == []
