"""`nhle bench inference`: ONNX Runtime against PyTorch eager for both architectures, and how
close ResNet-18 gets to this machine's fp32 matrix-multiply rate.

    nhle bench inference --out bench/inference        # ~2 min on 2 CPU cores
    nhle bench inference --quick --out /tmp/inference

For each model (the small CNN on 8x8 digits, ResNet-18 with the CIFAR stem on 32x32 images) the
model is exported to ONNX exactly as the pipeline does, and both runtimes run the same batches,
interleaved round by round (nhle.bench.serving.compare_runtimes). FLOPs per image come from
torch.utils.flop_counter (a multiply-add counts 2); achieved GFLOP/s = FLOPs x images/s. The
reference is the fastest fp32 2048x2048 matmul among torch.mm, numpy and ONNX Runtime on the
same threads (torch.mm alone understates AMD CPUs: MKL takes slow paths there).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnx import TensorProto, helper
from torch.utils.flop_counter import FlopCounterMode

from nhle.bench.serving import compare_runtimes
from nhle.core.export import export_onnx
from nhle.core.models import build_model

MODELS = {"smallcnn": (1, 8), "resnet18_cifar": (3, 32)}  # channels, image size


def flops_per_image(model, shape) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return int(counter.get_total_flops())


def _best_seconds(run, repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(n: int = 2048, repeats: int = 5) -> dict:
    """Best fp32 n x n matmul rate, GFLOP/s, of three libraries on the same threads: torch.mm
    (MKL, which takes slow paths on AMD CPUs), numpy (OpenBLAS) and an ONNX Runtime MatMul (MLAS).
    The largest is the machine's rate."""
    a, b = np.random.default_rng(0).random((2, n, n), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    spec = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = {
        "torch": lambda: torch.mm(ta, tb),
        "numpy": lambda: a @ b,
        "onnxruntime": lambda: session.run(None, {"A": a, "B": b}),
    }
    rates = {k: round(2 * n**3 / _best_seconds(run, repeats) / 1e9, 1) for k, run in runs.items()}
    return {**rates, "best": max(rates.values()), "n": n}


def bench_inference(
    out: Path = Path("bench/inference"), batch_size: int = 64, rounds: int = 5, seconds_per_model: float = 40.0
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": f"{platform.node() or 'this machine'} ({platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
        "matmul_fp32_gflops": matmul_gflops(),
        "models": {},
    }
    rng = np.random.default_rng(0)
    for arch, (channels, size) in MODELS.items():
        model = build_model(arch, channels, 10).eval()
        shape = (channels, size, size)
        with tempfile.TemporaryDirectory(prefix="nhle-inference-") as folder:
            onnx_path = export_onnx(model, Path(folder) / "model.onnx", shape)
            batches = [rng.random((batch_size, *shape), dtype=np.float32) for _ in range(2)]
            runtimes = compare_runtimes(model, onnx_path, batches, rounds, time.monotonic() + seconds_per_model)
        flops = flops_per_image(model, shape)
        runtimes.update(
            {
                "input": list(shape),
                "mflops_per_image": round(flops / 1e6, 2),
                "ort_gflops": round(flops * runtimes["ort_images_per_s"] / 1e9, 1),
                "torch_gflops": round(flops * runtimes["torch_images_per_s"] / 1e9, 1),
            }
        )
        runtimes["ort_share_of_matmul"] = round(runtimes["ort_gflops"] / result["matmul_fp32_gflops"]["best"], 3)
        runtimes["torch_share_of_matmul"] = round(runtimes["torch_gflops"] / result["matmul_fp32_gflops"]["best"], 3)
        result["models"][arch] = runtimes
        print(json.dumps({arch: runtimes}), flush=True)
    (out / "inference.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "inference.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    mm = result["matmul_fp32_gflops"]
    lines = [
        f"Inference on {result['machine']}, {result['date']}, {result['torch_threads']} torch threads, CPU. "
        f"fp32 {mm['n']}x{mm['n']} matmul, GFLOP/s: ONNX Runtime (MLAS) {mm['onnxruntime']}, numpy (OpenBLAS) "
        f"{mm['numpy']}, torch.mm {mm['torch']}; the machine's rate is taken as {mm['best']}.",
        "",
        "| model | input | MFLOP / image | batch | ONNX Runtime img/s | PyTorch eager img/s | ORT / eager "
        "| ORT GFLOP/s (share of matmul rate) | eager GFLOP/s (share) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, r in result["models"].items():
        lines.append(
            f"| {arch} | {'x'.join(map(str, r['input']))} | {r['mflops_per_image']} | {r['batch_size']} | "
            f"{r['ort_images_per_s']:,.0f} | {r['torch_images_per_s']:,.0f} | {r['ort_over_torch']} | "
            f"{r['ort_gflops']} ({100 * r['ort_share_of_matmul']:.0f}%) | {r['torch_gflops']} "
            f"({100 * r['torch_share_of_matmul']:.0f}%) |"
        )
    return "\n".join(lines)


__all__ = ["bench_inference", "flops_per_image", "matmul_gflops"]
