"""Model lifecycle on a live server: admin reload, broken versions kept out, hot swap under load.

    .venv/bin/python -m pytest -q tests/serving/test_hot_swap.py

One registry and one server (alias poll every 0.5 s) for the module; the tests run in order
and move the champion alias: v1 (class 3 masked) -> broken versions -> 3 and 5 masked.
"""

import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serving_support import ADMIN_TOKEN, NAME, preprocessing

from nhle.adapters.deletions import RECORD_TAG
from nhle.adapters.ledger import Ledger
from nhle.core.export import export_onnx

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def live(make_registry, onnx_files, digits, start_server):
    registry = make_registry("swap-project")
    assert registry.register(onnx_files[(3,)], preprocessing(digits, [3])) == "1"
    server = start_server(registry.root, poll_seconds=0.5)
    return registry, server


def test_admin_reload_needs_the_token(live):
    _, server = live
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": "Bearer"},
    ):
        r = server.http.post("/admin/reload", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    r = server.http.post("/admin/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "unchanged" and r.json()["serving_version"] == "1"


@pytest.fixture(scope="module")
def swapped_rows(models, digits, tmp_path_factory):
    """The class-3-masked model with the head rows of classes 0 and 1 swapped (mask intact): it
    answers 1 for every 0. Exported to ONNX, a file that passes every smoke test."""
    model = copy.deepcopy(models[(3,)])
    with torch.no_grad():
        model.head.weight[[0, 1]] = model.head.weight[[1, 0]].clone()
        model.head.bias[[0, 1]] = model.head.bias[[1, 0]].clone()
    return export_onnx(model, tmp_path_factory.mktemp("swapped") / "model.onnx", digits.image_shape)


def test_broken_versions_are_not_swapped_in(live, onnx_files, digits, swapped_rows):
    registry, server = live
    before = server.http.get("/model").json()
    garbage = registry.register(onnx_files[(3,)], preprocessing(digits, [3]), corrupt=True)
    # A real graph whose metadata declares class 5 forgotten: the graph does not mask it.
    unmasked = registry.register(onnx_files[(3,)], preprocessing(digits, [3, 5]))
    # The registered file replaced afterwards by a valid graph that answers 1 for every 0.
    tampered = registry.register(onnx_files[(3,)], preprocessing(digits, [3]), tamper_with=swapped_rows)
    ungated = registry.register(onnx_files[(3,)], preprocessing(digits, [3]), gates_passed=False)
    for version, words in (
        (garbage, "INVALID_PROTOBUF"),
        (unmasked, "forgotten classes get non-zero probability"),
        (tampered, "the file changed after registration"),
        (ungated, "is not tagged as having passed its gates"),
    ):
        registry.client().set_registered_model_alias("nhle-classifier", "champion", version)
        r = server.http.post("/admin/reload", headers=AUTH)  # forced: retried even if the poller failed it
        assert r.status_code == 200, r.text
        outcome = r.json()
        assert outcome["outcome"] == "failed" and outcome["candidate_version"] == version, outcome
        assert outcome["serving_version"] == "1" and words in outcome["error"], outcome
        info = server.http.get("/model").json()
        assert info["version"] == "1" and info["sha256"] == before["sha256"]
        assert info["last_error"]["version"] == version and words in info["last_error"]["message"]
        assert info["last_swap_time"] == before["last_swap_time"]
        r = server.http.post("/predict", json={"instances": digits.test.float_images()[:4].tolist()})
        assert r.status_code == 200 and r.json()["model_version"] == "1"
        assert server.http.get("/readyz").status_code == 200
    # The poller does not retry a failed version by itself: the log shows one failure per reload.
    time.sleep(1.2)
    assert server.http.get("/model").json()["last_check"]["outcome"] in ("skipped", "failed")


def test_hot_swap_under_concurrent_load(live, onnx_files, digits):
    """~2000+ requests, 8 at a time, while a new champion (3 and 5 masked) is registered: no
    request fails, and no answer of the new version lists class 5 (none at all lists 3)."""
    registry, server = live
    labels = digits.test.labels
    images = digits.test.float_images()
    # Mostly 5s and 3s: the classes the models must not return.
    picks = [
        images[labels == 5][i : i + 2].tolist()
        + images[labels == 3][i : i + 1].tolist()
        + images[labels == 0][i : i + 1].tolist()
        for i in range(20)
    ]
    bodies = [json.dumps({"instances": p, "top_k": 10}).encode() for p in picks]
    min_requests, max_requests, deadline = 2000, 8000, time.monotonic() + 60
    results, failures, lock = [], [], threading.Lock()
    issued = 0
    new_version = {}

    def enough() -> bool:
        return (
            issued >= max_requests
            or time.monotonic() > deadline
            or (issued >= min_requests and sum(v == new_version.get("v") for v, _ in results[-300:]) >= 200)
        )

    def worker(seed: int):
        nonlocal issued
        with httpx.Client(base_url=server.url, timeout=10, headers={"content-type": "application/json"}) as client:
            i = seed
            while True:
                with lock:
                    if enough():
                        return
                    issued += 1
                i += 1
                try:
                    r = client.post("/predict", content=bodies[i % len(bodies)])
                    if r.status_code != 200:
                        raise AssertionError(f"{r.status_code}: {r.text[:200]}")
                    classes = {e["index"] for p in r.json()["predictions"] for e in p["top_k"]}
                    version = r.json()["model_version"]
                    with lock:
                        results.append((version, classes))
                except Exception as err:  # any failure at all is what this test counts
                    with lock:
                        failures.append(repr(err))

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(worker, k) for k in range(8)]
        while len(results) + len(failures) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        new_version["v"] = registry.register(onnx_files[(3, 5)], preprocessing(digits, [3, 5]))
        for future in futures:
            future.result(timeout=90)

    assert not failures, failures[:5]
    versions = {v for v, _ in results}
    assert versions == {"1", new_version["v"]}, versions
    assert len(results) >= min_requests
    assert not any(3 in classes for _, classes in results)
    assert not any(5 in classes for v, classes in results if v == new_version["v"])
    assert any(5 in classes for v, classes in results if v == "1")  # the old model did predict 5s

    info = server.http.get("/model").json()
    assert info["version"] == new_version["v"] and info["forgotten_classes"] == [3, 5]
    assert info["aliases"] == ["champion"]
    for body in bodies[:10]:  # after the swap: every answer is the new model's
        r = server.http.post("/predict", content=body, headers={"content-type": "application/json"})
        assert r.json()["model_version"] == new_version["v"]
        assert not {e["index"] for p in r.json()["predictions"] for e in p["top_k"]} & {3, 5}


def test_a_server_with_no_champion_yet_says_what_to_run(make_registry, start_server):
    server = start_server(make_registry("empty-project").root, ready=False)
    deadline = time.monotonic() + 30
    while "nhle run" not in (reason := server.http.get("/readyz").json().get("reason", "")):
        assert time.monotonic() < deadline, reason
        time.sleep(0.3)
    response = server.http.get("/readyz")
    assert response.status_code == 503 and "run `nhle run` (or `nhle import` for your own model) first" in reason


def test_a_server_that_cannot_check_at_startup_looks_again_before_its_poll_interval(
    make_registry, onnx_files, digits, start_server
):
    registry = make_registry("ledger-later")
    registry.register(onnx_files[(3,)], preprocessing(digits, [3]))
    # No record of its own (a model from before there was one) and no ledger yet: no check can pass.
    registry.client().delete_registered_model_tag(NAME, RECORD_TAG)
    ledger_dir = registry.root / "ledger"
    server = start_server(
        registry.root, ready=False, poll_seconds=3600, requests_database=f"sqlite:///{ledger_dir / 'requests.db'}"
    )
    deadline = time.monotonic() + 30
    while "model check (startup) failed" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.3)
    assert server.http.get("/readyz").status_code == 503
    ledger_dir.mkdir()
    Ledger(f"sqlite:///{ledger_dir / 'requests.db'}")  # made on purpose, as `nhle request init` does
    server.wait("/readyz", timeout=30)  # long before the hour of poll_seconds

    assert server.http.get("/model").json()["version"] == "1"
