"""Models that exist only as a traced graph (torch.export, MLflow 3's PyTorch format): split at
the last linear layer into a backbone and a real nn.Linear head, fine-tuned, saved and exported."""

import pytest
import torch
import torch.nn as nn
import torchvision

from nhle.adapters.mlflow_models import fixed_batch_to_any
from nhle.core.config import UnlearnConfig
from nhle.core.experiment import forget_and_measure, validate_forget
from nhle.core.export import check_parity, export_onnx
from nhle.core.graphs import any_batch, export_graph, input_shape, split_at_head, traced_batch
from nhle.core.models import GRAPH, MaskedClassifier
from nhle.core.training import load_checkpoint, save_checkpoint
from nhle.core.unlearning import apply_class_weight_mask


class TheirNet(nn.Module):
    """Somebody's classifier: batch norm, dropout, a hidden linear layer, then the logits."""

    def __init__(self, classes: int = 10, softmax: bool = False):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.hidden, self.drop, self.out = nn.Linear(32, 16), nn.Dropout(0.5), nn.Linear(16, classes)
        self.softmax = softmax

    def forward(self, x):
        logits = self.out(self.drop(torch.relu(self.hidden(self.convs(x).flatten(1)))))
        return logits.softmax(1) if self.softmax else logits


def traced(net: nn.Module, train_mode: bool = False) -> torch.fx.GraphModule:
    """What mlflow.pytorch.load_model gives for a pt2 model: torch.export's module()."""
    net.train(train_mode)
    program = torch.export.export(net, (torch.rand(4, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return program.module()


def test_split_gives_the_features_and_the_head_as_an_nn_linear():
    torch.manual_seed(0)
    net = TheirNet().eval()
    graph = traced(net)
    backbone, head = split_at_head(graph, 10)
    x = torch.rand(5, 1, 8, 8)
    assert isinstance(head, nn.Linear) and torch.equal(head.weight, net.out.weight)
    assert backbone(x).shape == (5, 16) and torch.allclose(head(backbone(x)), net(x), atol=1e-6)
    assert "out.weight" not in dict(backbone.named_parameters())  # the head lives in the nn.Linear only
    assert torch.allclose(graph(x), net(x), atol=1e-6)  # the loaded graph is left as it was


def test_a_graph_traced_in_train_mode_computes_inference():
    torch.manual_seed(0)
    net = TheirNet()
    graph = traced(net, train_mode=True)
    backbone, head = split_at_head(graph, 10)
    x = torch.rand(6, 1, 8, 8)
    assert torch.allclose(head(backbone(x)), net.eval()(x), atol=1e-6)  # running stats, no dropout
    assert torch.equal(backbone(x), backbone(x))


def test_refusals_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"\[10, 16\] outputs but the data has 7 classes"):
        split_at_head(traced(TheirNet().eval()), 7)
    with pytest.raises(ValueError, match="computed after its last linear layer"):
        split_at_head(traced(TheirNet(softmax=True).eval()), 10)
    with pytest.raises(ValueError, match="no linear layer 'fc'"):
        split_at_head(traced(TheirNet().eval()), 10, head="fc")


def test_a_graph_model_fine_tunes_saves_and_exports(tmp_path):
    torch.manual_seed(0)
    backbone, head = split_at_head(traced(TheirNet().eval()), 10)
    model = MaskedClassifier(backbone, head, 1, 0.0, 1.0, arch=GRAPH, image_size=8)
    model.eval()  # the graph's own train()/eval() raise; the wrapper's must not
    apply_class_weight_mask(model, [4])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(8, 1, 8, 8)
    model(x).logsumexp(1).mean().backward()
    optimizer.step()
    moved = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert any(k.startswith("backbone.convs") for k in moved) and "forget_mask" not in moved
    path = save_checkpoint(tmp_path / "model.pt", model, class_names=[str(k) for k in range(10)])
    loaded, checkpoint = load_checkpoint(path)
    assert checkpoint["model_spec"]["arch"] == GRAPH and isinstance(checkpoint["backbone_program"], bytes)
    assert torch.equal(loaded(x), model(x)) and loaded.forget_mask.tolist() == model.forget_mask.tolist()
    onnx_path = export_onnx(loaded, tmp_path / "model.onnx", (1, 8, 8))
    assert check_parity(loaded, onnx_path, x, batch_sizes=(1, 3), tolerance=1e-5)["passed"]


def test_a_module_without_export_support_is_refused_with_the_reason():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, : int(x.sum().item()) % 5 + 1]

    with pytest.raises(ValueError, match="torch.export could not trace"):
        export_graph(DataDependent(), torch.rand(2, 1, 8, 8))


def traced_for_one(net: nn.Module, shape=(1, 8, 8)) -> torch.fx.GraphModule:
    """What mlflow.pytorch.load_model gives for a pt2 model logged with a ONE-image input_example:
    MLflow exports with Dim.AUTO, which specialises the batch to 1."""
    program = torch.export.export(net.eval(), (torch.zeros(1, *shape),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    return program.module()


class ViewNet(nn.Module):
    """Flattens with x.view(x.size(0), -1), which a batch-1 trace records as view(x, [1, -1]),
    and normalises with a buffer viewed as (1, 1, 1, 1) (not the batch)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.out = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 10)
        self.register_buffer("centre", torch.tensor([0.5]))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x - self.centre.view(1, 1, 1, 1))))
        return self.out(h.view(h.size(0), -1))


class TokenNet(nn.Module):
    """A class token expanded to the batch and a reshape by the batch size, as a ViT does."""

    def __init__(self):
        super().__init__()
        self.patches, self.token, self.out = nn.Conv2d(1, 8, 2, 2), nn.Parameter(torch.randn(1, 1, 8)), nn.Linear(8, 10)

    def forward(self, x):
        t = self.patches(x)
        t = t.reshape(t.shape[0], 8, -1).transpose(1, 2)
        t = torch.cat([self.token.expand(t.shape[0], -1, -1), t], 1)
        return self.out((torch.softmax(t @ t.transpose(1, 2), -1) @ t)[:, 0])


@pytest.mark.parametrize(
    "make,shape", [(TheirNet, (1, 8, 8)), (ViewNet, (1, 8, 8)), (TokenNet, (1, 8, 8)), ("resnet18", (3, 32, 32))]
)
def test_a_graph_traced_for_a_batch_of_one_is_made_to_take_any_batch(make, shape):
    torch.manual_seed(0)
    if make == "resnet18":
        net = torchvision.models.resnet18(num_classes=10)
    else:
        net = make()
    net.train()
    with torch.no_grad():  # batch-norm statistics other than the initial ones
        net(torch.rand(16, *shape))
    net.eval()
    graph = traced_for_one(net, shape)
    assert traced_batch(graph) == 1
    with pytest.raises(Exception, match=r"Guard failed: x.size\(\)\[0\] == 1"):
        graph(torch.rand(2, *shape))
    converted = any_batch(graph)
    assert traced_batch(converted) is None and input_shape(converted) == shape
    x = torch.rand(7, *shape)
    with torch.no_grad():
        for batch in (x[:1], x[:5], x):
            assert torch.allclose(converted(batch), net(batch), atol=1e-5)
    backbone, head = split_at_head(converted, 10)
    assert torch.allclose(head(backbone(x)), net(x), atol=1e-5)
    assert traced_batch(traced(TheirNet().eval())) is None  # a dynamic batch is left alone


def test_a_batch_of_one_graph_that_cannot_take_other_batches_is_refused():
    class Folded(nn.Module):
        """Folds the batch into another dimension (a reshape to 2 * batch rows): the trace has a 2."""

        def __init__(self):
            super().__init__()
            self.conv, self.out = nn.Conv2d(1, 8, 2, 2), nn.Linear(32, 10)

        def forward(self, x):
            h = self.conv(x)
            b = h.shape[0]
            return self.out(h.reshape(b * 2, 4, 16).mean(1).reshape(b, 32))

    graph = traced_for_one(Folded())
    with pytest.raises(ValueError):
        any_batch(graph)
    with pytest.raises(
        ValueError,
        match='for a batch of exactly one image .* input_example of 2 or more images .*serialization_format="pickle"',
    ):
        fixed_batch_to_any(graph, 1, "models:/folded/1")
    fixed = torch.export.export(TheirNet().eval(), (torch.rand(3, 1, 8, 8),)).module()
    with pytest.raises(ValueError, match="for batches of exactly 3 images only"):
        fixed_batch_to_any(fixed, 3, "models:/three/1")


def test_forgetting_from_a_graph_model_runs_without_a_retrained_reference_and_says_why(digits):
    """A traced graph has no architecture to retrain: `nhle run --classes` on an imported MLflow
    model goes ahead (retrain_baseline left at its default) and the report says why there is no
    reference, instead of refusing the request."""
    torch.manual_seed(0)
    backbone, head = split_at_head(traced(TheirNet().eval()), 10)
    model = MaskedClassifier(backbone, head, 1, 0.0, 1.0, arch=GRAPH, image_size=8)
    classes = validate_forget(model, "3", digits.class_names)
    quick = UnlearnConfig(max_steps=2, synthetic_per_class=0, rows_steps=0, feature_pull=0.0, relearn_max_steps=1)
    outcome = forget_and_measure(
        model,
        {"data_fingerprint": "test"},
        classes,
        config=quick,
        retrain_baseline=True,
        data=digits,
        device="cpu",
        progress=False,
    )
    assert outcome.report["reference"]["kind"] == "none" and "traced graph" in outcome.report["reference"]["why"]
    assert "retrained" not in outcome.report["metrics"] and outcome.retrained is None
    assert outcome.report["relearn"]["reference"] == "mask_only"  # the relearn share's reference without a retrain
