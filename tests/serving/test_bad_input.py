"""Every kind of bad request gets a 4xx that names the problem, and the server keeps serving.

    .venv/bin/python -m pytest -q tests/serving/test_bad_input.py

The `server` fixture runs with NHLE_MAX_INSTANCES=300, NHLE_MAX_BODY_BYTES=1 MiB,
NHLE_MAX_REQUEST_PIXELS=20,000,000 and NHLE_BODY_TIMEOUT_SECONDS=3.
"""

import asyncio
import base64
import io
import json
import random
import socket
import struct
import time
import zlib

import httpx
import pytest
from PIL import Image
from serving_support import ADMIN_TOKEN, NAME

import nhle_serving.server
import nhle_serving.settings
from nhle_serving.settings import Settings

IMG = [[0.5] * 8 for _ in range(8)]
NESTED_34 = [0.5]
for _ in range(33):
    NESTED_34 = [NESTED_34]
JSON = {"content-type": "application/json"}


def png(width=8, height=8, noise=False) -> bytes:
    buffer = io.BytesIO()
    image = Image.effect_noise((width, height), 64) if noise else Image.new("L", (width, height))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def body(payload) -> bytes:
    return json.dumps(payload).encode()


def with_pixel(value: str) -> bytes:
    """An 8 x 8 instance whose first pixel is the raw JSON text `value`."""
    row = ",".join(["0.5"] * 7)
    rows = [f"[{value},{row}]"] + [f"[0.5,{row}]"] * 7
    return ('{"instances": [[' + ",".join(rows) + "]]}").encode()


def chunked(data: bytes, size: int = 64 * 1024):
    for i in range(0, len(data), size):  # a generator body is sent chunked: no Content-Length
        yield data[i : i + size]


# (id, path, request kwargs, status, words the message must contain)
CASES = [
    ("malformed-json", "/predict", dict(content=b'{"instances": [', headers=JSON), 400, "not valid JSON"),
    ("empty-body", "/predict", dict(content=b"", headers=JSON), 400, "empty"),
    ("invalid-utf8", "/predict", dict(content=b'{"instances": "\xff\xfe"}', headers=JSON), 400, "not valid JSON"),
    ("too-deep", "/predict", dict(content=b"[" * 100_000, headers=JSON), 400, "nested too deeply"),
    ("nan-literal", "/predict", dict(content=with_pixel("NaN"), headers=JSON), 400, "NaN"),
    ("infinity-literal", "/predict", dict(content=with_pixel("-Infinity"), headers=JSON), 400, "Infinity"),
    ("overflowing-float", "/predict", dict(content=with_pixel("1e400"), headers=JSON), 422, "non-finite"),
    ("huge-int", "/predict", dict(content=with_pixel("9" * 400), headers=JSON), 422, "too large"),
    ("not-an-object", "/predict", dict(json=[IMG]), 422, "JSON object"),
    ("missing-instances", "/predict", dict(json={"top_k": 2}), 422, "missing field"),
    ("unknown-field", "/predict", dict(json={"instances": [IMG], "topk": 2}), 422, "unknown field(s) ['topk']"),
    ("instances-not-list", "/predict", dict(json={"instances": IMG[0][0]}), 422, "must be a list"),
    ("empty-instances", "/predict", dict(json={"instances": []}), 422, "empty"),
    ("too-many-instances", "/predict", dict(json={"instances": [IMG] * 301}), 413, "limit is 300"),
    ("wrong-shape-hw", "/predict", dict(json={"instances": [IMG[:7]]}), 422, "shape 7 x 8"),
    ("wrong-shape-chw", "/predict", dict(json={"instances": [[IMG] * 3]}), 422, "shape 3 x 8 x 8"),
    ("scalar-instance", "/predict", dict(json={"instances": [0.5]}), 422, "nested array"),
    ("ragged", "/predict", dict(json={"instances": [IMG[:7] + [[0.5] * 7]]}), 422, "ragged"),
    ("strings", "/predict", dict(json={"instances": [[["a"] * 8] * 8]}), 422, "strings"),
    ("bools", "/predict", dict(json={"instances": [[[True] + [0.5] * 7] + IMG[1:]]}), 422, "true/false"),
    ("nulls", "/predict", dict(json={"instances": [[[None] * 8] * 8]}), 422, "null"),
    ("out-of-range-unit", "/predict", dict(json={"instances": [[[200] * 8] * 8]}), 422, '"scale": "byte"'),
    ("out-of-range-byte", "/predict", dict(json={"instances": [[[300] * 8] * 8], "scale": "byte"}), 422, "outside"),
    ("negative", "/predict", dict(json={"instances": [[[-0.1] * 8] * 8]}), 422, "outside [0, 1]"),
    ("bad-scale", "/predict", dict(json={"instances": [IMG], "scale": "percent"}), 422, "scale"),
    ("top-k-zero", "/predict", dict(json={"instances": [IMG], "top_k": 0}), 422, "top_k"),
    ("top-k-string", "/predict", dict(json={"instances": [IMG], "top_k": "3"}), 422, "top_k"),
    ("top-k-bool", "/predict", dict(json={"instances": [IMG], "top_k": True}), 422, "top_k"),
    ("bad-base64", "/predict", dict(json={"instances": ["not base64 !!"]}), 400, "base64"),
    (
        "base64-not-image",
        "/predict",
        dict(json={"instances": [base64.b64encode(b"hello").decode()]}),
        400,
        "could not be decoded",
    ),
    (
        "truncated-png",
        "/predict",
        dict(json={"instances": [base64.b64encode(png(40, 40, noise=True)[:200]).decode()]}),
        400,
        "could not be decoded",
    ),
    (
        "image-too-large",
        "/predict",
        dict(json={"instances": [base64.b64encode(png(5000, 5000)).decode()]}),
        413,
        "pixels",
    ),
    (
        "text-plain",
        "/predict",
        dict(content=body({"instances": [IMG]}), headers={"content-type": "text/plain"}),
        415,
        "application/json",
    ),
    ("no-content-type", "/predict", dict(content=body({"instances": [IMG]})), 415, "application/json"),
    ("form-encoded", "/invocations", dict(data={"inputs": "x"}), 415, "application/json"),
    ("body-over-limit", "/predict", dict(content=b" " * (1024 * 1024 + 1), headers=JSON), 413, "limit"),
    (
        "chunked-over-limit",
        "/predict",
        dict(content=chunked(b" " * (1024 * 1024 + 100)), headers=JSON),
        413,
        "exceeds the limit",
    ),
    ("invocations-no-key", "/invocations", dict(json={"data": [IMG]}), 422, "unknown field(s) ['data']"),
    ("invocations-two-keys", "/invocations", dict(json={"inputs": [IMG], "instances": [IMG]}), 422, "exactly one"),
    ("invocations-params", "/invocations", dict(json={"inputs": [IMG], "params": {"x": 1}}), 422, "params"),
    ("invocations-wrong-shape", "/invocations", dict(json={"inputs": [[IMG] * 2]}), 422, "N x 1 x 8 x 8"),
    ("invocations-empty", "/invocations", dict(json={"inputs": []}), 422, "empty"),
    ("invocations-too-many", "/invocations", dict(json={"inputs": [IMG] * 301}), 413, "limit is 300"),
    ("invocations-named-wrong", "/invocations", dict(json={"inputs": {"pixels": [IMG]}}), 422, "'images'"),
    (
        "dataframe-columns",
        "/invocations",
        dict(json={"dataframe_split": {"columns": ["a", "b"], "data": [[0.5, 0.5]]}}),
        422,
        "64 pixel columns",
    ),
    ("dataframe-row-length", "/invocations", dict(json={"dataframe_split": {"data": [[0.5] * 63]}}), 422, "64 pixels"),
    (
        "dataframe-unknown",
        "/invocations",
        dict(json={"dataframe_split": {"data": [[0.5] * 64], "dtypes": []}}),
        422,
        "dtypes",
    ),
    ("image-json-body", "/predict/image", dict(json={"files": []}), 415, "multipart/form-data"),
    ("image-no-files", "/predict/image", dict(files={"other": ("a.png", png())}), 422, "unknown form field"),
    (
        "image-text-field",
        "/predict/image",
        dict(data={"files": "abc"}, files={"x": ("a.png", png())}),
        422,
        "unknown form field",
    ),
    ("image-text-only", "/predict/image", dict(data={"files": "abc"}, files={"files": ("", b"")}), 422, "file uploads"),
    ("image-not-image", "/predict/image", dict(files={"files": ("a.txt", b"plain text")}), 400, "could not be decoded"),
    ("image-top-k", "/predict/image?top_k=zero", dict(files={"files": ("a.png", png())}), 422, "top_k"),
    ("image-query", "/predict/image?k=1", dict(files={"files": ("a.png", png())}), 422, "query parameter"),
    ("nested-34-deep", "/predict", dict(json={"instances": [NESTED_34]}), 422, "nested more than 5 levels deep"),
    ("top-k-superscript", "/predict/image?top_k=%C2%B2", dict(files={"files": ("a.png", png())}), 422, "top_k"),
    (
        "image-too-long",
        "/predict",
        dict(json={"instances": [base64.b64encode(png(9000, 1)).decode()]}),
        413,
        "8192 on a side",
    ),
    (
        "image-too-thin",
        "/predict",
        dict(json={"instances": [base64.b64encode(png(1000, 4)).decode()]}),
        400,
        "differ at most 64 times",
    ),
    (
        "no-memory-address",
        "/predict/image",
        dict(files={"files": ("a.txt", b"plain text")}),
        400,
        "cannot identify image file the data",
    ),
    (
        "image-too-many",
        "/predict/image",
        dict(files=[("files", (f"{i}.png", png())) for i in range(301)]),
        413,
        "limit is 300",
    ),
    (
        "request-pixels",
        "/predict",
        dict(json={"instances": [base64.b64encode(png(4000, 2000)).decode()] * 3}),
        413,
        "instances[2] would take this request's decoded images past NHLE_MAX_REQUEST_PIXELS",
    ),
    (
        "request-pixels-files",
        "/predict/image",
        dict(files=[("files", (f"{i}.png", png(4000, 2000))) for i in range(3)]),
        413,
        "NHLE_MAX_REQUEST_PIXELS",
    ),
    ("invocations-bytes", "/invocations", dict(json={"inputs": [[[200] * 8] * 8]}), 422, "divide 0..255 pixels by 255"),
    (
        "malformed-multipart",
        "/predict/image",
        dict(
            content=b"--xyz\r\nContent-Disposition: form-data\r\n\r\nno end",
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        ),
        400,
        "multipart",
    ),
]


@pytest.mark.parametrize("path,kwargs,status,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_4xx_naming_the_problem(server, path, kwargs, status, words):
    r = server.http.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"], r.json()
    assert server.http.get("/healthz").status_code == 200


def test_server_still_serves_after_every_bad_request(server):
    assert server.http.get("/readyz").status_code == 200
    r = server.http.post("/predict", json={"instances": [IMG]})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 3
    assert "Traceback" not in server.log()  # no bad input reached the 500 handler


def test_invocations_never_suggests_a_field_it_rejects(server):
    r = server.http.post("/invocations", json={"instances": [[[200] * 8] * 8]})
    assert r.status_code == 422 and 'need "scale"' not in r.json()["detail"], r.json()
    r = server.http.post("/invocations", json={"inputs": [IMG], "scale": "byte"})
    assert r.status_code == 422 and "unknown field(s) ['scale']" in r.json()["detail"]


def test_a_body_that_stops_midway_gets_408_and_the_connection_closed(server):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"instances": ['
        )
        received = b""
        while chunk := conn.recv(4096):  # b"" once the server has closed the connection
            received += chunk
    waited = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"did not arrive whole within 3 s (15 bytes came" in received
    assert 2.5 < waited < 20, waited  # the 3 s limit, not the client's 30 s timeout
    assert server.http.post("/predict", json={"instances": [IMG]}).status_code == 200


def test_unknown_route_and_method_are_4xx(server):
    assert server.http.get("/nope").status_code == 404
    assert server.http.get("/predict").status_code == 405


def test_admin_reload_disabled_without_token_and_not_ready_without_model(tmp_path):
    """In-process, without the lifespan (so no model is ever loaded): no NHLE_ADMIN_TOKEN is 403."""
    app = nhle_serving.server.create_app(nhle_serving.settings.Settings(model=str(tmp_path / "none.onnx")))

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            r = await client.post("/admin/reload", headers={"Authorization": "Bearer anything"})
            assert r.status_code == 403 and "NHLE_ADMIN_TOKEN" in r.json()["detail"]
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/healthz")).status_code == 200
            r = await client.post("/predict", json={"instances": [IMG]})
            assert r.status_code == 503 and "no model loaded" in r.json()["detail"]

    asyncio.run(calls())


def jpeg_with_exif() -> tuple[bytes, int, int]:
    """An 8 x 8 JPEG with an EXIF segment (orientation and a few tags), and where that segment's
    bytes lie in it."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate on decoding (ImageOps.exif_transpose reads it)
    exif[0x010F] = "nhle"
    exif[0x0132] = "2026:12:07 12:00:00"
    buffer = io.BytesIO()
    Image.effect_noise((8, 8), 64).save(buffer, format="JPEG", exif=exif.tobytes())
    data = buffer.getvalue()
    start = data.index(b"Exif\x00\x00")
    return data, start + 6, start + 6 + len(exif.tobytes())


def test_images_with_mutated_exif_get_a_4xx_never_a_5xx(server):
    """3,000 JPEGs with a few random bytes of their EXIF segment changed (fixed seed): the
    decoder's errors on them (TypeError, struct.error, ...) are the input's fault: 200 or 400."""
    data, start, end = jpeg_with_exif()
    rng = random.Random(0)
    statuses = {}
    for i in range(3000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(start, end)] = rng.randrange(256)
        response = server.http.post("/predict", json={"instances": [base64.b64encode(bytes(mutated)).decode()]})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (i, response.status_code, response.text)
    assert set(statuses) <= {200, 400} and statuses.get(200, 0) > 0, statuses


def test_an_inference_header_length_of_5000_digits_is_a_400(server):
    response = server.http.post(
        f"/v2/models/{NAME}/infer", content=b"{}", headers={"Inference-Header-Content-Length": "9" * 5000}
    )
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.text, response.text


def test_a_short_admin_token_is_refused_at_start():
    with pytest.raises(ValueError, match="NHLE_ADMIN_TOKEN is 1 characters long; at least 32"):
        Settings.from_env({"NHLE_PARAMS": "no-such-params.yaml", "NHLE_ADMIN_TOKEN": "x"})


def test_failed_admin_attempts_are_limited_and_logged(champion_registry, start_server):
    """Five wrong tokens from one address within a minute: the sixth attempt, even with the right
    token, gets 429 with when to try again; every failure is logged with the address."""
    server = start_server(champion_registry.root)
    for token in ["wrong"] * 5:
        assert server.http.post("/admin/reload", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    for token in ("wrong", ADMIN_TOKEN):
        refused = server.http.post("/admin/reload", headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 429 and "try again in" in refused.json()["detail"], refused.text
    assert server.log().count("missing or wrong token from 127.0.0.1") == 5


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels and holds none (what a bomb sends first)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def test_an_image_over_the_pixel_limit_is_a_413_and_zero_v2_images_a_400(server):
    bomb = base64.b64encode(png_header_only(50_000, 50_000)).decode()  # 2.5 billion pixels, by its header
    response = server.http.post("/predict", json={"instances": [bomb]})
    assert response.status_code == 413 and "too large" in response.json()["detail"], response.text
    empty = server.http.post(
        f"/v2/models/{NAME}/infer",
        json={"inputs": [{"name": "images", "shape": [0, 1, 8, 8], "datatype": "FP32", "data": []}]},
    )
    assert empty.status_code == 400 and "N >= 1" in empty.json()["error"], empty.text
