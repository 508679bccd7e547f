"""The baselines: one interface, the input model left alone, and each method's defining rule."""

import pytest
import torch

from nhle.core.data import split_by_classes
from nhle.core.training import evaluate
from nhle.core.unlearning.baselines import BASELINES, _random_relabel, run_baseline


@pytest.fixture(scope="module")
def results(trained, digits):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    out = {name: run_baseline(name, trained, digits, [3], seed=0, device="cpu") for name in BASELINES}
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())  # input untouched
    return out


def test_every_baseline_returns_a_changed_model_and_its_cost(results, trained):
    for name, result in results.items():
        moved = any(not torch.equal(a, b) for a, b in zip(result.model.parameters(), trained.parameters()))
        assert moved, name
        assert result.seconds > 0 and result.snapshot is None and not result.model.forget_mask.any(), name


def test_salun_moves_only_the_salient_half_of_the_weights(results, trained):
    changed = total = 0
    for after, before in zip(results["salun"].model.parameters(), trained.parameters()):
        changed += int((after != before).sum())
        total += after.numel()
    assert 0 < changed <= total // 2 + 1


def test_ssd_only_dampens(results, trained):
    for after, before in zip(results["ssd"].model.parameters(), trained.parameters()):
        assert (after.abs() <= before.abs() + 1e-7).all()
        assert (torch.sign(after) * torch.sign(before) >= 0).all()


def test_relabelling_methods_forget_the_class(results, digits):
    forget_test, _ = split_by_classes(digits.test, [3])
    for name in ("random_label", "salun"):
        assert evaluate(results[name].model, forget_test) < 0.5, name


def test_random_labels_are_retained_classes(digits):
    forget, _ = split_by_classes(digits.train, [3, 5])
    relabelled = _random_relabel(forget, [0, 1, 2, 4, 6, 7, 8, 9], seed=0)
    assert not set(relabelled.labels.tolist()) & {3, 5} and len(set(relabelled.labels.tolist())) > 4


def test_unknown_baseline_is_refused(trained, digits):
    with pytest.raises(ValueError, match="unknown baseline 'magic'"):
        run_baseline("magic", trained, digits, [3])
