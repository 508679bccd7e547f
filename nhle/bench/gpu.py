"""`python -m nhle.bench.gpu`: the whole path on one machine (train ResNet-18, NHLE + masking,
ONNX export, ONNX Runtime parity on every provider) with its timings, to run on a GPU box.

    python -m nhle.bench.gpu --quick --device cpu --out /tmp/gpu_check       # smoke test, ~20 s on 2 CPU cores
    python -m nhle.bench.gpu --device cuda --amp bf16 --out bench/gpu         # a GPU, synthetic CIFAR-shaped data
    python -m nhle.bench.gpu --device cuda --cifar-root ~/data --out bench/gpu   # real CIFAR-10 files
    nhle bench gpu --device cuda --out bench/gpu                              # the same through the CLI

Data: real CIFAR-10 (torchvision's files under --cifar-root, never downloaded), or without it a
synthetic stand-in of the same shape (3x32x32, 10 classes, uint8) with real class structure
(nhle.bench.synthetic.synthetic_splits). One class is forgotten with the configured NHLE + class
weight masking from 32 of its samples. The model is exported to ONNX and checked against PyTorch
(nhle.core.export.check_parity, the pipeline's tolerance) on the CPU provider and, with a GPU, on the
CUDA provider in strict fp32 (use_tf32=0); the CUDA provider with its default options (TF32
convolutions on Ampere and later, what `nhle serve` gets) is reported too but does not gate.

Writes gpu_check.json and gpu_check.md into --out. Exits 1, naming what failed, if a parity check
fails, the ONNX model ever predicts the forgotten class, or a GPU is present but ONNX Runtime
could not give a session its CUDA provider.

Imports only torch, torchvision, numpy, scikit-learn, onnx, onnxruntime and nhle's core modules
(no MLflow, Prefect, DVC, FastAPI or matplotlib), so it runs from the bare environment.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from nhle.bench.configs import GpuBench
from nhle.bench.synthetic import synthetic_splits
from nhle.bench.unlearning import measured_on
from nhle.core.config import ExportConfig, ModelConfig, TrainConfig, UnlearnConfig
from nhle.core.data import ImageSet, Splits, load_dataset, sample_per_class, split_by_classes
from nhle.core.export import CUDA_STRICT_FP32, check_parity, export_onnx, make_session, preload_cuda_libraries
from nhle.core.flags import add_config_flags, config_from
from nhle.core.gates import retained_drop_pp
from nhle.core.training import evaluate, resolve_device, train_model, training_spec
from nhle.core.unlearning import unlearn

CPU = ["CPUExecutionProvider"]
CUDA_FP32 = [CUDA_STRICT_FP32, "CPUExecutionProvider"]  # what the pipeline's parity check uses on a GPU
CUDA_DEFAULT = ["CUDAExecutionProvider", "CPUExecutionProvider"]
# Sizes: a GPU run, and --quick (a smoke test that finishes in well under a minute on 2 CPU cores).
FULL = {
    "train_size": 50000,
    "test_size": 2000,
    "epochs": 3,
    "batch_size": 128,
    "max_steps": 300,
    "repeats": 20,
    "synthesis_steps": UnlearnConfig().synthesis_steps,
}
# The default's input synthesis (36 images x 100 steps of ResNet-18) alone took minutes on 2 cores.
QUICK = {
    "train_size": 256,
    "test_size": 200,
    "epochs": 1,
    "batch_size": 32,
    "max_steps": 5,
    "repeats": 3,
    "synthesis_steps": 5,
}
NOT_IMPORTED = ("mlflow", "prefect", "dvc", "fastapi", "matplotlib")


def gpu_check_data(cifar_root: str | None, train_size: int, test_size: int, seed: int) -> Splits:
    """Real CIFAR-10 from local files (a seeded subset of each split when sizes are smaller),
    else the synthetic 3x32x32 stand-in of exactly those sizes."""
    if cifar_root is None:
        return synthetic_splits(train_size, test_size, seed=seed, size=32, channels=3)
    data = load_dataset("cifar10", root=cifar_root, download=False)
    generator = torch.Generator().manual_seed(seed)

    def take(part: ImageSet, n: int) -> ImageSet:
        return part if n >= len(part) else part.subset(torch.randperm(len(part), generator=generator)[:n].sort().values)

    return Splits(data.name, take(data.train, train_size), take(data.test, test_size), data.class_names)


def median_ms(run, repeats: int, sync=lambda: None) -> float:
    """Median wall-clock milliseconds of run() over `repeats` calls, after two warm-up calls."""
    for _ in range(2):
        run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def inference_ms(model, onnx_path: Path, x: torch.Tensor, device: torch.device, gpu: bool, repeats: int) -> dict:
    """ms per batch: PyTorch eager (fp32) on `device` with the batch already there, and ONNX
    Runtime on each provider from a numpy batch in host memory (so the CUDA figure includes the
    copy to the GPU and back, as a server's request does)."""
    eager = copy.deepcopy(model).to(device).eval()
    x_device = x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        result = {f"torch_eager_{device.type}": median_ms(lambda: eager(x_device), repeats, sync)}
    for name, providers in (("ort_cpu", CPU), *([("ort_cuda", CUDA_DEFAULT)] if gpu else [])):
        session = make_session(onnx_path, providers)
        feed = {session.get_inputs()[0].name: x.numpy()}
        result[name] = median_ms(lambda session=session, feed=feed: session.run(None, feed), repeats)
    return result


def onnx_predictions_of(onnx_path: Path, data: ImageSet, forget_class: int) -> int:
    """How many test images the exported model (CPU provider) assigns to the forgotten class."""
    session = make_session(onnx_path, CPU)
    name = session.get_inputs()[0].name
    logits = [session.run(None, {name: chunk.numpy()})[0] for chunk in torch.split(data.float_images(), 256)]
    return int((np.concatenate(logits).argmax(1) == forget_class).sum())


def failures_of(parity: dict, gpu: bool, forgotten_predictions: int, forget_class: int) -> list[str]:
    """What makes the check fail, one sentence each: a gating parity report that did not pass, a
    GPU that ONNX Runtime did not use, or a forgotten class the exported model still predicts."""
    failures = []
    for name in ("cpu", "cuda"):
        report = parity[name]
        if report is not None and not report["passed"]:
            failures.append(
                f"parity on the {name} provider failed: argmax agreement {report['argmax_agreement']:.4%}, "
                f"max abs probability difference {report['max_abs_prob_diff']:.3g} "
                f"(tolerance {report['tolerance']:g}), providers {report['providers']}"
            )
    if gpu and parity["cuda"]["providers"][0] != "CUDAExecutionProvider":
        failures.append(
            f"a GPU is present but ONNX Runtime gave the session only {parity['cuda']['providers']}: "
            "check that onnxruntime-gpu (not onnxruntime) is installed and that CUDA 13 / cuDNN 9 "
            "libraries load (see docs/gpu.md)"
        )
    if forgotten_predictions:
        failures.append(
            f"the ONNX model predicted the forgotten class {forget_class} for {forgotten_predictions} test images"
        )
    return failures


def run(args: GpuBench) -> dict:
    """Everything the module docstring lists; returns the report that goes to gpu_check.json."""
    sizes = {
        k: getattr(args, k) if getattr(args, k, None) is not None else v
        for k, v in (QUICK if args.quick else FULL).items()
    }
    device = resolve_device(args.device)
    gpu = torch.cuda.is_available()
    if gpu:
        preload_cuda_libraries()
    export_config = ExportConfig()
    data = gpu_check_data(args.cifar_root, sizes["train_size"], sizes["test_size"], args.seed)
    print(
        f"gpu_check: {data.name}, {len(data.train)} train / {len(data.test)} test images "
        f"{'x'.join(map(str, data.image_shape))}, ResNet-18 on {device}, amp {args.amp}",
        flush=True,
    )

    train_config = replace(
        TrainConfig(), epochs=sizes["epochs"], batch_size=sizes["batch_size"], device=str(device), amp=args.amp
    )
    spec = training_spec(ModelConfig(arch="resnet18_cifar"), data)
    model, train_seconds = train_model(data, train_config, seed=args.seed, progress=False, spec=spec)
    train_steps = sizes["epochs"] * -(-len(data.train) // sizes["batch_size"])

    unlearn_config = replace(
        UnlearnConfig(), max_steps=sizes["max_steps"], synthesis_steps=sizes["synthesis_steps"], amp=args.amp
    )
    samples = sample_per_class(data.train, [args.forget_class], unlearn_config.n_samples, args.seed)
    result = unlearn(model, samples, [args.forget_class], unlearn_config, device=str(device))
    forget_test, retain_test = split_by_classes(data.test, [args.forget_class])
    retained_share = 1 - (data.train.labels == args.forget_class).float().mean().item()
    retrain_estimate = train_seconds * retained_share

    with tempfile.TemporaryDirectory(prefix="nhle-gpu-check-") as folder:
        onnx_path = export_onnx(result.model, Path(folder) / "model.onnx", data.image_shape)

        def parity(providers):
            return check_parity(
                result.model,
                onnx_path,
                data.test,
                batch_sizes=export_config.parity_batch_sizes,
                tolerance=export_config.parity_tolerance,
                providers=providers,
            )

        parity_reports = {
            "cpu": parity(CPU),
            "cuda": parity(CUDA_FP32) if gpu else None,
            "cuda_default_options": parity(CUDA_DEFAULT) if gpu else None,
        }
        forgotten_predictions = onnx_predictions_of(onnx_path, data.test, args.forget_class)
        batch = data.test.float_images()[torch.arange(sizes["batch_size"]) % len(data.test)]
        inference = inference_ms(result.model, onnx_path, batch, device, gpu, sizes["repeats"])

    failures = failures_of(parity_reports, gpu, forgotten_predictions, args.forget_class)
    original, unlearned = (copy.deepcopy(m).to(device) for m in (model, result.model))  # evaluated on `device`
    original_retain, retain_after = evaluate(original, retain_test, device), evaluate(unlearned, retain_test, device)
    return {
        "measured_on": measured_on(),
        "machine": {
            "device": str(device),
            "gpu": torch.cuda.get_device_name() if gpu else None,
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "settings": {
            "data": data.name,
            "image_shape": list(data.image_shape),
            "train_size": len(data.train),
            "test_size": len(data.test),
            "epochs": sizes["epochs"],
            "batch_size": sizes["batch_size"],
            "amp": args.amp,
            "max_steps": sizes["max_steps"],
            "synthesis_steps": sizes["synthesis_steps"],
            "n_samples": unlearn_config.n_samples,
            "forget_class": args.forget_class,
            "seed": args.seed,
            "quick": bool(args.quick),
        },
        "train": {
            "seconds": train_seconds,
            "steps": train_steps,
            "seconds_per_step": train_seconds / train_steps,
            "images_per_s": sizes["epochs"] * len(data.train) / train_seconds,
        },
        "unlearn": {
            "seconds": result.seconds,
            "steps": result.steps,
            "stopped_early": result.stopped_early,
            "seconds_per_step": result.seconds / max(result.steps, 1),
        },
        "retrain_free": {
            "retrain_seconds_estimate": retrain_estimate,
            "speedup_vs_retrain": retrain_estimate / result.seconds,
            "note": "retraining not run: estimated as the training time scaled to the retained share "
            "of the training set (same recipe, same machine)",
        },
        "accuracy": {
            "original_forget_test_acc": evaluate(original, forget_test, device),
            "original_retain_test_acc": original_retain,
            "forget_test_acc": evaluate(unlearned, forget_test, device),
            "retain_test_acc": retain_after,
            "retained_drop_pp": retained_drop_pp(original_retain, retain_after),
        },
        "onnx": {"forgotten_class_predictions": forgotten_predictions, "test_images": len(data.test)},
        "parity": parity_reports,
        "inference_ms_per_batch": {"batch_size": sizes["batch_size"], **inference},
        "modules_that_must_not_load": sorted(m for m in NOT_IMPORTED if m in sys.modules),
        "failures": failures,
        "passed": not failures,
    }


def markdown(report: dict) -> str:
    """gpu_check.md: the figures of one run, with its 'measured on' stamp."""
    s, t, u, r, a = (report[k] for k in ("settings", "train", "unlearn", "retrain_free", "accuracy"))
    m, inference = report["machine"], report["inference_ms_per_batch"]
    stop = "stopped early" if u["stopped_early"] else "step cap reached"
    figures = [
        (
            "training",
            (
                f"{t['seconds']:.1f} s, {t['steps']} steps: {t['seconds_per_step']:.3f} s/step, "
                f"{t['images_per_s']:.0f} images/s"
            ),
        ),
        ("NHLE + masking", f"{u['seconds']:.2f} s, {u['steps']} steps ({u['seconds_per_step']:.3f} s/step, {stop})"),
        (
            "retraining (estimated, not run)",
            f"{r['retrain_seconds_estimate']:.1f} s: NHLE is "
            + (
                f"{r['speedup_vs_retrain']:.1f}x faster"
                if r["speedup_vs_retrain"] >= 1
                else f"{1 / r['speedup_vs_retrain']:.1f}x slower (a small training set is cheap to retrain)"
            ),
        ),
        (
            "forget / retain test accuracy, original",
            f"{100 * a['original_forget_test_acc']:.1f}% / {100 * a['original_retain_test_acc']:.1f}%",
        ),
        (
            "forget / retain test accuracy, after NHLE",
            (
                f"{100 * a['forget_test_acc']:.1f}% / {100 * a['retain_test_acc']:.1f}% "
                f"(drop {a['retained_drop_pp']:.2f} pp)"
            ),
        ),
        (
            "ONNX predictions of the forgotten class",
            f"{report['onnx']['forgotten_class_predictions']} of {report['onnx']['test_images']}",
        ),
        *[
            (f"inference, {k.replace('_', ' ')}", f"{v:.2f} ms per batch of {inference['batch_size']}")
            for k, v in inference.items()
            if k != "batch_size"
        ],
    ]
    checks = [
        ("CPU", report["parity"]["cpu"]),
        ("CUDA, strict fp32 (gates)", report["parity"]["cuda"]),
        ("CUDA, default options (TF32; reported only)", report["parity"]["cuda_default_options"]),
    ]
    gpu = f" ({m['gpu']})" if m["gpu"] else " (no GPU)"
    lines = [
        f"# GPU check: {'passed' if report['passed'] else 'FAILED'}",
        "",
        f"{report['measured_on']}; device {m['device']}{gpu}; torch {m['torch']}, onnxruntime {m['onnxruntime']}.",
        (
            f"ResNet-18 (CIFAR stem) on {s['data']} ({s['train_size']} train / {s['test_size']} test images), "
            f"{s['epochs']} epoch(s) at batch {s['batch_size']}, amp {s['amp']}; NHLE + masking forgets class "
            f"{s['forget_class']} from {s['n_samples']} samples (at most {s['max_steps']} steps)."
        ),
        "",
        "| figure | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in figures],
        "",
        "| parity check | providers the session got | max abs prob diff | result |",
        "|---|---|---|---|",
        *[
            f"| {name} | not run (no GPU) | | |"
            if rep is None
            else f"| {name} | {', '.join(rep['providers'])} | {rep['max_abs_prob_diff']:.2g} | "
            f"{'passed' if rep['passed'] else 'FAILED'} |"
            for name, rep in checks
        ],
    ]
    if report["failures"]:
        lines += ["", "Failures:", *[f"- {f}" for f in report["failures"]]]
    return "\n".join(lines) + "\n"


def check_and_report(config: GpuBench) -> int:
    """Run the check, write OUT/gpu_check.json and .md, print the table; 1 when it failed."""
    report = run(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    if not report["passed"]:
        print("gpu_check FAILED:\n" + "\n".join(f"- {f}" for f in report["failures"]), file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nhle.bench.gpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(parser, GpuBench)
    config = config_from(GpuBench, parser.parse_args(argv))
    try:
        return check_and_report(config)
    except (RuntimeError, FileNotFoundError) as err:  # no GPU for --device cuda, no CIFAR files, ...
        parser.exit(2, f"gpu_check: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
