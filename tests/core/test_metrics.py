"""Metrics on inputs with known answers."""

import copy

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_info

from nhle.core.data import sample_per_class, split_by_classes
from nhle.core.metrics import (
    METRIC_KEYS,
    forget_silhouette,
    measure_case,
    mia_efficacy,
    probe_forget_acc,
    relearn_shares,
    relearn_steps,
    relearn_target_accuracy,
    shipped_weights,
)
from nhle.core.unlearning import apply_class_weight_mask, without_mask


def test_probe_on_perfectly_separable_features_recalls_everything():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 50)
    features = np.eye(3)[labels] * 10 + rng.normal(0, 0.1, (150, 3))
    assert probe_forget_acc(features, labels, features, labels, [1]) == 1.0


def test_the_sklearn_metrics_run_on_one_blas_thread_and_give_the_threads_back():
    def blas_threads():
        return sorted(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")

    seen, fit = [], LogisticRegression.fit

    def spy(self, *args, **kwargs):
        seen.append(blas_threads())
        return fit(self, *args, **kwargs)

    before = blas_threads()
    labels = np.repeat(np.arange(3), 50)
    features = np.eye(3)[labels] * 10 + np.random.default_rng(0).normal(0, 0.1, (150, 3))
    LogisticRegression.fit = spy
    try:
        assert probe_forget_acc(features, labels, features, labels, [1]) == 1.0
    finally:
        LogisticRegression.fit = fit
    assert seen and all(set(threads) == {1} for threads in seen)
    assert blas_threads() == before


def test_probe_on_features_without_class_information_is_near_chance():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 300)
    features = rng.normal(size=(1200, 8))
    assert probe_forget_acc(features[::2], labels[::2], features[1::2], labels[1::2], [0]) < 0.45


def test_mia_members_and_nonmembers_from_one_distribution_sit_near_chance():
    rng = np.random.default_rng(0)
    efficacy = mia_efficacy(rng.uniform(size=2000), rng.uniform(size=500), rng.uniform(size=1000))
    assert 0.2 < efficacy < 0.8


def test_mia_flags_forget_samples_that_look_like_members():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.uniform(0.9, 1.0, 400), rng.uniform(0.0, 0.5, 400)
    assert mia_efficacy(members, nonmembers, rng.uniform(0.9, 1.0, 100)) == 0.0
    assert mia_efficacy(members, nonmembers, rng.uniform(0.0, 0.5, 100)) == 1.0


def test_silhouette_of_tight_and_of_mixed_clusters():
    labels = np.repeat([0, 1], 20)
    tight = np.eye(2)[labels] + 0.01 * np.random.default_rng(0).normal(size=(40, 2))
    assert forget_silhouette(tight, labels, [1]) > 0.9
    mixed = np.random.default_rng(1).normal(size=(40, 2))
    assert abs(forget_silhouette(mixed, labels, [1])) < 0.2


def test_relearn_is_zero_for_a_model_that_already_meets_the_target(trained, digits):
    forget_test, _ = split_by_classes(digits.test, [4])
    samples = sample_per_class(digits.train, [4], 32, 0)
    target = relearn_target_accuracy(trained, digits, [4], share=0.95)
    assert target > 0.9 * 0.95
    assert relearn_steps(trained, samples, forget_test, max_steps=10, target=target) == 0


def test_the_shipped_attacker_of_the_original_is_the_mask_only_model(trained):
    masked = copy.deepcopy(trained)
    apply_class_weight_mask(masked, [4])
    mask_only = without_mask(masked, classes=[4])
    for model in (trained, masked):  # the model that has the class, and the masked one as shipped
        shipped = shipped_weights(model, [4])
        assert shipped.state_dict().keys() == mask_only.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), mask_only.state_dict().values()))
    assert bool(trained.head.weight[4].abs().sum() > 0) and bool(masked.forget_mask[4])  # both left alone


def test_masking_only_hides_the_class_and_the_attack_sees_it(trained, digits):
    model = copy.deepcopy(trained)
    snapshot = apply_class_weight_mask(model, [4])
    samples = sample_per_class(digits.train, [4], 32, 0)
    target = relearn_target_accuracy(trained, digits, [4], share=0.95)
    measure = measure_case(digits, [4], samples, 5, 1e-4, 0, relearn_target_acc=target)
    masked = measure(model, without_mask(model, snapshot))
    original = measure(trained)
    assert set(masked) == set(METRIC_KEYS)
    assert masked["forget_test_acc"] == 0.0 and masked["forget_train_acc"] == 0.0
    assert masked["unmasked_forget_test_acc"] == pytest.approx(original["forget_test_acc"])
    assert masked["probe_forget_acc"] == original["probe_forget_acc"]  # same features
    assert masked["relearn_steps_restored"] == original["relearn_steps_restored"] == 0  # the rows given back
    assert masked["relearn_steps_shipped"] == original["relearn_steps_shipped"]  # both are the mask-only model
    assert masked["retain_test_acc"] >= original["retain_test_acc"]
    assert all(0.0 <= masked[k] <= 1.0 for k in METRIC_KEYS if k.endswith("acc") or k == "mia_efficacy")


def steps(shipped, restored):
    return {"relearn_steps_shipped": shipped, "relearn_steps_restored": restored}


def test_the_relearn_share_is_over_the_retrained_models_restored_steps_for_both_attackers():
    shares = relearn_shares({"original": steps(6, 0), "unlearned": steps(48, 30), "retrained": steps(70, 60)})
    assert (shares["reference"], shares["reference_steps"]) == ("retrained", 60)
    assert (shares["shipped"], shares["restored"], shares["mask_only"]) == (0.8, 0.5, 0.1)
    assert shares["steps"] == {"shipped": 48, "restored": 30, "mask_only": 6}


def test_without_a_retrained_model_the_relearn_share_is_over_the_mask_only_models_steps():
    shares = relearn_shares({"original": steps(6, 0), "unlearned": steps(48, 30)})
    assert (shares["reference"], shares["reference_steps"]) == ("mask_only", 6)
    assert (shares["shipped"], shares["restored"], shares["mask_only"]) == (8.0, 5.0, 1.0)
    assert "no retrained model" in shares["why"]


def test_a_reference_of_zero_steps_gives_inf_for_any_step_and_nan_for_none():
    shares = relearn_shares({"original": steps(0, 0), "unlearned": steps(12, 0)})
    assert shares["shipped"] == float("inf") and np.isnan(shares["restored"]) and np.isnan(shares["mask_only"])
