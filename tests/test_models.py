import pytest
import torch

from nhle.models import build_model


@pytest.mark.parametrize("arch,channels,size,width", [("smallcnn", 1, 8, 128), ("smallcnn", 3, 28, 128),
                                                       ("resnet18_cifar", 3, 32, 512)])
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
