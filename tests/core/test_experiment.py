"""nhle.core.experiment: the retrained reference measured later (after promotion) is the one
measured at once.

    .venv/bin/python -m pytest -q tests/core/test_experiment.py
"""


def test_a_reference_completed_later_equals_the_one_measured_at_once(digits):
    from nhle.core.config import DataConfig, TrainConfig, UnlearnConfig
    from nhle.core.experiment import complete_reference, forget_and_measure, train_base_model, validate_forget

    model, checkpoint = train_base_model(DataConfig(), TrainConfig(epochs=3), data=digits, progress=False)
    classes = validate_forget(model, "3", checkpoint["class_names"])
    quick = UnlearnConfig(max_steps=5, synthetic_per_class=0, rows_steps=0, feature_pull=0.0, relearn_max_steps=20)
    options = dict(seed=0, config=quick, retrain_baseline=True, data=digits, device="cpu", progress=False)
    now = forget_and_measure(model, checkpoint, classes, **options).report
    deferred = forget_and_measure(model, checkpoint, classes, defer_reference=True, **options).report
    assert deferred["reference"]["kind"] == "pending" and "retrained" not in deferred["metrics"]
    assert deferred["relearn"]["reference"] == "mask_only"
    later = complete_reference(deferred, checkpoint, digits)
    assert later["reference"] == now["reference"] and later["metrics"]["retrained"] == now["metrics"]["retrained"]
    assert later["relearn"] == now["relearn"] and "retrain" in later["seconds"]
    assert later["metrics"]["unlearned"] == deferred["metrics"]["unlearned"]  # nothing else moves
