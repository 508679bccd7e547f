"""The nhle model server: ONNX Runtime behind FastAPI, following an MLflow registry alias.

    uvicorn nhle_serving.server:create_app --factory --http nhle_serving.http:GuardedProtocol \
        --host 127.0.0.1 --port 8000
    nhle serve --host 127.0.0.1 --port 8000          # the same through the CLI

Settings come from params.yaml's `serving:` section, each overridden by an environment variable
(see `Settings.from_env` and serving/README.md):
NHLE_PARAMS, NHLE_PROJECT_DIR, NHLE_MODEL, NHLE_ADMIN_TOKEN, NHLE_POLL_SECONDS,
NHLE_MAX_INSTANCES, NHLE_MAX_BODY_BYTES, NHLE_BODY_TIMEOUT_SECONDS, NHLE_MAX_HEADER_BYTES,
NHLE_HEADER_TIMEOUT_SECONDS, NHLE_KEEP_ALIVE_SECONDS, NHLE_MAX_REQUEST_PIXELS, NHLE_ORT_THREADS,
NHLE_ORT_OPT_LEVEL, NHLE_MICRO_BATCHING, NHLE_MICRO_BATCH_MAX_IMAGES, NHLE_MICRO_BATCH_WAIT_MS,
NHLE_DEVICE, NHLE_VERIFY_SECONDS, NHLE_VERIFY_KEY.

Model input: float32 pixels in [0, 1], shape (C, H, W) per image, exactly what the exported
ONNX graph takes (normalisation and the forgotten-class mask are inside the graph). /predict
also takes 0..255 pixels with "scale": "byte", and base64 PNG/JPEG images of any size. The Open
Inference Protocol (KServe V2) endpoints under /v2 take FP32 or UINT8 tensors, as JSON or as raw
bytes (nhle_serving.open_inference).

Hot swap: a background thread checks the alias every NHLE_POLL_SECONDS. A new version is
downloaded, loaded into a new InferenceSession and smoke-tested (finite probabilities, every
forgotten class exactly 0) off the request path; only then is the single `current` reference
replaced. Each request reads that reference once, so it runs start to end on one model. A
version that fails is not swapped in: the old one keeps serving and /model shows `last_error`.

This module holds the app and its routes; the rest lives in the package's other modules:
nhle_serving.settings (Settings, ApiError), nhle_serving.sources (registry or local file),
nhle_serving.models (ONNX Runtime sessions, load_model, ModelManager), nhle_serving.batching
(micro-batching), nhle_serving.payloads (request parsing, handlers, the body limit) and
nhle_serving.open_inference (the /v2 protocol).

None of them may import torch (a serving image need not ship it): they use numpy,
onnxruntime, Pillow, nhle.core.config (pure dataclasses) and, for models:/ URIs, mlflow.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import sys
import time
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from fastapi import Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from nhle_serving import open_inference as v2
from nhle_serving.models import (
    LoadedModel,
    ModelManager,
)
from nhle_serving.payloads import (
    DEFAULT_TOP_K,
    BodyLimit,
    check_count,
    handle_images,
    handle_invocations,
    handle_predict,
    parse_top_k,
    require_content_type,
    shape_text,
)
from nhle_serving.settings import ApiError, Settings, bad, error_body

log = logging.getLogger("nhle_serving.server")
# A V2 body up to this size is parsed on the event loop, a larger one in a worker thread so that
# it does not hold up other requests: binary tensors are read as one view of the bytes, JSON
# numbers one by one.
INLINE_BODY_BYTES = {"binary": 1024 * 1024, "json": 16 * 1024}


# --------------------------------------------------------------------------------------------
# The app


def request_body(content_type: str, schema: dict) -> dict:
    """FastAPI's openapi_extra for a route that reads its body itself: a required body of one type."""
    return {"requestBody": {"required": True, "content": {content_type: {"schema": schema}}}}


TOP_K = {"type": "integer", "minimum": 1, "default": DEFAULT_TOP_K}
PREDICT_SCHEMA = request_body(
    "application/json",
    {
        "type": "object",
        "required": ["instances"],
        "additionalProperties": False,
        "properties": {
            "instances": {
                "type": "array",
                "description": "images: C x H x W (or H x W) nested arrays, "
                'or base64 PNG/JPEG strings of any size, bare or as {"b64": "..."}',
                "items": {},
            },
            "top_k": TOP_K,
            "scale": {
                "type": "string",
                "enum": ["unit", "byte"],
                "default": "unit",
                "description": "unit: pixels in [0, 1] (the model's input); byte: 0..255",
            },
        },
    },
)
INVOCATIONS_SCHEMA = request_body(
    "application/json",
    {
        "type": "object",
        "description": 'MLflow scoring protocol: one of "inputs" (N x C x H x W), '
        '"instances" (list of C x H x W), "dataframe_split" (rows of C*H*W pixels), all in [0, 1]',
    },
)
IMAGES_SCHEMA = request_body(
    "multipart/form-data",
    {
        "type": "object",
        "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}, "top_k": TOP_K},
    },
)


def example_image(shape) -> list:
    """A C x H x W image in [0, 1] (a diagonal gradient) for the OpenAPI examples."""
    c, h, w = shape
    ramp = (np.arange(h)[:, None] + np.arange(w)[None, :]) / max(1, h + w - 2)
    return np.round(np.broadcast_to(ramp, (c, h, w)), 3).tolist()


def add_v2_infer_paths(paths: dict, model: LoadedModel | None) -> dict:
    """`paths` with the Open Inference Protocol's infer routes described after the other /v2
    ones: they are plain Starlette routes (for speed), which FastAPI leaves out of the schema."""
    items = list(paths.items())
    at = max(
        (i + 1 for i, (path, _) in enumerate(items) if path == "/v2" or path.startswith("/v2/")), default=len(items)
    )
    return dict(items[:at] + list(v2.infer_openapi(model).items()) + items[at:])


def v2_example(model: LoadedModel, image: list) -> dict:
    """A JSON-tensor V2 infer request of one image."""
    return {
        "inputs": [
            {
                "name": model.input_name,
                "datatype": "FP32",
                "shape": [1, *model.input_shape],
                "data": np.asarray(image).ravel().tolist(),
            }
        ]
    }


def add_live_examples(schema: dict, model: LoadedModel, settings: Settings) -> dict:
    """Request examples shaped for the served model, with the responses it really gives them
    (computed now), so "Try it out" in /docs reproduces the documented answer."""
    image = example_image(model.input_shape)
    cases = {
        "/predict": ({"instances": [image], "top_k": 3}, handle_predict),
        "/invocations": ({"inputs": [image]}, handle_invocations),
    }
    for path, (request, handler) in cases.items():
        operation = schema["paths"][path]["post"]
        response = handler(json.dumps(request).encode(), model, settings)
        operation["requestBody"]["content"]["application/json"]["example"] = request
        operation["responses"]["200"]["content"] = {"application/json": {"example": response}}
    request = v2_example(model, image)
    response = json.loads(v2.handle_infer(json.dumps(request).encode(), None, model, settings)[0])
    for path in v2.INFER_PATHS:
        operation = schema["paths"][path]["post"]
        operation["requestBody"]["content"]["application/json"]["example"] = request
        operation["responses"]["200"]["content"]["application/json"]["example"] = response
    schema["info"]["description"] += (
        f" The examples are version {model.version}'s real answers to a {shape_text(model.input_shape)} gradient image."
    )
    return schema


def _setup_logging():
    # uvicorn configures only its own loggers; without this our INFO lines would be dropped.
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s nhle_serving.server: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def create_app(settings: Settings | None = None, manager: ModelManager | None = None):
    """The ASGI app; `uvicorn nhle_serving.server:create_app --factory` calls it with no arguments."""
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

    # FastAPIOffline: /docs and /redoc load their JavaScript and CSS from this server, not a CDN.
    app = FastAPIOffline(
        title="nhle model server",
        version="1",
        lifespan=lifespan,
        description="Image classification with an unlearned model: forgotten classes are never returned.",
    )

    def openapi() -> dict:
        # Not cached like FastAPI's: the examples follow the model being served.
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        model = manager.current
        schema["paths"] = add_v2_infer_paths(schema["paths"], model)
        return add_live_examples(schema, model, settings) if model is not None else schema

    app.openapi = openapi
    app.state.settings, app.state.manager = settings, manager
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_seconds=settings.body_timeout_seconds)

    def headers(model: LoadedModel) -> dict:
        return {"X-Model-Version": str(model.version)}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(error_body(request.url.path, err.code, err.message), err.status, headers=extra)

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
        mismatch = manager.mismatch()
        if mismatch:  # what is served was verified at load, but the registry no longer proves it
            return JSONResponse(
                {
                    "ready": False,
                    "version": model.version,
                    "reason": f"the served version's files no longer verify: {mismatch}",
                },
                503,
            )
        refused = manager.refused()
        if refused:  # still ready: what is served passed every check; the alias's target did not
            return {
                "ready": True,
                "version": model.version,
                "refused_version": refused["version"],
                "warning": f"not serving version {refused['version']}: {refused['reason']}",
            }
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
        result = await run_in_threadpool(handle_images, files, top_k, model, settings)
        return JSONResponse(result, headers=headers(model))

    add_open_inference_routes(app, manager, settings)

    attempts = FailedAttempts()

    @app.post("/admin/reload")
    async def admin_reload(request: Request):
        """Check the alias now and swap if it moved; retries a version that failed before."""
        if not settings.admin_token:
            raise ApiError(403, "disabled", "admin reload is disabled: start the server with NHLE_ADMIN_TOKEN set")
        client = request.client.host if request.client else "unknown"
        attempts.check(client)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            attempts.failed(client)
            raise ApiError(401, "unauthorized", "missing bearer token: send Authorization: Bearer <NHLE_ADMIN_TOKEN>")
        if not hmac.compare_digest(token.strip().encode(), settings.admin_token.encode()):
            attempts.failed(client)
            raise ApiError(401, "unauthorized", "wrong bearer token")
        outcome = await run_in_threadpool(manager.refresh, True, "admin reload")
        return {**outcome, "model": manager.describe()}

    return app


class FailedAttempts:
    """Failed admin attempts per client address: after `limit` of them within `window` seconds,
    every attempt from that address gets 429 until the oldest leaves the window, so a token
    cannot be guessed by trying; each failure is logged with the address."""

    def __init__(self, limit: int = 5, window: float = 60.0):
        self.limit, self.window = limit, window
        self.failures: dict[str, list[float]] = {}

    def recent(self, client: str) -> list[float]:
        now = time.monotonic()
        kept = [t for t in self.failures.get(client, []) if now - t < self.window]
        self.failures[client] = kept
        return kept

    def check(self, client: str) -> None:
        recent = self.recent(client)
        if len(recent) >= self.limit:
            wait = max(1, int(self.window - (time.monotonic() - recent[0])) + 1)
            raise ApiError(
                429,
                "too_many_attempts",
                f"{len(recent)} failed admin attempts from {client} in the last "
                f"{self.window:.0f} s: try again in {wait} s",
            )

    def failed(self, client: str) -> None:
        self.recent(client).append(time.monotonic())
        log.warning(
            "admin reload: missing or wrong token from %s (%d failed in the last %.0f s)",
            client,
            len(self.failures[client]),
            self.window,
        )


def add_open_inference_routes(app, manager: ModelManager, settings: Settings):
    """The Open Inference Protocol (KServe V2) endpoints: nhle_serving.open_inference."""
    try:
        nhle_version = version("nhle")
    except PackageNotFoundError:  # run from a checkout that was never installed
        nhle_version = "unknown"

    @app.get("/v2")
    async def v2_server():
        return v2.server_metadata(nhle_version)

    @app.get("/v2/health/live")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready():
        return JSONResponse({"ready": manager.current is not None}, 200 if manager.current is not None else 503)

    def served(name: str, version: str | None):
        """The model being served, if the request names it (and its version); else a 404."""
        model = manager.require()  # this request's model, whatever swaps happen meanwhile
        v2.check_model(model, name, version)
        return model

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_model(name: str, version: str | None = None):
        return v2.model_metadata(served(name, version))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(name: str, version: str | None = None):
        return {"name": served(name, version).name, "ready": True}

    async def v2_infer(request: Request):
        """Open Inference Protocol inference: JSON tensors, or the binary tensor data extension."""
        model = served(request.path_params["name"], request.path_params.get("version"))
        body = v2.decompress(await request.body(), request.headers.get("content-encoding"), settings.max_body_bytes)
        header_length = request.headers.get(v2.HEADER)
        if len(body) > INLINE_BODY_BYTES["binary" if header_length else "json"]:
            content, extra = await run_in_threadpool(v2.handle_infer, body, header_length, model, settings)
        else:
            parsed = v2.parse_infer(body, header_length, model, settings)
            content, extra = v2.respond(parsed, await model.probabilities_async(parsed.x), model)
        return Response(content, headers={**extra, "X-Model-Version": str(model.version)})

    # Plain Starlette routes: FastAPI's parameter handling costs more than parsing a binary tensor.
    # FastAPI leaves them out of its schema: create_app's openapi() adds them (add_v2_infer_paths).
    for path in v2.INFER_PATHS:
        app.router.add_route(path, v2_infer, methods=["POST"], include_in_schema=False)
