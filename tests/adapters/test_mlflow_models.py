"""A PyTorch model logged the ordinary MLflow 3 way into nhle: mlflow.pytorch.log_model in MLflow's
default pt2 (torch.export) format, with a one-image input_example, which MLflow exports for a batch
of exactly one. Real MLflow on a SQLite file, the artifacts in tmp_path."""

import logging
import shutil

import mlflow
import numpy as np
import pytest
import torch
import torch.nn as nn

from nhle.adapters.mlflow_models import from_mlflow, mlflow_store
from nhle.core.config import ModelConfig
from nhle.core.export import check_parity, export_onnx
from nhle.core.importing import smoke_test
from nhle.core.training import load_checkpoint, save_checkpoint


class OneImageNet(nn.Module):
    """Batch norm, a flatten by x.view(x.size(0), -1) (a batch-1 trace hard-codes the 1) and a
    linear head."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.hidden, self.out = nn.Linear(32, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = self.convs(x)
        return self.out(torch.relu(self.hidden(h.view(h.size(0), -1))))


def test_a_model_logged_with_a_one_image_input_example_takes_any_batch_and_exports(
    tmp_path, mlflow_template, digits, caplog
):
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torch.manual_seed(0)
    net = OneImageNet().train()
    with torch.no_grad():  # batch-norm statistics other than the initial ones
        net(digits.train.float_images()[:256])
    net.eval()
    with mlflow_store(uri):
        experiment = mlflow.create_experiment("theirs", artifact_location=str(tmp_path / "artifacts"))
        with mlflow.start_run(experiment_id=experiment):
            mlflow.pytorch.log_model(
                net,
                name="model",
                registered_model_name="one-image",
                input_example=np.zeros((1, 1, 8, 8), np.float32),
                pip_requirements=["torch"],
            )
        logged = mlflow.pytorch.load_model("models:/one-image/1")
        with pytest.raises(Exception, match=r"Guard failed: x.size\(\)\[0\] == 1"):  # a batch of one only
            logged(torch.rand(2, 1, 8, 8))

    model, source = from_mlflow(ModelConfig(from_mlflow="models:/one-image/1"), digits, uri)
    smoke_test(model, digits)
    x = digits.test.float_images()
    model.eval()
    with torch.no_grad():
        for batch in (x[:1], x[:7], x):
            assert torch.allclose(model(batch), net(batch), atol=1e-4)
    assert source == {
        "kind": "mlflow",
        "uri": "models:/one-image/1",
        "tracking_uri": uri,
        "format": "pt2",
        "batch_one_converted": True,
    }
    model(x[:8]).logsumexp(1).mean().backward()  # fine-tuning reaches the backbone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    with caplog.at_level(logging.INFO, logger="nhle.core.export"):
        path = export_onnx(model, tmp_path / "model.onnx", (1, 8, 8))
    # The TorchScript exporter fixes this program's batch size; its graph is caught and replaced.
    assert "TorchScript ONNX export failed" in caplog.text and "exporting with torch.export" in caplog.text
    assert check_parity(model, path, x, batch_sizes=(1, 7, 64))["passed"]
    saved = save_checkpoint(tmp_path / "model.pt", model, class_names=[str(k) for k in range(10)])
    loaded, _ = load_checkpoint(saved)  # the checkpoint stores the backbone as a dynamic-batch program
    with torch.no_grad():
        assert torch.equal(loaded(x[:7]), model(x[:7]))
