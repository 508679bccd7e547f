"""The Open Inference Protocol (KServe V2, also spoken by Triton and MLServer) of the nhle model
server: metadata, and inference with JSON tensors or with the binary tensor data extension.

    POST /v2/models/{name}[/versions/{version}]/infer
    {"inputs": [{"name": "images", "datatype": "FP32", "shape": [N, C, H, W], "data": [...]}]}

With the binary extension the body is that JSON header followed by the raw little-endian tensor
bytes; the header's length is in `Inference-Header-Content-Length` and the input says its byte
count in `"parameters": {"binary_data_size": ...}`. Inputs: FP32 pixels in [0, 1] (what the graph
takes) or UINT8 pixels, divided by the recorded preprocessing's `uint8_divisor` (255). The one
output, "probabilities" (FP32, N x classes), has every forgotten class exactly 0; it comes back
binary when the request asks (`binary_data_output`, or `binary_data` on the output), else as JSON.
The model name and version are the registry's. Errors: a 4xx with {"error": message}.

Never imports torch.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np

from nhle.core.outputs import OUTPUT_NAME
from nhle_serving.models import LoadedModel
from nhle_serving.payloads import check_count, parse_json, to_array
from nhle_serving.settings import ApiError, Settings, bad

HEADER = "inference-header-content-length"
DATATYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "onnxruntime_onnx"


def served_version(model: LoadedModel) -> str:
    """The registry version; a local file has none, so its sha256 prefix names it."""
    return model.version or model.sha256[:12]


def server_metadata(version: str) -> dict:
    return {"name": "nhle", "version": version, "extensions": EXTENSIONS}


def model_metadata(model: LoadedModel) -> dict:
    c, h, w = model.input_shape
    return {
        "name": model.name,
        "versions": [served_version(model)],
        "platform": PLATFORM,
        "inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [-1, c, h, w]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(model.class_names)]}],
        "parameters": {
            "input_datatypes": list(DATATYPES),
            "input_scale": f"FP32 in [0, 1]; UINT8 / {model.uint8_divisor:g}",
            "class_names": list(model.class_names),
            "forgotten_classes": list(model.forgotten),
            "suppressed_classes": list(model.suppressed),
        },
    }


def check_model(model: LoadedModel, name: str, version: str | None) -> None:
    """404 unless the request names the model (and version) being served."""
    if name != model.name:
        raise ApiError(404, "unknown_model", f"model {name!r} is not served here; this server serves {model.name!r}")
    if version is not None and version != served_version(model):
        raise ApiError(
            404,
            "unknown_version",
            f"version {version!r} of {name!r} is not served; this server serves "
            f"version {served_version(model)} (the alias it follows)",
        )


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A gzip or deflate request body (tritonclient's request_compression_algorithm), decoded up
    to `limit` bytes: a small compressed body must not expand past the body limit."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(
            415, "unsupported_encoding", f"Content-Encoding {encoding} is not supported: send gzip, deflate or none"
        )
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise bad("bad_encoding", f"the body is not valid {encoding} data: {err}", 400) from None
    if len(out) > limit:
        raise bad("payload_too_large", f"the body decompresses to more than {limit} bytes (NHLE_MAX_BODY_BYTES)", 413)
    if not inflater.eof:  # a gzip member without its CRC and length trailer, or deflate cut short
        raise bad("bad_encoding", f"the body is not complete {encoding} data: it ends before its end marker", 400)
    if inflater.unused_data:
        raise bad("bad_encoding", f"the body has {len(inflater.unused_data)} bytes after its {encoding} data", 400)
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a request."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    # At most as many digits as the largest body allowed has: Python refuses int() of over 4,300.
    if not (text.isascii() and text.isdigit()) or len(text) > 15 or not 0 < int(text) <= len(body):
        raise bad(
            "bad_header_length",
            f"Inference-Header-Content-Length {header_length!r} must be a whole number "
            f"of bytes from 1 to the body's {len(body)}",
            400,
        )
    return body[: int(text)], body[int(text) :]


def flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise bad("bad_parameter", f"{where} must be true or false, got {value!r}", 400)
    return value


def parse_input(tensor, model: LoadedModel, binary: bytes, settings: Settings) -> tuple[np.ndarray, int]:
    """The request's input tensor -> float32 (N, C, H, W) in [0, 1], and the binary bytes it used."""
    if not isinstance(tensor, dict):
        raise bad("bad_type", f"inputs[0] must be an object, got {type(tensor).__name__}", 400)
    unknown = sorted(set(tensor) - {"name", "shape", "datatype", "parameters", "data"})
    if unknown:
        raise bad("unknown_field", f"unknown field(s) {unknown} in inputs[0]", 400)
    if tensor.get("name") != model.input_name:
        raise bad(
            "unknown_input", f"inputs[0].name is {tensor.get('name')!r}; the model's input is {model.input_name!r}", 400
        )
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise bad(
            "bad_datatype", f"inputs[0].datatype is {datatype!r}; send FP32 (pixels in [0, 1]) or UINT8 (0..255)", 400
        )
    shape = tensor.get("shape")
    c, h, w = model.input_shape
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise bad("bad_shape", f"inputs[0].shape must be a list of whole numbers, got {shape!r}", 400)
    if len(shape) != 4 or shape[1:] != [c, h, w] or shape[0] < 1:
        raise bad(
            "bad_shape", f"inputs[0].shape is {shape}; this model takes [N, {c}, {h}, {w}] with N >= 1 images", 400
        )
    check_count(shape[0], settings, "inputs[0] images")
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad("bad_parameter", "inputs[0].parameters must be an object", 400)
    dtype, count = DATATYPES[datatype], shape[0] * c * h * w
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if "data" in tensor:
            raise bad("bad_body", "inputs[0] has both data and binary_data_size: send one", 400)
        if type(size) is not int or size != count * dtype.itemsize:
            raise bad(
                "bad_byte_count",
                f"inputs[0].parameters.binary_data_size is {size!r}; shape {shape} of "
                f"{datatype} takes {count * dtype.itemsize} bytes",
                400,
            )
        if len(binary) < size:
            raise bad(
                "bad_byte_count",
                f"the body carries {len(binary)} bytes of tensor data after its JSON header; inputs[0] declares {size}",
                400,
            )
        x, used = np.frombuffer(binary, dtype, count).reshape(shape), size
    elif "data" in tensor:
        x, used = json_data(tensor["data"], datatype, count, shape), 0
    else:
        raise bad(
            "missing_field",
            "inputs[0] has no data: send data, or binary_data_size with the bytes after the JSON header",
            400,
        )
    if datatype == "UINT8":
        return (x / np.float32(model.uint8_divisor)).astype(np.float32), used
    if not np.isfinite(x).all():
        raise bad("non_finite", "inputs[0] holds non-finite values", 400)
    if x.size and (x.min() < 0 or x.max() > 1):
        raise bad(
            "out_of_range",
            f"inputs[0] has FP32 values in [{x.min():g}, {x.max():g}], outside [0, 1]: send UINT8 for 0..255 pixels",
            400,
        )
    return x, used


def json_data(data, datatype: str, count: int, shape: list) -> np.ndarray:
    """The JSON "data" of an input: flat (row-major) or nested as the shape, numbers only."""
    values = to_array(data if isinstance(data, list) else None, "inputs[0].data")
    if values.size != count:
        raise bad("bad_shape", f"inputs[0].data holds {values.size} values; shape {shape} needs {count}", 400)
    if datatype == "UINT8" and (values.min() < 0 or values.max() > 255 or (values != np.round(values)).any()):
        raise bad("out_of_range", "inputs[0].data holds values that are not UINT8 (whole numbers 0..255)", 400)
    return values.reshape(shape).astype(DATATYPES[datatype])


def binary_output_wanted(payload: dict) -> bool:
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad("bad_parameter", "parameters must be an object", 400)
    binary = flag(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    outputs = payload.get("outputs")
    if outputs is None:
        return binary
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
        raise bad("bad_outputs", f'outputs must list the one output {{"name": "{OUTPUT_NAME}"}}', 400)
    output = outputs[0]
    if output.get("name") != OUTPUT_NAME or set(output) - {"name", "parameters"}:
        raise bad("unknown_output", f"outputs[0] is {output!r}; the model's one output is {OUTPUT_NAME!r}", 400)
    options = output.get("parameters") or {}
    if not isinstance(options, dict) or set(options) - {"binary_data"}:
        raise bad("bad_parameter", f"outputs[0].parameters may hold binary_data only, got {options!r}", 400)
    return flag(options.get("binary_data", binary), "outputs[0].parameters.binary_data")


@dataclass(frozen=True)
class InferRequest:
    x: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    binary_output: bool
    request_id: object  # echoed back when given


def parse_infer(body: bytes, header_length: str | None, model: LoadedModel, settings: Settings) -> InferRequest:
    header, binary = split_body(body, header_length)
    payload = parse_json(header)
    if not isinstance(payload, dict):
        raise bad("bad_body", f"the body must be a JSON object with inputs, got {type(payload).__name__}", 400)
    unknown = sorted(set(payload) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise bad("unknown_field", f"unknown field(s) {unknown}; known: id, parameters, inputs, outputs", 400)
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise bad("bad_inputs", f"inputs must list exactly one tensor, {model.input_name!r}", 400)
    binary_output = binary_output_wanted(payload)
    x, used = parse_input(inputs[0], model, binary, settings)
    if used != len(binary):
        raise bad(
            "bad_byte_count", f"the body carries {len(binary)} bytes of tensor data; the inputs declare {used}", 400
        )
    return InferRequest(x, binary_output, payload.get("id"))


def respond(request: InferRequest, p: np.ndarray, model: LoadedModel) -> tuple[bytes, dict]:
    """(response body, response headers) carrying the probabilities `p`."""
    output = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(p.shape)}
    response = {"model_name": model.name, "model_version": served_version(model), "outputs": [output]}
    if request.request_id is not None:
        response["id"] = request.request_id
    if not request.binary_output:
        output["data"] = p.ravel().tolist()
        return json.dumps(response).encode(), {"Content-Type": "application/json"}
    data = p.astype("<f4").tobytes()
    output["parameters"] = {"binary_data_size": len(data)}
    head = json.dumps(response).encode()
    return head + data, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def handle_infer(body: bytes, header_length: str | None, model: LoadedModel, settings: Settings) -> tuple[bytes, dict]:
    """One whole inference request, for a worker thread -> (response body, response headers)."""
    request = parse_infer(body, header_length, model, settings)
    return respond(request, model.probabilities(request.x), model)


# --------------------------------------------------------------------------------------------
# OpenAPI: the infer route is a plain Starlette route (FastAPI's parameter handling would cost
# more than parsing a binary tensor), so FastAPI does not describe it; the server's openapi()
# adds these path items instead.

INFER_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
_ERROR = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "description": "what was wrong, in words"},
                "code": {"type": "string", "description": "a stable short code, e.g. bad_shape"},
            },
        }
    }
}
_PARAMETERS = {"type": "object", "additionalProperties": True}
_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "description": "the model's input name (see GET /v2/models/{name})"},
        "datatype": {
            "type": "string",
            "enum": list(DATATYPES),
            "description": "FP32: pixels in [0, 1] (what the graph takes); UINT8: 0..255 pixels, divided by "
            "the recorded preprocessing's uint8_divisor",
        },
        "shape": {
            "type": "array",
            "items": {"type": "integer"},
            "minItems": 4,
            "maxItems": 4,
            "description": "[N, C, H, W]",
        },
        "data": {
            "type": "array",
            "items": {},
            "description": "the N*C*H*W values, flat (row-major) or nested as the "
            "shape; absent with the binary extension",
        },
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_size": {
                    "type": "integer",
                    "description": "binary extension: this tensor's byte count after the JSON header",
                }
            },
        },
    },
}
_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "additionalProperties": False,
    "properties": {
        "id": {"description": "echoed back in the response"},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_output": {
                    "type": "boolean",
                    "default": False,
                    "description": "return the probabilities as raw bytes",
                }
            },
        },
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
        "outputs": {
            "type": "array",
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "enum": [OUTPUT_NAME]},
                    "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                },
            },
        },
    },
}
_RESPONSE = {
    "type": "object",
    "required": ["model_name", "model_version", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [OUTPUT_NAME]},
                    "datatype": {"type": "string", "enum": ["FP32"]},
                    "shape": {"type": "array", "items": {"type": "integer"}, "description": "[N, classes]"},
                    "data": {
                        "type": "array",
                        "items": {"type": "number"},
                        "description": "N x classes probabilities, flat; every forgotten class is exactly 0",
                    },
                    "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
                },
            },
        },
    },
}
_BINARY = {
    "type": "string",
    "format": "binary",
    "description": "the JSON header (its byte count in Inference-Header-Content-Length) followed by the raw "
    "little-endian tensor bytes",
}
_INFER_DESCRIPTION = (
    "Open Inference Protocol (KServe V2) inference, as Triton and MLServer clients send it (e.g. tritonclient.http). "
    "The body is a JSON object with one input tensor (FP32 pixels in [0, 1], or UINT8 pixels 0..255), or, with the "
    "binary tensor data extension, that JSON header followed by the raw little-endian tensor bytes: the header's "
    "byte count goes in the Inference-Header-Content-Length request header and the input gives its byte count in "
    "parameters.binary_data_size. The one output, probabilities (FP32, N x classes), has every forgotten class "
    "exactly 0; it comes back as raw bytes after a JSON header when the request asks (parameters.binary_data_output, "
    "or outputs[0].parameters.binary_data). The body may be gzip or deflate compressed (Content-Encoding). "
    'Errors: a 4xx with {"error": message}.'
)


def infer_openapi(model: LoadedModel | None = None) -> dict:
    """OpenAPI path items of the infer routes; with the served `model`, its name and version as
    the path parameters' examples."""

    def path_parameter(name: str, example) -> dict:
        parameter = {"name": name, "in": "path", "required": True, "schema": {"type": "string", "title": name.title()}}
        if example is not None:
            parameter["example"] = example
        return parameter

    def header(name: str, description: str) -> dict:
        return {
            "name": name,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": description,
        }

    headers = [
        header(
            "Inference-Header-Content-Length",
            "binary extension: byte count of the JSON header at the start of the body; absent for a JSON-only body",
        ),
        header("Content-Encoding", "gzip or deflate for a compressed body"),
    ]
    paths = {}
    for path in INFER_PATHS:
        versioned = "{version}" in path
        parameters = [path_parameter("name", model.name if model else None)]
        if versioned:
            parameters.append(path_parameter("version", served_version(model) if model else None))
        paths[path] = {
            "post": {
                "summary": "V2 Infer" + (" (a given version)" if versioned else ""),
                "description": _INFER_DESCRIPTION
                + (" The version must be the one served (else 404)." if versioned else ""),
                "operationId": "v2_infer_version" if versioned else "v2_infer",
                "parameters": parameters + headers,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _REQUEST},
                        "application/octet-stream": {"schema": _BINARY},
                    },
                },
                "responses": {
                    "200": {
                        "description": "the probabilities: JSON, or a JSON header and raw FP32 bytes",
                        "headers": {
                            "X-Model-Version": {"schema": {"type": "string"}},
                            "Inference-Header-Content-Length": {
                                "schema": {"type": "string"},
                                "description": "with a binary output: byte count of the JSON header",
                            },
                        },
                        "content": {
                            "application/json": {"schema": _RESPONSE},
                            "application/octet-stream": {"schema": _BINARY},
                        },
                    },
                    "400": {"description": "a malformed request or tensor", "content": _ERROR},
                    "404": {"description": "the model (or version) is not the one served", "content": _ERROR},
                    "413": {"description": "too many images or too large a body", "content": _ERROR},
                    "415": {"description": "an unsupported Content-Encoding", "content": _ERROR},
                    "503": {"description": "no model loaded yet", "content": _ERROR},
                },
            }
        }
    return paths
