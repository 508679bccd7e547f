"""Request parsing of the nhle model server: JSON and content-type checks, nested arrays and
images (base64 or uploaded) -> float32 (N, C, H, W) in [0, 1], the /predict, /invocations and
/predict/image handlers, and the BodyLimit middleware. Every bad input is an ApiError naming it.

Never imports torch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import os
import re
import threading
import time
from contextvars import ContextVar
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image, ImageOps

from nhle.core.outputs import OUTPUT_NAME
from nhle_serving.models import LoadedModel
from nhle_serving.settings import ApiError, Settings, bad, error_body

DEFAULT_TOP_K = 3
# Decoded-image guard: an 8 MiB PNG can hold a gigapixel of zeros. 4096 x 4096 is far above
# any image this model family needs and keeps one decode under ~50 MB of RGB.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_ASPECT = 64

# Images decoded at once, all requests together: each may hold ~100 MB while it decodes, and the
# thread pool runs up to 40 handlers.
DECODE_SLOTS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))

# Pixels the request being handled may still have decoded (set by its handler): one request of 256
# images, each under MAX_IMAGE_PIXELS, could otherwise decode 4 billion pixels.
_pixels_left: ContextVar[list[int] | None] = ContextVar("pixels_left", default=None)


@contextlib.contextmanager
def pixel_budget(settings: Settings):
    token = _pixels_left.set([settings.max_request_pixels])
    try:
        yield
    finally:
        _pixels_left.reset(token)


def spend_pixels(n: int, where: str) -> None:
    left = _pixels_left.get()
    if left is None:
        return
    if n > left[0]:
        raise bad(
            "request_too_large",
            f"{where} would take this request's decoded images past "
            "NHLE_MAX_REQUEST_PIXELS pixels in all: send fewer or smaller images",
            413,
        )
    left[0] -= n


IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")


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
    ok = media == wanted or (
        wanted == "application/json" and media.startswith("application/") and media.endswith("+json")
    )
    if not ok:
        raise ApiError(
            415, "unsupported_media_type", f"Content-Type {media or '(none)'} is not supported here: send {wanted}"
        )


def _type_names(types) -> str:
    names = {bool: "true/false", str: "strings", type(None): "null", dict: "objects", list: "nested lists"}
    return ", ".join(sorted(names.get(t, t.__name__) for t in types))


MAX_DEPTH = 5  # a batch of C x H x W images is 4 deep


def check_depth(value: list, where: str) -> None:
    """Refuse arrays nested deeper than any image batch before numpy sees them (numpy fails on
    32 or more levels with an error of its own)."""
    stack = [(value, 1)]
    while stack:
        items, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad("too_deep", f"{where} is nested more than {MAX_DEPTH} levels deep; images are C x H x W")
        stack.extend((item, depth + 1) for item in items if isinstance(item, list))


def to_array(value, where: str) -> np.ndarray:
    """A nested JSON list of numbers -> float64 array; bools, strings, nulls and ragged rows are refused."""
    if not isinstance(value, list):
        raise bad("bad_type", f"{where} must be a nested array of pixel values, got {type(value).__name__}")
    check_depth(value, where)
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


# What to do with 0..255 pixels sent where [0, 1] is expected: /predict has a "scale" field, the
# MLflow scoring protocol of /invocations has none.
BYTE_HINT = {
    "predict": '; 0..255 pixels need "scale": "byte"',
    "invocations": "; divide 0..255 pixels by 255 (the MLflow protocol carries the model's [0, 1] "
    'input; /predict also takes "scale": "byte")',
}


def to_unit(x: np.ndarray, scale: str, where: str, endpoint: str, divisor: float | None = None) -> np.ndarray:
    """x in [0, 1] ("unit") or 0..255 ("byte", divided by `divisor`, the model's uint8_divisor) -> float32 input."""
    top = 1.0 if scale == "unit" else 255.0
    if x.size and (x.min() < 0 or x.max() > top):
        hint = BYTE_HINT[endpoint] if scale == "unit" else ""
        raise bad(
            "out_of_range",
            f"{where} has values in [{x.min():g}, {x.max():g}], outside [0, {top:g}] of scale {scale!r}{hint}",
        )
    return (x / divisor if scale == "byte" else x).astype(np.float32)


def shape_text(shape) -> str:
    return " x ".join(str(s) for s in shape)


def instance_tensor(value, model: LoadedModel, scale: str, where: str, endpoint: str = "predict") -> np.ndarray:
    """One image: base64 string, C x H x W array, or H x W array for a one-channel model."""
    if isinstance(value, str):
        return decode_base64_image(value, model, where)
    if isinstance(value, dict) and set(value) == {"b64"}:  # TF Serving / KServe V1 binary convention
        if not isinstance(value["b64"], str):
            raise bad("bad_type", f"{where}.b64 must be a base64 string, got {type(value['b64']).__name__}")
        return decode_base64_image(value["b64"], model, f"{where}.b64")
    if isinstance(value, dict) and set(value) == {model.input_name}:  # MLflow's named-tensor form
        value = value[model.input_name]
    x = to_array(value, where)
    c, h, w = model.input_shape
    if x.shape != (c, h, w) and not (c == 1 and x.shape == (h, w)):
        extra = f" (or {h} x {w})" if c == 1 else ""
        raise bad(
            "bad_shape",
            f"{where} has shape {shape_text(x.shape) or 'scalar'}; this model takes {shape_text((c, h, w))}{extra}",
        )
    x = x.reshape(c, h, w)
    return to_unit(x, scale, where, endpoint, model.uint8_divisor)


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
            # From the header, before any pixel is decoded: a 16,000,000 x 1 PNG is 16 KB on the
            # wire but a quarter of a gigabyte while it decodes.
            if img.width * img.height > MAX_IMAGE_PIXELS or max(img.size) > MAX_IMAGE_SIDE:
                raise bad(
                    "image_too_large",
                    f"{where} is {img.width} x {img.height} pixels; at most "
                    f"{MAX_IMAGE_PIXELS} pixels and {MAX_IMAGE_SIDE} on a side are decoded",
                    413,
                )
            if max(img.size) > MAX_IMAGE_ASPECT * max(1, min(img.size)):
                raise bad(
                    "bad_image",
                    f"{where} is {img.width} x {img.height} pixels; sides may differ at most {MAX_IMAGE_ASPECT} times",
                    400,
                )
            spend_pixels(img.width * img.height, where)
            with DECODE_SLOTS:
                return decoded(img, c, h, w)
    except (ApiError, MemoryError):
        raise
    except Image.DecompressionBombError as err:  # Pillow's own pixel limit, met before ours could be
        raise bad("image_too_large", f"{where} is too large to decode: {err}", 413) from None
    except Exception as err:  # whatever a decoder raises on hostile bytes (EXIF: TypeError, struct.error) is a 400
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the data", str(err))  # no addresses
        raise bad("bad_image", f"{where} could not be decoded as an image: {message}", 400) from None


def decoded(img: Image.Image, c: int, h: int, w: int) -> np.ndarray:
    """The opened image's pixels: the model's channels, H x W, in [0, 1] (C x H x W)."""
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
    return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)


def check_count(n: int, settings: Settings, what: str = "instances"):
    if n == 0:
        raise bad("empty", f"{what} is empty: send at least one image")
    if n > settings.max_instances:
        raise bad(
            "too_many_instances",
            f"{n} {what} in one request; the limit is {settings.max_instances} (NHLE_MAX_INSTANCES): split the batch",
            413,
        )


def parse_top_k(value, from_text: bool = False) -> int:
    if value is None:
        return DEFAULT_TOP_K
    # query and form fields; isdigit() alone also takes '²', which int() refuses
    if from_text and isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if type(value) is not int or value < 1:
        raise bad("bad_top_k", f"top_k must be an integer >= 1, got {value!r}")
    return value


def top_k_rows(p: np.ndarray, model: LoadedModel, k: int) -> list[dict]:
    withheld = set(model.withheld)
    retained = np.array([i for i in range(p.shape[1]) if i not in withheld])
    k = min(k, len(retained))  # forgotten and suppressed classes are never listed, whatever top_k asks
    rows = []
    for probs in p[:, retained]:
        order = np.argsort(-probs, kind="stable")[:k]
        rows.append(
            {
                "top_k": [
                    {"index": int(retained[j]), "class": model.class_names[retained[j]], "probability": float(probs[j])}
                    for j in order
                ]
            }
        )
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
    with pixel_budget(settings):
        x = np.stack([instance_tensor(v, model, scale, f"instances[{i}]") for i, v in enumerate(instances)])
    return {"predictions": top_k_rows(model.probabilities(x), model, top_k), "model_version": model.version}


def batch_tensor(value, model: LoadedModel, where: str, settings: Settings) -> np.ndarray:
    """MLflow "inputs": (N, C, H, W), or (N, H, W) for a one-channel model, in [0, 1]."""
    if isinstance(value, dict):  # {"images": tensor}
        if set(value) != {model.input_name}:
            raise bad(
                "unknown_field",
                f"{where} as an object must have exactly the key {model.input_name!r}, got {sorted(value)}",
            )
        value = value[model.input_name]
    if not isinstance(value, list):
        raise bad("bad_type", f"{where} must be an array (N, C, H, W), got {type(value).__name__}")
    check_count(len(value), settings, where)
    x = to_array(value, where)
    c, h, w = model.input_shape
    if x.shape[1:] != (c, h, w) and not (c == 1 and x.shape[1:] == (h, w)):
        raise bad(
            "bad_shape",
            f"{where} has shape {shape_text(x.shape)}; this model takes "
            f"N x {shape_text((c, h, w))}" + (f" (or N x {h} x {w})" if c == 1 else ""),
        )
    return to_unit(x.reshape(-1, c, h, w), "unit", where, "invocations")


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
        raise bad(
            "bad_shape",
            f'"dataframe_split.columns" must list {n_pixels} pixel columns (C*H*W = '
            f"{shape_text((c, h, w))}) or one tensor column, got "
            f"{len(columns) if isinstance(columns, list) else type(columns).__name__}",
        )
    if rows and all(isinstance(r, list) and len(r) == 1 and isinstance(r[0], list) for r in rows):
        return np.stack(
            [
                instance_tensor(r[0], model, "unit", f"dataframe_split.data[{i}][0]", "invocations")
                for i, r in enumerate(rows)
            ]
        )
    x = to_array(rows, "dataframe_split.data")
    if x.ndim != 2 or x.shape[1] != n_pixels:
        raise bad(
            "bad_shape",
            f"dataframe_split.data has shape {shape_text(x.shape)}; each row must hold "
            f"{n_pixels} pixels (C*H*W = {shape_text((c, h, w))})",
        )
    return to_unit(x.reshape(-1, c, h, w), "unit", "dataframe_split.data", "invocations")


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
        with pixel_budget(settings):
            x = np.stack(
                [instance_tensor(v, model, "unit", f"instances[{i}]", "invocations") for i, v in enumerate(instances)]
            )
    else:
        with pixel_budget(settings):
            x = dataframe_tensor(payload["dataframe_split"], model, settings)
    # The body `mlflow models serve` answers for nhle's graph (its named output "probabilities").
    return {"predictions": {OUTPUT_NAME: model.probabilities(x).tolist()}}


def handle_images(files: list[tuple[str, bytes]], top_k: int, model: LoadedModel, settings: Settings) -> dict:
    with pixel_budget(settings):
        x = np.stack([image_tensor(raw, model, f"file {name!r}") for name, raw in files])
    return {
        "predictions": [
            {"filename": name, **row} for (name, _), row in zip(files, top_k_rows(model.probabilities(x), model, top_k))
        ],
        "model_version": model.version,
    }


# --------------------------------------------------------------------------------------------
# The body limits, enforced before any parsing: the declared Content-Length, the bytes that
# actually arrive (a chunked body has no Content-Length), and the time they take to arrive.


class BodyLimit:
    def __init__(self, app, max_bytes: int, timeout_seconds: float = 30.0):
        self.app, self.max_bytes, self.timeout_seconds = app, max_bytes, timeout_seconds

    async def refuse(self, scope, receive, send, status: int, message: str):
        code = {413: "payload_too_large", 408: "body_timeout"}.get(status, "bad_request")
        # Connection: close, since the rest of the refused body is never read.
        await JSONResponse(error_body(scope["path"], code, message), status, headers={"Connection": "close"})(
            scope, receive, send
        )

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
                too_big = f"the body is {size} bytes; the limit is {self.max_bytes} (NHLE_MAX_BODY_BYTES)"
                return await self.refuse(scope, receive, send, 413, too_big)
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout_seconds
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                late = (
                    f"the body did not arrive whole within {self.timeout_seconds:g} s "
                    f"({size} bytes came; NHLE_BODY_TIMEOUT_SECONDS)"
                )
                return await self.refuse(scope, receive, send, 408, late)
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                too_big = f"the body exceeds the limit of {self.max_bytes} bytes (NHLE_MAX_BODY_BYTES)"
                return await self.refuse(scope, receive, send, 413, too_big)
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
