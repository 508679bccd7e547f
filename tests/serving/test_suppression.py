"""A class accepted for deletion is not answered from the moment the server reads the ledger,
until its request is done or withdrawn on record: a real server process, the SQLite ledger file,
MLflow on disk, 1,000 digits through every endpoint (JSON, /invocations, V2 JSON and binary).

    .venv/bin/python -m pytest -q tests/serving/test_suppression.py
"""

import numpy as np
import pytest
from serving_support import ADMIN_TOKEN, NAME, preprocessing

from nhle.adapters.ledger import Ledger

httpclient = pytest.importorskip("tritonclient.http")
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def answers(server, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every class's probabilities for `images` from each endpoint, and /predict's top 3 (-1 pads)."""
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=30)
    found = {}
    for binary in (True, False):
        tensor = httpclient.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=binary)
        result = client.infer(
            NAME, [tensor], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
        )
        found["v2-binary" if binary else "v2-json"] = result.as_numpy("probabilities")
    found["invocations"] = np.asarray(
        server.http.post("/invocations", json={"inputs": images.tolist()}).json()["predictions"]["probabilities"]
    )
    top = server.http.post("/predict", json={"instances": images.tolist(), "top_k": 3}).json()["predictions"]
    found["predict-top-3"] = np.array([[row["index"] for row in p["top_k"]] for p in top])
    return found


def test_a_pending_request_is_suppressed_on_every_endpoint_until_withdrawn(
    make_registry, onnx_files, digits, start_server
):
    registry = make_registry("suppression")
    registry.register(onnx_files[(3,)], preprocessing(digits, [3]))
    ledger = Ledger(f"sqlite:///{registry.root / 'requests.db'}")
    server = start_server(registry.root, poll_seconds=3600, max_instances=1000)  # only told: no poll in between
    images = np.concatenate([digits.train.float_images().numpy(), digits.test.float_images().numpy()])[:1000]
    before = answers(server, images)
    assert (before["v2-binary"].argmax(1) == 5).sum() > 50  # class 5 is answered today

    request = ledger.submit([5], ["5"], "dpo@example.com", "erasure", model_name=NAME)
    told = server.http.post("/admin/reload", headers=AUTH).json()
    assert told["suppressed_classes"] == [5] and told["model"]["suppressed_classes"] == [5]
    assert told["model"]["suppressed_pending_deletion"]["5"]["requests"] == [request.id]
    during = answers(server, images)
    for endpoint in ("v2-binary", "v2-json", "invocations"):
        p = during[endpoint]
        assert (p[:, [3, 5]] == 0).all(), endpoint  # forgotten, and suppressed, exactly 0
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
        kept = [c for c in range(10) if c not in (3, 5)]  # the others, renormalised as if 5 were masked
        expected = before[endpoint][:, kept] / before[endpoint][:, kept].sum(1, keepdims=True)
        np.testing.assert_allclose(p[:, kept], expected, atol=1e-5)
    assert not np.isin(during["predict-top-3"], [3, 5]).any()
    meta = server.http.get(f"/v2/models/{NAME}").json()
    assert meta["parameters"]["suppressed_classes"] == [5]

    ledger.withdraw(request.id, "operator@example.com", "the data subject withdrew the erasure")
    lifted = server.http.post("/admin/reload", headers=AUTH).json()
    assert lifted["suppressed_classes"] == [] and lifted["model"]["suppressed_pending_deletion"] == {}
    after = answers(server, images)
    np.testing.assert_allclose(after["v2-binary"], before["v2-binary"], atol=1e-6)
    assert (after["v2-binary"].argmax(1) == 5).sum() > 50
    assert [e.kind for e in ledger.events(request.id)] == ["withdrawn"]


def test_a_rejected_request_suppresses_nothing_and_a_failed_one_stays_suppressed(
    make_registry, onnx_files, digits, start_server
):
    registry = make_registry("suppression-statuses")
    registry.register(onnx_files[(3,)], preprocessing(digits, [3]))
    ledger = Ledger(f"sqlite:///{registry.root / 'requests.db'}")
    ledger.submit([7], ["7"], "dpo@example.com", "erasure", model_name=NAME, status="rejected", error="test")
    failed = ledger.submit([8], ["8"], "dpo@example.com", "erasure", model_name=NAME)
    owner = "test-host:1:x"
    ledger.claim(owner, 60)
    ledger.finish(failed.id, owner, "failed", error="a gate did not hold")
    server = start_server(registry.root, poll_seconds=0.5)
    described = server.wait_for(lambda d: d.get("suppressed_classes") == [8], "class 8 suppressed")
    pending = described["suppressed_pending_deletion"]
    assert list(pending) == ["8"] and pending["8"]["requests"] == [failed.id] and pending["8"]["since"]
    with pytest.raises(ValueError, match="cannot be withdrawn: it is rejected"):
        ledger.withdraw(1, "operator@example.com", "no")
