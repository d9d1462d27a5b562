"""The folders are the architecture: imports follow the data flow, and no module imports in a circle.

Every import of every module is read from its source (function-local ones too, since a lazy
import is still a dependency). Allowed direction: launcher -> workers -> {models, manifests}.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("launcher", "manifests", "models", "workers")

# (importer prefix, imported prefix, why it must never exist)
FORBIDDEN = (
    ("models", "videofeat", "models import nothing of ours but their own layers"),
    ("manifests", "videofeat.workers", "manifests come before workers in the data flow"),
    ("manifests", "videofeat.launcher", "manifests come before the entry points"),
    ("manifests", "videofeat.models", "manifests know nothing of models"),
    ("workers", "videofeat.launcher", "workers are driven by the entry points, never the other way"),
    ("workers.reduce", "videofeat.workers.extract", "the reducer reads shards (workers/shard_io.py), not extraction"),
    ("workers.reduce", "videofeat.workers.finetune", "the reducer knows nothing of fine-tuning"),
    ("workers.finetune", "videofeat.workers.extract", "fine-tuning shares decoding (workers/decode), not extraction"),
    ("workers.decode", "videofeat.workers.extract", "decoding serves extraction and fine-tuning alike"),
    ("workers.decode", "videofeat.workers.finetune", "decoding serves extraction and fine-tuning alike"),
    ("workers.decode", "videofeat.workers.reduce", "decoding knows nothing of the reducer"),
)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["videofeat", *parts])


def imports_of(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from videofeat.x import y` may name a module y: count videofeat.x.y when it exists.
            for alias in node.names:
                yield f"{target}.{alias.name}", node.lineno
            yield target, node.lineno


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """Our modules -> the modules of ours they import (with the first line that does)."""
    files = {module_name(root, p): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    files["videofeat"] = root / "__init__.py"
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(path, module):
            if target in files and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def forbidden_arrows(graph: dict[str, dict[str, int]]) -> list[str]:
    found = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            for importer, imported, why in FORBIDDEN:
                inside = module == f"videofeat.{importer}" or module.startswith(f"videofeat.{importer}.")
                hits = target == imported or target.startswith(imported + ".")
                own = importer == "models" and (target == "videofeat.models" or target.startswith("videofeat.models."))
                if inside and hits and not own:
                    found.append(f"{module} (line {line}) imports {target}: {why}")
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            # A package importing its own submodule and back is a cycle too, except the
            # package root re-exporting: ``models/__init__`` -> ``models.factory`` is fine
            # as long as no submodule imports the package root.
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_forbidden_arrow():
    assert forbidden_arrows(import_graph(REPO)) == []


def test_no_import_cycle_between_our_modules():
    assert cycles(import_graph(REPO)) == []


def test_the_check_catches_a_forbidden_import_and_a_cycle(tmp_path):
    """Inject the faults into a copy of the tree: the same checks must name them."""
    copy = tmp_path / "tree"
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "__init__.py", copy / "__init__.py")
    with open(copy / "workers" / "reduce" / "merge.py", "a") as handle:
        handle.write("\n\ndef _late():\n    from videofeat.workers.extract.loop import ExtractConfig  # noqa\n")
    with open(copy / "manifests" / "windows.py", "a") as handle:
        handle.write("\nfrom videofeat.manifests.manifest import ManifestRow  # noqa\n")
    graph = import_graph(copy)
    arrows = forbidden_arrows(graph)
    assert any(a.startswith("videofeat.workers.reduce.merge") and "videofeat.workers.extract.loop" in a
               for a in arrows), arrows
    assert any({"videofeat.manifests.windows", "videofeat.manifests.manifest"} <= set(c) for c in cycles(graph))
