"""Settings of the nhle model server (NHLE_* environment variables), the constants they are
checked against, and the ApiError that every refused request raises.

Shared by the other server modules (nhle_serving.sources, nhle_serving.models, nhle_serving.payloads, nhle_serving.server).
Never imports torch.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import onnxruntime as ort

MIB = 1024 * 1024
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
DEVICES = ("auto", "cpu", "cuda")


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
    body_timeout_seconds: float = 30.0
    """NHLE_BODY_TIMEOUT_SECONDS: a request body must arrive whole within this (else 408 and the
    connection is closed), so a client that stops mid-body does not hold a connection."""
    max_request_pixels: int = 64 * MIB
    """NHLE_MAX_REQUEST_PIXELS: most image pixels (width x height, read from each header before
    decoding) one request may make the server decode, summed over its images (more is 413)."""
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
        if not self.body_timeout_seconds > 0 or not math.isfinite(self.body_timeout_seconds):
            raise ValueError(f"NHLE_BODY_TIMEOUT_SECONDS must be a positive number, got {self.body_timeout_seconds}")
        if self.max_request_pixels < 1:
            raise ValueError(f"NHLE_MAX_REQUEST_PIXELS must be >= 1, got {self.max_request_pixels}")
        if self.ort_threads < 0:
            raise ValueError(f"NHLE_ORT_THREADS must be >= 0, got {self.ort_threads}")
        if self.ort_opt_level not in OPT_LEVELS:
            raise ValueError(f"NHLE_ORT_OPT_LEVEL must be one of {', '.join(OPT_LEVELS)}, got {self.ort_opt_level!r}")
        if self.device not in DEVICES:
            raise ValueError(f"NHLE_DEVICE must be one of {', '.join(DEVICES)}, got {self.device!r}")

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        """params.yaml's `serving:` section, each field overridden by its NHLE_* variable."""
        from nhle.core.config import load_params  # pure dataclasses + yaml: no torch

        env = os.environ if environ is None else environ
        params_path = Path(env.get("NHLE_PARAMS") or "params.yaml")
        defaults = load_params(params_path).serving
        return cls(
            params_path=params_path,
            project_dir=Path(env.get("NHLE_PROJECT_DIR") or "."),
            model=env.get("NHLE_MODEL") or None,
            admin_token=env.get("NHLE_ADMIN_TOKEN") or None,
            poll_seconds=_env_number(env, "NHLE_POLL_SECONDS", defaults.poll_seconds, float),
            max_instances=_env_number(env, "NHLE_MAX_INSTANCES", defaults.max_instances),
            max_body_bytes=_env_number(env, "NHLE_MAX_BODY_BYTES", defaults.max_body_bytes),
            body_timeout_seconds=_env_number(env, "NHLE_BODY_TIMEOUT_SECONDS", defaults.body_timeout_seconds, float),
            max_request_pixels=_env_number(env, "NHLE_MAX_REQUEST_PIXELS", defaults.max_request_pixels),
            ort_threads=_env_number(env, "NHLE_ORT_THREADS", defaults.ort_threads),
            ort_opt_level=(env.get("NHLE_ORT_OPT_LEVEL") or defaults.ort_opt_level).strip().lower(),
            device=(env.get("NHLE_DEVICE") or defaults.device).strip().lower(),
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
