"""The shell blocks of the docs, and how one is run in a scratch project.

    blocks = doc_blocks("docs/own-model.md")     # every fenced block, with its skip marker
    script = runnable(block.text, substitutions)  # the text bash runs (substitutions checked)

A block is a fenced code block (``` or ~~~, up to three spaces of indentation) whose info string
starts with a shell language (SHELL_LANGUAGES). The line directly above its opening fence may
hold a marker comment:

    <!-- doctest: skip — needs an NVIDIA GPU -->

`skip` is the only kind; the reason after it (a dash, an em dash or a colon first) is required.
A marker anywhere else (not directly above a shell block) is an error, so that a marker moved by
an edit cannot silently stop applying. Nothing here imports nhle, torch or the test's fixtures.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHELL_LANGUAGES = ("bash", "sh", "console", "shell")
# Every Markdown file whose shell blocks are tests: the README, each docs/*.md, the server's README.
DOC_GLOBS = ("README.md", "docs/*.md", "serving/README.md")

OPEN_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\n]*)$")
MARKER = re.compile(r"<!--\s*doctest\b(?P<body>.*?)-->", re.S)
MARKER_BODY = re.compile(r"^\s*:\s*(?P<kind>[A-Za-z-]+)\s*(?P<reason>.*?)\s*$", re.S)
REASON_LEAD = re.compile(r"^(?:—|–|--|-|:)\s*")


def doc_paths(repo: Path = REPO) -> list[str]:
    """The documents, as paths relative to the repository, in a stable order."""
    found = []
    for pattern in DOC_GLOBS:
        found += sorted(str(p.relative_to(repo)) for p in repo.glob(pattern) if p.is_file())
    return found


@dataclass(frozen=True)
class Marker:
    line: int  # 1-based line of the comment
    kind: str  # "skip" (anything else is an error the tests report)
    reason: str  # empty: an error the tests report
    raw: str


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # 1-based line of the opening fence
    language: str  # the first word of the info string ("" when none)
    text: str  # the lines between the fences, with the fence's indentation removed
    end_line: int  # 1-based line of the closing fence (or the last line when unclosed)
    closed: bool
    marker: Marker | None = None

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES


@dataclass
class Parsed:
    blocks: list[Block] = field(default_factory=list)
    orphan_markers: list[Marker] = field(default_factory=list)  # not directly above a shell block


def parse_marker(text: str, line: int) -> Marker:
    body = MARKER.search(text).group("body")
    match = MARKER_BODY.match(body)
    if not match:
        return Marker(line, "", "", text.strip())
    reason = REASON_LEAD.sub("", match.group("reason")).strip()
    return Marker(line, match.group("kind").lower(), reason, text.strip())


def parse_markdown(text: str, doc: str) -> Parsed:
    """Every fenced block of a Markdown text (CommonMark's fence rules, which is all the docs use)
    and every doctest marker comment, each marker tied to the block right below it."""
    lines = text.split("\n")
    parsed = Parsed()
    markers: dict[int, Marker] = {}
    for number, line in enumerate(lines, start=1):
        if MARKER.search(line):
            markers[number] = parse_marker(line, number)
    i = 0
    while i < len(lines):
        opened = OPEN_FENCE.match(lines[i])
        if not opened or (opened.group("fence")[0] == "`" and "`" in opened.group("info")):
            i += 1
            continue
        indent, fence = len(opened.group("indent")), opened.group("fence")
        info = opened.group("info").strip()
        language = info.split()[0].lower() if info else ""
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body, j = [], i + 1
        while j < len(lines) and not closing.match(lines[j]):
            raw = lines[j]
            strip = min(indent, len(raw) - len(raw.lstrip(" ")))
            body.append(raw[strip:])
            j += 1
        closed = j < len(lines)
        marker = markers.pop(i, None)  # the comment on the line right above (line numbers are 1-based)
        parsed.blocks.append(
            Block(doc, i + 1, language, "\n".join(body), j + 1 if closed else len(lines), closed, marker)
        )
        i = j + 1
    for block in parsed.blocks:  # a marker above a block that is not a shell block is an orphan too
        if block.marker and not block.is_shell:
            parsed.orphan_markers.append(block.marker)
    parsed.blocks = [
        b if b.is_shell or not b.marker else Block(b.doc, b.line, b.language, b.text, b.end_line, b.closed, None)
        for b in parsed.blocks
    ]
    parsed.orphan_markers += list(markers.values())
    return parsed


def parse_doc(doc: str, repo: Path = REPO) -> Parsed:
    return parse_markdown((repo / doc).read_text(encoding="utf-8"), doc)


def shell_blocks(repo: Path = REPO) -> list[Block]:
    return [b for doc in doc_paths(repo) for b in parse_doc(doc, repo).blocks if b.is_shell]


def rough_shell_fence_lines(text: str) -> list[int]:
    """An independent count for the parser: the 1-based lines that open a shell fence, found by a
    plain pattern without the parser's state. Assumes (as the docs do) no shell fence inside
    another block."""
    pattern = re.compile(rf"^ {{0,3}}(`{{3,}}|~{{3,}})\s*({'|'.join(SHELL_LANGUAGES)})\b", re.I)
    return [n for n, line in enumerate(text.split("\n"), start=1) if pattern.match(line)]


# What a line a user types starts with: an untagged block made of such lines is a shell block
# someone forgot to tag (and would escape the tests).
COMMAND_START = re.compile(
    r"^\s*(\$ )?(\.venv/bin/|\.\./\.venv/bin/|nhle |make |curl |pip |dvc |mlflow |prefect |"
    r"uvicorn |python |cd |export |[A-Z_]+=\S+ )"
)


def looks_like_shell(text: str) -> bool:
    lines = [line for line in text.split("\n") if line.strip() and not line.lstrip().startswith("#")]
    return bool(lines) and sum(bool(COMMAND_START.match(line)) for line in lines) * 2 >= len(lines)


# --- running -------------------------------------------------------------------------------------


class SubstitutionError(AssertionError):
    pass


@dataclass(frozen=True)
class Sub:
    """Replace every occurrence of `old` in the block by `new` (formatted with the fixture's
    values: {photos}, {serve_port}, ...). `old` must occur, else the block changed under the
    test and the test fails. `why` is said in the test table and printed with the script."""

    old: str
    new: str
    why: str


def apply_substitutions(text: str, subs: list[Sub], values: dict[str, str]) -> str:
    for sub in subs:
        if sub.old not in text:
            raise SubstitutionError(
                f"substitution {sub.old!r} -> {sub.new!r} ({sub.why}): {sub.old!r} no longer "
                "occurs in the block; the doc changed, update the test's table"
            )
        text = text.replace(sub.old, sub.new.format(**values))
    return text


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(index of the first physical line, the command with its backslash continuations) per
    command of a block; blank and comment-only lines are kept as they are."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        start, parts = i, [lines[i]]
        while parts[-1].rstrip().endswith("\\") and not parts[-1].lstrip().startswith("#") and i + 1 < len(lines):
            i += 1
            parts.append(lines[i])
        out.append((start, "\n".join(parts)))
        i += 1
    return out


@dataclass(frozen=True)
class LongRunning:
    """A command that runs until stopped (a server, a scheduler): run in the background, ready
    once `probe` answers, stopped when the doc's blocks are done or when a later command of the
    doc wants its port."""

    pattern: re.Pattern
    probe: str  # "http:PATH" (200 on 127.0.0.1:<port>PATH) or "log:TEXT" (TEXT in its output)
    default_port: int | None = None


def command_words(command: str) -> list[str]:
    """The words of a command without leading VAR=value assignments and without the comment."""
    try:
        words = shlex.split(command.replace("\\\n", " "), comments=True)
    except ValueError:
        return command.split()
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words.pop(0)
    return words


def port_of(command: str, default: int | None) -> int | None:
    words = command_words(command)
    for flag in ("--port", "-p"):
        if flag in words and words.index(flag) + 1 < len(words):
            return int(words[words.index(flag) + 1])
        for word in words:
            if word.startswith(flag + "="):
                return int(word.split("=", 1)[1])
    return default


def background_script(text: str, long_running: list[LongRunning]) -> tuple[str, list[str]]:
    """The block with each long-running command rewritten to start in the background and wait
    for its probe (helpers in PRELUDE); returns the script and the commands so rewritten."""
    out, started = [], []
    for _, command in logical_lines(text):
        words = " ".join(command_words(command))
        match = next((lr for lr in long_running if lr.pattern.search(words)), None)
        if match is None:
            out.append(command)
            continue
        port = port_of(command, match.default_port)
        n = len(started)
        started.append(command)
        out.append(
            f"__doc_stop_port {port or 0}\n"
            f'{{ {command}\n}} > "$DOCTEST_STATE/bg-{n}.log" 2>&1 &\n'
            f'__doc_started $! {port or 0} {shlex.quote(match.probe)} "$DOCTEST_STATE/bg-{n}.log" '
            f"{shlex.quote(words[:80])}"
        )
    return "\n".join(out), started


# Sourced before every block. Job control (set -m) gives each background job its own process
# group, so that the test can stop a server with everything it started (and nothing else).
PRELUDE = r"""
set -e -o pipefail
set -m
# An HTTP error answer fails the command, as an error exit would (curl -s alone exits 0 on a 422).
curl() { command curl --fail-with-body --max-time 120 "$@"; }
__doc_starttime() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
__doc_stop_port() {  # stop the server this doc started earlier on the same port (the user's Ctrl-C)
    local port=$1 pgid p started
    [ "$port" != 0 ] || return 0
    [ -f "$DOCTEST_STATE/servers" ] || return 0
    while read -r pgid p started; do
        # only the process group this doc started (its leader's start time still matches)
        if [ "$p" = "$port" ] && [ "$(__doc_starttime "$pgid")" = "$started" ]; then
            kill -TERM -- "-$pgid" 2>/dev/null || true
            for _ in $(seq 150); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL -- "-$pgid" 2>/dev/null || true
        fi
    done < "$DOCTEST_STATE/servers"
}
__doc_started() {  # pgid port probe log label: wait until the background command is ready
    local pgid=$1 port=$2 probe=$3 log=$4 label=$5 deadline=$((SECONDS + ${DOCTEST_READY_SECONDS:-180}))
    echo "$pgid $port $(__doc_starttime "$pgid")" >> "$DOCTEST_STATE/servers"
    while :; do
        if ! kill -0 "$pgid" 2>/dev/null; then
            echo "doctest: '$label' exited before it was ready; its output:" >&2; tail -n 60 "$log" >&2; return 1
        fi
        case "$probe" in
            http:*) if command curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$port${probe#http:}"
                    then break; fi ;;
            log:*) if grep -qF -- "${probe#log:}" "$log"; then break; fi ;;
        esac
        if [ $SECONDS -ge $deadline ]; then
            echo "doctest: '$label' not ready after ${DOCTEST_READY_SECONDS:-180} s ($probe); its output:" >&2
            tail -n 60 "$log" >&2; return 1
        fi
        sleep 0.3
    done
    echo "doctest: '$label' is running in the background (ready: $probe)" >&2
}
"""
