"""Dependencies point one way (DESIGN.md): types is a leaf; plug-ins see only types and base contracts;
the engine never imports a method, task or backbone; only build.py wires plug-ins together (the CLI,
the API and the benchmarks sit on top and may name them); no module imports itself through others
(no import circles, lazy imports inside functions included); the trainer writes no file and prints
nothing (DESIGN.md, "Layers of a run")."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parents[1] / "locallearn"
PLUGIN_FAMILIES = ("backbones", "methods", "tasks")


def runtime_imports(path: Path, resolve: bool = False) -> set[str]:
    """locallearn modules imported at run time (imports under ``if TYPE_CHECKING:`` are skipped).
    ``resolve``: ``from locallearn.data import imagefolder`` names the module ``locallearn.data.imagefolder``
    (not the package), as the import graph needs."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("locallearn"):
            if not resolve:
                found.add(node.module)
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("locallearn"))
    return found


def modules(sub: str = "") -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in modules()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each circle as one path ``[a, b, ..., a]`` (Tarjan's strongly connected components, then a
    shortest way back for a readable message)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while part[-1:] != [v]:
                part.append(stack.pop())
            if len(part) > 1 or v in graph[v]:
                components.append(set(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = []
    for part in components:
        start = min(part)
        paths = {start: [start]}
        queue = [start]
        while queue:  # breadth first inside the component, until an edge returns to start
            v = queue.pop(0)
            if start in graph[v]:
                circles.append(paths[v] + [start])
                break
            for w in sorted(graph[v] & part):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return circles


def test_import_circle_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_circles(graph) == [["a", "b", "c", "a"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = {name: runtime_imports(path, resolve=True) & MODULES.keys() for name, path in MODULES.items()}
    circles = import_circles(graph)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


RUN_PACKAGE = "run"  # the run in every engine mode, one file per mode (locallearn/run/__init__.py)
RUN_LAYER = ("trainer.py", "rundir.py", "resume.py", "lifecycle.py", "engine/sequential.py", "api.py",
             "watch.py", "report.py",
             *sorted(str(p.relative_to(PKG)) for p in (PKG / RUN_PACKAGE).glob("*.py")))  # fmt: skip


def test_the_run_package_holds_every_mode():
    """The run layer's files live in one package: no module of a mode's run outside it, no alias module."""
    names = {p.name for p in (PKG / RUN_PACKAGE).glob("*.py")}
    assert {"single.py", "distributed.py", "ddp.py", "pipeline.py", "launch.py"} == names - {"__init__.py"}
    stray = {"run.py", "runner.py", "launch.py", "parallel.py", "ddp_run.py", "pipeline_run.py",
             "distributed_run.py"} & {p.name for p in PKG.glob("*.py")}  # fmt: skip
    assert not stray, f"run-layer modules outside locallearn/{RUN_PACKAGE}/: {sorted(stray)}"


@pytest.mark.parametrize("name", RUN_LAYER)
def test_run_layer_files_stay_small(name):
    lines = len((PKG / name).read_text().splitlines())
    assert lines <= 320, f"{name} has {lines} lines: split it by concept (DESIGN.md)"


def test_the_trainer_writes_no_file_and_prints_nothing():
    tree = ast.parse((PKG / "trainer.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            banned = ("print", "open", "logging", "checkpoint.save", "torch.save", "write_text", "tqdm")
            assert not any(name == b or name.endswith("." + b) or name.startswith(b) for b in banned), name
    imported = runtime_imports(PKG / "trainer.py")
    assert not {m for m in imported if m == "locallearn.run" or m.startswith("locallearn.run.")}
    assert "locallearn.rundir" not in imported


def test_types_is_a_leaf():
    assert runtime_imports(PKG / "types.py") == set()


@pytest.mark.parametrize("family", PLUGIN_FAMILIES)
def test_plugins_use_only_types_and_contracts(family):
    for path in modules(family):
        for module in runtime_imports(path):
            parts = module.split(".")
            ok = (
                module == "locallearn.types"
                or (len(parts) == 3 and parts[1] in PLUGIN_FAMILIES and parts[2] == "base")
                or parts[1] == family  # helpers inside the same family
                or parts[1] == "metrics"  # metric modules are leaves (memory meter, COCOeval)
            )
            assert ok, f"{path.relative_to(PKG)} imports {module}"


def test_engine_never_imports_a_plugin():
    for path in modules("engine"):
        for module in runtime_imports(path):
            assert module.split(".")[1] not in (*PLUGIN_FAMILIES, "build"), (
                f"{path.relative_to(PKG)} imports {module}"
            )


def test_only_build_wires_plugins():
    for path in modules():
        rel = path.relative_to(PKG)
        if rel.parts[0] in (*PLUGIN_FAMILIES, "bench") or rel.name in (
            "build.py",
            "cli.py",
            "api.py",
        ):
            continue
        for module in runtime_imports(path):
            parts = module.split(".")
            concrete = len(parts) == 3 and parts[1] in PLUGIN_FAMILIES and parts[2] != "base"
            assert not concrete, f"{rel} imports the plug-in {module}"


def test_only_the_step_module_runs_backward():
    """DESIGN.md: engine/step.py is the only place that calls .backward() (gradient isolation lives there)."""
    for path in modules():
        if path == PKG / "engine" / "step.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "backward"
            ):
                raise AssertionError(f"{path.relative_to(PKG)}:{node.lineno} calls .backward()")
