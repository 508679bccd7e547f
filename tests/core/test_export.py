import copy
import logging
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from nhle.core.config import ExportConfig
from nhle.core.export import (
    ParityError,
    assert_parity,
    check_parity,
    export_onnx,
    make_session,
    preload_cuda_libraries,
    session_providers,
)
from nhle.core.models import build_model
from nhle.core.unlearning import apply_class_weight_mask

MASKED = 3


@pytest.fixture(scope="module")
def masked(trained):
    model = copy.deepcopy(trained)
    apply_class_weight_mask(model, [MASKED])
    return model


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def onnx_path(masked, digits, tmp_path_factory, request):
    """The masked model exported by each exporter: every test below holds for both graphs."""
    return export_onnx(masked, tmp_path_factory.mktemp("onnx") / "masked.onnx", digits.image_shape, request.param)


def test_export_is_valid_with_symbolic_batch(onnx_path, digits):
    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 18
    assert not list(onnx_path.parent.glob("*.data")), "weights must be inside the .onnx file"
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("images", "probabilities")
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == list(digits.image_shape)

    session = make_session(onnx_path, intra_op_threads=1)
    for n in (1, 37):
        x = digits.test.float_images()[:n].numpy()
        assert session.run(None, {"images": x})[0].shape == (n, 10)


def test_parity_on_whole_test_split(masked, onnx_path, digits):
    report = assert_parity(check_parity(masked, onnx_path, digits.test, batch_sizes=(1, 64, 257)))
    assert report["passed"] and report["argmax_agreement"] == 1.0
    assert report["n_samples"] == len(digits.test) and report["batch_sizes"] == [1, 64, 257]
    assert report["max_abs_prob_diff"] <= 1e-5 and report["non_finite"] == 0
    assert report["providers"] == ["CPUExecutionProvider"] or torch.cuda.is_available()
    print(f"smallcnn max abs prob diff {report['max_abs_prob_diff']:.3g}")


def test_mask_is_inside_the_graph(onnx_path, digits):
    x = digits.test.float_images()[digits.test.labels == MASKED]
    assert len(x) > 10
    p = make_session(onnx_path).run(None, {"images": x.numpy()})[0]
    assert (p[:, MASKED] == 0).all() and np.isfinite(p).all()  # finite: no -inf leaves the graph
    assert not (p.argmax(1) == MASKED).any()
    assert np.allclose(p.sum(1), 1, atol=1e-5)


def test_parity_failure_is_reported(masked, onnx_path, digits):
    perturbed = copy.deepcopy(masked)
    with torch.no_grad():
        perturbed.head.bias[0] += 0.01  # a small real change must fail the default tolerance
    for model, tolerance in ((perturbed, ExportConfig().parity_tolerance), (masked, -1.0)):
        report = check_parity(model, onnx_path, digits.test, batch_sizes=(64, 257), tolerance=tolerance)
        assert report["passed"] is False
        with pytest.raises(ParityError, match="max abs probability difference"):
            assert_parity(report)
    assert report["max_abs_prob_diff"] >= 0 and report["argmax_agreement"] == 1.0


def test_nan_fails_parity(onnx_path, digits):
    everything_masked = build_model("smallcnn", 1, 10)
    everything_masked.forget_mask[:] = True  # every logit -inf: softmax is NaN
    report = check_parity(everything_masked, onnx_path, digits.test.images[:8], batch_sizes=(8,))
    assert report["non_finite"] > 0 and report["passed"] is False
    assert np.isnan(report["max_abs_prob_diff"])


@pytest.mark.parametrize("stage", ["export", "check"])
def test_failed_export_leaves_nothing(masked, digits, tmp_path, monkeypatch, stage):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")

    def half_write_then_fail(model, args, f, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half an onnx file")
        raise RuntimeError("export failed")

    def reject(*args, **kwargs):
        raise RuntimeError("checker failed")

    if stage == "export":
        monkeypatch.setattr(torch.onnx, "export", half_write_then_fail)
    else:  # a complete export that the checker rejects
        monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(RuntimeError):
        export_onnx(masked, target, digits.image_shape)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_session_providers(monkeypatch):
    calls = []
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: calls.append(1), raising=False)
    preload_cuda_libraries.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert session_providers() == ["CPUExecutionProvider"] and calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    strict = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert session_providers() == strict
    assert session_providers() == strict
    assert calls == [1]  # the CUDA libraries are preloaded once, and only when a GPU is visible
    assert session_providers(prefer_gpu=False) == ["CPUExecutionProvider"]
    preload_cuda_libraries.cache_clear()


def test_a_failed_or_missing_preload_is_not_an_error(monkeypatch):
    def broken():
        raise OSError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(onnxruntime, "preload_dlls", broken, raising=False)
    preload_cuda_libraries.cache_clear()
    assert preload_cuda_libraries() is False
    monkeypatch.delattr(onnxruntime, "preload_dlls")
    preload_cuda_libraries.cache_clear()
    assert preload_cuda_libraries() is False
    preload_cuda_libraries.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's session")
def test_cpu_machine_session_logs_no_failed_cuda_provider(onnx_path):
    """onnxruntime-gpu on a machine without a GPU: the session must quietly be CPU-only, not
    log a failed CUDA provider load on every start (a fresh process: nothing preloaded)."""
    code = (
        "import numpy as np; from nhle.core.export import make_session; "
        f"s = make_session({str(onnx_path)!r}); "
        "s.run(None, {'images': np.zeros((2, 1, 8, 8), np.float32)}); print(s.get_providers())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['CPUExecutionProvider']"
    for word in ("CUDA", "Failed", "failed"):
        assert word not in done.stderr, done.stderr


def test_resnet18_exports_and_matches(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18_cifar", 3, 10).eval()
    model.forget_mask[7] = True
    path = export_onnx(model, tmp_path / "resnet18.onnx", (3, 32, 32))
    report = check_parity(model, path, torch.rand(2, 3, 32, 32), batch_sizes=(2,), tolerance=1e-4)
    assert_parity(report)
    print(f"resnet18 max abs prob diff {report['max_abs_prob_diff']:.3g}")


class Spectrum(torch.nn.Module):
    """A forward the TorchScript exporter cannot export (aten::fft_rfft) and torch.export can."""

    def forward(self, x):
        return torch.fft.rfft(x.flatten(1), dim=1).abs()[:, :10]


def test_what_the_torchscript_exporter_refuses_is_exported_by_torch_export(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="nhle.core.export"):
        path = export_onnx(Spectrum(), tmp_path / "spectrum.onnx", (1, 8, 8))
    assert "exporting with torch.export" in caplog.text and "fft_rfft" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["spectrum.onnx"]
    x = torch.rand(5, 1, 8, 8)
    expected = torch.softmax(Spectrum()(x), dim=1).numpy()
    assert np.abs(make_session(path).run(None, {"images": x.numpy()})[0] - expected).max() < 1e-6
    with pytest.raises(ValueError, match="unknown ONNX exporter 'jit'"):
        export_onnx(Spectrum(), tmp_path / "other.onnx", (1, 8, 8), "jit")
