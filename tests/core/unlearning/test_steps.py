"""How NHLE steps: the optimisers, the warm-up, and saliency-limited updates."""

import pytest
import torch

from nhle.core.config import UnlearnConfig
from nhle.core.data import as_float, sample_per_class
from nhle.core.unlearning import unlearn
from nhle.core.unlearning.nhle import PaceKeeper, nhle_loss, salient_entries
from nhle.core.unlearning.steps import NormalizedGradient, make_optimizer, saliency_masks


def test_a_normalized_step_moves_the_weights_by_its_share_of_their_norm():
    weights = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    optimizer = NormalizedGradient([weights], relative_step=0.1)
    weights.grad = torch.tensor([10.0, 0.0])
    optimizer.step()
    assert torch.allclose(weights.detach(), torch.tensor([2.5, 4.0]))  # 0.1 * 5 along the gradient


def test_warm_up_ramps_the_learning_rate_linearly():
    optimizer, warmup = make_optimizer([torch.nn.Parameter(torch.zeros(2))], UnlearnConfig(lr=1e-4, warmup_steps=4))
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        warmup.step()
    assert rates == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])


def test_layer_wise_rates_run_geometrically_from_the_first_tensor_to_the_last():
    tensors = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    optimizer, _ = make_optimizer(tensors, UnlearnConfig(lr=1e-4, lr_depth_ratio=4.0, warmup_steps=0))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([4e-4, 2e-4, 1e-4])
    one, _ = make_optimizer(tensors, UnlearnConfig(lr=1e-4, warmup_steps=0))
    assert [g["lr"] for g in one.param_groups] == pytest.approx([1e-4])
    with pytest.raises(ValueError, match="lr_depth_ratio needs optimizer adam or sgd"):
        make_optimizer(tensors, UnlearnConfig(optimizer="normalized", lr_depth_ratio=4.0))


def test_unknown_optimizer_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unlearn.optimizer must be one of adam, sgd, normalized, got 'lbfgs'"):
        UnlearnConfig(optimizer="lbfgs")


def test_saliency_keeps_the_largest_gradient_entries():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    masks = saliency_masks([weight], (weight * torch.tensor([0.1, -5.0, 2.0, 0.0])).sum(), share=0.5)
    assert masks[weight].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert saliency_masks([weight], weight.sum(), share=1.0) is None


def test_saliency_limited_unlearning_moves_only_that_share_of_each_tensor(trained, digits):
    samples = sample_per_class(digits.train, [4], 32, seed=0)
    result = unlearn(trained, samples, [4], UnlearnConfig(saliency=0.2, mask=False), device="cpu")
    moved = {
        name: (p != dict(trained.named_parameters())[name]).float().mean().item()
        for name, p in result.model.named_parameters()
    }
    assert all(share <= 0.2 + 0.01 for share in moved.values()), moved
    assert max(moved.values()) > 0


def test_the_pace_rule_raises_the_rate_only_when_the_cap_would_be_missed():
    def rates(log_odds, config=UnlearnConfig(lr=1e-5, max_steps=30, adaptive_lr=True, stop_forget_prob=0.05)):
        optimizer, warmup = make_optimizer([torch.nn.Parameter(torch.zeros(1))], config)
        pace = PaceKeeper(config, optimizer, warmup)
        seen = []
        for step, value in enumerate(log_odds):
            pace.record(step, value)
            seen.append(optimizer.param_groups[0]["lr"])
        return seen

    # Goal log(0.05 / 0.95) = -2.94; checks every 10 steps of 30.
    on_time = rates([10 - 0.7 * t for t in range(25)])  # 0.7 per step: there by step ~19
    assert on_time == pytest.approx([1e-5] * 25)
    stalled = rates([30 - 0.01 * t for t in range(30)])  # margins of 30 nats, hardly moving
    assert (
        stalled[9] == pytest.approx(1e-5) and stalled[10] == pytest.approx(3e-5) and stalled[29] == pytest.approx(9e-5)
    )
    assert rates([30.0] * 30, UnlearnConfig(lr=1e-5, max_steps=30, adaptive_lr=False))[-1] == pytest.approx(1e-5)
    # stop_forget_prob 0 is never reached on purpose (the whole cap is wanted): no raise, no error
    assert rates([30.0] * 30, UnlearnConfig(lr=1e-5, max_steps=30, stop_forget_prob=0.0))[-1] == pytest.approx(1e-5)


def test_a_request_of_several_classes_moves_the_salient_entries_of_each_class(trained, digits):
    classes = [3, 5]
    samples = sample_per_class(digits.train, classes, 32, seed=0)
    x, labels = as_float(samples.images), samples.labels
    forget = torch.zeros(10, dtype=torch.bool)
    forget[classes] = True
    parameters = list(trained.parameters())
    united = salient_entries(trained, parameters, x, labels, classes, forget, ~forget, UnlearnConfig(saliency=0.2))
    for c in classes:
        own = saliency_masks(parameters, nhle_loss(trained(x[labels == c]), forget, ~forget, "negative_hot"), 0.2)
        assert all(bool((united[p] >= own[p]).all()) for p in own)  # every class's own entries move
    conv = parameters[0]
    assert 0.2 < united[conv].mean().item() <= 0.4  # more than one class's share, at most both
