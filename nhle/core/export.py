"""Export a classifier to ONNX and check that ONNX Runtime gives the same answers as PyTorch.

    from nhle.core.export import export_onnx, check_parity, assert_parity, make_session
    path = export_onnx(model, "model.onnx", image_shape=(1, 8, 8))
    report = check_parity(model, path, data.test)   # ImageSet or float/uint8 (N, C, H, W) tensor
    assert_parity(report)                           # raises ParityError unless report["passed"]
    session = make_session(path)
    p = session.run(None, {"images": x.numpy()})[0]   # x: float32 (N, C, H, W) in [0, 1]

The graph takes raw [0, 1] pixels named "images" with a symbolic batch dimension "batch" and
returns "probabilities" (N, classes): the softmax of the model's logits. Input normalisation and
the forgotten-class mask are part of the model's forward, so they are in the graph: a masked
class has a -inf logit, hence probability exactly 0, in ONNX Runtime as well. Probabilities
rather than logits leave the graph so that every consumer, `mlflow models serve` included, gets
finite numbers (a -inf logit is `-Infinity` in JSON, which strict parsers refuse).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from nhle.core.config import EXPORTERS
from nhle.core.data import ImageSet, as_float
from nhle.core.outputs import OUTPUT_NAME, as_probabilities, output_of

log = logging.getLogger(__name__)

INPUT_NAME = "images"
# What both exporters name the graph's input and output, quietly.
GRAPH_NAMES = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "verbose": False}


class WithProbabilities(torch.nn.Module):
    """The classifier as exported: its softmax probabilities (a -inf logit gives exactly 0)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x), dim=1)


def onnx_probabilities(session: onnxruntime.InferenceSession, x: np.ndarray) -> np.ndarray:
    """Probabilities from a session (nhle.core.outputs: what a graph's output means)."""
    name = output_of([o.name for o in session.get_outputs()])
    return as_probabilities(session.run([name], {session.get_inputs()[0].name: x})[0], name)


class ParityError(ValueError):
    """ONNX Runtime's predictions differ from PyTorch's beyond the tolerance."""


def _cpu_eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    # A copy, so the caller's model keeps its device and train/eval mode.
    return copy.deepcopy(model).cpu().eval()


def export_onnx(model: torch.nn.Module, path: str | Path, image_shape, exporter: str = "torchscript") -> Path:
    """Write `model` (in eval mode, on the CPU) to `path` as one self-contained ONNX file.

    exporter "torchscript" is torch.onnx's TorchScript exporter (5 to 20 times faster on the
    models here; PyTorch deprecates it) and falls back to "dynamo" (torch.export) where it fails,
    is gone, or gives a graph that does not answer like the model at batch sizes 1 and 3;
    "dynamo" is torch.export only. Either graph is checked for parity by the caller.
    The file appears at `path` only once it is complete and has passed onnx.checker; an export
    that fails leaves whatever was at `path` before untouched and no temporary file behind.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = WithProbabilities(_cpu_eval_copy(model)).eval()
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 1.
    example = torch.rand(2, *image_shape)
    # Not mkstemp: its 0600 mode would carry over to the exported file.
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        if exporter == "torchscript":
            try:
                _torchscript_export(model, example, tmp)
                _check_answers(model, tmp, image_shape)
            except Exception as err:  # noqa: BLE001 - an op it cannot export, a shape it fixed: torch.export can
                log.info(
                    "TorchScript ONNX export failed (%s: %s); exporting with torch.export", type(err).__name__, err
                )
                Path(tmp).unlink(missing_ok=True)
                exporter = "dynamo"
        if exporter == "dynamo":
            torch.onnx.export(
                model,
                (example,),
                tmp,
                dynamo=True,
                **GRAPH_NAMES,
                dynamic_shapes=({0: torch.export.Dim("batch")},),  # by position, whatever forward calls it
                # The dynamo exporter otherwise puts the weights in a side file next to `tmp`.
                external_data=False,
            )
        onnx.checker.check_model(tmp, full_check=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp + ".data"):
            Path(leftover).unlink(missing_ok=True)
        raise
    return path


def _check_answers(model: torch.nn.Module, path: str, image_shape) -> None:
    """Raise unless ONNX Runtime answers like `model` at batch sizes 1 and 3: a traced graph can
    fix a shape the example fed it (a model imported as a torch.export program does)."""
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = torch.rand(n, *image_shape)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-4):
            raise ValueError(f"its graph does not answer like the model at batch size {n}")


def _torchscript_export(model: torch.nn.Module, example: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings():  # its deprecation notice, on every call: the fallback above is the answer
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=False,
            **GRAPH_NAMES,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=18,
        )


@functools.cache
def preload_cuda_libraries() -> bool:
    """Load the CUDA and cuDNN libraries that torch's CUDA wheels installed (nvidia-* packages)
    into the process, once, so ONNX Runtime's CUDA provider finds them without LD_LIBRARY_PATH.

    Best effort: an onnxruntime without preload_dlls (older, or the CPU build) or a failed load
    only means ONNX Runtime searches the usual paths itself; the session then reports which
    providers it really got. Returns whether the preload ran."""
    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is None:
        return False
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its own warnings
            preload()
    except Exception:  # noqa: BLE001 - never worse than not preloading
        return False
    return True


# The parity check's CUDA provider computes in strict fp32, the contract of the CPU provider:
# by default it lets cuDNN run fp32 convolutions in TF32 (10-bit mantissa) on Ampere and later.
CUDA_STRICT_FP32 = ("CUDAExecutionProvider", {"use_tf32": "0"})


def session_providers(prefer_gpu: bool = True) -> list:
    """ONNX Runtime providers to ask for, best first.

    onnxruntime-gpu lists CUDA as available even without a GPU, and asking for it there only
    logs a failed provider load, so CUDA is requested only when torch can see a GPU (and then
    the CUDA libraries of torch's wheels are preloaded for it), in strict fp32.
    """
    if prefer_gpu and torch.cuda.is_available():
        preload_cuda_libraries()
        return [CUDA_STRICT_FP32, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path_or_bytes, providers=None, intra_op_threads: int | None = None) -> onnxruntime.InferenceSession:
    """An InferenceSession on an ONNX file or its bytes; session.get_providers() says what it got."""
    options = onnxruntime.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    if isinstance(path_or_bytes, Path):
        path_or_bytes = str(path_or_bytes)
    return onnxruntime.InferenceSession(path_or_bytes, options, providers=list(providers or session_providers()))


def check_parity(
    model: torch.nn.Module, onnx_path, images, batch_sizes=(1, 64, 257), tolerance: float = 1e-5, providers=None
) -> dict:
    """Compare PyTorch's softmax probabilities on all of `images` with ONNX Runtime's, the latter
    run in chunks of each batch size; see the module docstring for the report's use.

    Probabilities are compared (what the graph returns) because masked classes have -inf logits
    on both sides, and -inf - -inf is NaN. A NaN anywhere (e.g. a row with every class masked)
    fails the check.
    """
    x = images.float_images() if isinstance(images, ImageSet) else as_float(torch.as_tensor(images))
    if len(x) == 0:
        raise ValueError("no images to check parity on")
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    model = _cpu_eval_copy(model)
    session = make_session(onnx_path, providers)

    # The batch sizes exercise the graph's dynamic batch dimension; PyTorch is the reference,
    # computed once in large chunks: its own batching changes only float rounding, and batch-1
    # forwards of a whole test split are slow on a CPU.
    with torch.no_grad():
        p_torch = torch.softmax(torch.cat([model(c) for c in torch.split(x, 256)]), dim=1)
    non_finite = int((~torch.isfinite(p_torch)).sum())
    per_batch = {}
    for bs in batch_sizes:
        p_ort = torch.from_numpy(np.concatenate([onnx_probabilities(session, c.numpy()) for c in torch.split(x, bs)]))
        non_finite += int((~torch.isfinite(p_ort)).sum())
        per_batch[bs] = {
            "argmax_agreement": float((p_torch.argmax(1) == p_ort.argmax(1)).float().mean()),
            # torch's max propagates NaN, which then fails `<= tolerance` below.
            "max_abs_prob_diff": float((p_torch - p_ort).abs().max()),
        }

    agreement = min(r["argmax_agreement"] for r in per_batch.values())
    diffs = [r["max_abs_prob_diff"] for r in per_batch.values()]
    # Python's max() silently skips NaN depending on order, so NaN is carried explicitly.
    max_diff = float("nan") if any(np.isnan(diffs)) else max(diffs)
    return {
        "argmax_agreement": agreement,
        "max_abs_prob_diff": max_diff,
        "batch_sizes": batch_sizes,
        "n_samples": len(x),
        "tolerance": tolerance,
        "providers": session.get_providers(),
        "non_finite": non_finite,
        "per_batch_size": per_batch,
        "passed": bool(agreement == 1.0 and non_finite == 0 and max_diff <= tolerance),
    }


def preprocessing(model, image_shape, class_names) -> dict:
    """What a server needs to feed the exported graph (logged beside every ONNX model): the
    input tensor, the normalisation the graph applies itself, the classes and the masked ones."""
    return {
        "input_name": INPUT_NAME,
        "input_shape": [int(d) for d in image_shape],
        "input_scale": "float32 in [0, 1] (raw 8-bit pixels / 255; digits: value / 16)",
        "uint8_divisor": 255,  # 8-bit pixels (the servers' UINT8 / "byte" inputs) / this = the input
        "normalisation": {
            "inside_graph": True,
            "mean": model.input_mean.flatten().tolist(),
            "std": model.input_std.flatten().tolist(),
            "grey_to_rgb": bool(model.grey_to_rgb),
        },
        "arch": model.arch,
        "class_names": list(class_names),
        "forgotten_classes": model.forgotten_classes,
    }


def assert_parity(report: dict) -> dict:
    """Return the report if it passed, else raise ParityError naming the figures."""
    if not report["passed"]:
        raise ParityError(
            f"ONNX Runtime ({', '.join(report['providers'])}) differs from PyTorch on "
            f"{report['n_samples']} samples at batch sizes {report['batch_sizes']}: argmax agreement "
            f"{report['argmax_agreement']:.4%}, max abs probability difference "
            f"{report['max_abs_prob_diff']:.3g} (tolerance {report['tolerance']:g}), "
            f"{report.get('non_finite', 0)} non-finite probabilities"
        )
    return report
