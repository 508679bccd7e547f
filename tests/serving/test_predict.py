"""The server's answers against the PyTorch model it was exported from, over real HTTP.

.venv/bin/python -m pytest -q tests/serving/test_predict.py
"""

import base64
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from serving_support import NAME


def torch_probabilities(model, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(x), dim=1).numpy()


def chunks(x, size):
    return [x[i : i + size] for i in range(0, len(x), size)]


def test_predict_and_invocations_match_pytorch(server, models, digits):
    x = digits.test.float_images()
    expected = torch_probabilities(models[(3,)], x)
    got_top1, got_probs = [], []
    for part in chunks(x, 150):
        r = server.http.post("/predict", json={"instances": part.squeeze(1).tolist(), "top_k": 1})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "1" and r.headers["x-model-version"] == "1"
        got_top1 += [p["top_k"][0]["index"] for p in r.json()["predictions"]]
        r = server.http.post("/invocations", json={"inputs": part.tolist()})
        assert r.status_code == 200, r.text
        got_probs += r.json()["predictions"]["probabilities"]
    assert got_top1 == expected.argmax(1).tolist()
    got_probs = np.array(got_probs)
    assert got_probs.shape == expected.shape
    np.testing.assert_allclose(got_probs, expected, atol=1e-5)
    assert (got_probs[:, 3] == 0).all()

    # The other two MLflow input forms give the same numbers.
    part = x[:20]
    for payload in (
        {"instances": part.tolist()},
        {"dataframe_split": {"columns": [f"p{i}" for i in range(64)], "data": part.reshape(20, -1).tolist()}},
        {"inputs": part.squeeze(1).tolist()},
    ):
        r = server.http.post("/invocations", json=payload)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["predictions"]["probabilities"]), expected[:20], atol=1e-5)


def test_forgotten_class_is_never_returned(server, digits):
    images = digits.test.float_images()[digits.test.labels == 3]
    assert len(images) > 40
    r = server.http.post("/predict", json={"instances": images.tolist(), "top_k": 10})
    assert r.status_code == 200, r.text
    for prediction in r.json()["predictions"]:
        indices = [entry["index"] for entry in prediction["top_k"]]
        assert 3 not in indices and len(indices) == 9  # top_k beyond the retained classes is clipped
        assert [e["class"] for e in prediction["top_k"]] == [str(i) for i in indices]
    r = server.http.post("/invocations", json={"inputs": images.tolist()})
    assert (np.array(r.json()["predictions"]["probabilities"])[:, 3] == 0).all()


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_images_of_any_size_as_base64_and_multipart(server, digits):
    pixels = (digits.test.float_images()[:6, 0].numpy() * 255).round().astype(np.uint8)
    r = server.http.post("/predict", json={"instances": pixels.tolist(), "scale": "byte", "top_k": 2})
    assert r.status_code == 200, r.text
    reference = [[e["index"] for e in p["top_k"]] for p in r.json()["predictions"]]

    def top(response):
        assert response.status_code == 200, response.text
        return [[e["index"] for e in p["top_k"]] for p in response.json()["predictions"]]

    # Exactly 8 x 8 grey; 64 x 64 RGB (each pixel an 8 x 8 block: the box filter gives it back);
    # a data URL; all must agree with the byte arrays.
    same_size = [base64.b64encode(encode(Image.fromarray(p))).decode() for p in pixels]
    upscaled = [
        base64.b64encode(encode(Image.fromarray(p).resize((64, 64), Image.NEAREST).convert("RGB"))).decode()
        for p in pixels
    ]
    data_urls = ["data:image/png;base64," + s for s in same_size]
    tf_serving = [{"b64": s} for s in same_size]  # the TF Serving / KServe V1 convention
    for instances in (same_size, upscaled, data_urls, tf_serving):
        assert top(server.http.post("/predict", json={"instances": instances, "top_k": 2})) == reference

    # Odd sizes and JPEG decode and give a valid answer.
    odd = [
        base64.b64encode(encode(Image.fromarray(pixels[0]).resize((37, 23)), "JPEG")).decode(),
        base64.b64encode(encode(Image.fromarray(pixels[1]).resize((5, 3)))).decode(),
    ]
    assert len(top(server.http.post("/predict", json={"instances": odd}))) == 2

    files = [("files", (f"digit{i}.png", encode(Image.fromarray(p)), "image/png")) for i, p in enumerate(pixels)]
    r = server.http.post("/predict/image", files=files, data={"top_k": "2"})
    assert top(r) == reference
    assert [p["filename"] for p in r.json()["predictions"]] == [f"digit{i}.png" for i in range(6)]
    r = server.http.post("/predict/image?top_k=1", files=files[:1])
    assert top(r) == [reference[0][:1]]


def test_model_endpoint_reports_the_served_version(server, champion_registry):
    info = server.http.get("/model").json()
    stored = next(champion_registry.root.glob("mlartifacts/models/*/artifacts/model.onnx"))
    assert info["ready"] is True and info["name"] == NAME and info["version"] == "1"
    assert info["aliases"] == ["champion"] and info["model_uri"] == f"models:/{NAME}@champion"
    assert info["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert info["forgotten_classes"] == [3] and info["input_shape"] == [1, 8, 8]
    assert info["class_names"] == [str(k) for k in range(10)]
    assert info["providers"] == ["CPUExecutionProvider"] and info["last_error"] is None
    assert info["last_swap_time"] and server.http.get("/readyz").json() == {"ready": True, "version": "1"}


def test_server_process_never_imports_torch(server, champion_registry):
    maps = Path(f"/proc/{server.proc.pid}/maps")
    if maps.exists():  # the running server, after it has served every endpoint above
        assert "torch" not in maps.read_text()
    # The module itself, through a full registry load and a prediction, in a clean interpreter.
    script = f"""
import json, sys
import numpy as np
import nhle_serving.models, nhle_serving.payloads, nhle_serving.settings
settings = nhle_serving.settings.Settings(project_dir={str(champion_registry.root)!r},
                                params_path={str(champion_registry.root / "params.yaml")!r})
manager = nhle_serving.models.ModelManager(settings)
assert manager.refresh()["outcome"] == "swapped"
body = json.dumps({{"instances": [[[0.5] * 8] * 8]}}).encode()
out = nhle_serving.payloads.handle_predict(body, manager.current, settings)
assert len(out["predictions"]) == 1
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "torch")))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**server.env, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_docs_pages_load_every_asset_from_the_server_itself(server):
    for page in ("/docs", "/redoc"):
        r = server.http.get(page)
        assert r.status_code == 200, r.text
        assets = re.findall(r"""(?:src|href)=["']([^"']+\.(?:js|css|png))["']""", r.text)
        assert assets, r.text
        for url in assets:  # a blank page without internet had its assets on a CDN
            assert url.startswith("/"), f"{page} loads {url} from elsewhere"
            asset = server.http.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url
        assert "cdn." not in r.text


def test_openapi_examples_are_the_served_models_real_answers(server):
    spec = server.http.get("/openapi.json").json()
    assert "version 1's real answers" in spec["info"]["description"]
    for path in ("/predict", "/invocations"):
        operation = spec["paths"][path]["post"]
        request = operation["requestBody"]["content"]["application/json"]["example"]
        documented = operation["responses"]["200"]["content"]["application/json"]["example"]
        r = server.http.post(path, json=request)  # what "Try it out" in /docs sends
        assert r.status_code == 200, r.text
        assert r.json() == documented
    assert (
        len(
            spec["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["example"][
                "predictions"
            ][0]["top_k"]
        )
        == 3
    )
