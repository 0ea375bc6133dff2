"""Dependencies point one way (DESIGN.md): types is a leaf; plug-ins see only types and base contracts;
the engine never imports a method, task or backbone; only build.py wires plug-ins together (the CLI,
the runner and the benchmarks sit on top and may name them)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parents[1] / "locallearn"
PLUGIN_FAMILIES = ("backbones", "methods", "tasks")


def runtime_imports(path: Path) -> set[str]:
    """locallearn modules imported at run time (imports under ``if TYPE_CHECKING:`` are skipped)."""
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
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("locallearn"))
    return found


def modules(sub: str = "") -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


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
        if rel.parts[0] in (*PLUGIN_FAMILIES, "bench") or rel.name in ("build.py", "cli.py", "runner.py"):
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
