"""Class weight masking is a hard constraint: no optimiser moves a masked weight."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nhle.core.data import as_float
from nhle.core.unlearning import apply_class_weight_mask, without_mask


def fine_tune(model, data, optimizer, steps=30):
    model.train()
    for step in range(steps):
        x, y = as_float(data.images[step * 32 : (step + 1) * 32]), data.labels[step * 32 : (step + 1) * 32]
        # Targets include the masked classes: the strongest pull there is on their rows.
        loss = F.cross_entropy(model(x).clamp_min(-1e4), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-2),
    ],
    ids=["sgd-momentum-wd", "adamw", "adam-l2"],
)
def test_masked_weights_stay_bit_identical_under_fine_tuning(trained, digits, make_optimizer):
    model = copy.deepcopy(trained)
    apply_class_weight_mask(model, [3, 8])
    weight_before = model.head.weight.detach().clone()
    bias_before = model.head.bias.detach().clone()
    other_before = model.backbone[0].weight.detach().clone()
    fine_tune(model, digits.train, make_optimizer(model.parameters()))
    assert torch.equal(model.head.weight[[3, 8]], weight_before[[3, 8]])
    assert torch.equal(model.head.bias[[3, 8]], bias_before[[3, 8]])
    assert (model.head.weight[[3, 8]] == 0).all() and (model.head.bias[[3, 8]] == 0).all()
    assert not torch.equal(model.head.weight[0], weight_before[0])  # the rest did train
    assert not torch.equal(model.backbone[0].weight, other_before)
    predictions = model.eval()(as_float(digits.test.images)).argmax(1)
    assert not torch.isin(predictions, torch.tensor([3, 8])).any()


def test_mask_holds_even_against_stale_optimizer_momentum(trained, digits):
    model = copy.deepcopy(trained)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fine_tune(model, digits.train, optimizer, steps=5)  # momentum now non-zero on every row
    apply_class_weight_mask(model, [3])
    fine_tune(model, digits.train, optimizer, steps=5)
    # The raw row may drift with stale momentum, the function of the model may not.
    features = model.features(as_float(digits.test.images))
    assert torch.isneginf(model.classify(features)[:, 3]).all()
    keep = (~model.forget_mask).float()
    assert ((model.head.weight * keep[:, None])[3] == 0).all()


def test_without_mask_restores_rows_for_the_attack(trained, digits):
    model = copy.deepcopy(trained)
    x = as_float(digits.test.images)
    snapshot = apply_class_weight_mask(model, [5])
    attacked = without_mask(model, snapshot)
    assert not attacked.forget_mask.any() and model.forget_mask[5]
    assert torch.allclose(attacked(x), trained(x))  # masking alone hides, the attack brings it back
    with pytest.raises(ValueError, match="out of range"):
        apply_class_weight_mask(model, [10])
