"""Evidence no one can forge by editing tags: every version the pipeline judges is signed with a
private key, and the server loads a version only once its signature verifies with the public key.

What is signed is a folder of two files, with OpenSSF's model-signing (sigstore model-transparency,
an elliptic-curve key pair, offline): the version's `model.onnx` and `evidence.json` (the
registered model and version, the ONNX file's sha256, its preprocessing metadata, the classes it
forgets and its gate results). The signature and the evidence are logged to the version's run
under `signature/`; the server rebuilds the folder from the downloaded model and that evidence,
verifies it, and from then on believes the evidence, not the tags.

    nhle keys create                      # keys/nhle-signing.key (private, 0600) and .pub
    doc = evidence(name, version, onnx_sha256, preprocessing, forgotten_classes, gates)
    evidence_bytes, signature = sign_version(onnx_path, doc, private_key_path)
    verify_version(onnx_path, evidence_bytes, signature, public_key_path)   # -> doc; ValueError on any mismatch

No torch; model_signing is imported only when a signature is made or checked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from model_signing import signing, verifying

EVIDENCE = "evidence.json"
SIGNATURE = "model.sig"
ARTIFACT_DIR = "signature"
"""Where a version's run keeps its evidence.json and model.sig."""


def create_key_pair(private_path: Path, public_path: Path) -> None:
    """A new EC P-256 key pair as PEM files; the private one readable by its owner only. Refuses
    to overwrite either: a new key makes every version signed with the old one unverifiable."""
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(
                f"{path} exists already: nothing written (a new key pair would make every version "
                "signed with the old one unverifiable; move it away first if you mean to)"
            )
    key = ec.generate_private_key(ec.SECP256R1())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def evidence(
    name: str, version: str, onnx_sha256: str, preprocessing: dict, forgotten_classes: list[int], gates: list[dict]
) -> dict:
    """What the signature vouches for, besides the ONNX file itself."""
    return {
        "registered_model": name,
        "version": str(version),
        "onnx_sha256": onnx_sha256,
        "forgotten_classes": sorted(int(c) for c in forgotten_classes),
        "gates": gates,
        "preprocessing": preprocessing,
    }


def signed_folder(onnx_path: Path, evidence_doc: dict | bytes, into: Path) -> Path:
    """into/model/ holding exactly model.onnx and evidence.json: the folder that is signed."""
    folder = into / "model"
    folder.mkdir(parents=True)
    try:  # a large model is not copied where a link will do
        os.link(onnx_path, folder / "model.onnx")
    except OSError:
        shutil.copyfile(onnx_path, folder / "model.onnx")
    text = evidence_doc if isinstance(evidence_doc, bytes) else json.dumps(evidence_doc, indent=1).encode()
    (folder / EVIDENCE).write_bytes(text)
    return folder


def sign_version(onnx_path: Path, evidence_doc: dict, private_key: Path) -> tuple[bytes, bytes]:
    """(evidence.json bytes, signature bytes) for the version's ONNX file and evidence."""
    if not private_key.exists():
        raise FileNotFoundError(
            f"no signing key at {private_key}: create the project's key pair with `nhle keys "
            "create` (or set registry.signing_key to yours); every version is signed before it "
            "may be served"
        )
    with tempfile.TemporaryDirectory(prefix="nhle-sign-") as tmp:
        folder = signed_folder(onnx_path, evidence_doc, Path(tmp))
        signing.Config().use_elliptic_key_signer(private_key=private_key).sign(folder, Path(tmp) / SIGNATURE)
        return (folder / EVIDENCE).read_bytes(), (Path(tmp) / SIGNATURE).read_bytes()


def verify_version(onnx_path: Path, evidence_bytes: bytes, signature: bytes, public_key: Path) -> dict:
    """The evidence, once the signature over it and the ONNX file verifies with `public_key`;
    ValueError naming what failed otherwise."""
    if not public_key.exists():
        raise ValueError(
            f"no public key at {public_key} to verify the version's signature with: copy the "
            "project's keys/nhle-signing.pub there, or set NHLE_VERIFY_KEY (serving.verify_key)"
        )
    with tempfile.TemporaryDirectory(prefix="nhle-verify-") as tmp:
        folder = signed_folder(onnx_path, evidence_bytes, Path(tmp))
        (Path(tmp) / SIGNATURE).write_bytes(signature)
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(folder, Path(tmp) / SIGNATURE)
        except Exception as err:  # model_signing raises ValueError, and others on a malformed bundle
            raise ValueError(f"the signature does not verify with {public_key}: {str(err)[:300]}") from None
    return json.loads(evidence_bytes)


__all__ = [
    "ARTIFACT_DIR",
    "EVIDENCE",
    "SIGNATURE",
    "create_key_pair",
    "evidence",
    "sign_version",
    "signed_folder",
    "verify_version",
]
