"""Where the served model comes from: an MLflow registry (models:/NAME@ALIAS followed, or
models:/NAME/VERSION pinned) or a local .onnx file with its preprocessing json beside it.

Each source answers `current()` (a Pointer whose key changes exactly when the model does) and
`fetch()` (the ONNX file and its metadata, copied into a work folder). mlflow is imported only
for models:/ URIs. Never imports torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nhle.adapters.signing import ARTIFACT_DIR, EVIDENCE, SIGNATURE, verify_version
from nhle.core.config import load_params, resolve_uri
from nhle.core.files import from_tag  # json only
from nhle_serving.settings import Settings

# --------------------------------------------------------------------------------------------
# Where the model comes from: the registry (an alias or a pinned version) or a local file.


@dataclass(frozen=True)
class Pointer:
    """What the model URI points at right now; `key` changes exactly when the model does."""

    key: str
    model_uri: str
    name: str | None = None
    version: str | None = None
    aliases: tuple[str, ...] = ()
    run_id: str | None = None
    tags: dict = field(default_factory=dict)


def resolve_tracking_uri(uri: str, project_dir: Path) -> str:
    return resolve_uri(uri, project_dir)


class MissingStore(LookupError):
    """The configured MLflow store does not exist (the server is not in, or pointed at, a project)."""


MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class RegistrySource:
    """models:/NAME@ALIAS (followed) or models:/NAME/VERSION (pinned) in an MLflow registry."""

    registered = True  # its versions carry onnx_sha256 and gates tags that load_model checks

    def __init__(
        self, model_uri: str, tracking_uri: str, ledger_url: str | None = None, verify_key: Path | None = None
    ):
        match = MODELS_URI.match(model_uri)
        if not match:
            raise ValueError(f"model URI {model_uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
        self.model_uri, self.tracking_uri, self.ledger_url = model_uri, tracking_uri, ledger_url
        self.verify_key = verify_key
        self.name, self.alias, self.version = match["name"], match["alias"], match["version"]
        self._client = None
        self.record = "not read yet"

    def deleted_classes(self) -> dict[int, list[int]]:
        """Classes deleted on record (the ledger and the registered model's own record united,
        nhle.adapters.deletions): a version that predicts one of them is never served. A ledger
        that is missing and not covered by the model's record, or unreachable, raises, so
        nothing is swapped in unchecked; `record` says which record answered."""
        from nhle.adapters.deletions import deleted_on_record  # noqa: PLC0415 - lazy: SQLAlchemy, for the ledger

        deleted, self.record = (
            deleted_on_record(self.client(), self.name, self.ledger_url) if self.ledger_url else ({}, "none")
        )
        return deleted

    def suppressed_classes(self) -> dict[int, list[int]]:
        """Classes accepted for deletion and not yet deleted ({class: [request ids]}): answered by
        no version until their request is done or withdrawn."""
        from nhle.adapters.deletions import suppressed_on_record  # noqa: PLC0415 - lazy: SQLAlchemy, for the ledger

        return suppressed_on_record(self.name, self.ledger_url) if self.ledger_url else {}

    def fallbacks(self, exclude: str | None, limit: int = 10) -> list[Pointer]:
        """Versions that passed their gates, newest first (at most `limit`), for a server whose
        champion cannot be served."""
        client = self.client()
        found = sorted(client.search_model_versions(f"name = '{self.name}'"), key=lambda v: -int(v.version))
        pointers = [self._pointer(mv) for mv in found if str(mv.version) != str(exclude) and gates_passed(mv.tags)]
        return pointers[:limit]

    def _pointer(self, mv) -> Pointer:
        return Pointer(
            key=f"{self.name}/{mv.version}",
            model_uri=f"models:/{self.name}/{mv.version}",
            name=self.name,
            version=str(mv.version),
            aliases=tuple(mv.aliases or ()),
            run_id=mv.run_id,
            tags=dict(mv.tags or {}),
        )

    def client(self):
        if self._client is None:
            from nhle.adapters.deletions import missing_store  # noqa: PLC0415 - lazy: SQLAlchemy, for the ledger

            missing = missing_store(self.tracking_uri)
            if missing is not None:  # looked for at every check: the project may be made meanwhile
                raise MissingStore(
                    f"the MLflow store {missing} does not exist, so there is no {self.model_uri} to serve (and the "
                    f"server does not create the store): run `nhle run` (or `nhle import` for your own model) in the "
                    f"project first, or point the server at the project with --project-dir (NHLE_PROJECT_DIR) or "
                    f"--params (NHLE_PARAMS)"
                )
            import mlflow  # noqa: PLC0415 - lazy: MLflow; only here: a local .onnx needs no MLflow at all
            from mlflow import MlflowClient  # noqa: PLC0415 - lazy: MLflow

            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def current(self) -> Pointer:
        client = self.client()
        from mlflow.exceptions import MlflowException  # noqa: PLC0415 - lazy: MLflow

        try:
            if self.alias:
                mv = client.get_model_version_by_alias(self.name, self.alias)
            else:
                mv = client.get_model_version(self.name, self.version)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise LookupError(
                f"{self.model_uri} does not exist yet in {self.tracking_uri}: run `nhle run` (or "
                f"`nhle import` for your own model) first ({err.message})"
            ) from None
        return self._pointer(mv)

    def pointer_of(self, version: str) -> Pointer:
        """Version `version` as the registry has it now (its tags read again)."""
        return self._pointer(self.client().get_model_version(self.name, str(version)))

    def fetch(self, pointer: Pointer, workdir: Path) -> tuple[Path, dict]:
        """Download the version into workdir; returns (model.onnx path, {}): a registry version's
        preprocessing metadata is taken from its signed evidence (verified_evidence), never from
        the MLmodel file, which anyone who can write to the registry can change."""
        import mlflow  # noqa: PLC0415 - lazy: MLflow

        self.client()
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pointer.model_uri, dst_path=str(workdir)))
        mlmodel = yaml.safe_load((local / "MLmodel").read_text()) or {}
        flavor = (mlmodel.get("flavors") or {}).get("onnx")
        if not flavor:
            raise ValueError(
                f"{pointer.model_uri} has no onnx flavour (flavours: {sorted(mlmodel.get('flavors') or {})})"
            )
        return local / flavor.get("data", "model.onnx"), {}

    def verified_evidence(self, pointer: Pointer, onnx_path: Path, workdir: Path) -> dict:
        """The version's signed evidence (nhle.adapters.signing), once its signature over the ONNX
        file and the evidence verifies with the public key; ValueError (the version is refused)
        when it is unsigned, signed by another key, or anything signed changed."""
        import mlflow  # noqa: PLC0415 - lazy: MLflow

        if self.verify_key is None:
            raise ValueError("no public key configured to verify versions with (serving.verify_key, NHLE_VERIFY_KEY)")
        try:
            folder = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=pointer.run_id, artifact_path=ARTIFACT_DIR, dst_path=str(workdir / "signature")
                )
            )
            evidence_bytes, signature = (folder / EVIDENCE).read_bytes(), (folder / SIGNATURE).read_bytes()
        except Exception:  # not there: a version nhle did not sign
            raise ValueError(
                f"version {pointer.version} is not signed (no {ARTIFACT_DIR}/{EVIDENCE} and "
                f"{SIGNATURE} in its run {pointer.run_id}): it was not judged by nhle's pipeline"
            ) from None
        evidence = verify_version(onnx_path, evidence_bytes, signature, self.verify_key)
        signed_for = (evidence.get("registered_model"), evidence.get("version"))
        if signed_for != (self.name, str(pointer.version)):
            raise ValueError(
                f"version {pointer.version}'s signature is for {signed_for[0]} version {signed_for[1]}: "
                "signed evidence copied from another version"
            )
        return evidence


def gates_passed(tags: dict) -> bool:
    """The version's `gates` tag (written before any alias move) lists gates that all held."""
    try:
        gates = from_tag(tags, "gates", [])
    except ValueError:
        return False
    return bool(gates) and all(isinstance(g, dict) and g.get("passed") is True for g in gates)


class LocalSource:
    """A local .onnx file, with its preprocessing json beside it; re-read when either changes.
    No registry stands behind it: no sha256, gate or ledger check applies."""

    registered = False
    record = "none: a local file has no registry or ledger behind it"

    def deleted_classes(self) -> dict[int, list[int]]:
        return {}

    def suppressed_classes(self) -> dict[int, list[int]]:
        return {}

    def fallbacks(self, exclude: str | None) -> list[Pointer]:
        return []

    def __init__(self, path: Path):
        self.path = path.resolve()
        self.model_uri = str(self.path)

    def metadata_path(self) -> Path | None:
        for candidate in (
            self.path.with_suffix(".preprocessing.json"),
            self.path.with_name(self.path.name + ".preprocessing.json"),
            self.path.with_name("preprocessing.json"),
        ):
            if candidate.exists():
                return candidate
        return None

    def current(self) -> Pointer:
        parts = [self.path, self.metadata_path()]
        # mtime, size and inode: an in-place rewrite and an atomic rename both change the key.
        stamp = [f"{p.stat().st_mtime_ns}:{p.stat().st_size}:{p.stat().st_ino}" for p in parts if p is not None]
        return Pointer(
            key="|".join([str(self.path), *stamp]),
            model_uri=self.model_uri,
            name=self.path.stem,
            version=f"file:{stamp[0]}",
        )

    def fetch(self, pointer: Pointer, workdir: Path) -> tuple[Path, dict]:
        # Copied first, so a file replaced while we read it cannot mix two models.
        copy = workdir / "model.onnx"
        shutil.copyfile(self.path, copy)
        meta_path = self.metadata_path()
        return copy, (json.loads(meta_path.read_text()) if meta_path else {})


def make_source(settings: Settings):
    """The model source the settings name, plus a short description for logs."""
    uri = settings.model
    params = None
    if uri is None or uri.startswith("models:/"):
        params_path = settings.params_path
        if not params_path.is_absolute() and not params_path.exists():
            params_path = settings.project_dir / params_path
        params = load_params(params_path)
        uri = uri or params.registry.champion_uri()
        project_dir = settings.project_dir.resolve()
        verify_key = Path(settings.verify_key)
        return RegistrySource(
            uri,
            resolve_tracking_uri(params.tracking_uri(), project_dir),
            resolve_tracking_uri(params.requests_database(), project_dir),
            verify_key if verify_key.is_absolute() else project_dir / verify_key,
        )
    path = Path(uri)
    if not path.is_absolute():
        path = settings.project_dir / path
    return LocalSource(path)
