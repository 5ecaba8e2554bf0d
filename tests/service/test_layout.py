"""The layout of ``service/`` shows the data flow: checked on the import graph."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"


def _module(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the service modules it imports, anywhere in the file (lazy imports too)."""
    graph: dict[str, set[str]] = {}
    for path in SERVICE.rglob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
                deps.add(node.module)
                deps.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("service"))
        graph[_module(path)] = deps
    return {name: {d for d in deps if d in graph and d != name} for name, deps in graph.items()}


def test_no_import_cycles_between_modules():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            if dep == "service" or name.startswith(dep + "."):
                continue  # a package importing its own parts, or the root package
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_inference_and_storage_know_nothing_about_http():
    for name, deps in import_graph().items():
        if name.startswith(("service.inference", "service.storage")):
            web = sorted(d for d in deps if d.startswith("service.http") or d == "service.settings")
            assert not web, f"{name} imports {web}"


def test_every_limit_of_the_api_shapes_comes_from_limits():
    from service import limits
    from service.http import schemas

    search = schemas.SearchRequest.model_json_schema()["properties"]["k"]
    assert search["maximum"] == limits.MAX_K
    doc_id = schemas.DocumentIn.model_json_schema()["properties"]["id"]
    assert doc_id["maxLength"] == limits.MAX_ID_CHARS
