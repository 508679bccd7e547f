"""ONNX Runtime side of the nhle model server: provider choice, session creation, the
LoadedModel a request runs on, `load_model` (download, open, smoke-test) and the ModelManager
that polls the source and swaps the serving model with one reference assignment.

Never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from starlette.concurrency import run_in_threadpool

from nhle.core.gates import deleted_but_predicted  # pure: nhle.core.config only, no torch
from nhle.core.outputs import OUTPUT_NAME, as_probabilities, output_of  # numpy only
from nhle_serving.batching import MicroBatcher
from nhle_serving.settings import OPT_LEVELS, ApiError, Settings, now_iso
from nhle_serving.sources import Pointer, gates_passed, make_source

log = logging.getLogger("nhle_serving.server")
INLINE_CALL_SECONDS = 0.001
FIRST_RETRY_SECONDS = 0.5  # while nothing is served, checks repeat after 0.5, 1, 2 ... s, up to poll_seconds


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
    if device == "cuda" and not gpu_present():
        raise ValueError(
            "NHLE_DEVICE=cuda but no GPU is visible to this process (no /dev/nvidia*, or "
            "CUDA_VISIBLE_DEVICES hides it); use NHLE_DEVICE=auto or cpu"
        )
    if device == "cuda" or (device == "auto" and cuda and gpu_present()):
        if hasattr(ort, "preload_dlls"):  # the CUDA/cuDNN libraries of the nvidia-* wheels
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: Path, settings: Settings, providers: list[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = OPT_LEVELS[settings.ort_opt_level]
    if settings.ort_threads:
        options.intra_op_num_threads = settings.ort_threads
    # Idle intra-op threads would spin between calls, taking the cores that parse the next requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=providers)


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
    batcher: MicroBatcher | None = None  # the server's, when serving.micro_batching is on
    seconds_per_image: float = 0.0  # one warm ONNX Runtime call at batch 64, per image
    suppressed: tuple[int, ...] = ()  # accepted for deletion, not yet forgotten by this version

    @property
    def withheld(self) -> tuple[int, ...]:
        """The classes never answered: forgotten by the version, or suppressed pending deletion."""
        return tuple(sorted({*self.forgotten, *self.suppressed}))

    @property
    def name(self) -> str:
        """The Open Inference Protocol's model name: the registry's (a local file's stem)."""
        return self.pointer.name or "model"

    @property
    def version(self) -> str | None:
        return self.pointer.version

    @property
    def uint8_divisor(self) -> float:
        """What a 0..255 pixel is divided by to give the graph's input (the exported preprocessing;
        255 for metadata written before it said so)."""
        return float(self.metadata.get("uint8_divisor", 255.0))

    def gathered(self, x: np.ndarray) -> bool:
        """Whether x waits for other requests' images (micro-batching on, and x under its cap)."""
        return self.batcher is not None and len(x) < self.batcher.max_images

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Every class's probability for the float32 (N, C, H, W) batch; forgotten ones exactly 0."""
        if self.gathered(x):
            return self.batcher.submit(self, x).result()
        return self.compute(x)

    async def probabilities_async(self, x: np.ndarray) -> np.ndarray:
        """probabilities(x) from the event loop: gathered when micro-batching is on; else a call
        expected under INLINE_CALL_SECONDS runs right here (a hop to a worker thread costs about
        as much as the call), a longer one in a worker thread."""
        if self.gathered(x):
            return await asyncio.wrap_future(self.batcher.submit(self, x))
        if len(x) * self.seconds_per_image <= INLINE_CALL_SECONDS:
            return self.compute(x)
        return await run_in_threadpool(self.compute, x)

    def compute(self, x: np.ndarray) -> np.ndarray:
        """One ONNX Runtime call (the micro-batcher calls it with gathered requests)."""
        y = self.session.run([self.output_name], {self.input_name: x})[0].astype(np.float32, copy=False)
        p = as_probabilities(y, self.output_name)
        # The graph already gives them exactly 0 (checked before the swap); setting it again
        # keeps the promise even for a class declared forgotten only in the metadata.
        p[:, list(self.forgotten)] = 0.0
        if self.suppressed:  # as if masked: the probability the rest had, renormalised over them
            p[:, list(self.suppressed)] = 0.0
            p /= np.maximum(p.sum(axis=1, keepdims=True), np.finfo(np.float32).tiny)
        if not np.isfinite(p).all():
            raise RuntimeError(f"model version {self.version} produced non-finite probabilities")
        return p


def timed(call, *args) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def _int_list(value, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise ValueError(f"{what} must be a list of integers, got {value!r}")
    return value


def check_registration(pointer: Pointer, digest: str) -> None:
    """A registry version is served only as registered: the file nhle exported (sha256 tag) and
    only after every gate held (gates tag); then its signature decides (signed_metadata)."""
    tagged = pointer.tags.get("onnx_sha256")
    if not tagged:
        raise ValueError(f"version {pointer.version} has no onnx_sha256 tag: it was not registered by nhle")
    if tagged != digest:
        raise ValueError(
            f"version {pointer.version}'s ONNX file has sha256 {digest[:16]}... but was registered "
            f"with {tagged[:16]}...: the file changed after registration"
        )
    if not gates_passed(pointer.tags):
        raise ValueError(f"version {pointer.version} is not tagged as having passed its gates")


def signed_metadata(source, pointer: Pointer, onnx_path: Path, workdir: Path) -> dict:
    """The version's preprocessing metadata and forgotten classes as its signed evidence gives them
    (nhle.adapters.signing), once the signature verifies: from here on the evidence is believed,
    not the tags or the MLmodel file, which anyone who can write to the registry can write."""
    evidence = source.verified_evidence(pointer, onnx_path, workdir)
    if not gates_passed({"gates": json.dumps(evidence.get("gates") or [])}):
        raise ValueError(f"version {pointer.version}'s signed evidence does not show every gate passed")
    return {**evidence["preprocessing"], "signed_forgotten_classes": evidence["forgotten_classes"]}


def verified(
    source, pointer: Pointer, onnx_path: Path, metadata: dict, folder: Path, loaded_sha256: str | None = None
) -> tuple[dict, str]:
    """(metadata, sha256) of a fetched version once it verifies: the file's sha256 against the one
    loaded (a re-verification) and, for a registered source, against its registration tags,
    and the signature, whose signed metadata is the one returned; raises on any mismatch.
    What a load checks, and a re-verification again."""
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if loaded_sha256 is not None and digest != loaded_sha256:
        raise ValueError(
            f"the registry's ONNX file of version {pointer.version} has sha256 {digest[:16]}..., "
            f"not the {loaded_sha256[:16]}... verified and loaded"
        )
    if source.registered:
        check_registration(pointer, digest)
        metadata = signed_metadata(source, pointer, onnx_path, folder)
    return metadata, digest


def load_model(
    source, pointer: Pointer, settings: Settings, deleted: dict[int, list[int]], batcher: MicroBatcher | None = None
) -> LoadedModel:
    """Download, open and smoke-test one model; raises on anything that should block a swap.
    `deleted` is the source's classes deleted on record (class -> done request ids)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nhle-serve-") as tmp:
        onnx_path, metadata = source.fetch(pointer, Path(tmp))
        metadata, digest = verified(source, pointer, onnx_path, metadata, Path(tmp))
        # Created while the download exists: ONNX Runtime reads any external weights now.
        session = open_session(onnx_path, settings, choose_providers(settings.device))
    if settings.device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise ValueError(
            "NHLE_DEVICE=cuda but ONNX Runtime could not start its CUDA provider (CUDA 13 or "
            "cuDNN 9 libraries missing? see docs/gpu.md); the session fell back to "
            f"{session.get_providers()}"
        )

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
    output_name = output_of([o.name for o in outputs])

    forgotten = set(_int_list(metadata.get("forgotten_classes", []), "forgotten_classes"))
    forgotten |= set(_int_list(metadata.get("signed_forgotten_classes", []), "the signed forgotten_classes"))

    # Smoke test: three different images in one batch (so the batch dimension must be dynamic).
    rng = np.random.default_rng(0)
    x = np.stack([np.zeros(shape), np.ones(shape), rng.random(shape)]).astype(np.float32)
    y = session.run([output_name], {input_name: x})[0]
    if y.ndim != 2 or y.shape[0] != 3:
        raise ValueError(f"a batch of 3 images gave output shape {y.shape}; expected (3, classes)")
    n_classes = y.shape[1]
    class_names = metadata.get("class_names") or [str(k) for k in range(n_classes)]
    if len(class_names) != n_classes:
        raise ValueError(f"metadata has {len(class_names)} class names but the graph outputs {n_classes} classes")
    if forgotten and (max(forgotten) >= n_classes or min(forgotten) < 0):
        raise ValueError(f"forgotten classes {sorted(forgotten)} are out of range 0..{n_classes - 1}")
    # -inf logits mark masked classes; a probability of 0 may also be a confident model's underflow.
    masked_in_graph = (
        set() if output_name == OUTPUT_NAME else {int(k) for k in np.flatnonzero(np.isneginf(y).all(axis=0))}
    )
    if masked_in_graph - forgotten:
        log.warning(
            "classes %s have -inf logits but are not declared forgotten; treating them as forgotten",
            sorted(masked_in_graph - forgotten),
        )
        forgotten |= masked_in_graph
    if len(forgotten) >= n_classes:
        raise ValueError("every class is forgotten: nothing left to predict")
    missing, requests = deleted_but_predicted(forgotten, deleted)
    if missing:
        raise ValueError(
            f"version {pointer.version} predicts class(es) {missing}, deleted on record by forget "
            f"request(s) {requests}: a forgotten class is never served again (reopening the request "
            "on record is the only way: nhle rollback --reopen)"
        )
    with np.errstate(all="ignore"):
        p = as_probabilities(y, output_name)
    if not np.isfinite(p).all():
        raise ValueError("smoke test: the model gives non-finite probabilities")
    leaked = {k: float(p[:, k].max()) for k in sorted(forgotten) if p[:, k].max() != 0.0}
    if leaked:
        raise ValueError(
            f"smoke test: forgotten classes get non-zero probability {leaked}; the graph does not mask them"
        )
    if np.abs(p.sum(axis=1) - 1).max() > 1e-4:
        raise ValueError("smoke test: probabilities do not sum to 1")
    # Warm-up at the batch sizes requests use, so the first real request pays no allocation;
    # the last call's time per image decides where requests run (probabilities_async).
    for n in sorted({1, min(64, settings.max_instances)}):
        batch = np.repeat(x[2:3], n, axis=0)
        session.run([output_name], {input_name: batch})
    seconds_per_image = min(timed(session.run, [output_name], {input_name: batch}) for _ in range(3)) / len(batch)

    return LoadedModel(
        session=session,
        input_name=input_name,
        output_name=output_name,
        input_shape=shape,
        class_names=tuple(str(c) for c in class_names),
        forgotten=tuple(sorted(forgotten)),
        pointer=pointer,
        sha256=digest,
        providers=tuple(session.get_providers()),
        loaded_at=now_iso(),
        load_seconds=round(time.perf_counter() - started, 3),
        metadata=metadata,
        batcher=batcher,
        seconds_per_image=seconds_per_image,
    )


class ModelManager:
    """Holds the serving model and replaces it when the source points somewhere new."""

    def __init__(self, settings: Settings, source=None):
        self.settings = settings
        self._source = source
        self.current: LoadedModel | None = None  # read once per request; replaced atomically
        self.aliases: tuple[str, ...] = ()
        self.last_swap_time: str | None = None
        self.last_error: dict | None = None  # the last failed load
        self.last_check: dict | None = None  # the last alias check (time, outcome)
        self.fallback: dict | None = None  # set while serving another version than the refused one
        self.deleted: dict | None = None  # the classes deleted on record at the last check, and whose record
        self.verification: dict | None = None  # the last re-verification of the served version's files
        self.suppressed: dict[int, list[int]] = {}  # accepted for deletion, not yet deleted: class -> request ids
        self.suppressed_since: dict[int, str] = {}  # when this server began suppressing each
        self.deleted_now: set[int] = set()  # the classes deleted on record at the last check
        self._verified_at = time.monotonic()
        self._failed: dict[str, str] = {}  # key -> message: not retried by the poller
        self._lock = threading.Lock()  # one check/load at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batcher = (
            MicroBatcher(settings.micro_batch_max_images, settings.micro_batch_wait_ms)
            if settings.micro_batching
            else None
        )

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
            if self.current is not None:  # whatever else happened, the ledger's accepted requests hold
                self.current = self.suppressing(self.current)
                outcome["suppressed_classes"] = list(self.current.suppressed)
            self.last_check = {"time": now_iso(), "reason": reason, **outcome}
            return outcome

    def _refresh(self, force: bool, reason: str) -> dict:
        current = self.current
        serving = current.version if current else None
        try:
            source = self.source
            suppressed = source.suppressed_classes()
            self._note_suppressed(suppressed)
            pointer = source.current()
            deleted = source.deleted_classes()
            self.deleted_now = set(deleted)
            self.deleted = {"classes": {str(c): ids for c, ids in sorted(deleted.items())}, "record": source.record}
        except Exception as err:  # registry or ledger down, alias missing, file gone: keep serving
            log.warning("model check (%s) failed: %s", reason, err)
            return {"outcome": "check_failed", "serving_version": serving, "error": f"{type(err).__name__}: {err}"}
        self.aliases = pointer.aliases
        if current is not None and current.pointer.key == pointer.key:
            return {"outcome": "unchanged", "serving_version": serving}
        # A refusal holds for this version under this record: reopening a request may lift it.
        failure_key = f"{pointer.key}|deleted={sorted(deleted)}"
        if not force and failure_key in self._failed:
            return {
                "outcome": "skipped",
                "serving_version": serving,
                "candidate_version": pointer.version,
                "error": self._failed[failure_key],
            }
        log.info("loading model %s (version %s, %s)", pointer.model_uri, pointer.version, reason)
        try:
            model = load_model(source, pointer, self.settings, deleted, self.batcher)
        except Exception as err:  # any failure of a candidate blocks its swap, nothing more
            message = f"{type(err).__name__}: {err}"
            self._failed[failure_key] = message
            self.last_error = {
                "time": now_iso(),
                "model_uri": pointer.model_uri,
                "version": pointer.version,
                "message": message,
            }
            log.error(
                "model %s (version %s) not swapped in, still serving %s: %s",
                pointer.model_uri,
                pointer.version,
                serving,
                message,
            )
            if current is None:
                return self._fall_back(source, pointer, message, deleted)
            return {
                "outcome": "failed",
                "serving_version": serving,
                "candidate_version": pointer.version,
                "error": message,
            }
        self._failed.pop(failure_key, None)
        self.fallback = None
        model = self.suppressing(model)
        self.current = model  # the swap: one reference assignment
        self.last_swap_time = now_iso()
        log.info(
            "serving model %s version %s (sha256 %s, %s, loaded in %.2f s; was %s)",
            pointer.name,
            model.version,
            model.sha256[:12],
            ",".join(model.providers),
            model.load_seconds,
            serving,
        )
        return {"outcome": "swapped", "serving_version": model.version, "previous_version": serving}

    def _note_suppressed(self, suppressed: dict[int, list[int]]) -> None:
        """The ledger's classes accepted for deletion, with when this server began suppressing each."""
        now = now_iso()
        self.suppressed_since = {c: self.suppressed_since.get(c, now) for c in suppressed}
        lifted = sorted(set(self.suppressed) - set(suppressed))
        added = sorted(set(suppressed) - set(self.suppressed))
        if added:
            log.info(
                "suppressing class(es) %s pending deletion (requests %s)",
                added,
                sorted({i for c in added for i in suppressed[c]}),
            )
        if lifted:
            log.info("class(es) %s no longer suppressed (their requests ended)", lifted)
        self.suppressed = suppressed

    def suppressing(self, model: LoadedModel) -> LoadedModel:
        """`model` withholding every class accepted for deletion, or deleted on record (a request
        done while this server still serves the version before it), that it does not forget itself."""
        pending_or_deleted = set(self.suppressed) | self.deleted_now
        wanted = tuple(
            sorted(c for c in pending_or_deleted if c not in model.forgotten and 0 <= c < len(model.class_names))
        )
        return model if wanted == model.suppressed else dataclasses.replace(model, suppressed=wanted)

    def reverify(self) -> dict | None:
        """Fetch the served registry version's files again and check them as at load: the ONNX
        file's sha256 against the one loaded, the registration tags and the signature. The outcome
        (ok, or the mismatch) is kept for /readyz and /model; a registry that cannot be reached
        changes nothing (the next poll tries again)."""
        model, source = self.current, self.source
        self._verified_at = time.monotonic()
        if model is None or not source.registered:
            return None
        with tempfile.TemporaryDirectory(prefix="nhle-reverify-") as tmp:
            try:
                pointer = source.pointer_of(model.version)
                onnx_path, metadata = source.fetch(pointer, Path(tmp))
            except Exception as err:
                log.warning("re-verifying version %s: its files could not be fetched: %s", model.version, err)
                return None
            try:
                verified(source, pointer, onnx_path, metadata, Path(tmp), loaded_sha256=model.sha256)
                outcome = {"time": now_iso(), "version": model.version, "ok": True}
            except Exception as err:
                outcome = {
                    "time": now_iso(),
                    "version": model.version,
                    "ok": False,
                    "message": f"{type(err).__name__}: {err}",
                }
                log.error("the served version %s no longer verifies: %s", model.version, outcome["message"])
        if self.current is model:
            self.verification = outcome
        return outcome

    def mismatch(self) -> str | None:
        """Why the served version's files no longer verify, when its last re-verification failed."""
        check, model = self.verification, self.current
        if check and not check["ok"] and model is not None and check["version"] == model.version:
            return check["message"]
        return None

    def _fall_back(self, source, refused: Pointer, message: str, deleted: dict[int, list[int]]) -> dict:
        """Nothing is served and the source's model was refused: serve the newest version that
        passes every check (gates, sha256, the classes deleted on record) instead, and say so."""
        try:
            candidates = source.fallbacks(exclude=refused.version)
        except Exception as err:  # the registry is down: stay not ready
            log.warning("no fallback: listing versions failed: %s", err)
            candidates = []
        for pointer in candidates:
            try:
                model = load_model(source, pointer, self.settings, deleted, self.batcher)
            except Exception as err:
                log.warning("fallback version %s refused too: %s", pointer.version, err)
                continue
            self.current, self.last_swap_time = self.suppressing(model), now_iso()
            self.fallback = {"serving_version": model.version, "refused_version": refused.version, "because": message}
            log.warning(
                "serving fallback version %s because version %s was refused: %s",
                model.version,
                refused.version,
                message,
            )
            return {
                "outcome": "fallback",
                "serving_version": model.version,
                "candidate_version": refused.version,
                "error": message,
            }
        message = (
            f"{message}; and no other version that forgets every class deleted on record ({sorted(deleted)}, "
            f"from {getattr(source, 'record', 'no record')}) passes every check: nothing is served rather than "
            "a model that may predict a deleted class"
        )
        self.last_error = {**(self.last_error or {}), "message": message}
        log.error("no model served: %s", message)
        return {"outcome": "failed", "serving_version": None, "candidate_version": refused.version, "error": message}

    def _run(self):
        retry = FIRST_RETRY_SECONDS
        while not self._stop.is_set():
            try:
                self.refresh(reason="startup" if self.current is None and self.last_check is None else "poll")
                if time.monotonic() - self._verified_at >= self.settings.verify_seconds:
                    self.reverify()
            except Exception:  # never let the poller die
                log.exception("model poller error")
            # Nothing served yet (registry or ledger unreachable, or every version refused): look
            # again soon, backing off to the poll interval, rather than stay unready for all of it.
            wait = self.settings.poll_seconds if self.current is not None else min(retry, self.settings.poll_seconds)
            retry = FIRST_RETRY_SECONDS if self.current is not None else retry * 2
            if self._stop.wait(wait):
                break

    def start(self):
        self._thread = threading.Thread(target=self._run, name="nhle-model-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.batcher is not None:
            self.batcher.stop()

    def require(self) -> LoadedModel:
        model = self.current
        if model is None:
            error = f"; last error: {self.last_error['message']}" if self.last_error else ""
            raise ApiError(503, "not_ready", f"no model loaded yet{error}")
        return model

    def refused(self) -> dict | None:
        """The version the source points at, when it is not the one served because it was refused."""
        check = self.last_check or {}
        if check.get("outcome") in ("failed", "skipped", "fallback"):
            return {"version": check.get("candidate_version"), "reason": check.get("error")}
        return None

    def describe(self) -> dict:
        model = self.current
        info = {
            "ready": model is not None,
            "model_uri": getattr(self._source, "model_uri", self.settings.model),
            "last_swap_time": self.last_swap_time,
            "last_error": self.last_error,
            "last_check": self.last_check,
            "poll_seconds": self.settings.poll_seconds,
            "refused": self.refused(),
            "fallback": self.fallback,
            "deleted_on_record": self.deleted,
            "verification": self.verification,
            "suppressed_pending_deletion": {
                str(c): {"requests": ids, "since": self.suppressed_since.get(c)}
                for c, ids in sorted(self.suppressed.items())
            },
            "verify_seconds": self.settings.verify_seconds,
            "micro_batching": (
                {"max_images": self.batcher.max_images, "calls": self.batcher.calls, "images": self.batcher.images}
                if self.batcher
                else None
            ),
        }
        if model is None:
            return info
        tags = model.pointer.tags
        return {
            **info,
            "name": model.pointer.name,
            "version": model.version,
            "aliases": list(self.aliases),
            "resolved_uri": model.pointer.model_uri,
            "run_id": model.pointer.run_id,
            "sha256": model.sha256,
            "tagged_onnx_sha256": tags.get("onnx_sha256"),
            "class_names": list(model.class_names),
            "forgotten_classes": list(model.forgotten),
            "suppressed_classes": list(model.suppressed),
            "input_name": model.input_name,
            "input_shape": list(model.input_shape),
            "input_scale": "float32 in [0, 1]",
            "normalisation": model.metadata.get("normalisation"),
            "arch": model.metadata.get("arch"),
            "providers": list(model.providers),
            "loaded_at": model.loaded_at,
            "load_seconds": model.load_seconds,
        }
