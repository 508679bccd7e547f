"""The architecture, as the tree shows it: each layer imports only the layers below it.

    nhle.core  <-  nhle.adapters  <-  nhle.orchestration  <-  nhle_flows  <-  nhle.cli
         ^                                 ^------ nhle.bench ------^
         '---- nhle_serving (nhle.core.config, gates and outputs, the ledger, the record of
                            deletions and the signatures only: no torch)

Every import statement of every module is read (function-local ones too), so a late import
cannot hide a wrong dependency."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"nhle": REPO / "nhle", "nhle_flows": REPO / "flows", "nhle_serving": REPO / "serving"}
# What each layer may import of nhle's own code (a prefix allows its submodules).
ALLOWED = {
    "nhle.core": ("nhle.core",),
    "nhle.adapters": ("nhle.core", "nhle.adapters"),
    "nhle.orchestration": ("nhle.core", "nhle.adapters", "nhle.orchestration"),
    # The serving benchmark drives the real pipeline and request loop end to end.
    "nhle.bench": ("nhle.core", "nhle.adapters", "nhle.orchestration", "nhle.bench"),
    "nhle_flows": ("nhle.core", "nhle.adapters", "nhle.orchestration", "nhle.bench", "nhle_flows"),
    "nhle.cli": ("nhle.core", "nhle.adapters", "nhle.orchestration", "nhle.bench", "nhle.cli", "nhle_flows"),
    # The server reads the classes deleted on record (the ledger and the registered model's record),
    # verifies signatures, and uses nhle's pure config, gates and the meaning of a graph's output.
    "nhle_serving": (
        "nhle.core.config",
        "nhle.core.files",
        "nhle.core.gates",
        "nhle.core.outputs",
        "nhle.adapters.ledger",
        "nhle.adapters.deletions",
        "nhle.adapters.signing",
        "nhle_serving",
    ),
}
# What the layers that must run on a bare GPU image (torch, torchvision, numpy, scikit-learn,
# onnx, onnxruntime) or in a serving image may never import.
SYSTEMS = ("mlflow", "prefect", "prefect_dask", "dvc", "sqlalchemy", "fastapi", "uvicorn", "starlette", "httpx")
FORBIDDEN = {"nhle.core": SYSTEMS, "nhle_serving": ("torch", "torchvision", "sklearn", "prefect", "dvc")}


def modules():
    """(module name, path) of every Python file of nhle, flows/ and serving/."""
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            yield ".".join((package, *parts)).removesuffix(".__init__"), path


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from nhle import pipeline`
    return found


def layer_of(module: str) -> str:
    return next(
        (
            layer
            for layer in sorted(ALLOWED, key=len, reverse=True)
            if module == layer or module.startswith(layer + ".")
        ),
        "nhle",
    )


def own(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_every_module_belongs_to_a_layer():
    stray = [m for m, _ in modules() if layer_of(m) == "nhle" and m != "nhle"]
    assert not stray, f"modules outside every layer folder: {stray}"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    wrong = []
    for module, path in modules():
        if layer_of(module) != layer:
            continue
        for name in imports(path):
            if own(name) and name not in ("nhle", "nhle_flows", "nhle_serving") and not within(name, ALLOWED[layer]):
                wrong.append(f"{module} imports {name}")
            if within(name, FORBIDDEN.get(layer, ())):
                wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(wrong)


def import_cycles() -> list[list[str]]:
    """Every set of modules that import each other, directly or around a circle (function-local
    imports included), as strongly connected components of the import graph (Tarjan)."""
    found = dict(modules())
    graph = {
        m: {n for n in imports(p) if n in found and n != m and not m.startswith(n + ".")} for m, p in found.items()
    }
    index, low, stack, cycles = {}, {}, [], []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return cycles


def test_no_modules_import_each_other():
    """A circle of imports (a <-> b, or a -> b -> c -> a) means neither can be read, tested or
    moved alone; the shared piece belongs in a module of its own or a layer below."""
    assert not import_cycles(), import_cycles()


def test_the_core_and_the_benchmarks_run_without_tracking_orchestration_or_versioning():
    """Imported for real, not only read: a GPU image has torch, numpy, scikit-learn, onnx and
    onnxruntime, and nothing of MLflow, Prefect or DVC."""
    names = [m for m, _ in modules() if layer_of(m) == "nhle.core"] + [
        "nhle.bench.unlearning",
        "nhle.bench.scaling",
        "nhle.bench.gpu",
        "nhle.bench.report",
        "nhle.bench.synthetic",
    ]
    code = (
        f"import importlib, sys\nfor name in {names!r}: importlib.import_module(name)\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({SYSTEMS!r})); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_dvc_stage_depends_on_the_code_its_command_imports():
    """dvc.yaml's deps, held to the imports: every nhle.core module a stage's `nhle <command>`
    reaches (function-local imports of its cmd_ function, then every import from there) must sit
    under one of the stage's deps, so a change of, say, the exported forward pass reruns the export."""
    found = dict(modules())
    cli = ast.parse((REPO / "nhle" / "cli" / "commands.py").read_text())
    commands = {node.name: node for node in cli.body if isinstance(node, ast.FunctionDef)}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = []
    for stage, spec in stages.items():
        command = spec["cmd"].split()[1]  # ${nhle} <command> ...
        reached, todo = set(), [n for n in imports_in(commands[f"cmd_{command}"]) if n in found]
        while todo:
            module = todo.pop()
            if module not in reached:
                reached.add(module)
                todo += [n for n in imports(found[module]) if n in found]
        for module in sorted(m for m in reached if m.startswith("nhle.core")):
            path = found[module].relative_to(REPO).as_posix()
            if not any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in spec["deps"]):
                missing.append(f"stage {stage} runs {path} but does not depend on it")
    assert not missing, "\n".join(missing)


def imports_in(function: ast.FunctionDef) -> set[str]:
    """What one function imports (the CLI's commands import lazily, in their bodies)."""
    found = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found
