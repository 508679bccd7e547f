"""The audit report of one forget request: what was asked, what was done, and the evidence.

    from nhle.core.audit import build_audit, audit_markdown
    audit = build_audit(request, model_name, version_tags, report, parity, gates)   # plain dict -> JSON
    text = audit_markdown(audit)                                                  # the readable page

Pure functions over plain values (the ledger row, the model version's tags and the run's
report.json, parity.json and gates.json); nhle.orchestration.requests fetches those and logs the results.
"""

from __future__ import annotations

import html
import re
import unicodedata
from datetime import UTC, datetime

from nhle.core.files import from_tag
from nhle.core.gates import report_retained_drop_pp

EVIDENCE = (
    ("forget_test_acc", "accuracy on the forgotten classes' test samples", "0 = never predicted"),
    ("retain_test_acc", "accuracy on the retained classes' test samples", "as high as before"),
    (
        "unmasked_forget_test_acc",
        "mask-removal attack: forgotten-class test accuracy with the mask taken off and the pre-mask rows restored",
        "low: the network itself no longer recognises the class",
    ),
    (
        "mia_efficacy",
        "membership-inference efficacy on the forgotten train samples (SVC on confidences)",
        "close to the retrained model's",
    ),
    (
        "probe_forget_acc",
        "linear probe on the features, recall on the forgotten classes",
        "close to the retrained model's",
    ),
    ("forget_silhouette", "cosine silhouette of the forgotten classes in feature space", "lower than the original's"),
    (
        "relearn_steps_shipped",
        "relearn attack on the shipped weights (mask off, forgotten rows zero): Adam steps "
        "on the class's samples until its test accuracy is back to unlearn.relearn_target of the original's",
        "above the original's (the mask-only model); near the retrained model's",
    ),
    (
        "relearn_steps_restored",
        "the same attack with the pre-mask rows restored",
        "near the retrained model's (its rows as trained)",
    ),
)


def _data(tags: dict, prefix: str) -> dict | None:
    values = {key[len(prefix) :]: value for key, value in tags.items() if key.startswith(prefix)}
    return values or None


def build_audit(
    request: dict,
    model_name: str,
    version: str,
    version_tags: dict,
    run_id: str,
    report: dict | None,
    parity: dict | None,
    gates: list | None,
    note: str | None = None,
) -> dict:
    """The audit of `request` (a ledger row as a dict), settled by model version `version`."""
    promoted = version_tags.get("promoted") == "true"
    metrics = (report or {}).get("metrics", {})
    evidence = []
    for key, meaning, expected in EVIDENCE:
        if metrics:
            evidence.append(
                {
                    "metric": key,
                    "meaning": meaning,
                    "expected": expected,
                    **{
                        which: metrics[which].get(key)
                        for which in ("original", "unlearned", "retrained")
                        if which in metrics
                    },
                }
            )
    drop = report_retained_drop_pp(report) if "original" in metrics and "unlearned" in metrics else None
    return {
        "request": request,
        "outcome": {
            "status": "done" if promoted else "failed",
            "promoted": promoted,
            "reason": version_tags.get("rejection_reason") or ("every gate held" if promoted else ""),
            "note": note,
        },
        "model": {
            "name": model_name,
            "version_before": version_tags.get("parent_version") or None,
            "version_after": str(version),
            "run_id": run_id,
            "onnx_sha256": version_tags.get("onnx_sha256"),
            "forgotten_classes": from_tag(version_tags, "forgotten_classes", []),
            "forgotten_class_names": from_tag(version_tags, "forgotten_class_names", []),
        },
        "unlearned_together": (report or {}).get("forget_class_names"),
        "data": {"before": _data(version_tags, "data."), "after": _data(version_tags, "data_after.")},
        "metrics": metrics,
        "evidence": evidence,
        "retained_drop_pp": drop,
        "relearn": (report or {}).get("relearn"),
        "reference": (report or {}).get("reference"),
        "seconds": (report or {}).get("seconds"),
        "parity": parity,
        "gates": gates or [],
        "generated_at": datetime.now(UTC).isoformat(),
    }


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def terminal_text(value) -> str:
    """Text a requester typed, safe to print: control characters (ANSI escapes, newlines)
    shown as escapes instead of acting on the terminal or breaking a one-line listing."""
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch)[0] == "C" else ch for ch in str(value))


def markdown_text(value) -> str:
    """Text a requester typed, safe inside a Markdown table cell: one line, HTML and Markdown
    syntax shown literally (so it cannot add headings, rows, links or script)."""
    text = html.escape(terminal_text(value), quote=False)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def reference_text(reference: dict | None) -> str:
    """Which reference the evidence is measured against: a retrained model, or none and why."""
    if not reference:
        return "not recorded"
    if reference.get("kind") == "retrained":
        recipe = reference.get("recipe") or {}
        return (
            f"retrained from random initialisation without the forgotten classes: {reference.get('arch')}, "
            f"{recipe.get('epochs')} epochs, batch {recipe.get('batch_size')}, lr {recipe.get('lr')} "
            "(the train recipe of params.yaml)"
        )
    return f"none, no model was retrained ({reference.get('why')}); the evidence compares with the original only"


def relearn_sentence(relearn: dict) -> str:
    """The relearn shares (nhle.core.metrics.relearn_shares) with their raw steps, as the audit,
    the version page and the terminal say them: "(the relearn attack's steps over ...): shipped ..."."""
    steps, retrained = relearn["steps"], relearn["reference"] == "retrained"
    meaning = "as hard to bring back as retraining" if retrained else "no harder than the mask alone"
    shares = ", ".join(
        f"{who.replace('_', '-')} {_fmt(relearn[who])} ({_fmt(steps[who])} steps)"
        for who in ("shipped", "restored", "mask_only")
    )
    return (
        f"(the relearn attack's steps over the {relearn['reference'].replace('_', '-')} model's "
        f"{_fmt(relearn['reference_steps'])}; 1 = {meaning}): {shares}"
    )


def relearn_text(relearn: dict | None) -> list[str]:
    """The audit's relearn paragraph; nothing for a report written before the relearn share."""
    if not relearn:
        return []
    return ["", f"Relearn share {relearn_sentence(relearn)}. {relearn['why'][:1].upper()}{relearn['why'][1:]}."]


def audit_markdown(audit: dict) -> str:
    request, outcome, model, data = audit["request"], audit["outcome"], audit["model"], audit["data"]
    lines = [
        f"# Forget request {request['id']}: audit report",
        "",
        f"**Outcome: {outcome['status']}** - {outcome['reason'] or 'no reason recorded'}"
        + (f" ({outcome['note']})" if outcome.get("note") else ""),
        "",
        "## Request",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in ("id", "class_names", "classes", "requester", "reason", "submitted_at", "started_at", "attempts"):
        lines.append(f"| {key} | {markdown_text(_fmt(request.get(key)))} |")
    lines += [
        "",
        "## Model",
        "",
        f"- registered model `{model['name']}`: version {model['version_before'] or '-'} -> "
        f"**version {model['version_after']}** ({'now champion' if outcome['promoted'] else 'not promoted'})",
        f"- classes the new version never predicts: {model['forgotten_class_names']}",
        f"- unlearned together in this run: {audit['unlearned_together']}",
        f"- MLflow run `{model['run_id']}`; ONNX sha256 `{model['onnx_sha256']}`",
        "",
        "## Data (DVC)",
        "",
    ]
    for which in ("before", "after"):
        version = data.get(which)
        if version:
            lines.append(
                f"- {which}: `{version.get('path')}` md5 `{version.get('md5')}` at git rev "
                f"`{version.get('git_rev')}` of `{version.get('repo')}`"
            )
        else:
            lines.append(f"- {which}: -")
    lines += ["", "## Evidence of forgetting", "", f"Reference: {reference_text(audit.get('reference'))}.", ""]
    columns = [c for c in ("original", "unlearned", "retrained") if c in audit["metrics"]]
    if audit["evidence"]:
        lines += ["| metric | " + " | ".join(columns) + " | expected |", "|---" * (len(columns) + 2) + "|"]
        for row in audit["evidence"]:
            lines.append(
                f"| {row['metric']} | " + " | ".join(_fmt(row.get(c)) for c in columns) + f" | {row['expected']} |"
            )
        lines += [""] + [f"- `{row['metric']}`: {row['meaning']}" for row in audit["evidence"]]
        lines += ["", f"Retained accuracy drop: {_fmt(audit['retained_drop_pp'])} percentage points."]
        lines += relearn_text(audit.get("relearn"))
    else:
        lines.append("No unlearning report (see the outcome above).")
    parity = audit.get("parity") or {}
    lines += [
        "",
        "## ONNX Runtime parity",
        "",
        f"passed: {_fmt(parity.get('passed'))}, argmax agreement {_fmt(parity.get('argmax_agreement'))}, "
        f"max |p_onnx - p_torch| {_fmt(parity.get('max_abs_prob_diff'))}",
        "",
        "## Gates",
        "",
        "| gate | value | rule | result |",
        "|---|---|---|---|",
    ]
    for gate in audit["gates"]:
        lines.append(
            f"| {gate['name']} | {_fmt(gate.get('value'))} | {gate.get('rule')} {_fmt(gate.get('bound'))} | "
            f"{'pass' if gate['passed'] else 'FAIL'} |"
        )
    lines += attempts_text(audit.get("unlearning_attempts"))
    lines += timeline_text(audit.get("timeline"))
    lines += ["", f"_generated {audit['generated_at']}_", ""]
    return "\n".join(lines)


def with_timeline(audit: dict, events: list[dict], notified: list | None) -> dict:
    """`audit` with the request's timeline: when it was accepted, when each server of
    serving.notify began suppressing its classes (the ledger's "suppressed" events), and when
    each was serving the new version (the promotion's notified_servers.json)."""
    suppressed = [
        {
            "url": s["url"],
            "at": s.get("at"),
            "outcome": s.get("outcome"),
            "suppressed_classes": s.get("suppressed_classes"),
            "error": s.get("error"),
        }
        for event in events
        if event["kind"] == "suppressed"
        for s in event["detail"].get("servers", [])
    ]
    served = [
        {
            "url": s["url"],
            "at": s.get("at"),
            "serving_new_version": s.get("serving_new_version"),
            "error": s.get("error"),
        }
        for s in notified or []
    ]
    return {
        **audit,
        "timeline": {
            "accepted_at": audit["request"].get("submitted_at"),
            "suppressed": suppressed,
            "new_version_served": served,
        },
    }


def timeline_text(timeline: dict | None) -> list[str]:
    """The audit's timeline section; nothing for an audit written before timelines."""
    if not timeline:
        return []
    lines = ["", "## Timeline", "", f"- accepted: {_fmt(timeline['accepted_at'])}"]
    for s in timeline["suppressed"]:
        lines.append(
            f"- suppressed on {s['url']}: "
            + (
                f"{s['at']} (classes {s['suppressed_classes']})"
                if s["outcome"] != "not_told"
                else f"not told ({s['error']})"
            )
        )
    for s in timeline["new_version_served"]:
        lines.append(
            f"- new version served by {s['url']}: "
            + (f"{s['at']}" if s["serving_new_version"] else f"not yet ({s.get('error') or 'see its log'})")
        )
    if not timeline["suppressed"] and not timeline["new_version_served"]:
        lines.append("- no server listed in serving.notify: each found the change at its next poll")
    return lines


def with_attempts(audit: dict, attempts: list | None) -> dict:
    """`audit` with the unlearning attempts of the run that made its version (the run's
    attempts.json: each recipe tried, in order, and why a candidate was dropped); none for a run
    written before attempts were recorded."""
    return {**audit, "unlearning_attempts": attempts or []}


def attempts_text(attempts: list | None) -> list[str]:
    """The audit's section on the unlearning attempts: one row per recipe tried and why a
    candidate was not registered; nothing for a version made without them."""
    if not attempts:
        return []
    lines = [
        "",
        "## Unlearning attempts",
        "",
        "Each recipe was tried in this order, each in its own MLflow run; a candidate that failed a gate was "
        "not registered while another recipe was left.",
        "",
        "| attempt | recipe | settings changed | outcome | why | MLflow run |",
        "|---|---|---|---|---|---|",
    ]
    for a in attempts:
        overrides = ", ".join(f"{k}={_fmt(v)}" for k, v in (a.get("overrides") or {}).items()) or "-"
        outcome = a.get("outcome", "")
        if a.get("version"):
            outcome = f"registered as version {a['version']}, {'promoted' if a.get('promoted') else 'not promoted'}"
        lines.append(
            f"| {a.get('attempt')} | {a.get('recipe')} | {overrides} | {outcome} | "
            f"{a.get('reason', '')} | `{a.get('run_id')}` |"
        )
    return lines


__all__ = [
    "build_audit",
    "audit_markdown",
    "markdown_text",
    "reference_text",
    "relearn_sentence",
    "relearn_text",
    "terminal_text",
    "attempts_text",
    "with_attempts",
]
