"""nhle.bench.gpu on this CPU-only machine: the real entry point end to end with --quick, its
failure exits, the CLI's `bench gpu`, and the CIFAR-shaped synthetic data it uses."""

import json
import subprocess
import sys

import pytest
import torch

from nhle import cli
from nhle.bench import gpu as gpu_check
from nhle.bench.configs import GpuBench
from nhle.bench.scaling import synthetic_splits


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `python -m nhle.bench.gpu --quick --device cpu` in a fresh process (about 20 s)."""
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(
        [sys.executable, "-m", "nhle.bench.gpu", "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return done, out


def test_quick_run_passes_parity_on_the_cpu_and_never_predicts_the_forgotten_class(quick_run):
    done, out = quick_run
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and report["failures"] == []
    assert report["machine"]["device"] == "cpu"
    assert report["settings"]["image_shape"] == [3, 32, 32] and report["settings"]["quick"]
    cpu = report["parity"]["cpu"]
    assert cpu["passed"] and cpu["providers"] == ["CPUExecutionProvider"] and cpu["argmax_agreement"] == 1.0
    if not torch.cuda.is_available():
        assert report["parity"]["cuda"] is None and report["parity"]["cuda_default_options"] is None
    assert report["onnx"]["forgotten_class_predictions"] == 0 and report["onnx"]["test_images"] > 0
    assert report["accuracy"]["forget_test_acc"] == 0.0
    assert report["train"]["seconds"] > 0 and report["train"]["seconds_per_step"] > 0
    assert report["unlearn"]["seconds"] > 0 and report["retrain_free"]["speedup_vs_retrain"] > 0
    timings = report["inference_ms_per_batch"]
    assert timings["torch_eager_cpu"] > 0 and timings["ort_cpu"] > 0
    assert report["modules_that_must_not_load"] == []  # no mlflow, prefect, dvc, fastapi, matplotlib
    markdown = (out / "gpu_check.md").read_text()
    assert (
        markdown.startswith("# GPU check: passed")
        and "measured " in markdown
        and "| CPU | CPUExecutionProvider |" in markdown
    )


def test_failures_name_parity_a_missing_cuda_provider_and_a_predicted_class():
    ok = {"passed": True, "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    bad = {
        "passed": False,
        "argmax_agreement": 0.99,
        "max_abs_prob_diff": 3e-3,
        "tolerance": 1e-4,
        "providers": ["CPUExecutionProvider"],
    }
    assert gpu_check.failures_of({"cpu": ok, "cuda": None}, False, 0, 3) == []
    assert gpu_check.failures_of({"cpu": ok, "cuda": ok}, True, 0, 3) == []
    [parity] = gpu_check.failures_of({"cpu": bad, "cuda": None}, False, 0, 3)
    assert "parity on the cpu provider failed" in parity and "0.003" in parity
    fell_back = gpu_check.failures_of({"cpu": ok, "cuda": {**ok, "providers": ["CPUExecutionProvider"]}}, True, 0, 3)
    assert len(fell_back) == 1 and "a GPU is present but ONNX Runtime gave the session only" in fell_back[0]
    assert gpu_check.failures_of({"cpu": ok, "cuda": None}, False, 5, 3) == [
        "the ONNX model predicted the forgotten class 3 for 5 test images"
    ]


def test_a_failed_check_exits_non_zero_with_the_reason(tmp_path, monkeypatch, capsys):
    report = json.loads(json.dumps(FAKE_REPORT))
    report.update(passed=False, failures=["parity on the cpu provider failed: ..."])
    monkeypatch.setattr(gpu_check, "run", lambda args: report)
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    assert "gpu_check FAILED:\n- parity on the cpu provider failed" in capsys.readouterr().err
    assert json.loads((tmp_path / "gpu_check.json").read_text())["passed"] is False
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check: FAILED")


def test_cuda_asked_for_without_a_gpu_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--device", "cuda", "--quick"])
    assert exit_.value.code == 2
    assert "gpu_check: error: device 'cuda' was asked for but no CUDA GPU is available" in capsys.readouterr().err


def test_cli_bench_gpu_hands_its_flags_to_gpu_check(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(gpu_check, "check_and_report", lambda config: seen.append(config) or 0)
    flags = ["--quick", "--device", "cpu", "--amp", "bf16", "--out", "x"]
    assert cli.main(["bench", "gpu", *flags]) == 0
    assert gpu_check.main(flags) == 0  # python -m nhle.bench.gpu: the same flags, the same config
    assert seen == [GpuBench(quick=True, device="cpu", amp="bf16", out="x")] * 2
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "gpu", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--device",
        "--amp",
        "--cifar-root",
        "--train-size",
        "--test-size",
        "--epochs",
        "--batch-size",
        "--max-steps",
        "--quick",
        "--out",
    ):
        assert flag in help_text


def test_cifar_shaped_synthetic_data_has_class_structure_and_scaling_data_is_unchanged():
    data = synthetic_splits(300, test_size=50, size=32, channels=3)
    assert data.train.images.shape == (300, 3, 32, 32) and data.train.images.dtype == torch.uint8
    means = [data.train.images[data.train.labels == c].float().mean(0) for c in range(10)]
    within = (data.train.images[data.train.labels == 0].float() - means[0]).abs().mean()
    between = min((means[0] - means[c]).abs().mean() for c in range(1, 10))
    assert between > 0.2 * within
    # The defaults must keep giving the exact data docs/benchmarks.md's scaling rows were measured on
    # (this fingerprint was taken before the size/channels parameters existed).
    assert synthetic_splits(500, test_size=100, seed=3).fingerprint() == (
        "ade49f340ed05b1c39659ef9fb929cfbc23956d987925346924603fa05017e71"
    )


FAKE_REPORT = {
    "measured_on": "measured today on a test",
    "passed": True,
    "failures": [],
    "machine": {"device": "cpu", "gpu": None, "cpu": "x86_64", "torch": "2", "onnxruntime": "1", "torch_threads": 2},
    "settings": {
        "data": "synthetic",
        "image_shape": [3, 32, 32],
        "train_size": 10,
        "test_size": 10,
        "epochs": 1,
        "batch_size": 8,
        "amp": "off",
        "max_steps": 1,
        "n_samples": 32,
        "forget_class": 0,
        "seed": 0,
        "quick": True,
    },
    "train": {"seconds": 1.0, "steps": 2, "seconds_per_step": 0.5, "images_per_s": 10.0},
    "unlearn": {"seconds": 0.1, "steps": 1, "stopped_early": False, "seconds_per_step": 0.1},
    "retrain_free": {"retrain_seconds_estimate": 0.9, "speedup_vs_retrain": 9.0, "note": ""},
    "accuracy": {
        "original_forget_test_acc": 1.0,
        "original_retain_test_acc": 1.0,
        "forget_test_acc": 0.0,
        "retain_test_acc": 1.0,
        "retained_drop_pp": 0.0,
    },
    "onnx": {"forgotten_class_predictions": 0, "test_images": 10},
    "parity": {
        "cpu": {"passed": True, "providers": ["CPUExecutionProvider"], "max_abs_prob_diff": 1e-7},
        "cuda": None,
        "cuda_default_options": None,
    },
    "inference_ms_per_batch": {"batch_size": 8, "torch_eager_cpu": 1.0, "ort_cpu": 1.0},
}
