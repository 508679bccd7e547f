"""The audit report from plain values: every section present, a failed gate shows as the outcome."""

import json

from nhle.core.audit import audit_markdown, build_audit, terminal_text

METRICS = {
    "forget_test_acc": 0.0,
    "retain_test_acc": 0.97,
    "unmasked_forget_test_acc": 0.3,
    "mia_efficacy": 1.0,
    "probe_forget_acc": 0.9,
    "forget_silhouette": 0.4,
    "relearn_steps_shipped": 48,
    "relearn_steps_restored": 30,
    "forget_train_acc": 0.0,
    "retain_train_acc": 0.99,
}
REPORT = {
    "metrics": {
        "original": {
            **METRICS,
            "forget_test_acc": 0.98,
            "unmasked_forget_test_acc": 0.98,
            "relearn_steps_shipped": 6,
            "relearn_steps_restored": 0,
        },
        "unlearned": METRICS,
        "retrained": {**METRICS, "unmasked_forget_test_acc": 0.0, "relearn_steps_restored": 60},
    },
    "relearn": {
        "reference": "retrained",
        "reference_steps": 60,
        "shipped": 0.8,
        "restored": 0.5,
        "mask_only": 0.1,
        "steps": {"shipped": 48, "restored": 30, "mask_only": 6},
        "why": "steps over those of the model retrained without the classes, its rows as trained",
    },
    "forget_class_names": ["5"],
    "seconds": {"unlearn": 0.2, "retrain": 1.5},
}
GATES = [
    {"name": "forget_test_acc", "value": 0.0, "bound": 0.0, "passed": True, "rule": "<="},
    {"name": "unmasked_forget_test_acc", "value": 0.3, "bound": 0.05, "passed": False, "rule": "<="},
]
REQUEST = {
    "id": 7,
    "classes": [5],
    "class_names": ["5"],
    "requester": "dpo@example.com",
    "reason": "erasure",
    "submitted_at": "2026-11-27T10:00:00+00:00",
    "started_at": "2026-11-27T11:00:00+00:00",
    "attempts": 0,
}
TAGS = {
    "promoted": "false",
    "rejection_reason": "gate failed: unmasked_forget_test_acc",
    "parent_version": "2",
    "forgotten_classes": "[3, 5]",
    "forgotten_class_names": '["3", "5"]',
    "onnx_sha256": "ab12",
    "data.path": "datasets/digits",
    "data.md5": "aa.dir",
    "data.git_rev": "c0ffee",
    "data.repo": "/data-repo",
}


def test_failed_request_audit_names_the_failing_gate_and_the_evidence():
    audit = build_audit(REQUEST, "nhle-classifier", "3", TAGS, "run1", REPORT, {"passed": True}, GATES)
    assert json.loads(json.dumps(audit)) == audit  # plain JSON
    assert audit["outcome"] == {
        "status": "failed",
        "promoted": False,
        "note": None,
        "reason": "gate failed: unmasked_forget_test_acc",
    }
    assert audit["model"]["version_before"] == "2" and audit["model"]["forgotten_classes"] == [3, 5]
    assert audit["data"] == {
        "before": {"path": "datasets/digits", "md5": "aa.dir", "git_rev": "c0ffee", "repo": "/data-repo"},
        "after": None,
    }
    attack = next(row for row in audit["evidence"] if row["metric"] == "unmasked_forget_test_acc")
    assert (attack["original"], attack["unlearned"], attack["retrained"]) == (0.98, 0.3, 0.0)
    assert abs(audit["retained_drop_pp"]) < 1e-9
    text = audit_markdown(audit)
    assert text.startswith("# Forget request 7: audit report")
    assert "**Outcome: failed**" in text and "| unmasked_forget_test_acc | 0.3 | <= 0.05 | FAIL |" in text
    assert "| unmasked_forget_test_acc | 0.98 | 0.3 | 0 |" in text and "- after: -" in text
    assert "| relearn_steps_shipped | 6 | 48 | 48 |" in text and "| relearn_steps_restored | 0 | 30 | 60 |" in text


def test_the_audit_gives_the_relearn_shares_with_their_raw_steps():
    audit = build_audit(REQUEST, "nhle-classifier", "3", TAGS, "run1", REPORT, {"passed": True}, GATES)
    assert audit["relearn"] == REPORT["relearn"]
    text = audit_markdown(audit)
    assert (
        "Relearn share (the relearn attack's steps over the retrained model's 60; 1 = as hard to bring back as "
        "retraining): shipped 0.8 (48 steps), restored 0.5 (30 steps), mask-only 0.1 (6 steps). Steps over"
    ) in text
    before = {k: v for k, v in METRICS.items() if not k.startswith("relearn")}
    old = {**REPORT, "metrics": {"unlearned": {**before, "relearn_steps": 2}}}
    old.pop("relearn")
    text = audit_markdown(build_audit(REQUEST, "nhle-classifier", "3", TAGS, "run1", old, None, GATES))
    assert "Relearn share" not in text and "| relearn_steps_shipped | - |" in text  # an older report


def test_done_request_without_a_report_still_renders():
    tags = {**TAGS, "promoted": "true", "data_after.md5": "bb.dir", "data_after.path": "datasets/digits"}
    tags.pop("rejection_reason")
    audit = build_audit(REQUEST, "nhle-classifier", "3", tags, "run1", None, None, [], note="already forgotten")
    assert audit["outcome"]["status"] == "done" and audit["data"]["after"]["md5"] == "bb.dir"
    text = audit_markdown(audit)
    assert "**Outcome: done** - every gate held (already forgotten)" in text and "No unlearning report" in text


def test_what_a_requester_typed_cannot_forge_the_report_or_the_terminal():
    reason = (
        "ok\n\n## Outcome: done - every gate held\n| forged | row |\n<script>alert(1)</script> "
        "[click](http://evil.example) \x1b[2J\x1b[31mred"
    )
    audit = build_audit(
        {**REQUEST, "reason": reason, "requester": "a|b\r\nc"},
        "nhle-classifier",
        "3",
        TAGS,
        "run1",
        REPORT,
        {"passed": True},
        GATES,
    )
    text = audit_markdown(audit)
    assert audit["request"]["reason"] == reason  # stored verbatim, escaped only on output
    lines = text.splitlines()
    assert not any(line.startswith("## Outcome") for line in lines)
    assert [line for line in lines if line.startswith("| forged")] == []
    assert "<script>" not in text and "](http" not in text and "\x1b" not in text and "\r" not in text
    [reason_row] = [line for line in lines if line.startswith("| reason |")]
    assert reason_row.count("|") - reason_row.count("\\|") == 3  # one cell: every | inside is escaped
    assert "&lt;script&gt;" in reason_row and "\\x1b" in reason_row


def test_request_lines_for_the_terminal_show_control_characters_as_escapes():
    assert terminal_text("dpo\n\x1b[31m@x\u202e") == "dpo\\n\\x1b[31m@x\\u202e"
