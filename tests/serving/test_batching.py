"""Micro-batching: concurrent small requests gathered into one ONNX Runtime call, each answered
with its own rows of its own model (a hot swap never mixes versions in one call).

    .venv/bin/python -m pytest -q tests/serving/test_batching.py
"""

import threading

import numpy as np
import onnxruntime as ort
import pytest

from nhle_serving.batching import MicroBatcher
from nhle_serving.models import LoadedModel
from nhle_serving.sources import Pointer


def loaded(path, forgotten, batcher) -> LoadedModel:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return LoadedModel(
        session=session,
        input_name="images",
        output_name="probabilities",
        input_shape=(1, 8, 8),
        class_names=tuple(map(str, range(10))),
        forgotten=forgotten,
        pointer=Pointer(key=str(path), model_uri=str(path)),
        sha256="-",
        providers=("cpu",),
        loaded_at="-",
        load_seconds=0.0,
        metadata={},
        batcher=batcher,
    )


@pytest.fixture
def batcher():
    batcher = MicroBatcher(max_images=64, wait_ms=500)
    yield batcher
    batcher.stop()


def concurrently(calls):
    results, threads = [None] * len(calls), []
    for i, (model, x) in enumerate(calls):

        def run(i=i, model=model, x=x):
            results[i] = model.probabilities(x)

        threads.append(threading.Thread(target=run))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_requests_share_a_call_and_get_their_own_rows(onnx_files, digits, batcher):
    model = loaded(onnx_files[(3,)], (3,), batcher)
    images = digits.test.float_images().numpy()
    parts = [images[2 * i : 2 * i + 2] for i in range(6)]
    results = concurrently([(model, x) for x in parts])
    assert batcher.calls == 1 and batcher.images == 12  # all six waited for one another (500 ms)
    for x, p in zip(parts, results):
        np.testing.assert_allclose(p, model.compute(x), atol=1e-6)


def test_two_versions_in_one_gathering_each_answer_with_their_own_model(onnx_files, digits, batcher):
    old, new = loaded(onnx_files[(3,)], (3,), batcher), loaded(onnx_files[(3, 5)], (3, 5), batcher)
    images = digits.test.float_images().numpy()[:8]
    results = concurrently([(old, images[:4]), (new, images[4:]), (old, images[4:])])
    assert batcher.calls == 2
    np.testing.assert_allclose(results[0], old.compute(images[:4]), atol=1e-6)
    np.testing.assert_allclose(results[1], new.compute(images[4:]), atol=1e-6)
    np.testing.assert_allclose(results[2], old.compute(images[4:]), atol=1e-6)
    assert (results[1][:, [3, 5]] == 0).all() and (results[2][:, 3] == 0).all()


def test_a_full_batch_goes_straight_to_the_session(onnx_files, digits, batcher):
    model = loaded(onnx_files[(3,)], (3,), batcher)
    p = model.probabilities(digits.test.float_images().numpy()[:64])
    assert p.shape == (64, 10) and batcher.calls == 0
