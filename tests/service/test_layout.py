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


def _numeric_constants(path: Path) -> list[str]:
    """Module-level ``MAX_*``/``MIN_*``/``RESCORE_*`` names bound to number literals in ``path``."""
    found: list[str] = []
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for name, value in zip(names, values, strict=False):
                literal = all(isinstance(n, ast.Constant | ast.BinOp | ast.operator) for n in ast.walk(value))
                if (
                    isinstance(name, ast.Name)
                    and name.id.startswith(("MAX_", "MIN_", "RESCORE_"))
                    and literal
                ):
                    found.append(f"{_module(path)}.{name.id}")
    return found


def test_every_limit_is_defined_in_limits_only():
    # "Every limit defined once": a module of service/ that writes its own MAX_/MIN_/RESCORE_
    # number keeps a second copy that can drift from the one /info and the docs show.
    stray = [c for p in SERVICE.rglob("*.py") if p.name != "limits.py" for c in _numeric_constants(p)]
    assert stray == []
    assert _numeric_constants(SERVICE / "limits.py")  # the scan does see constants


def test_stores_use_the_limits_of_limits():
    import inspect

    from service import limits
    from service.storage import validation
    from service.storage.store import CollectionStore

    assert validation.MAX_FILTER_KEYS == limits.MAX_FILTER_KEYS
    assert (
        inspect.signature(CollectionStore).parameters["max_metadata_bytes"].default
        == limits.MAX_METADATA_BYTES
    )
    try:
        from service.storage.postgres import PostgresStore
    except ImportError:  # psycopg missing: the SQLite store alone
        return
    assert (
        inspect.signature(PostgresStore).parameters["max_metadata_bytes"].default == limits.MAX_METADATA_BYTES
    )
