"""Your weights into an architecture by name: state_dict files, checkpoint dicts, refusals."""

import pytest
import torch
import torchvision

from nhle.core.config import ModelConfig
from nhle.core.data import resize
from nhle.core.importing import from_weights, read_state_dict
from nhle.orchestration.steps import load_user_model


@pytest.fixture(scope="module")
def digits32(digits):
    return resize(digits, 32)


def test_a_state_dict_in_a_checkpoint_dict_with_a_data_parallel_prefix(tmp_path, digits32):
    net = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "model": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    assert set(read_state_dict(path, "model")) == set(net.state_dict())
    with pytest.raises(ValueError, match=r"not a state_dict .* --weights-key"):
        read_state_dict(path)
    with pytest.raises(ValueError, match=r"has no entry 'state_dict' \(weights_key\); it holds \['epoch', 'model'\]"):
        read_state_dict(path, "state_dict")
    model, source = load_user_model(ModelConfig(arch="resnet18", weights=str(path), weights_key="model"), digits32, "")
    x = digits32.test.float_images()[:4]
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():  # ImageNet normalisation and grey -> RGB inside the wrapper
        assert torch.allclose(model.eval()(x), net((x.expand(-1, 3, -1, -1) - mean) / std), atol=1e-5)
    assert source["kind"] == "weights" and len(source["weights_sha256"]) == 64 and model.head_path == "fc"


def test_a_pickled_module_is_refused_by_weights_only_loading(tmp_path, digits32):
    path = tmp_path / "whole-model.pth"
    torch.save(torchvision.models.resnet18(num_classes=10), path)
    with pytest.raises(ValueError, match=r"weights_only=True.*save model.state_dict\(\)"):
        from_weights(ModelConfig(arch="resnet18", weights=str(path)), digits32)


def test_given_normalisation_and_no_weights(digits32):
    model, source = from_weights(ModelConfig(arch="mobilenet_v3_small", mean=(0.1,), std=(0.2,)), digits32)
    assert source == {"kind": "random", "arch": "mobilenet_v3_small"}
    assert model.input_mean.flatten().tolist() == pytest.approx([0.1] * 3) and model.grey_to_rgb
