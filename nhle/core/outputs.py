"""What an exported graph answers, for every reader: the parity check (nhle.core.export), the
server (nhle_serving) and the benchmarks. numpy only, so the server reads it without torch.

nhle's graphs return OUTPUT_NAME, the softmax of the model's logits, with every masked class
exactly 0. A graph from elsewhere (a local .onnx served as it is) may return logits under another
name: those get the softmax here.
"""

from __future__ import annotations

import numpy as np

OUTPUT_NAME = "probabilities"


def softmax(logits: np.ndarray) -> np.ndarray:
    # A masked class has a -inf logit: exp(-inf - max) is exactly 0, as it should be.
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def as_probabilities(y: np.ndarray, output_name: str) -> np.ndarray:
    """A graph's output `y`, named `output_name`, as probabilities."""
    return y if output_name == OUTPUT_NAME else softmax(y)


def output_of(names: list[str]) -> str:
    """Which of a graph's outputs is read: OUTPUT_NAME when it has one, else its first."""
    return OUTPUT_NAME if OUTPUT_NAME in names else names[0]
