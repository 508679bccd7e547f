"""The nhle model server: ONNX Runtime behind FastAPI, following an MLflow registry alias.

    uvicorn nhle_server:create_app --factory --app-dir serving --host 127.0.0.1 --port 8000
    nhle serve --host 127.0.0.1 --port 8000          # the same through the CLI

Settings come from environment variables (see `Settings.from_env` and serving/README.md):
NHLE_PARAMS, NHLE_PROJECT_DIR, NHLE_MODEL, NHLE_ADMIN_TOKEN, NHLE_POLL_SECONDS,
NHLE_MAX_INSTANCES, NHLE_MAX_BODY_BYTES, NHLE_ORT_THREADS, NHLE_ORT_OPT_LEVEL, NHLE_DEVICE.

Model input: float32 pixels in [0, 1], shape (C, H, W) per image, exactly what the exported
ONNX graph takes (normalisation and the forgotten-class mask are inside the graph). /predict
also takes 0..255 pixels with "scale": "byte", and base64 PNG/JPEG images of any size.

Hot swap: a background thread checks the alias every NHLE_POLL_SECONDS. A new version is
downloaded, loaded into a new InferenceSession and smoke-tested (finite probabilities, every
forgotten class exactly 0) off the request path; only then is the single `current` reference
replaced. Each request reads that reference once, so it runs start to end on one model. A
version that fails is not swapped in: the old one keeps serving and /model shows `last_error`.

This module must never import torch (a serving image need not ship it): it uses numpy,
onnxruntime, Pillow, nhle.config (pure dataclasses) and, for models:/ URIs, mlflow.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import glob
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("nhle_server")

MIB = 1024 * 1024
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TOP_K = 3
# Decoded-image guard: an 8 MiB PNG can hold a gigapixel of zeros. 4096 x 4096 is far above
# any image this model family needs and keeps one decode under ~50 MB of RGB.
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")


# --------------------------------------------------------------------------------------------
# Settings


def _env_number(environ, name: str, default, kind=int):
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


@dataclass(frozen=True)
class Settings:
    params_path: Path = Path("params.yaml")
    """NHLE_PARAMS: params.yaml giving the registry name, alias and tracking URI."""
    project_dir: Path = Path(".")
    """NHLE_PROJECT_DIR: relative tracking URIs (sqlite:///mlflow.db) are resolved against it."""
    model: str | None = None
    """NHLE_MODEL: models:/NAME@ALIAS, models:/NAME/VERSION, or a local .onnx file; None means
    models:/<registry.model_name>@<registry.champion_alias> of params.yaml."""
    admin_token: str | None = None
    """NHLE_ADMIN_TOKEN: bearer token of POST /admin/reload; unset disables it (403)."""
    poll_seconds: float = 5.0
    """NHLE_POLL_SECONDS: how often the alias (or the local file) is checked for a new model."""
    max_instances: int = 256
    """NHLE_MAX_INSTANCES: most images in one request (more is 413)."""
    max_body_bytes: int = 8 * MIB
    """NHLE_MAX_BODY_BYTES: largest request body (more is 413)."""
    ort_threads: int = 0
    """NHLE_ORT_THREADS: ONNX Runtime intra-op threads; 0 is ONNX Runtime's default."""
    ort_opt_level: str = "all"
    """NHLE_ORT_OPT_LEVEL: graph optimisation, one of disable, basic, extended, all."""
    device: str = "auto"
    """NHLE_DEVICE: auto (CUDA when onnxruntime has it and a GPU is present), cpu, or cuda."""

    def __post_init__(self):
        for name in ("params_path", "project_dir"):  # str is fine too
            object.__setattr__(self, name, Path(getattr(self, name)))
        if not self.poll_seconds > 0 or not math.isfinite(self.poll_seconds):
            raise ValueError(f"NHLE_POLL_SECONDS must be a positive number, got {self.poll_seconds}")
        if self.max_instances < 1:
            raise ValueError(f"NHLE_MAX_INSTANCES must be >= 1, got {self.max_instances}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"NHLE_MAX_BODY_BYTES must be >= 1024, got {self.max_body_bytes}")
        if self.ort_threads < 0:
            raise ValueError(f"NHLE_ORT_THREADS must be >= 0, got {self.ort_threads}")
        if self.ort_opt_level not in OPT_LEVELS:
            raise ValueError(f"NHLE_ORT_OPT_LEVEL must be one of {', '.join(OPT_LEVELS)}, got {self.ort_opt_level!r}")
        if self.device not in DEVICES:
            raise ValueError(f"NHLE_DEVICE must be one of {', '.join(DEVICES)}, got {self.device!r}")

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        env = os.environ if environ is None else environ
        return cls(
            params_path=Path(env.get("NHLE_PARAMS") or "params.yaml"),
            project_dir=Path(env.get("NHLE_PROJECT_DIR") or "."),
            model=env.get("NHLE_MODEL") or None,
            admin_token=env.get("NHLE_ADMIN_TOKEN") or None,
            poll_seconds=_env_number(env, "NHLE_POLL_SECONDS", 5.0, float),
            max_instances=_env_number(env, "NHLE_MAX_INSTANCES", 256),
            max_body_bytes=_env_number(env, "NHLE_MAX_BODY_BYTES", 8 * MIB),
            ort_threads=_env_number(env, "NHLE_ORT_THREADS", 0),
            ort_opt_level=(env.get("NHLE_ORT_OPT_LEVEL") or "all").strip().lower(),
            device=(env.get("NHLE_DEVICE") or "auto").strip().lower(),
        )


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------
# Errors: every refusal of a request is an ApiError with a status and a message naming the
# problem; anything else escaping a handler is a genuine server fault (500).


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def bad(code: str, message: str, status: int = 422) -> ApiError:
    return ApiError(status, code, message)


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
    # The same rule as nhle.tracking.resolve_uri, copied so that the server does not depend on
    # a module that may import more than it needs.
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(project_dir / uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return (project_dir / uri).resolve().as_uri()
    return uri


MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class RegistrySource:
    """models:/NAME@ALIAS (followed) or models:/NAME/VERSION (pinned) in an MLflow registry."""

    def __init__(self, model_uri: str, tracking_uri: str):
        match = MODELS_URI.match(model_uri)
        if not match:
            raise ValueError(f"model URI {model_uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
        self.model_uri, self.tracking_uri = model_uri, tracking_uri
        self.name, self.alias, self.version = match["name"], match["alias"], match["version"]
        self._client = None

    def client(self):
        if self._client is None:
            import mlflow  # only here: a local .onnx needs no MLflow at all
            from mlflow import MlflowClient

            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def current(self) -> Pointer:
        client = self.client()
        if self.alias:
            mv = client.get_model_version_by_alias(self.name, self.alias)
        else:
            mv = client.get_model_version(self.name, self.version)
        return Pointer(key=f"{self.name}/{mv.version}", model_uri=f"models:/{self.name}/{mv.version}",
                       name=self.name, version=str(mv.version), aliases=tuple(mv.aliases or ()),
                       run_id=mv.run_id, tags=dict(mv.tags or {}))

    def fetch(self, pointer: Pointer, workdir: Path) -> tuple[Path, dict]:
        """Download the version into workdir; returns (model.onnx path, preprocessing metadata)."""
        import mlflow
        import yaml

        self.client()
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pointer.model_uri, dst_path=str(workdir)))
        mlmodel = yaml.safe_load((local / "MLmodel").read_text()) or {}
        flavor = (mlmodel.get("flavors") or {}).get("onnx")
        if not flavor:
            raise ValueError(f"{pointer.model_uri} has no onnx flavour (flavours: {sorted(mlmodel.get('flavors') or {})})")
        metadata = dict(mlmodel.get("metadata") or {})
        if "class_names" not in metadata and pointer.run_id:
            # Older versions may carry the preprocessing only as the run's artifact.
            with contextlib.suppress(Exception):
                path = mlflow.artifacts.download_artifacts(run_id=pointer.run_id, artifact_path="preprocessing.json",
                                                           dst_path=str(workdir / "run"))
                metadata = {**json.loads(Path(path).read_text()), **metadata}
        tagged = pointer.tags.get("forgotten_classes")
        if tagged:
            metadata["tagged_forgotten_classes"] = json.loads(tagged)
        return local / flavor.get("data", "model.onnx"), metadata


class LocalSource:
    """A local .onnx file, with its preprocessing json beside it; re-read when either changes."""

    def __init__(self, path: Path):
        self.path = path.resolve()
        self.model_uri = str(self.path)

    def metadata_path(self) -> Path | None:
        for candidate in (self.path.with_suffix(".preprocessing.json"),
                          self.path.with_name(self.path.name + ".preprocessing.json"),
                          self.path.with_name("preprocessing.json")):
            if candidate.exists():
                return candidate
        return None

    def current(self) -> Pointer:
        parts = [self.path, self.metadata_path()]
        # mtime, size and inode: an in-place rewrite and an atomic rename both change the key.
        stamp = [f"{p.stat().st_mtime_ns}:{p.stat().st_size}:{p.stat().st_ino}" for p in parts if p is not None]
        return Pointer(key="|".join([str(self.path), *stamp]), model_uri=self.model_uri, name=self.path.stem,
                       version=f"file:{stamp[0]}")

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
        from nhle.config import load_params  # pure dataclasses + yaml: no torch

        params_path = settings.params_path
        if not params_path.is_absolute() and not params_path.exists():
            params_path = settings.project_dir / params_path
        params = load_params(params_path)
        uri = uri or f"models:/{params.registry.model_name}@{params.registry.champion_alias}"
        return RegistrySource(uri, resolve_tracking_uri(params.tracking_uri(), settings.project_dir.resolve()))
    path = Path(uri)
    if not path.is_absolute():
        path = settings.project_dir / path
    return LocalSource(path)


# --------------------------------------------------------------------------------------------
# ONNX Runtime sessions


def gpu_present() -> bool:
    """A GPU is visible to this process, checked without CUDA libraries (and without torch)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    if glob.glob("/dev/nvidia[0-9]*"):
        return True
    smi = shutil.which("nvidia-smi")  # WSL and Windows have no /dev/nvidia*
    if smi:
        with contextlib.suppress(Exception):
            result = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
            return result.returncode == 0 and "GPU" in result.stdout
    return False


def choose_providers(device: str) -> list[str]:
    """CUDA first only when it can work: onnxruntime-gpu lists CUDA as available even on a
    machine without a GPU, and asking for it there only logs a failed provider load."""
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not cuda:
        raise ValueError("NHLE_DEVICE=cuda but this onnxruntime build has no CUDAExecutionProvider")
    if device == "cuda" or (device == "auto" and cuda and gpu_present()):
        if hasattr(ort, "preload_dlls"):  # the CUDA/cuDNN libraries of the nvidia-* wheels
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path: Path, settings: Settings, providers: list[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = OPT_LEVELS[settings.ort_opt_level]
    if settings.ort_threads:
        options.intra_op_num_threads = settings.ort_threads
    return ort.InferenceSession(str(path), options, providers=providers)


def softmax(logits: np.ndarray) -> np.ndarray:
    # A masked class has a -inf logit: exp(-inf - max) is exactly 0, as it should be.
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class LoadedModel:
    """Everything one request needs, swapped as one reference."""

    session: ort.InferenceSession
    input_name: str
    output_name: str
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    forgotten: tuple[int, ...]
    pointer: Pointer
    sha256: str
    providers: tuple[str, ...]
    loaded_at: str
    load_seconds: float
    metadata: dict

    @property
    def version(self) -> str | None:
        return self.pointer.version

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        logits = self.session.run([self.output_name], {self.input_name: x})[0]
        p = softmax(logits.astype(np.float32, copy=False))
        # The graph already gives them exactly 0 (checked before the swap); setting it again
        # keeps the promise even for a class declared forgotten only in the metadata.
        p[:, list(self.forgotten)] = 0.0
        if not np.isfinite(p).all():
            raise RuntimeError(f"model version {self.version} produced non-finite probabilities")
        return p


def _int_list(value, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise ValueError(f"{what} must be a list of integers, got {value!r}")
    return value


def load_model(source, pointer: Pointer, settings: Settings) -> LoadedModel:
    """Download, open and smoke-test one model; raises on anything that should block a swap."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nhle-serve-") as tmp:
        onnx_path, metadata = source.fetch(pointer, Path(tmp))
        digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
        # Created while the download exists: ONNX Runtime reads any external weights now.
        session = make_session(onnx_path, settings, choose_providers(settings.device))

    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ValueError(f"the graph has {len(inputs)} inputs; the server feeds exactly one image tensor")
    graph_input = inputs[0]
    input_name = metadata.get("input_name") or graph_input.name
    if input_name != graph_input.name:
        raise ValueError(f"metadata names input {input_name!r} but the graph's input is {graph_input.name!r}")
    if graph_input.type != "tensor(float)":
        raise ValueError(f"the graph's input is {graph_input.type}, the server feeds tensor(float)")
    dims = list(graph_input.shape)
    if len(dims) != 4:
        raise ValueError(f"the graph's input has shape {dims}; expected (batch, C, H, W)")
    if "input_shape" in metadata:
        shape = tuple(_int_list(metadata["input_shape"], "input_shape"))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be [C, H, W], got {list(shape)}")
        fixed = [(i, d, s) for i, (d, s) in enumerate(zip(dims[1:], shape), 1) if isinstance(d, int) and d != s]
        if fixed:
            raise ValueError(f"metadata input_shape {list(shape)} does not match the graph's input {dims}")
    elif all(isinstance(d, int) for d in dims[1:]):
        shape = tuple(dims[1:])
    else:
        raise ValueError(f"the graph's input {dims} has symbolic image dimensions and no input_shape metadata")
    output_name = "logits" if any(o.name == "logits" for o in outputs) else outputs[0].name

    forgotten = set(_int_list(metadata.get("forgotten_classes", []), "forgotten_classes"))
    forgotten |= set(_int_list(metadata.get("tagged_forgotten_classes", []), "the version's forgotten_classes tag"))

    # Smoke test: three different images in one batch (so the batch dimension must be dynamic).
    rng = np.random.default_rng(0)
    x = np.stack([np.zeros(shape), np.ones(shape), rng.random(shape)]).astype(np.float32)
    logits = session.run([output_name], {input_name: x})[0]
    if logits.ndim != 2 or logits.shape[0] != 3:
        raise ValueError(f"a batch of 3 images gave output shape {logits.shape}; expected (3, classes)")
    n_classes = logits.shape[1]
    class_names = metadata.get("class_names") or [str(k) for k in range(n_classes)]
    if len(class_names) != n_classes:
        raise ValueError(f"metadata has {len(class_names)} class names but the graph outputs {n_classes} classes")
    if forgotten and (max(forgotten) >= n_classes or min(forgotten) < 0):
        raise ValueError(f"forgotten classes {sorted(forgotten)} are out of range 0..{n_classes - 1}")
    masked_in_graph = {int(k) for k in np.flatnonzero(np.isneginf(logits).all(axis=0))}
    if masked_in_graph - forgotten:
        log.warning("classes %s have -inf logits but are not declared forgotten; treating them as forgotten",
                    sorted(masked_in_graph - forgotten))
        forgotten |= masked_in_graph
    if len(forgotten) >= n_classes:
        raise ValueError("every class is forgotten: nothing left to predict")
    with np.errstate(all="ignore"):
        p = softmax(logits)
    if not np.isfinite(p).all():
        raise ValueError("smoke test: the model gives non-finite probabilities")
    leaked = {k: float(p[:, k].max()) for k in sorted(forgotten) if p[:, k].max() != 0.0}
    if leaked:
        raise ValueError(f"smoke test: forgotten classes get non-zero probability {leaked}; the graph does not mask them")
    if np.abs(p.sum(axis=1) - 1).max() > 1e-4:
        raise ValueError("smoke test: probabilities do not sum to 1")
    # Warm-up at the batch sizes requests use, so the first real request pays no allocation.
    for n in sorted({1, min(64, settings.max_instances)}):
        session.run([output_name], {input_name: np.repeat(x[2:3], n, axis=0)})

    return LoadedModel(session=session, input_name=input_name, output_name=output_name, input_shape=shape,
                       class_names=tuple(str(c) for c in class_names), forgotten=tuple(sorted(forgotten)),
                       pointer=pointer, sha256=digest, providers=tuple(session.get_providers()),
                       loaded_at=now_iso(), load_seconds=round(time.perf_counter() - started, 3), metadata=metadata)


class ModelManager:
    """Holds the serving model and replaces it when the source points somewhere new."""

    def __init__(self, settings: Settings, source=None):
        self.settings = settings
        self._source = source
        self.current: LoadedModel | None = None   # read once per request; replaced atomically
        self.aliases: tuple[str, ...] = ()
        self.last_swap_time: str | None = None
        self.last_error: dict | None = None        # the last failed load
        self.last_check: dict | None = None        # the last alias check (time, outcome)
        self._failed: dict[str, str] = {}          # key -> message: not retried by the poller
        self._lock = threading.Lock()              # one check/load at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def source(self):
        if self._source is None:
            self._source = make_source(self.settings)
        return self._source

    def refresh(self, force: bool = False, reason: str = "poll") -> dict:
        """Check the source; load, smoke-test and swap in a new model. Returns what happened.

        A version that failed before is retried only when forced (POST /admin/reload), so a
        broken champion is not downloaded again every poll interval."""
        with self._lock:
            outcome = self._refresh(force, reason)
            self.last_check = {"time": now_iso(), "reason": reason, **outcome}
            return outcome

    def _refresh(self, force: bool, reason: str) -> dict:
        current = self.current
        serving = current.version if current else None
        try:
            source = self.source
            pointer = source.current()
        except Exception as err:  # registry down, alias missing, file gone: keep serving
            log.warning("model check (%s) failed: %s", reason, err)
            return {"outcome": "check_failed", "serving_version": serving, "error": f"{type(err).__name__}: {err}"}
        self.aliases = pointer.aliases
        if current is not None and current.pointer.key == pointer.key:
            return {"outcome": "unchanged", "serving_version": serving}
        if not force and pointer.key in self._failed:
            return {"outcome": "skipped", "serving_version": serving, "candidate_version": pointer.version,
                    "error": self._failed[pointer.key]}
        log.info("loading model %s (version %s, %s)", pointer.model_uri, pointer.version, reason)
        try:
            model = load_model(source, pointer, self.settings)
        except Exception as err:  # any failure of a candidate blocks its swap, nothing more
            message = f"{type(err).__name__}: {err}"
            self._failed[pointer.key] = message
            self.last_error = {"time": now_iso(), "model_uri": pointer.model_uri, "version": pointer.version,
                               "message": message}
            log.error("model %s (version %s) not swapped in, still serving %s: %s",
                      pointer.model_uri, pointer.version, serving, message)
            return {"outcome": "failed", "serving_version": serving, "candidate_version": pointer.version,
                    "error": message}
        self._failed.pop(pointer.key, None)
        self.current = model  # the swap: one reference assignment
        self.last_swap_time = now_iso()
        log.info("serving model %s version %s (sha256 %s, %s, loaded in %.2f s; was %s)", pointer.name,
                 model.version, model.sha256[:12], ",".join(model.providers), model.load_seconds, serving)
        return {"outcome": "swapped", "serving_version": model.version, "previous_version": serving}

    def _run(self):
        while not self._stop.is_set():
            try:
                self.refresh(reason="startup" if self.current is None and self.last_check is None else "poll")
            except Exception:  # never let the poller die
                log.exception("model poller error")
            if self._stop.wait(self.settings.poll_seconds):
                break

    def start(self):
        self._thread = threading.Thread(target=self._run, name="nhle-model-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def require(self) -> LoadedModel:
        model = self.current
        if model is None:
            error = f"; last error: {self.last_error['message']}" if self.last_error else ""
            raise ApiError(503, "not_ready", f"no model loaded yet{error}")
        return model

    def describe(self) -> dict:
        model = self.current
        info = {"ready": model is not None, "model_uri": getattr(self._source, "model_uri", self.settings.model),
                "last_swap_time": self.last_swap_time, "last_error": self.last_error, "last_check": self.last_check,
                "poll_seconds": self.settings.poll_seconds}
        if model is None:
            return info
        tags = model.pointer.tags
        return {**info, "name": model.pointer.name, "version": model.version, "aliases": list(self.aliases),
                "resolved_uri": model.pointer.model_uri, "run_id": model.pointer.run_id, "sha256": model.sha256,
                "tagged_onnx_sha256": tags.get("onnx_sha256"), "class_names": list(model.class_names),
                "forgotten_classes": list(model.forgotten), "input_name": model.input_name,
                "input_shape": list(model.input_shape), "input_scale": "float32 in [0, 1]",
                "providers": list(model.providers), "loaded_at": model.loaded_at,
                "load_seconds": model.load_seconds}


# --------------------------------------------------------------------------------------------
# Request parsing: JSON -> float32 (N, C, H, W) in [0, 1], or an ApiError naming the problem.


def _reject_constant(name: str):
    raise bad("non_finite", f"JSON literal {name} is not allowed: every pixel must be a finite number", 400)


def parse_json(body: bytes) -> Any:
    if not body:
        raise bad("empty_body", "the request body is empty: send a JSON object", 400)
    try:
        # Python's json accepts NaN and Infinity, which are not JSON; refuse them here.
        return json.loads(body, parse_constant=_reject_constant)
    except ApiError:
        raise
    except RecursionError:
        raise bad("malformed_json", "the JSON is nested too deeply", 400) from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise bad("malformed_json", f"the body is not valid JSON: {err}", 400) from None


def require_content_type(request: Request, wanted: str):
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    ok = media == wanted or (wanted == "application/json" and media.startswith("application/") and media.endswith("+json"))
    if not ok:
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {media or '(none)'} is not supported here: send {wanted}")


def _type_names(types) -> str:
    names = {bool: "true/false", str: "strings", type(None): "null", dict: "objects", list: "nested lists"}
    return ", ".join(sorted(names.get(t, t.__name__) for t in types))


def to_array(value, where: str) -> np.ndarray:
    """A nested JSON list of numbers -> float64 array; bools, strings, nulls and ragged rows are refused."""
    if not isinstance(value, list):
        raise bad("bad_type", f"{where} must be a nested array of pixel values, got {type(value).__name__}")
    try:
        arr = np.array(value, dtype=object)
    except ValueError:
        raise bad("ragged", f"{where} is ragged: its rows have different lengths") from None
    # Checked on the Python objects: numpy would silently turn True into 1.
    types = set(map(type, arr.flat)) - {int, float}
    if list in types:
        raise bad("ragged", f"{where} is ragged: its rows have different lengths or depths")
    if types:
        raise bad("bad_dtype", f"{where} holds {_type_names(types)}: pixel values must be numbers")
    try:
        out = arr.astype(np.float64)
    except OverflowError:
        raise bad("non_finite", f"{where} holds an integer too large for a pixel value") from None
    if not np.isfinite(out).all():
        raise bad("non_finite", f"{where} holds non-finite values (a number beyond float range)")
    return out


def to_unit(x: np.ndarray, scale: str, where: str) -> np.ndarray:
    top = 1.0 if scale == "unit" else 255.0
    if x.size and (x.min() < 0 or x.max() > top):
        hint = '; 0..255 pixels need "scale": "byte"' if scale == "unit" else ""
        raise bad("out_of_range", f"{where} has values in [{x.min():g}, {x.max():g}], outside [0, {top:g}] "
                                  f"of scale {scale!r}{hint}")
    return (x / 255.0 if scale == "byte" else x).astype(np.float32)


def shape_text(shape) -> str:
    return " x ".join(str(s) for s in shape)


def instance_tensor(value, model: LoadedModel, scale: str, where: str) -> np.ndarray:
    """One image: base64 string, C x H x W array, or H x W array for a one-channel model."""
    if isinstance(value, str):
        return decode_base64_image(value, model, where)
    if isinstance(value, dict) and set(value) == {model.input_name}:  # MLflow's named-tensor form
        value = value[model.input_name]
    x = to_array(value, where)
    c, h, w = model.input_shape
    if x.shape != (c, h, w) and not (c == 1 and x.shape == (h, w)):
        extra = f" (or {h} x {w})" if c == 1 else ""
        raise bad("bad_shape", f"{where} has shape {shape_text(x.shape) or 'scalar'}; "
                               f"this model takes {shape_text((c, h, w))}{extra}")
    x = x.reshape(c, h, w)
    return to_unit(x, scale, where)


def decode_base64_image(text: str, model: LoadedModel, where: str) -> np.ndarray:
    payload = text.strip()
    if payload.startswith("data:"):  # a data URL: data:image/png;base64,....
        payload = payload.partition(",")[2]
    payload = "".join(payload.split())  # MIME base64 may carry line breaks
    try:
        altchars = b"-_" if ("-" in payload or "_" in payload) else None
        raw = base64.b64decode(payload, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad("bad_base64", f"{where} is a string but not valid base64 image data: {err}", 400) from None
    return image_tensor(raw, model, where)


def image_tensor(raw: bytes, model: LoadedModel, where: str) -> np.ndarray:
    """Image bytes of any size -> the model's channels and H x W, scaled to [0, 1]."""
    c, h, w = model.input_shape
    if c not in (1, 3):
        raise bad("unsupported", f"this model takes {c} channels; images work only for 1 (grey) or 3 (RGB)")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in IMAGE_FORMATS:
                raise bad("bad_image", f"{where} is a {img.format} image; send {', '.join(IMAGE_FORMATS)}", 400)
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise bad("image_too_large", f"{where} is {img.width} x {img.height} pixels; at most "
                                             f"{MAX_IMAGE_PIXELS} pixels are decoded", 413)
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):
                # 16-bit grey (PNG): scale 0..65535 to [0, 1] ourselves; convert("L") would clip.
                grey = np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
                img, top = Image.fromarray(grey), 1.0  # float32 -> mode F
            else:
                img, top = img.convert("L" if c == 1 else "RGB"), 255.0
            if img.size != (w, h):
                # Box (area) filter when shrinking: every source pixel counts, no aliasing.
                shrink = img.width >= w and img.height >= h
                img = img.resize((w, h), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32) / top
            if c == 3 and pixels.ndim == 2:
                pixels = np.repeat(pixels[..., None], 3, axis=2)
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise bad("bad_image", f"{where} could not be decoded as an image: {err}", 400) from None
    return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)


def check_count(n: int, settings: Settings, what: str = "instances"):
    if n == 0:
        raise bad("empty", f"{what} is empty: send at least one image")
    if n > settings.max_instances:
        raise bad("too_many_instances", f"{n} {what} in one request; the limit is {settings.max_instances} "
                                        "(NHLE_MAX_INSTANCES): split the batch", 413)


def parse_top_k(value, from_text: bool = False) -> int:
    if value is None:
        return DEFAULT_TOP_K
    if from_text and isinstance(value, str) and value.strip().isdigit():  # query and form fields
        value = int(value)
    if type(value) is not int or value < 1:
        raise bad("bad_top_k", f"top_k must be an integer >= 1, got {value!r}")
    return value


def top_k_rows(p: np.ndarray, model: LoadedModel, k: int) -> list[dict]:
    forgotten = set(model.forgotten)
    retained = np.array([i for i in range(p.shape[1]) if i not in forgotten])
    k = min(k, len(retained))  # forgotten classes are never listed, whatever top_k asks
    rows = []
    for probs in p[:, retained]:
        order = np.argsort(-probs, kind="stable")[:k]
        rows.append({"top_k": [{"index": int(retained[j]), "class": model.class_names[retained[j]],
                                "probability": float(probs[j])} for j in order]})
    return rows


PREDICT_FIELDS = ("instances", "top_k", "scale")


def handle_predict(body: bytes, model: LoadedModel, settings: Settings) -> dict:
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise bad("bad_body", f'the body must be a JSON object {{"instances": [...]}}, got {type(payload).__name__}')
    unknown = sorted(set(payload) - set(PREDICT_FIELDS))
    if unknown:
        raise bad("unknown_field", f"unknown field(s) {unknown}; known fields: {', '.join(PREDICT_FIELDS)}")
    if "instances" not in payload:
        raise bad("missing_field", 'missing field "instances": a list of images')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise bad("bad_type", f'"instances" must be a list of images, got {type(instances).__name__}')
    check_count(len(instances), settings)
    top_k = parse_top_k(payload.get("top_k"))
    scale = payload.get("scale", "unit")
    if scale not in ("unit", "byte"):
        raise bad("bad_scale", f'"scale" must be "unit" (pixels in [0, 1]) or "byte" (0..255), got {scale!r}')
    x = np.stack([instance_tensor(v, model, scale, f"instances[{i}]") for i, v in enumerate(instances)])
    return {"predictions": top_k_rows(model.probabilities(x), model, top_k), "model_version": model.version}


def batch_tensor(value, model: LoadedModel, where: str, settings: Settings) -> np.ndarray:
    """MLflow "inputs": (N, C, H, W), or (N, H, W) for a one-channel model, in [0, 1]."""
    if isinstance(value, dict):  # {"images": tensor}
        if set(value) != {model.input_name}:
            raise bad("unknown_field", f"{where} as an object must have exactly the key {model.input_name!r}, "
                                       f"got {sorted(value)}")
        value = value[model.input_name]
    if not isinstance(value, list):
        raise bad("bad_type", f"{where} must be an array (N, C, H, W), got {type(value).__name__}")
    check_count(len(value), settings, where)
    x = to_array(value, where)
    c, h, w = model.input_shape
    if x.shape[1:] != (c, h, w) and not (c == 1 and x.shape[1:] == (h, w)):
        raise bad("bad_shape", f"{where} has shape {shape_text(x.shape)}; this model takes "
                               f"N x {shape_text((c, h, w))}" + (f" (or N x {h} x {w})" if c == 1 else ""))
    return to_unit(x.reshape(-1, c, h, w), "unit", where)


def dataframe_tensor(frame, model: LoadedModel, settings: Settings) -> np.ndarray:
    """MLflow "dataframe_split": one row per image, its C*H*W pixels flattened in C, H, W order
    (or one cell holding the image as a nested array)."""
    if not isinstance(frame, dict):
        raise bad("bad_type", f'"dataframe_split" must be an object with "data", got {type(frame).__name__}')
    unknown = sorted(set(frame) - {"columns", "data", "index"})
    if unknown:
        raise bad("unknown_field", f"unknown dataframe_split field(s) {unknown}; known: columns, data, index")
    rows = frame.get("data")
    if not isinstance(rows, list):
        raise bad("bad_type", '"dataframe_split.data" must be a list of rows')
    check_count(len(rows), settings, "dataframe_split.data")
    c, h, w = model.input_shape
    n_pixels = c * h * w
    columns = frame.get("columns")
    if columns is not None and (not isinstance(columns, list) or len(columns) not in (1, n_pixels)):
        raise bad("bad_shape", f'"dataframe_split.columns" must list {n_pixels} pixel columns (C*H*W = '
                               f"{shape_text((c, h, w))}) or one tensor column, got "
                               f"{len(columns) if isinstance(columns, list) else type(columns).__name__}")
    if rows and all(isinstance(r, list) and len(r) == 1 and isinstance(r[0], list) for r in rows):
        return np.stack([instance_tensor(r[0], model, "unit", f"dataframe_split.data[{i}][0]")
                         for i, r in enumerate(rows)])
    x = to_array(rows, "dataframe_split.data")
    if x.ndim != 2 or x.shape[1] != n_pixels:
        raise bad("bad_shape", f"dataframe_split.data has shape {shape_text(x.shape)}; each row must hold "
                               f"{n_pixels} pixels (C*H*W = {shape_text((c, h, w))})")
    return to_unit(x.reshape(-1, c, h, w), "unit", "dataframe_split.data")


INVOCATION_KEYS = ("inputs", "instances", "dataframe_split")


def handle_invocations(body: bytes, model: LoadedModel, settings: Settings) -> dict:
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise bad("bad_body", f"the body must be a JSON object with one of {', '.join(INVOCATION_KEYS)}")
    if payload.get("params"):
        raise bad("unknown_field", '"params" is not supported by this model: send it empty or leave it out')
    unknown = sorted(set(payload) - set(INVOCATION_KEYS) - {"params"})
    if unknown:
        raise bad("unknown_field", f"unknown field(s) {unknown}; send exactly one of {', '.join(INVOCATION_KEYS)}")
    given = [k for k in INVOCATION_KEYS if k in payload]
    if len(given) != 1:
        raise bad("bad_body", f"send exactly one of {', '.join(INVOCATION_KEYS)}; got {given or 'none'}")
    key = given[0]
    if key == "inputs":
        x = batch_tensor(payload["inputs"], model, "inputs", settings)
    elif key == "instances":
        instances = payload["instances"]
        if not isinstance(instances, list):
            raise bad("bad_type", f'"instances" must be a list, got {type(instances).__name__}')
        check_count(len(instances), settings)
        x = np.stack([instance_tensor(v, model, "unit", f"instances[{i}]") for i, v in enumerate(instances)])
    else:
        x = dataframe_tensor(payload["dataframe_split"], model, settings)
    return {"predictions": model.probabilities(x).tolist()}


def handle_images(files: list[tuple[str, bytes]], top_k: int, model: LoadedModel) -> dict:
    x = np.stack([image_tensor(raw, model, f"file {name!r}") for name, raw in files])
    return {"predictions": [{"filename": name, **row} for (name, _), row in
                            zip(files, top_k_rows(model.probabilities(x), model, top_k))],
            "model_version": model.version}


# --------------------------------------------------------------------------------------------
# The body limit, enforced before any parsing: the declared Content-Length and the bytes that
# actually arrive (a chunked body has no Content-Length).


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def refuse(self, scope, receive, send, status: int, message: str):
        code = "payload_too_large" if status == 413 else "bad_request"
        # Connection: close, since the rest of the refused body is never read.
        await JSONResponse({"detail": message, "error": code}, status,
                           headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await self.refuse(scope, receive, send, 400, f"invalid Content-Length {declared!r}")
            if size > self.max_bytes:
                return await self.refuse(scope, receive, send, 413, f"the body is {size} bytes; the limit is {self.max_bytes} "
                                                    "(NHLE_MAX_BODY_BYTES)")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self.refuse(scope, receive, send, 413, f"the body exceeds the limit of {self.max_bytes} bytes "
                                                    "(NHLE_MAX_BODY_BYTES)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# --------------------------------------------------------------------------------------------
# The app


PREDICT_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "required": ["instances"], "additionalProperties": False, "properties": {
        "instances": {"type": "array", "description": "images: C x H x W (or H x W) nested arrays, "
                      "or base64 PNG/JPEG strings of any size", "items": {}},
        "top_k": {"type": "integer", "minimum": 1, "default": DEFAULT_TOP_K},
        "scale": {"type": "string", "enum": ["unit", "byte"], "default": "unit",
                  "description": "unit: pixels in [0, 1] (the model's input); byte: 0..255"}}}}}}}
INVOCATIONS_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "description": 'MLflow scoring protocol: one of "inputs" (N x C x H x W), '
    '"instances" (list of C x H x W), "dataframe_split" (rows of C*H*W pixels), all in [0, 1]'}}}}}
IMAGES_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "minimum": 1, "default": DEFAULT_TOP_K}}}}}}}


def _setup_logging():
    # uvicorn configures only its own loggers; without this our INFO lines would be dropped.
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s nhle_server: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def create_app(settings: Settings | None = None, manager: ModelManager | None = None) -> FastAPI:
    """The ASGI app; `uvicorn nhle_server:create_app --factory` calls it with no arguments."""
    _setup_logging()
    settings = settings or Settings.from_env()
    manager = manager or ModelManager(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        manager.start()  # the first check loads the model in the background; /readyz says when
        try:
            yield
        finally:
            manager.stop()

    app = FastAPI(title="nhle model server", version="1", lifespan=lifespan,
                  description="Image classification with an unlearned model: forgotten classes are never returned.")
    app.state.settings, app.state.manager = settings, manager
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    def headers(model: LoadedModel) -> dict:
        return {"X-Model-Version": str(model.version)}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse({"detail": err.message, "error": err.code}, err.status, headers=extra)

    @app.exception_handler(Exception)
    async def server_fault(request: Request, err: Exception):
        # Only genuine faults get here: every bad input is an ApiError (4xx) above.
        log.error("internal error on %s %s: %s", request.method, request.url.path, err, exc_info=err)
        return JSONResponse({"detail": f"internal server error: {type(err).__name__}", "error": "internal"}, 500)

    @app.get("/healthz")
    async def healthz():
        return {"alive": True}

    @app.get("/readyz")
    async def readyz():
        model = manager.current
        if model is None:
            check = manager.last_check or {}
            error = manager.last_error["message"] if manager.last_error else check.get("error")
            reason = f"model not loaded yet: {error}" if error else "model not loaded yet"
            return JSONResponse({"ready": False, "reason": reason}, 503)
        return {"ready": True, "version": model.version}

    @app.get("/model")
    async def model_info():
        return manager.describe()

    @app.post("/predict", openapi_extra=PREDICT_SCHEMA)
    async def predict(request: Request):
        """Top-k classes of each image; forgotten classes are never listed."""
        require_content_type(request, "application/json")
        body = await request.body()
        model = manager.require()  # this request's model, whatever swaps happen meanwhile
        result = await run_in_threadpool(handle_predict, body, model, settings)
        return JSONResponse(result, headers=headers(model))

    @app.post("/invocations", openapi_extra=INVOCATIONS_SCHEMA)
    async def invocations(request: Request):
        """MLflow scoring protocol; returns every class's probability (forgotten ones are 0)."""
        require_content_type(request, "application/json")
        body = await request.body()
        model = manager.require()
        result = await run_in_threadpool(handle_invocations, body, model, settings)
        return JSONResponse(result, headers=headers(model))

    @app.post("/predict/image", openapi_extra=IMAGES_SCHEMA)
    async def predict_image(request: Request):
        """Multipart upload of image files (field `files`); top_k as form field or query parameter."""
        require_content_type(request, "multipart/form-data")
        unknown = sorted(set(request.query_params) - {"top_k"})
        if unknown:
            raise bad("unknown_field", f"unknown query parameter(s) {unknown}; known: top_k")
        model = manager.require()
        try:
            form = await request.form(max_files=settings.max_instances + 1, max_fields=8)
        except (StarletteHTTPException, ValueError) as err:
            message = getattr(err, "detail", None) or str(err)
            status = 413 if "Too many files" in message else 400
            raise bad("bad_multipart", f"malformed multipart body: {message}", status) from None
        try:
            unknown = sorted(set(form) - {"files", "top_k"})
            if unknown:
                raise bad("unknown_field", f"unknown form field(s) {unknown}; known: files, top_k")
            uploads = form.getlist("files")
            if not uploads:
                raise bad("missing_field", 'no files: upload images in the multipart field "files"')
            if not all(isinstance(u, UploadFile) for u in uploads):
                raise bad("bad_type", 'the field "files" must hold file uploads, not text')
            check_count(len(uploads), settings, "files")
            top_k = parse_top_k(form.get("top_k", request.query_params.get("top_k")), from_text=True)
            files = [(u.filename or f"files[{i}]", await u.read()) for i, u in enumerate(uploads)]
        finally:
            await form.close()
        result = await run_in_threadpool(handle_images, files, top_k, model)
        return JSONResponse(result, headers=headers(model))

    @app.post("/admin/reload")
    async def admin_reload(request: Request):
        """Check the alias now and swap if it moved; retries a version that failed before."""
        if not settings.admin_token:
            raise ApiError(403, "disabled", "admin reload is disabled: start the server with NHLE_ADMIN_TOKEN set")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "missing bearer token: send Authorization: Bearer <NHLE_ADMIN_TOKEN>")
        if not hmac.compare_digest(token.strip().encode(), settings.admin_token.encode()):
            raise ApiError(401, "unauthorized", "wrong bearer token")
        outcome = await run_in_threadpool(manager.refresh, True, "admin reload")
        return {**outcome, "model": manager.describe()}

    return app
