"""The packages form layers (tracer < decompose < align < toyworld < vit_decompose): no module imports a
package above its own, no two modules import each other (module-level or inside a function, both count),
and no file is over 500 lines."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("tracer", "decompose", "align", "toyworld", "vit_decompose")   # each may import the ones before it
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """dotted module name -> file, for every module of the layered packages."""
    modules = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The layered-package modules ``name`` imports, wherever the import statement sits."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:   # an attribute of a module, or a submodule of it
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] in LAYERS:
                found.add(target)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_checker_sees_imports_of_every_form():
    graph = _graph()
    assert "decompose" in graph["vit_decompose.heatmap_sources"]                # `from decompose import X`
    assert "decompose.attention_maps" in graph["vit_decompose.heatmap_commands"]  # `from decompose.x import Y`
    assert "toyworld.demo_records" in graph["toyworld.demo_report"]             # `from .x import Y`
    assert "align.clip_models" in graph["toyworld.models"]                      # an import inside a function
    assert graph["tracer"] and all(module.startswith("tracer") for module in graph["tracer"])


def test_no_module_imports_a_package_above_its_own():
    upward = [f"{name} imports {target}" for name, targets in _graph().items() for target in sorted(targets)
              if LAYERS.index(target.split(".")[0]) > LAYERS.index(name.split(".")[0])]
    assert not upward, upward


def test_no_two_modules_import_each_other():
    graph = _graph()
    mutual = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())})
    assert not mutual, mutual


def test_no_file_over_500_lines():
    long = {str(path.relative_to(ROOT)): count for path in _modules().values()
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
