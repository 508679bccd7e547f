"""Settings of the nhle model server (params.yaml's serving section, NHLE_* environment variables)
and the ApiError that every refused request raises. Shared by the other server modules. Never
imports torch: nhle.core.config is pure Python.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

import onnxruntime as ort
import yaml

from nhle.core.config import SERVING_DEVICES, ServingConfig, load_params  # pure: no torch

MIB = 1024 * 1024
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,  # keys: ORT_OPT_LEVELS of nhle.core.config
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
DEVICES = SERVING_DEVICES


MIN_ADMIN_TOKEN = 32
"""Fewest characters an admin token may have: the server refuses to start with a shorter one."""


FLOWS_ONLY = ("notify",)
"""ServingConfig fields for the flows (the servers they tell), not read by the server."""


@dataclass(frozen=True)
class Settings(ServingConfig):
    """What the server runs with: params.yaml's `serving:` section (nhle.core.config.ServingConfig:
    limits, polling, ONNX Runtime), each field overridden by NHLE_<FIELD> in the environment,
    plus where the model comes from."""

    params_path: Path = Path("params.yaml")
    """NHLE_PARAMS: params.yaml giving the registry name, alias, tracking URI and serving section."""
    project_dir: Path = Path(".")
    """NHLE_PROJECT_DIR: relative tracking URIs (sqlite:///mlflow.db) are resolved against it."""
    model: str | None = None
    """NHLE_MODEL: models:/NAME@ALIAS, models:/NAME/VERSION, or a local .onnx file; None means
    models:/<registry.model_name>@<registry.champion_alias> of params.yaml."""
    admin_token: str | None = None
    """NHLE_ADMIN_TOKEN: bearer token of POST /admin/reload; unset disables it (403)."""

    def check(self):
        super().check()
        for name in ("params_path", "project_dir"):  # str is fine too
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.admin_token is not None and len(self.admin_token) < MIN_ADMIN_TOKEN:
            raise ValueError(
                f"NHLE_ADMIN_TOKEN is {len(self.admin_token)} characters long; at least {MIN_ADMIN_TOKEN} are "
                "needed, so that it cannot be guessed (make one: python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')"
            )

    @classmethod
    def from_env(cls, environ=None) -> Settings:
        """params.yaml's `serving:` section, each field overridden by its NHLE_<FIELD> variable
        (NHLE_POLL_SECONDS, NHLE_MAX_INSTANCES, ...); a bad value is refused naming the variable."""
        env = os.environ if environ is None else environ
        params_path = Path(env.get(SOURCE_VARIABLES["params_path"]) or "params.yaml")
        settings = cls(
            **{
                **asdict(load_params(params_path).serving),
                "params_path": params_path,
                "project_dir": Path(env.get(SOURCE_VARIABLES["project_dir"]) or "."),
                "model": env.get(SOURCE_VARIABLES["model"]) or None,
                "admin_token": env.get(SOURCE_VARIABLES["admin_token"]) or None,
            }
        )
        for f in fields(ServingConfig):
            raw = env.get(f"NHLE_{f.name.upper()}")
            if raw is None or not raw.strip() or f.name in FLOWS_ONLY:
                continue
            # text as a YAML scalar, as params.yaml would give it: "10" -> 10, "0.5" -> 0.5
            # (a choice, such as NHLE_DEVICE, in any case; a path, such as NHLE_VERIFY_KEY, as given)
            text = raw.strip().lower() if "choices" in f.metadata else raw.strip()
            value = text if isinstance(getattr(settings, f.name), str) else yaml.safe_load(raw)
            try:
                settings = replace(settings, **{f.name: value})
            except ValueError as err:
                raise ValueError(f"NHLE_{f.name.upper()}={raw!r}: {err}") from None
        return settings


SOURCE_VARIABLES = {
    "params_path": "NHLE_PARAMS",
    "project_dir": "NHLE_PROJECT_DIR",
    "model": "NHLE_MODEL",
    "admin_token": "NHLE_ADMIN_TOKEN",
}
"""The variables of where the model and its project come from (Settings' own fields)."""


def environment_variables() -> dict[str, object]:
    """Every NHLE_* variable the server reads, with its default: the one list (from_env reads
    these; serving/README.md's table and server.py's docstring are checked against it)."""
    defaults = Settings()
    return {
        **{name: getattr(defaults, field) for field, name in SOURCE_VARIABLES.items()},
        **{f"NHLE_{f.name.upper()}": f.default for f in fields(ServingConfig) if f.name not in FLOWS_ONLY},
    }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------
# Errors: every refusal of a request is an ApiError with a status and a message naming the
# problem; anything else escaping a handler is a genuine server fault (500).


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def bad(code: str, message: str, status: int = 422) -> ApiError:
    return ApiError(status, code, message)


def error_body(path: str, code: str, message: str) -> dict:
    """A refusal's JSON: the Open Inference Protocol's {"error": message} under /v2 (what its
    clients show), else {"detail": message, "error": code}."""
    if path == "/v2" or path.startswith("/v2/"):
        return {"error": message, "code": code}
    return {"detail": message, "error": code}
