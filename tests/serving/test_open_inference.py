"""The Open Inference Protocol (KServe V2) on the real server process, through Triton's own client
(`tritonclient[http]`): metadata, JSON and binary tensors, bad tensors, a hot swap under load.

    .venv/bin/python -m pytest -q tests/serving/test_open_inference.py
"""

import gzip
import json
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from jsonschema import Draft202012Validator
from serving_support import NAME, preprocessing

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


def client_of(server):
    return httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=30)


def v2_infer(client, images: np.ndarray, binary: bool = True, datatype: str = "FP32", version: str = ""):
    tensor = httpclient.InferInput("images", list(images.shape), datatype)
    tensor.set_data_from_numpy(images, binary_data=binary)
    output = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    return client.infer(NAME, [tensor], model_version=version, outputs=[output])


@pytest.fixture(scope="module")
def all_digits(digits):
    """All 1,797 digits (train and test) as float32 (N, 1, 8, 8) in [0, 1], and their labels."""
    images = np.concatenate([digits.train.float_images().numpy(), digits.test.float_images().numpy()])
    return images, np.concatenate([np.asarray(digits.train.labels), np.asarray(digits.test.labels)])


def test_metadata_and_readiness(server):
    client = client_of(server)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "nhle" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata(NAME)
    assert model["name"] == NAME and model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert model["parameters"]["forgotten_classes"] == [3] and "UINT8" in model["parameters"]["input_datatypes"]
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, "1")
    assert not client.is_model_ready(NAME, "2") and not client.is_model_ready("other-model")
    with pytest.raises(InferenceServerException, match="'other-model' is not served here"):
        client.get_model_metadata("other-model")
    with pytest.raises(InferenceServerException, match="version '7' of 'nhle-classifier' is not served"):
        client.get_model_metadata(NAME, "7")


def test_json_binary_and_uint8_tensors_agree_with_invocations(server, all_digits):
    client = client_of(server)
    images = all_digits[0][:40]
    expected = np.array(
        server.http.post("/invocations", json={"inputs": images.tolist()}).json()["predictions"]["probabilities"],
        dtype=np.float32,
    )
    binary = v2_infer(client, images, binary=True)
    assert binary.get_response()["model_version"] == "1"
    for result in (binary, v2_infer(client, images, binary=False), v2_infer(client, images, version="1")):
        p = result.as_numpy("probabilities")
        assert p.dtype == np.float32 and p.shape == (40, 10)
        np.testing.assert_allclose(p, expected, atol=1e-6)
    # UINT8: 0..255 pixels, divided by the recorded preprocessing's 255 on the server.
    pixels = np.round(images * 255).astype(np.uint8)
    p8 = v2_infer(client, pixels, datatype="UINT8").as_numpy("probabilities")
    p_unit = v2_infer(client, pixels.astype(np.float32) / 255).as_numpy("probabilities")
    np.testing.assert_allclose(p8, p_unit, atol=1e-6)
    assert (p8.argmax(1) == p_unit.argmax(1)).all()


def test_the_forgotten_class_is_never_returned_over_all_digits(server, all_digits):
    client = client_of(server)
    images, labels = all_digits
    assert len(images) >= 1000
    p = np.concatenate(
        [
            v2_infer(client, images[i : i + 250], binary=i % 500 == 0).as_numpy("probabilities")
            for i in range(0, len(images), 250)
        ]
    )
    assert p.shape == (len(images), 10) and np.isfinite(p).all()
    assert (p[:, 3] == 0.0).all() and (p.argmax(1) != 3).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    keep = labels != 3
    assert (p[keep].argmax(1) == labels[keep]).mean() > 0.9  # the rest is still classified


@pytest.mark.parametrize(
    "datatype, shape, match",
    [
        ("FP64", [2, 1, 8, 8], "datatype is 'FP64'; send FP32"),
        ("INT32", [2, 1, 8, 8], "datatype is 'INT32'"),
        ("FP32", [2, 1, 8, 7], r"shape is \[2, 1, 8, 7\]; this model takes \[N, 1, 8, 8\]"),
        ("FP32", [2, 64], r"shape is \[2, 64\]"),
    ],
)
def test_bad_tensors_through_the_client_are_a_4xx_naming_the_problem(server, datatype, shape, match):
    client = client_of(server)
    dtype = {"FP64": np.float64, "INT32": np.int32, "FP32": np.float32}[datatype]
    tensor = httpclient.InferInput("images", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype), binary_data=True)
    with pytest.raises(InferenceServerException, match=match) as caught:
        client.infer(NAME, [tensor])
    assert caught.value.status() == "400"


def raw_infer(server, header: dict, data: bytes = b"", header_length=None):
    head = json.dumps(header).encode()
    length = str(len(head)) if header_length is None else header_length
    return server.http.post(
        f"/v2/models/{NAME}/infer",
        content=head + data,
        headers={"Inference-Header-Content-Length": length} if data or header_length else {},
    )


def binary_header(n: int, size: int, datatype: str = "FP32") -> dict:
    return {
        "inputs": [
            {"name": "images", "shape": [n, 1, 8, 8], "datatype": datatype, "parameters": {"binary_data_size": size}}
        ]
    }


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("declared size wrong", 400, "binary_data_size is 100; shape [2, 1, 8, 8] of FP32 takes 512 bytes"),
        (
            "fewer bytes than declared",
            400,
            "carries 300 bytes of tensor data after its JSON header; inputs[0] declares 512",
        ),
        ("bytes left over", 400, "carries 600 bytes of tensor data; the inputs declare 512"),
        ("header length not a number", 400, "Inference-Header-Content-Length 'ten'"),
        ("header length past the body", 400, "must be a whole number of bytes from 1 to the body's"),
        ("header length cuts the JSON", 400, "the body is not valid JSON"),
        ("UINT8 JSON data out of range", 400, "not UINT8 (whole numbers 0..255)"),
        ("FP32 out of [0, 1]", 400, "outside [0, 1]: send UINT8 for 0..255 pixels"),
        ("JSON data of the wrong count", 400, "holds 10 values; shape [1, 1, 8, 8] needs 64"),
        ("wrong input name", 400, "inputs[0].name is 'x'; the model's input is 'images'"),
        ("unknown output", 400, "the model's one output is 'probabilities'"),
        ("too many images", 413, "the limit is 300"),
    ],
)
def test_bad_bodies_are_a_4xx_naming_the_problem(server, case, status, words):
    zeros = np.zeros((2, 1, 8, 8), np.float32).tobytes()
    r = {
        "declared size wrong": lambda: raw_infer(server, binary_header(2, 100), zeros),
        "fewer bytes than declared": lambda: raw_infer(server, binary_header(2, 512), zeros[:300]),
        "bytes left over": lambda: raw_infer(server, binary_header(2, 512), zeros + b"x" * 88),
        "header length not a number": lambda: raw_infer(server, binary_header(2, 512), zeros, "ten"),
        "header length past the body": lambda: raw_infer(server, binary_header(2, 512), zeros, "99999"),
        "header length cuts the JSON": lambda: raw_infer(server, binary_header(2, 512), zeros, "20"),
        "UINT8 JSON data out of range": lambda: raw_infer(
            server, {"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "UINT8", "data": [300] * 64}]}
        ),
        "FP32 out of [0, 1]": lambda: raw_infer(
            server, {"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [16.0] * 64}]}
        ),
        "JSON data of the wrong count": lambda: raw_infer(
            server, {"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 10}]}
        ),
        "wrong input name": lambda: raw_infer(
            server, {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
        ),
        "unknown output": lambda: raw_infer(server, {**binary_header(2, 512), "outputs": [{"name": "logits"}]}, zeros),
        "too many images": lambda: raw_infer(server, binary_header(301, 301 * 256), bytes(301 * 256)),
    }[case]()
    assert r.status_code == status, (case, r.status_code, r.text)
    assert words in r.json()["error"], (case, r.json())


def test_gzip_bodies_are_read_and_bombs_refused(server, all_digits):
    client = client_of(server)
    images = all_digits[0][:8]
    tensor = httpclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    p = client.infer(NAME, [tensor], request_compression_algorithm="gzip").as_numpy("probabilities")
    np.testing.assert_allclose(p, v2_infer(client, images).as_numpy("probabilities"), atol=1e-6)

    bomb = gzip.compress(b" " * (4 * 1024 * 1024))  # 4 MiB of spaces, ~4 KB on the wire
    r = server.http.post(f"/v2/models/{NAME}/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "decompresses to more than" in r.json()["error"]


def test_a_compressed_body_cut_short_or_with_bytes_after_it_is_a_400(server):
    body = json.dumps(
        {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64}]}
    ).encode()
    url = f"/v2/models/{NAME}/infer"
    whole = gzip.compress(body)
    assert server.http.post(url, content=whole, headers={"Content-Encoding": "gzip"}).status_code == 200
    for encoding, sent, words in [
        ("gzip", whole[:-8], "ends before its end marker"),  # no CRC and length
        ("deflate", zlib.compress(body)[:-4], "ends before its end marker"),
        ("gzip", whole + b"junk", "4 bytes after its gzip data"),
    ]:
        r = server.http.post(url, content=sent, headers={"Content-Encoding": encoding})
        assert r.status_code == 400 and words in r.json()["error"], (encoding, r.status_code, r.text)


@pytest.mark.parametrize("micro_batching", [False, True])
def test_hot_swap_during_v2_binary_load_fails_no_request(
    make_registry, onnx_files, digits, start_server, all_digits, micro_batching
):
    """Four clients send V2 binary batches of 8 while a new champion (3 and 5 masked) is
    registered: no request fails, version 1 never returns class 3 and version 2 never 3 or 5."""
    registry = make_registry(f"v2-swap-project-{micro_batching}")
    registry.register(onnx_files[(3,)], preprocessing(digits, [3]))
    server = start_server(registry.root, poll_seconds=0.5, micro_batching=str(micro_batching).lower())
    images, labels = all_digits
    picks = [np.concatenate([images[labels == 5][i : i + 4], images[labels == 3][i : i + 4]]) for i in range(20)]
    results, failures, lock, stop = [], [], threading.Lock(), threading.Event()

    def worker(seed: int):
        client = client_of(server)
        i = seed
        while not stop.is_set():
            i += 1
            try:
                result = v2_infer(client, picks[i % len(picks)])
                with lock:
                    results.append((result.get_response()["model_version"], result.as_numpy("probabilities")))
            except Exception as err:  # any failure at all is what this test counts
                with lock:
                    failures.append(repr(err))

    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(worker, k) for k in range(4)]
        while len(results) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        new = registry.register(onnx_files[(3, 5)], preprocessing(digits, [3, 5]))
        while sum(v == new for v, _ in results[-300:]) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for future in futures:
            future.result(timeout=60)

    assert not failures, failures[:5]
    assert {v for v, _ in results} == {"1", new}
    for version, p in results:
        assert (p[:, 3] == 0).all() and (p.argmax(1) != 3).all()
        if version == new:
            assert (p[:, 5] == 0).all() and (p.argmax(1) != 5).all()
    assert any((p.argmax(1) == 5).any() for v, p in results if v == "1")  # the old model did predict 5s
    batching = server.http.get("/model").json()["micro_batching"]
    if micro_batching:
        assert batching["images"] > 0 and batching["calls"] <= batching["images"] / 8
    else:
        assert batching is None


def test_infer_routes_are_in_the_openapi_schema_with_a_working_example(server):
    """The infer routes are plain Starlette routes (for speed); /openapi.json (hence /docs) still
    describes them, and the JSON example it gives is the served model's real answer."""
    spec = server.http.get("/openapi.json").json()
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert path in spec["paths"], sorted(spec["paths"])
        operation = spec["paths"][path]["post"]
        assert "binary tensor data extension" in operation["description"]
        assert "Inference-Header-Content-Length" in operation["description"]
        body = operation["requestBody"]["content"]
        assert set(body) == {"application/json", "application/octet-stream"}
        named = {p["name"]: p for p in operation["parameters"]}
        assert named["name"]["in"] == "path" and named["name"]["example"] == NAME
        assert ("version" in named) == ("{version}" in path)
        request = body["application/json"]["example"]
        Draft202012Validator(body["application/json"]["schema"]).validate(request)
        url = path.replace("{name}", NAME).replace("{version}", "1")
        r = server.http.post(url, json=request)  # what "Try it out" in /docs sends
        assert r.status_code == 200, r.text
        assert r.json() == operation["responses"]["200"]["content"]["application/json"]["example"]
        assert r.json()["outputs"][0]["data"][3] == 0  # the forgotten class
    assert len(set(op["operationId"] for item in spec["paths"].values() for op in item.values())) == sum(
        len(item) for item in spec["paths"].values()
    )  # operation ids stay unique
    paths = list(spec["paths"])
    assert paths.index("/v2/models/{name}/infer") > paths.index("/v2/models/{name}/versions/{version}/ready")
