"""The doc-test harness itself (doc_blocks.py, doc_projects.py), on small made-up Markdown and
scripts: a parsing or rewriting mistake here would let a doc block escape test_docs.py."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from doc_blocks import (
    PRELUDE,
    LongRunning,
    Sub,
    SubstitutionError,
    apply_substitutions,
    background_script,
    looks_like_shell,
    parse_markdown,
    port_of,
    rough_shell_fence_lines,
)
from doc_projects import Project, free_port

SAMPLE = """# A doc

<!-- doctest: skip — needs an NVIDIA GPU -->
```bash
nvidia-smi -L
```

<!-- doctest: skip -->
```sh
echo no reason
```

<!-- doctest: skip — the blank line below detaches me -->

```bash
echo orphaned marker above
```

1. In a list:

   ```console
   .venv/bin/nhle params \\
       --set forget=5
   ```

````bash
cat <<'EOF'
```
EOF
````

~~~shell
echo tilde
~~~

```
.venv/bin/nhle run --classes 5
```

```python
print("not shell")
```
"""


def test_blocks_markers_and_fences_are_parsed():
    parsed = parse_markdown(SAMPLE, "x.md")
    shell = [b for b in parsed.blocks if b.is_shell]
    assert [b.line for b in shell] == rough_shell_fence_lines(SAMPLE) == [4, 9, 15, 21, 26, 32]
    assert [b.language for b in parsed.blocks] == ["bash", "sh", "bash", "console", "bash", "shell", "", "python"]
    assert all(b.closed for b in parsed.blocks)
    gpu, no_reason, orphan_below, listed, nested, tilde = shell
    assert gpu.marker.kind == "skip" and gpu.marker.reason == "needs an NVIDIA GPU"
    assert no_reason.marker.kind == "skip" and no_reason.marker.reason == ""
    assert orphan_below.marker is None
    assert [m.line for m in parsed.orphan_markers] == [13]
    assert listed.text == ".venv/bin/nhle params \\\n    --set forget=5"  # the list's indentation removed
    assert nested.text == "cat <<'EOF'\n```\nEOF"  # a shorter fence does not close it
    assert tilde.text == "echo tilde"
    untagged, python = parsed.blocks[-2:]
    assert looks_like_shell(untagged.text) and not looks_like_shell(python.text)


def test_a_marker_above_a_non_shell_block_is_an_orphan():
    parsed = parse_markdown("<!-- doctest: skip — x -->\n```python\nprint(1)\n```\n", "y.md")
    assert parsed.blocks[0].marker is None and [m.line for m in parsed.orphan_markers] == [1]


def test_a_substitution_whose_left_side_is_gone_fails():
    text = ".venv/bin/nhle serve --port 8000\ncurl -s localhost:8000/model"
    assert (
        apply_substitutions(text, [Sub("8000", "{port}", "free port")], {"port": "4321"})
        == ".venv/bin/nhle serve --port 4321\ncurl -s localhost:4321/model"
    )
    with pytest.raises(SubstitutionError, match="no longer occurs"):
        apply_substitutions(text, [Sub("--port 5000", "--port 1", "free port")], {})


SERVER = LongRunning(re.compile(r"(^|/)python3? -m http\.server\b"), "http:/", None)


def test_long_running_commands_are_backgrounded_with_their_env_and_continuations():
    text = (
        "echo before\nFOO=1 BAR=2 \\\n  python3 -m http.server 9999   # a server\n"
        "echo after  # python3 -m http.server in a comment"
    )
    script, started = background_script(text, [SERVER])
    assert started == ["FOO=1 BAR=2 \\\n  python3 -m http.server 9999   # a server"]
    assert script.startswith("echo before\n__doc_stop_port 0\n{ FOO=1 BAR=2 \\\n  python3 -m http.server 9999")
    assert script.endswith("echo after  # python3 -m http.server in a comment")
    assert port_of("nhle serve --host 127.0.0.1 --port 8123", 8000) == 8123
    assert port_of("mlflow ui --port=5055", 5000) == 5055
    assert port_of("FOO=--port nhle serve", 8000) == 8000


def test_a_background_server_answers_then_is_stopped_with_what_it_started(tmp_path):
    """A block that starts a server in the background: the block goes on once the server answers,
    the server outlives the block, and stop_background ends it and its child."""
    port = free_port()
    server = LongRunning(re.compile(r"(^|/)python3? -c\b"), "http:/", None)
    child = f"{sys.executable} -m http.server --bind 127.0.0.1 {port}"
    text = (
        f"echo start\n{sys.executable} -c 'import subprocess; subprocess.run(\"{child}\".split())' "
        f"--port {port}\necho ready"
    )
    script, started = background_script(text, [server])
    assert len(started) == 1
    project = Project("t", tmp_path, tmp_path / "state", {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, {})
    outcome = project.run(script, "server block", timeout=60, doc_state="doc")
    assert outcome.returncode == 0, outcome.output
    assert (
        outcome.output.index("start")
        < outcome.output.index("is running in the background")
        < outcome.output.rindex("ready")
    )
    assert subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}/"]).returncode == 0
    assert len(project.stop_background("doc")) == 1
    time.sleep(0.3)
    gone = subprocess.run(["curl", "-s", "-o", "/dev/null", "--max-time", "2", f"http://127.0.0.1:{port}/"])
    assert gone.returncode != 0


def test_a_failing_command_or_http_error_fails_the_block(tmp_path):
    project = Project("t", tmp_path, tmp_path / "state", {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, {})
    assert project.run("false\necho not reached", "fails").returncode == 1
    assert project.run("echo a | false | cat", "pipe").returncode == 1
    port = free_port()  # nothing listens there: curl -s alone would still exit 0 on an HTTP error, not on this
    assert project.run(f"curl -s localhost:{port}/x", "curl").returncode != 0
    assert PRELUDE.count("--fail-with-body") == 1
