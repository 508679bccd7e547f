import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn as nn

from nhle.core.export import check_parity, export_onnx
from nhle.core.models import build_model, build_network, find_head, torchvision_classifiers, wrap
from nhle.core.unlearning import apply_class_weight_mask


@pytest.mark.parametrize(
    "arch,channels,size,width", [("smallcnn", 1, 8, 128), ("smallcnn", 3, 28, 128), ("resnet18_cifar", 3, 32, 512)]
)
def test_forward_shapes_and_penultimate_features(arch, channels, size, width):
    model = build_model(arch, channels, 10).eval()
    x = torch.rand(2, channels, size, size)
    assert model(x).shape == (2, 10)
    assert model.features(x).shape == (2, width)
    assert torch.allclose(model.classify(model.features(x)), model(x))


def test_forget_mask_is_a_buffer_that_masked_classes_never_win():
    model = build_model("smallcnn", 1, 10).eval()
    with torch.no_grad():
        model.head.bias[4] = 1e6  # class 4 would win every input
        model.forget_mask[4] = True
    logits = model(torch.rand(64, 1, 8, 8))
    assert torch.isneginf(logits[:, 4]).all() and (logits.argmax(1) != 4).all()
    assert "forget_mask" in model.state_dict()
    assert torch.isfinite(torch.softmax(logits, 1)).all()


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="smallcnn, resnet18_cifar"):
        build_model("vgg", 1, 10)


# --- the adapter on other people's architectures ------------------------------------------


def test_every_torchvision_classifier_but_squeezenet_has_its_head_found():
    """On the meta device (shapes only, no memory): the head is found and its output is the
    network's output. SqueezeNet's classifier is a 1x1 convolution, so it is refused; RegNet's
    builder cannot run on meta and gets its own test below."""
    found, refused = {}, {}
    for name in torchvision_classifiers():
        if name.startswith("regnet"):
            continue
        with torch.device("meta"):
            net = build_network(name, 3, 7)
            try:
                found[name] = find_head(
                    net,
                    torch.empty(2, 3, 299 if name == "inception_v3" else 224, 224 if name != "inception_v3" else 299),
                )
            except ValueError as err:
                refused[name] = str(err)
    assert set(refused) == {"squeezenet1_0", "squeezenet1_1"} and all("no nn.Linear" in m for m in refused.values())
    assert len(found) >= 60
    assert {found[n] for n in ("resnet18", "resnet50", "googlenet", "inception_v3", "shufflenet_v2_x1_0")} == {"fc"}
    assert found["densenet121"] == "classifier" and found["maxvit_t"] == "classifier.5"
    assert (
        found["vit_b_16"] == "heads.head"
        and found["swin_t"] == "head"
        and found["mobilenet_v3_small"] == "classifier.3"
    )
    assert found["efficientnet_b0"] == "classifier.1" and found["convnext_tiny"] == "classifier.2"


@pytest.mark.parametrize("name", ["regnet_x_400mf", "regnet_y_400mf"])
def test_regnet_head_is_found(name):
    model = build_model(name, 3, 7, image_size=32)
    assert model.head_path == "fc" and model.features(torch.rand(2, 3, 32, 32)).shape == (2, model.head.in_features)


FAMILIES = [
    ("resnet18", "fc"),
    ("mobilenet_v3_small", "classifier.3"),
    ("efficientnet_b0", "classifier.1"),
    ("timm/vit_tiny_patch16_224", "head"),
]


@pytest.mark.parametrize("arch,head", FAMILIES)
def test_a_masked_class_stays_masked_in_torch_and_onnx_runtime_after_fine_tuning(arch, head, tmp_path):
    """Four families with random weights at 32x32: the head is found, the features are its input,
    class 2 (made the winner of every input first) is never predicted in PyTorch nor in ONNX
    Runtime, parity holds, and SGD with momentum and weight decay leaves the mask bit-identical."""
    if arch.startswith("timm/"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model(arch, 3, 6, image_size=32)
    x = torch.rand(16, 3, 32, 32)
    assert model.head_path == head
    assert model.eval().features(x).shape == (16, model.head.in_features)
    with torch.no_grad():
        model.head.bias[2] = 1e3
    apply_class_weight_mask(model, [2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(16) % 6)  # class 2's own samples included
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(model.head.weight[2], torch.zeros_like(model.head.weight[2]))
    assert model.head.bias[2].item() == 0.0 and model.forget_mask.tolist() == [False, False, True, False, False, False]
    model.eval()
    assert not (model(x).argmax(1) == 2).any()
    path = export_onnx(model, tmp_path / "model.onnx", (3, 32, 32))
    report = check_parity(model, path, x, batch_sizes=(1, 7), tolerance=1e-4)
    assert report["passed"], report

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    p = session.run(None, {"images": x.numpy()})[0]
    assert (p[:, 2] == 0).all() and np.isfinite(p).all() and not (p.argmax(1) == 2).any()


def test_grey_images_are_repeated_for_an_rgb_stem():
    model = build_model("resnet18", 1, 10, mean=0.5, std=0.25, image_size=32).eval()
    x = torch.rand(3, 1, 32, 32)
    assert model.grey_to_rgb and model.input_mean.shape == (1, 3, 1, 1)
    assert torch.equal(model(x), model.classify(model.backbone((x.expand(-1, 3, -1, -1) - 0.5) / 0.25)))


def test_a_named_head_that_is_not_the_output_is_refused():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))
    with pytest.raises(ValueError, match="further layers after its last nn.Linear"):
        wrap(net, 1, 0.0, 1.0, 8)

    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    with pytest.raises(ValueError, match="no module 'classifier'"):
        wrap(mlp(), 1, 0.0, 1.0, 8, head="classifier")
    with pytest.raises(ValueError, match="tried \\['1'\\]"):  # a hidden layer named as the head
        wrap(mlp(), 1, 0.0, 1.0, 8, head="1")
    assert (
        wrap(mlp(), 1, 0.0, 1.0, 8).head_path == "3" and wrap(mlp(), 1, 0.0, 1.0, 8, head="3").head.out_features == 10
    )
