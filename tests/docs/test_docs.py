"""The docs are tests: every shell block of README.md, docs/*.md and serving/README.md
runs here, in a scratch project laid out like a fresh clone (conftest.py), or is skipped by a
marker comment right above it that says why:

    <!-- doctest: skip — needs an NVIDIA GPU -->

How a block runs (doc_blocks.py): bash, `set -e -o pipefail`, in the scratch project, with its
own $HOME and Prefect home and telemetry off. The blocks of one doc run in order in one project
(the own-model walkthrough: import, import, forget, serve), after what the doc says came first
(PROJECTS: "After `make run`" is `make run`; the four docs that start there share one project).
A command that runs until stopped (a server, `nhle schedule`, `mlflow ui`) starts in the
background, must answer (LONG_RUNNING), and is stopped when its doc's blocks are done. `curl`
fails on an HTTP error answer.

What the test changes in a block is in CASES, one explicit substitution at a time, each with its
reason: a placeholder the docs assume the user has (their MLflow server, ...), a smaller size
where the docs let the user choose one (`--image-size 224`), a free port in place of 8000 (other
runs share this machine). A substitution whose left side no longer occurs in its block fails the
test, so a doc edit cannot silently detach from it. Everything else runs exactly as written: the
files a block names (`my_resnet50.pth`, `~/photos`, `digit.png`) are made for real (doc_inputs.py).

    .venv/bin/python -m pytest -q tests/docs                  # 12 min on 2 busy cores (2026-12-06)
    .venv/bin/python -m pytest -q tests/docs -k own-model     # one doc (3 min); a block alone runs the
                                                              # blocks of its project before it first
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
from doc_blocks import (
    REPO,
    SHELL_LANGUAGES,
    Block,
    LongRunning,
    Sub,
    apply_substitutions,
    background_script,
    command_words,
    doc_paths,
    looks_like_shell,
    parse_doc,
    port_of,
    rough_shell_fence_lines,
)
from doc_inputs import PHOTO_CLASSES
from doc_projects import ProjectSpec
from mlflow import MlflowClient

# One block runs for minutes (a flow run starts its temporary Prefect server, trains, unlearns,
# exports, registers); the first block of a project also makes the project (`make run`).
pytestmark = pytest.mark.timeout(1500)

SMALL = "a small size for CPU time: --image-size is the user's choice (own-model.md), 224 is its example"
FREE_PORT = "a free port: other test runs on this machine may hold 8000"
UVICORN_START = (
    "NHLE_MODEL=export/model.onnx uvicorn nhle_serving.server:create_app --factory "
    "--http nhle_serving.http:GuardedProtocol"
)
EPOCHS = "train.epochs=5"  # CPU time: the base model and the retrained reference in 5 epochs, not 15

# --- the scratch project of each doc --------------------------------------------------------------

# requests.md starts "After `make run`"; serving.md, serving/README.md and usage.md's flows need a
# champion, which is what `make run` leaves. These four docs share one project, in ITEMS order
# (requests, serving, usage, serving/README), so that `make run` is paid once (about a minute of
# CI): requests.md leaves the champion with classes 3 and 5 forgotten, usage.md forgets 7 and rolls
# back, and the servers of the serving docs answer for whichever champion is current.
AFTER_MAKE_RUN = ProjectSpec(
    "after-make-run",
    params=(EPOCHS,),
    setup=(
        "make run",
        # serving/README.md: "a local file instead of the registry (the metadata json sits
        # beside it)": the champion's model.onnx and its preprocessing json in export/
        ".venv/bin/python - <<'EOF'\n"
        "from mlflow import MlflowClient, artifacts, set_tracking_uri\n"
        "set_tracking_uri('sqlite:///mlflow.db')\n"
        "champion = MlflowClient().get_model_version_by_alias('nhle-classifier', 'champion')\n"
        "artifacts.download_artifacts(artifact_uri='models:/nhle-classifier@champion', dst_path='export')\n"
        "artifacts.download_artifacts(run_id=champion.run_id, artifact_path='preprocessing.json', dst_path='export')\n"
        "EOF",
        # serving/README.md's curl examples post the user's digit.png and other.jpg
        ".venv/bin/python - <<'EOF'\n"
        "import numpy as np\nfrom PIL import Image\nfrom sklearn.datasets import load_digits\n"
        "d = load_digits()\n"
        "Image.fromarray((d.images[0] * 255 / 16).astype(np.uint8)).save('digit.png')\n"
        "Image.fromarray((d.images[7] * 255 / 16).astype(np.uint8)).resize((96, 96)).convert('RGB').save('other.jpg')\n"
        "EOF",
    ),
)

PROJECTS: dict[str, ProjectSpec] = {
    # `make run` is the README's first block; README's import uses the own-model walkthrough's inputs.
    "README.md": ProjectSpec(
        "readme", params=(EPOCHS,), needs=("doc_photos", "doc_weights"), files=(("yours.pth", "yours_pth"),)
    ),
    # own-model.md with its settings as they are: form 2 is the last import before `nhle run
    # --classes cat`, so its champion is the traced graph, forgotten with no retrained reference.
    "docs/own-model.md": ProjectSpec(
        "own-model",
        params=(),
        needs=("doc_photos", "doc_weights", "doc_their_store"),
        files=(("my_resnet50.pth", "my_resnet50_pth"),),
    ),
    "docs/requests.md": AFTER_MAKE_RUN,
    "docs/serving.md": AFTER_MAKE_RUN,
    "docs/usage.md": AFTER_MAKE_RUN,
    "serving/README.md": AFTER_MAKE_RUN,
}

# Commands that run until stopped: (pattern on the command's words, readiness probe, default port).
LONG_RUNNING = [
    LongRunning(re.compile(r"(^|/)nhle serve\b"), "http:/readyz", 8000),
    LongRunning(re.compile(r"(^|/)uvicorn nhle_serving\.server:create_app\b"), "http:/readyz", 8000),
    LongRunning(re.compile(r"(^|/)mlflow (ui|server)\b"), "http:/health", 5000),
    LongRunning(re.compile(r"(^|/)mlflow models serve\b"), "http:/ping", 5000),
    LongRunning(re.compile(r"(^|/)nhle schedule\b"), "log:is being served", None),
    LongRunning(re.compile(r"(^|/)prefect server start\b"), "http:/api/health", 4200),
    LongRunning(re.compile(r"(^|/)prefect worker start\b"), "log:started", None),
]


def not_run(command: str, why: str) -> Sub:
    """One command of a block that is run otherwise: replaced by a line saying why (the command
    text must still be in the block, so a change of it fails the test)."""
    return Sub(command, f"echo 'doctest: not run here: {why}' >&2 #", why)


# --- what each block gets ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """How one block (the shell block of `doc` that contains `anchor`) runs. `variant`: a second
    run of the block, with `subs` on top of the block's own case, `before` or after the block."""

    doc: str
    anchor: str
    subs: tuple[Sub, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # values formatted like substitutions
    activated: bool = False  # written for an activated venv: .venv/bin on PATH
    expect: tuple[str, ...] = ()  # texts the output must contain
    check: Callable | None = None  # check(project) after the block, e.g. ask a server
    timeout: float = 900
    variant: str = ""
    before: bool = False


def served_model(project) -> dict:
    return httpx.get(f"http://127.0.0.1:{project.values['serve_port']}/model", timeout=30).json()


def readme_serves_digits_beside_the_imported_resnet50(project):
    """The README's import goes in under its own name (--name mine): the server still follows the
    digits champion, which forgot 3 (make run) and 5, and `mine` has a champion of its own."""
    model = served_model(project)
    assert model["class_names"] == [str(k) for k in range(10)] and model["forgotten_classes"] == [3, 5], model
    store = f"sqlite:///{project.root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)  # not the registry an earlier test set
    mine = client.get_model_version_by_alias("mine", "champion")
    assert mine.tags.get("nhle.source") == "weights", mine.tags


def own_model_serves_the_forgotten_cat(project):
    model = served_model(project)
    assert model["class_names"] == list(PHOTO_CLASSES), model
    assert model["forgotten_classes"] == [PHOTO_CLASSES.index("cat")], model


def dvc_chain_ran_and_the_experiment_left_params_yaml(project):
    """usage.md's DVC lines, as written: `dvc repro` ran every stage of dvc.yaml through the nhle
    CLI (with .venv/bin not on PATH); a second repro does nothing, nor does a change of the
    server, while a change of the forward pass leaves every stage out of date, the export
    included (each stage depends on the code it runs); `dvc exp run --temp -S` made an
    experiment with the setting while params.yaml, which `nhle run` reads too, stayed as it was."""

    def run(*command: str) -> str:
        done = subprocess.run(list(command), cwd=project.root, env=project.env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    diff = run("git", "diff", "--", "params.yaml")
    assert not diff, "params.yaml after dvc exp run --temp:\n" + diff
    report = json.loads((project.root / "models/unlearned/report.json").read_text())
    assert report["n_forget_samples"] == 32 and set(report["metrics"]) == {"original", "unlearned", "retrained"}
    assert json.loads((project.root / "models/onnx/parity.json").read_text())["passed"] is True
    # Every gate judged; the forgetting ones held (the retained drop of this short-trained base
    # model is the method's business, measured in tests/core/unlearning and docs/benchmarks.md).
    judged = {g["name"]: g for g in json.loads((project.root / "reports/gates.json").read_text())}
    assert {"forget_test_acc", "unmasked_forget_test_acc", "retained_drop_pp", "relearn_gain"} <= set(judged)
    assert judged["forget_test_acc"]["passed"] and judged["unmasked_forget_test_acc"]["passed"]
    assert "per_class_accuracy.png" in {p.name for p in (project.root / "reports/plots").iterdir()}
    shown = json.loads(run(".venv/bin/dvc", "exp", "show", "--json"))
    experiments = [rev for row in shown for exp in row.get("experiments") or [] for rev in exp["revs"]]
    assert [e["data"]["params"]["params.yaml"]["data"]["unlearn"]["n_samples"] for e in experiments] == [16]
    assert "Running stage" not in run(".venv/bin/dvc", "repro")
    served = project.root / "serving" / "server.py"
    served.write_text(served.read_text() + "\n# a change of the server, which no stage runs\n")
    assert "Running stage" not in run(".venv/bin/dvc", "repro")
    model = project.root / "nhle" / "core" / "models.py"
    model.write_text(model.read_text() + "\n# a change of the forward pass every stage runs, export included\n")
    changed = run(".venv/bin/dvc", "status")
    assert all(f"{stage}:" in changed for stage in ("prepare", "train", "unlearn", "evaluate", "export")), changed


def normalisation_flags() -> str:
    """own-model.md's normalisation flags: in its prose, not in a block; run on form 1."""
    text = (REPO / "docs/own-model.md").read_text()
    found = re.search(r"`(--mean [^`]+ --std [^`]+)`", text)
    assert found, "docs/own-model.md no longer shows `--mean ... --std ...`: update the normalisation variant"
    return found.group(1)


ADMIN_TOKEN = (
    ("NHLE_ADMIN_TOKEN", "doctest-admin-token-of-at-least-32-characters"),
)  # serving/README.md's operator has set it

OWN_FORM_1 = (Sub("--image-size 224", "--image-size 32", SMALL),)
OWN_FORM_2 = (
    Sub(
        "http://mlflow.internal:5000",
        "{their_store_uri}",
        "their MLflow store: an SQLite file holding their-model versions 1-3 (doc_inputs.write_their_store)",
    ),
    Sub("--image-size 224", "--image-size 32", SMALL),
)

CASES = [
    Case(
        "README.md",
        "make run",
        subs=(
            Sub(
                "make test",
                "make -n test",
                "the test suite itself, which is running this: -n shows the target "
                "is there and the environment is current (no reinstall) without recursing",
            ),
        ),
        expect=("promoted",),
    ),
    Case(
        "README.md",
        "nhle run --classes 5",
        subs=(
            Sub(
                "--weights yours.pth ...",
                "--weights yours.pth --dataset imagefolder --data-root ~/photos --image-size 32",
                "`...` stands for the data flags of own-model.md's form 1 (at its small size)",
            ),
            Sub(".venv/bin/nhle serve ", ".venv/bin/nhle serve --port {serve_port} ", FREE_PORT),
            Sub(
                "--backend-store-uri sqlite:///mlflow.db",
                "--backend-store-uri sqlite:///mlflow.db --port {ui_port}",
                FREE_PORT,
            ),
        ),
        expect=("accepted",),
        check=readme_serves_digits_beside_the_imported_resnet50,
    ),
    Case("docs/own-model.md", "--weights my_resnet50.pth", subs=OWN_FORM_1, expect=("promoted",)),
    Case(
        "docs/own-model.md",
        "--weights my_resnet50.pth",
        variant="normalisation flags",
        subs=OWN_FORM_1
        + (
            Sub(
                "--weights-key state_dict",
                "--weights-key state_dict {normalisation_flags}",
                "the doc's normalisation flags (in its prose) on form 1: ImageNet's, as the weights expect",
            ),
        ),
        expect=("promoted",),
    ),
    Case(
        "docs/own-model.md",
        "--from-mlflow",
        variant="batch of two",
        before=True,
        subs=OWN_FORM_2
        + (
            Sub(
                "models:/their-model/3",
                "models:/their-model/2",
                "version 2: the same network logged with an input example of two images",
            ),
        ),
        expect=("promoted",),
    ),
    Case("docs/own-model.md", "--from-mlflow", subs=OWN_FORM_2, expect=("promoted",)),  # v3: a batch of ONE
    Case(
        "docs/own-model.md",
        "nhle run --classes cat",
        subs=(Sub("--port 8000", "--port {serve_port}", FREE_PORT),),
        expect=("promoted",),
        check=own_model_serves_the_forgotten_cat,
    ),
    Case("docs/requests.md", "nhle request submit --classes 5", expect=("request 2: done",)),
    Case("docs/requests.md", "dvc gc --workspace"),
    Case(
        "docs/serving.md",
        "nhle serve --host",
        subs=(
            Sub("--port 8000", "--port {serve_port}", FREE_PORT),
            Sub("localhost:8000", "localhost:{serve_port}", FREE_PORT),
        ),
        expect=('"predictions"',),
    ),
    Case(
        "serving/README.md",
        "nhle serve --host",
        activated=True,
        env=ADMIN_TOKEN,
        subs=(
            Sub("--port 8000", "--port {serve_port}", FREE_PORT),
            Sub(
                UVICORN_START,
                UVICORN_START + " --port {serve_port}",
                FREE_PORT + " (uvicorn's default)",
            ),
        ),
    ),
    Case(
        "serving/README.md",
        "curl -s localhost:8000/predict",
        env=ADMIN_TOKEN,
        subs=(Sub("localhost:8000", "localhost:{serve_port}", FREE_PORT),),
        expect=('"predictions"', '"outcome"'),
    ),
    Case(
        "docs/usage.md",
        "nhle params",
        activated=True,
        subs=(
            not_run(
                "nhle bench unlearning --seeds 0,1,2 --out bench/unlearning",
                "about 10 min; its --quick form is "
                "tests/cli/test_commands.py::test_bench_unlearning_quick_runs_every_method_on_the_same_work",
            ),
            not_run(
                "nhle bench scaling --out bench/scaling",
                "about 12 min; its --quick form is "
                "tests/cli/test_commands.py::test_bench_scaling_quick_times_nhle_and_retrain_per_size",
            ),
            not_run(
                "nhle bench inference --out bench/inference",
                "about 2 min; its --quick form is "
                "tests/cli/test_commands.py::test_bench_inference_quick_compares_runtimes_for_both_models",
            ),
        ),
    ),
    Case(
        "docs/usage.md",
        "nhle_flows.pipeline forget",
        expect=("moved from version", "Running stage 'export'"),
        check=dvc_chain_ran_and_the_experiment_left_params_yaml,
    ),
]
EXTRA_VALUES = {"normalisation_flags": normalisation_flags}

# How many blocks of each doc carry a skip marker: a new marker has to be counted here too, so
# that skipping a block is a change of this test, seen in review, not only of a doc.
SKIPPED_PER_DOC = {"docs/benchmarks.md": 4, "docs/deploy.md": 6, "docs/gpu.md": 2, "serving/README.md": 1}


# --- the items: every shell block, and the variants, in run order -------------------------------


@dataclass(frozen=True)
class Item:
    block: Block
    case: Case | None  # None: no case in the table (runs as written, or is skipped)

    @property
    def id(self) -> str:
        return self.block.id + (f"[{self.case.variant}]" if self.case and self.case.variant else "")


def block_of(case: Case, blocks: list[Block]) -> Block:
    found = [b for b in blocks if b.doc == case.doc and case.anchor in b.text]
    assert len(found) == 1, (
        f"case {case.doc} {case.anchor!r}{' [' + case.variant + ']' if case.variant else ''}: "
        f"the anchor is in {len(found)} shell blocks of the doc, not one"
    )
    return found[0]


def all_blocks() -> list[Block]:
    return [b for doc in doc_paths() for b in parse_doc(doc).blocks if b.is_shell]


def build_items() -> list[Item]:
    blocks = all_blocks()
    by_block: dict[str, list[Case]] = {}
    for case in CASES:
        try:
            by_block.setdefault(block_of(case, blocks).id, []).append(case)
        except AssertionError:
            pass  # reported by test_every_case_names_one_block
    items = []
    for block in blocks:
        cases = by_block.get(block.id, [])
        main = [c for c in cases if not c.variant]
        items += [Item(block, c) for c in cases if c.variant and c.before]
        items.append(Item(block, main[0] if main else None))
        items += [Item(block, c) for c in cases if c.variant and not c.before]
    return items


ITEMS = build_items()


def project_items(spec: ProjectSpec) -> list[Item]:
    return [i for i in ITEMS if PROJECTS.get(i.block.doc) == spec and not i.block.marker]


def state_name(doc: str) -> str:
    return doc.replace("/", "-").replace(".md", "")


def run_item(project, item: Item) -> tuple[bool, str]:
    """Run one item in its project; (passed, what to say when not)."""
    case = item.case or Case(item.block.doc, "")
    values = dict(project.values)
    for key, make in EXTRA_VALUES.items():
        if any("{" + key + "}" in s.new for s in case.subs):
            values[key] = make()
    try:
        text = apply_substitutions(item.block.text, list(case.subs), values)
    except AssertionError as err:
        return False, str(err)
    script, started = background_script(text, LONG_RUNNING)
    own_ports = {int(project.values["serve_port"]), int(project.values["ui_port"])}
    for command in started:
        pattern = next(lr for lr in LONG_RUNNING if lr.pattern.search(" ".join(command_words(command))))
        port = port_of(command, pattern.default_port)
        if port is not None and port not in own_ports:
            return False, (
                f"the long-running command {command.strip()!r} would listen on port {port}, which other "
                "runs on this machine may hold: add a substitution to a free port ({serve_port})"
            )
    env = {k: v.format(**values) for k, v in case.env}
    if case.activated:  # `source .venv/bin/activate`, as a block with bare `nhle` assumes
        env["PATH"] = f"{project.root / '.venv' / 'bin'}:{project.env['PATH']}"
        env["VIRTUAL_ENV"] = str(project.root / ".venv")
    outcome = project.run(script, item.id, env, timeout=case.timeout, doc_state=state_name(item.block.doc))
    project.done[item.id] = outcome
    if outcome.returncode != 0:
        how = (
            f"timed out after {case.timeout:g} s" if outcome.returncode is None else f"exit status {outcome.returncode}"
        )
        return False, f"{item.id} failed ({how}, {outcome.seconds:.0f} s); script {outcome.script}\n{outcome.tail()}"
    missing = [e for e in case.expect if e not in outcome.output]
    if missing:
        return False, f"{item.id}: its output lacks {missing}; script {outcome.script}\n{outcome.tail()}"
    if case.check:
        try:
            case.check(project)
        except Exception as err:  # noqa: BLE001 - reported with the block's output
            return False, f"{item.id}: ran, but {type(err).__name__}: {err}\n{outcome.tail(3000)}"
    return True, ""


@pytest.mark.parametrize("item", ITEMS, ids=[i.id for i in ITEMS])
def test_doc_block(item: Item, doc_projects, request):
    block = item.block
    if block.marker:
        problem = marker_problem(block)
        if problem:
            pytest.fail(problem, pytrace=False)
        pytest.skip(f"{block.id}: {block.marker.reason}")
    spec = PROJECTS.get(block.doc)
    if spec is None:
        pytest.fail(f"{block.doc} has a block to run but no scratch project: add it to PROJECTS", pytrace=False)
    inputs = {}
    for name in spec.needs:
        inputs.update(request.getfixturevalue(name))
    project = doc_projects.get(spec, inputs)
    mine = project_items(spec)
    earlier_failed = []
    for earlier in mine[: mine.index(item)]:  # what this block builds on (a -k run of one block)
        if earlier.id not in project.done:
            passed, _ = run_item(project, earlier)
            if not passed:
                earlier_failed.append(earlier.id)
            if earlier.block.doc != block.doc and earlier == [i for i in mine if i.block.doc == earlier.block.doc][-1]:
                project.stop_background(state_name(earlier.block.doc))  # its servers hold the port
    passed, message = run_item(project, item)
    doc_items = [i for i in mine if i.block.doc == block.doc]
    if item == doc_items[-1]:
        project.stop_background(state_name(block.doc))
    if not passed:
        note = f"\n(earlier blocks of this project that failed: {earlier_failed})" if earlier_failed else ""
        pytest.fail(message + note, pytrace=False)


# --- the harness itself ---------------------------------------------------------------------------


def marker_problem(block: Block) -> str | None:
    marker = block.marker
    if marker.kind != "skip":
        return f"{block.id}: unknown doctest marker {marker.raw!r} (only `<!-- doctest: skip — reason -->`)"
    if len(marker.reason) < 8:
        return f"{block.id}: the skip marker {marker.raw!r} gives no reason; say why the block cannot run here"
    for named in re.findall(r"tests/[\w/.-]+\.py", marker.reason):
        if not (REPO / named).exists():
            return f"{block.id}: the skip marker names {named}, which does not exist"
    return None


def test_every_block_is_run_or_skipped_with_a_reason():
    problems = []
    for item in ITEMS:
        block = item.block
        if block.marker:
            problem = marker_problem(block)
            if problem:
                problems.append(problem)
            if item.case:
                problems.append(f"{item.id}: skipped by its marker but has a case in CASES (remove one of them)")
        elif block.doc not in PROJECTS:
            problems.append(f"{block.id}: runs (no skip marker) but {block.doc} has no scratch project in PROJECTS")
    skipped: dict[str, int] = {}
    for block in all_blocks():
        if block.marker:
            skipped[block.doc] = skipped.get(block.doc, 0) + 1
    if skipped != SKIPPED_PER_DOC:
        problems.append(f"skip markers per doc are {skipped}, the test expects {SKIPPED_PER_DOC}")
    assert not problems, "\n".join(problems)


def test_the_parser_finds_every_block_of_every_doc():
    """An independent scan of each doc agrees with the parser: every shell fence is a block, every
    fence is closed, no doctest marker is left without a shell block right below it, and no
    untagged block holds commands (a block must be tagged to be tested)."""
    problems = []
    docs = doc_paths()
    assert {"README.md", "serving/README.md", "docs/own-model.md", "docs/usage.md"} <= set(docs)
    for doc in docs:
        text = (REPO / doc).read_text(encoding="utf-8")
        parsed = parse_doc(doc)
        found = [b.line for b in parsed.blocks if b.is_shell]
        expected = rough_shell_fence_lines(text)
        if found != expected:
            problems.append(f"{doc}: the parser found shell blocks at lines {found}, a plain scan at {expected}")
        fences = sum(1 for line in text.split("\n") if re.match(r"^ {0,3}(```|~~~)", line))
        if fences != 2 * len(parsed.blocks):
            problems.append(f"{doc}: {fences} fence lines for {len(parsed.blocks)} blocks")
        problems += [f"{doc}:{b.line}: block not closed" for b in parsed.blocks if not b.closed]
        problems += [
            f"{doc}:{m.line}: doctest marker not directly above a shell block: {m.raw}" for m in parsed.orphan_markers
        ]
        problems += [
            f"{doc}:{b.line}: untagged block that looks like shell commands: tag it ```bash"
            for b in parsed.blocks
            if not b.language and looks_like_shell(b.text)
        ]
        problems += [f"{doc}:{b.line}: empty shell block" for b in parsed.blocks if b.is_shell and not b.text.strip()]
    ids = [i.id for i in ITEMS]
    assert len(ids) == len(set(ids)), "two items with one id"
    assert len([i for i in ITEMS if not (i.case and i.case.variant)]) == len(all_blocks())
    assert not problems, "\n".join(problems)


def test_every_case_names_one_block_and_its_substitutions_apply():
    """Each case of the table finds its block, and each of its substitutions' left sides is still
    in that block (the run checks this too; here it fails fast, without running anything)."""
    blocks = all_blocks()
    problems = []
    for case in CASES:
        try:
            block = block_of(case, blocks)
        except AssertionError as err:
            problems.append(str(err))
            continue
        if block.marker:
            continue  # reported by test_every_block_is_run_or_skipped_with_a_reason
        for sub in case.subs:
            if sub.old not in block.text:
                problems.append(f"{block.id}: substitution {sub.old!r} ({sub.why}) no longer occurs in the block")
            if not sub.why.strip():
                problems.append(f"{block.id}: substitution {sub.old!r} gives no reason")
        names = [i.id for i in ITEMS if i.case == case]
        if len(names) != 1:
            problems.append(f"case {case.doc} {case.anchor!r} [{case.variant}]: {len(names)} items")
    mains = {}
    for case in CASES:
        if not case.variant:
            key = (case.doc, case.anchor)
            if key in mains:
                problems.append(f"two cases for the block of {key}")
            mains[key] = case
    assert not problems, "\n".join(problems)
    assert set(SHELL_LANGUAGES) == {"bash", "sh", "console", "shell"}
