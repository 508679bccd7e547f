"""Classes deleted on record: what no version may predict again until an operator reopens it.

Two records hold them, so that losing either loses nothing: the ledger (a done row per forget
request, and per forgetting that no request asked for, such as `nhle run --classes`) and the
registered model's own tag `deleted_classes` ({class: [ledger row ids]}), written before every
promotion that forgets. Every reader (the flows' gate, `nhle rollback`, the server) uses their
union; a reopen takes its ids out of both.

    deleted, record = deleted_on_record(MlflowClient(), "nhle-classifier", "sqlite:///requests.db")

A ledger file that does not exist is not an empty ledger: it is accepted only where the
registered model's own record covers it (or there is no registered model yet, a new project),
and refused otherwise (open_ledger, for the flows and the CLI). No torch, and no mlflow import
at the top: the server reads it too, with its own MLflow client.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy.engine import make_url

from nhle.adapters.ledger import Ledger
from nhle.core.config import Params, resolve_uri

RECORD_TAG = "deleted_classes"
"""The registered model's tag with its own record: JSON {class: [ledger row ids]}."""


class MissingLedger(RuntimeError):
    """The configured ledger does not exist and nothing else records what was deleted."""


def missing_store(uri: str) -> Path | None:
    """The file of a local store (sqlite:///..., file:///...) when it does not exist, else None.
    MLflow and SQLAlchemy create such a store on first connection; a reader must not."""
    if uri.startswith("sqlite"):
        try:
            database = make_url(uri).database
        except Exception:  # not a URL SQLAlchemy can read: let the store report it
            return None
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        path = Path(database)
    elif uri.startswith("file:"):
        path = Path(unquote(urlsplit(uri).path))
    else:
        return None
    return None if path.exists() else path


def decode(text: str | None) -> dict[int, list[int]]:
    """A record tag's JSON as {class: sorted request ids}; refuses anything else."""
    value = json.loads(text or "{}")
    if not isinstance(value, dict) or not all(
        isinstance(v, list) and all(type(i) is int for i in v) for v in value.values()
    ):
        raise ValueError(f"the {RECORD_TAG} tag must be a JSON object of class -> request ids, got {text!r}")
    return {int(k): sorted(set(v)) for k, v in value.items()}


def encode(deleted: dict[int, list[int]]) -> str:
    return json.dumps({str(c): sorted(set(ids)) for c, ids in sorted(deleted.items())})


def united(*records: dict[int, list[int]]) -> dict[int, list[int]]:
    """Every class of any record, with every request id that deleted it."""
    merged: dict[int, set[int]] = {}
    for record in records:
        for c, ids in record.items():
            merged.setdefault(int(c), set()).update(int(i) for i in ids)
    return {c: sorted(ids) for c, ids in sorted(merged.items())}


def registry_record(client, name: str) -> tuple[bool, dict[int, list[int]] | None]:
    """(does the registered model exist, its own record or None when it carries none)."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 - lazy: MLflow (the ledger is read without it)

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False, None
        raise
    tag = (model.tags or {}).get(RECORD_TAG)
    return True, (decode(tag) if tag is not None else None)


@functools.lru_cache(maxsize=16)
def ledger_at(url: str) -> Ledger:
    """One Ledger (one engine) per URL in a process: a server reads it at every poll."""
    return Ledger(url)


def suppressed_on_record(name: str, ledger_url: str) -> dict[int, list[int]]:
    """Classes of `name` accepted for deletion and not yet deleted (Ledger.suppressed_classes);
    none where there is no ledger file (no request can have been accepted into it)."""
    if missing_store(ledger_url) is not None:
        return {}
    return ledger_at(ledger_url).suppressed_classes(name)


def deleted_on_record(client, name: str, ledger_url: str, create: bool = False) -> tuple[dict[int, list[int]], str]:
    """(class -> ids of the requests that deleted it, which record(s) said so) for the registered
    model `name`. create: make the ledger when it is missing but covered (the flows do; a server
    never creates one)."""
    exists, own = registry_record(client, name)
    missing = missing_store(ledger_url)
    if missing is None:
        return united(ledger_at(ledger_url).deleted_classes(name), own or {}), (
            "the ledger and the registered model's record" if own is not None else "the ledger"
        )
    if own is None and exists:
        raise MissingLedger(
            f"the forget-request ledger {missing} does not exist and registered model {name!r} carries no record of "
            f"its own ({RECORD_TAG} tag): what was deleted from it cannot be known, so nothing is served or promoted. "
            "Point NHLE_REQUESTS_DATABASE (requests_database in params.yaml) at the project's ledger, restore it, or "
            "create an empty one on purpose with `nhle request init`"
        )
    if create:  # a new file: tables made afresh, not assumed from a Ledger of a file since gone
        ledger_at.cache_clear()
        ledger_at(ledger_url)
    return dict(own or {}), (
        f"the registered model's record (the ledger {missing} does not exist)"
        if exists
        else "none yet (a new registered model)"
    )


def write_registry_record(client, name: str, deleted: dict[int, list[int]]) -> None:
    client.set_registered_model_tag(name, RECORD_TAG, encode(deleted))


def record_forgetting(
    client,
    ledger: Ledger,
    name: str,
    version: str,
    forgotten: list[int],
    forgotten_names: list[str],
    request_ids: list[int],
    requester: str,
) -> dict[int, list[int]]:
    """Put every class version `version` forgets on both records, before it is promoted: those
    its forget requests (`request_ids`, done once it is promoted) cover under their ids, any
    other class not yet deleted on record under a done ledger row of its own. Returns the union."""
    _, own = registry_record(client, name)
    on_record = united(ledger.deleted_classes(name), own or {})
    covered: dict[int, list[int]] = {}
    for request_id in request_ids:
        for c in ledger.get(request_id).classes:
            covered.setdefault(int(c), []).append(request_id)
    new = [int(c) for c in forgotten if int(c) not in on_record and int(c) not in covered]
    if new:
        names = dict(zip((int(c) for c in forgotten), forgotten_names))
        row = ledger.submit(
            new,
            [names.get(c, str(c)) for c in new],
            requester,
            f"forgotten by {name} version {version}, promoted without a forget request",
            model_name=name,
            status="done",
            model_version_after=str(version),
        )
        covered.update({c: [row.id] for c in new})
    record = united(on_record, {c: ids for c, ids in covered.items() if c in forgotten})
    write_registry_record(client, name, record)
    return record


def reopen_on_registry(client, name: str, request_ids: list[int]) -> None:
    """Take reopened requests out of the registered model's own record (the ledger's reopen is
    recorded first, so a failure between the two leaves the class deleted, never the reverse)."""
    _, own = registry_record(client, name)
    if own is None:
        return
    kept = {c: [i for i in ids if i not in request_ids] for c, ids in own.items()}
    write_registry_record(client, name, {c: ids for c, ids in kept.items() if ids})


def open_ledger(params: Params, project_dir: str | Path = ".") -> Ledger:
    """The project's ledger. A ledger file that does not exist is made only where the registered
    model's own record covers it (or there is no registered model yet): otherwise MissingLedger,
    never an empty ledger in place of a lost one (`nhle request init` makes one on purpose)."""
    url = resolve_uri(params.requests_database(), Path(project_dir))
    if missing_store(url) is not None:
        from mlflow import MlflowClient  # noqa: PLC0415 - lazy: MLflow (the ledger is read without it)

        uri = resolve_uri(params.tracking_uri(), Path(project_dir))
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        deleted_on_record(client, params.registry.model_name, url, create=True)
    return ledger_at(url)


__all__ = [
    "MissingLedger",
    "RECORD_TAG",
    "decode",
    "deleted_on_record",
    "encode",
    "missing_store",
    "open_ledger",
    "record_forgetting",
    "registry_record",
    "reopen_on_registry",
    "suppressed_on_record",
    "united",
    "write_registry_record",
]
