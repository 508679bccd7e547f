"""Evidence no one can forge by editing tags: a registry version is served only once its signature
(nhle.adapters.signing, OpenSSF model-signing) verifies with the project's public key. Real parts:
MLflow on SQLite, `nhle_serving` as a process over HTTP.

    .venv/bin/python -m pytest -q tests/serving/test_signatures.py
"""

from pathlib import Path

import mlflow
import onnx
from onnx import numpy_helper
from serving_support import NAME, preprocessing

from nhle.adapters.signing import create_key_pair


def copy_signature(registry, from_version: str, to_version: str) -> None:
    """What someone who can write to the registry can do: the signed files of one version logged
    into another version's run."""
    client = registry.client()
    source_run, target_run = (client.get_model_version(NAME, v).run_id for v in (from_version, to_version))
    with registry.current():
        folder = mlflow.artifacts.download_artifacts(run_id=source_run, artifact_path="signature")
    for name in ("evidence.json", "model.sig"):
        client.log_text(target_run, open(f"{folder}/{name}").read(), f"signature/{name}")


def test_changed_weights_with_copied_tags_and_signature_are_refused(make_registry, onnx_files, digits, start_server):
    """The champion's files with one weight changed, registered as a new version whose tags are
    the champion's (onnx_sha256 set to the new file's hash, gates passed) and whose run holds the
    champion's signature; then the same unchanged file registered again under the champion's
    signature; and one never signed: each is refused, and a server started on them falls back to
    the genuine version, naming why."""
    registry = make_registry("forged")
    metadata = preprocessing(digits, [3])
    genuine = registry.register(onnx_files[(3,)], metadata)

    changed = onnx.load(str(onnx_files[(3,)]))
    weight = changed.graph.initializer[0]
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 0.5
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    forged = registry.register(changed, metadata, sign=False)  # tags as nhle writes them, its own sha256
    copy_signature(registry, genuine, forged)
    server = start_server(registry.root, poll_seconds=0.5)
    described = server.http.get("/model").json()
    assert described["version"] == genuine and described["fallback"]["refused_version"] == forged
    assert "signature does not verify" in described["fallback"]["because"], described

    replayed = registry.register(onnx_files[(3,)], metadata, sign=False)  # the genuine file, its signature copied
    copy_signature(registry, genuine, replayed)
    unsigned = registry.register(onnx_files[(3,)], metadata, champion=False, sign=False)
    for version, reason in ((replayed, f"signature is for {NAME} version {genuine}"), (unsigned, "is not signed")):
        registry.client().set_registered_model_alias(NAME, "champion", version)
        server.wait_for(lambda d, v=version: (d.get("refused") or {}).get("version") == v, f"version {version} refused")
        described = server.http.get("/model").json()
        assert described["version"] == genuine and reason in described["refused"]["reason"], described
    images = digits.test.float_images()[:8].numpy()
    answer = server.http.post("/predict", json={"instances": images.tolist()})
    assert answer.status_code == 200 and answer.headers["x-model-version"] == genuine


def test_a_server_with_another_public_key_serves_nothing(make_registry, onnx_files, digits, start_server, tmp_path):
    registry = make_registry("other-key")
    registry.register(onnx_files[(3,)], preprocessing(digits, [3]))
    create_key_pair(tmp_path / "other.key", tmp_path / "other.pub")
    server = start_server(registry.root, ready=False, verify_key=str(tmp_path / "other.pub"))
    reason = server.wait_for_503("signature does not verify")
    assert str(tmp_path / "other.pub") in reason
    missing = start_server(registry.root, ready=False, verify_key=str(tmp_path / "none.pub"))
    assert "no public key at" in missing.wait_for_503("no public key")


def test_a_running_server_notices_when_its_versions_files_change_in_the_registry(
    make_registry, onnx_files, digits, start_server
):
    """The served version's ONNX file replaced in the artifact store while the server runs: its
    periodic re-verification reports the mismatch on /readyz (503) and /model; put back, it is ready again."""
    registry = make_registry("reverified")
    version = registry.register(onnx_files[(3,)], preprocessing(digits, [3]))
    server = start_server(registry.root, poll_seconds=0.3, verify_seconds=0.5)
    checked = server.wait_for(lambda d: (d.get("verification") or {}).get("ok") is True, "a passed re-verification")
    assert checked["verification"]["version"] == version and server.http.get("/readyz").status_code == 200
    client = registry.client()
    location = client.get_model_version_download_uri(NAME, version)
    stored = Path(location.removeprefix("file://"), "model.onnx")
    genuine = stored.read_bytes()
    stored.write_bytes(onnx_files[(3, 5)].read_bytes())
    try:
        reason = server.wait_for_503("no longer verify")
        assert f"the registry's ONNX file of version {version} has sha256" in reason, reason
        described = server.http.get("/model").json()
        assert described["verification"]["ok"] is False and described["version"] == version
    finally:
        stored.write_bytes(genuine)
    server.wait_for(lambda d: (d.get("verification") or {}).get("ok") is True, "verification passing again")
    assert server.http.get("/readyz").status_code == 200
