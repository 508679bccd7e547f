"""`nhle bench inference`: ONNX Runtime against PyTorch eager for both architectures, and how
close ResNet-18 gets to this machine's fp32 matrix-multiply rate.

    nhle bench inference --out bench/inference        # ~2 min on 2 CPU cores
    nhle bench inference --quick --out /tmp/inference

For each model (the small CNN on 8x8 digits, ResNet-18 with the CIFAR stem on 32x32 images) the
model is exported to ONNX exactly as the pipeline does, and both runtimes run the same batches,
interleaved round by round (nhle.serve_bench.compare_runtimes). FLOPs per image come from
torch.utils.flop_counter (a multiply-add counts 2); achieved GFLOP/s = FLOPs x images/s. The
reference is the best of several fp32 1024x1024 torch.mm runs with the same threads.
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nhle.export import export_onnx
from nhle.models import build_model
from nhle.serve_bench import compare_runtimes

MODELS = {"smallcnn": (1, 8), "resnet18": (3, 32)}  # channels, image size


def flops_per_image(model, shape) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return int(counter.get_total_flops())


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """Best fp32 torch.mm rate over `repeats` runs, GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def bench_inference(out: Path = Path("bench/inference"), batch_size: int = 64, rounds: int = 5,
                    seconds_per_model: float = 40.0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.node() or 'this machine'} ({platform.machine()})",
              "date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(),
              "matmul_fp32_gflops": round(matmul_gflops(), 1), "models": {}}
    rng = np.random.default_rng(0)
    for arch, (channels, size) in MODELS.items():
        model = build_model(arch, channels, 10).eval()
        shape = (channels, size, size)
        with tempfile.TemporaryDirectory(prefix="nhle-inference-") as folder:
            onnx_path = export_onnx(model, Path(folder) / "model.onnx", shape)
            batches = [rng.random((batch_size, *shape), dtype=np.float32) for _ in range(2)]
            runtimes = compare_runtimes(model, onnx_path, batches, rounds, time.monotonic() + seconds_per_model)
        flops = flops_per_image(model, shape)
        runtimes.update({"input": list(shape), "mflops_per_image": round(flops / 1e6, 2),
                         "ort_gflops": round(flops * runtimes["ort_images_per_s"] / 1e9, 1),
                         "torch_gflops": round(flops * runtimes["torch_images_per_s"] / 1e9, 1)})
        runtimes["ort_share_of_matmul"] = round(runtimes["ort_gflops"] / result["matmul_fp32_gflops"], 3)
        result["models"][arch] = runtimes
        print(json.dumps({arch: runtimes}), flush=True)
    (out / "inference.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "inference.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"Inference on {result['machine']}, {result['date']}, {result['torch_threads']} torch threads, "
             f"CPU; fp32 1024x1024 matmul: {result['matmul_fp32_gflops']} GFLOP/s.", "",
             "| model | input | MFLOP / image | batch | ONNX Runtime img/s | PyTorch eager img/s | ORT / eager "
             "| ORT GFLOP/s | share of matmul rate |", "|---|---|---|---|---|---|---|---|---|"]
    for arch, r in result["models"].items():
        lines.append(f"| {arch} | {'x'.join(map(str, r['input']))} | {r['mflops_per_image']} | {r['batch_size']} | "
                     f"{r['ort_images_per_s']:,.0f} | {r['torch_images_per_s']:,.0f} | {r['ort_over_torch']} | "
                     f"{r['ort_gflops']} | {100 * r['ort_share_of_matmul']:.0f}% |")
    return "\n".join(lines)


__all__ = ["bench_inference", "flops_per_image", "matmul_gflops"]
