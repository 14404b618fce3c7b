"""Dependencies point down (docs: STYLE's model -> attention -> kernels): kernels import no layer, the
attention layers import no model, the model imports nothing of training, inference, benchmarks or
transformers, and no module imports another that imports it back (at import time)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "egmla"

# package -> packages it must never import, at module level or inside a function
FORBIDDEN = {
    "egmla.kernels": ("egmla.attention", "egmla.model", "egmla.infer", "egmla.train", "egmla.bench", "egmla.hf"),
    "egmla.attention": ("egmla.model", "egmla.infer", "egmla.train", "egmla.bench", "egmla.hf"),
    "egmla.model": ("egmla.infer", "egmla.train", "egmla.bench", "egmla.hf"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.startswith("egmla")}


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_dependencies_point_down():
    wrong = []
    for name, path in modules().items():
        for package, forbidden in FORBIDDEN.items():
            if name == package or name.startswith(package + "."):
                wrong += [f"{name} imports {dep}" for dep in imports(path, top_level_only=False)
                          if any(dep == f or dep.startswith(f + ".") for f in forbidden)]
    assert not wrong, wrong


def test_no_import_cycles():
    known = modules()
    graph = {name: {dep for dep in imports(path, top_level_only=True) if dep in known and dep != name}
             for name, path in known.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name, trail):
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, trail + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
