"""The import structure of ``src/packtune``: circles between modules, and arrows running back up.

Each part of packtune (a subpackage, or a top-level module) sits in one layer of ``LAYERS``,
lowest first. A module may import modules of its own part and of lower layers; an import of a
higher layer is an arrow running back up. Only imports that run when a module is imported count
(``if TYPE_CHECKING:`` imports never run). An import inside a function runs later, on a call;
it counts like the others (for circles too), unless ``LAZY`` lists it with the reason.

    python scripts/import_graph.py [SRC/packtune]   # circles, upward arrows, unlisted lazy ones

``tests/test_import_graph.py`` asserts there are no circles and no upward arrows.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "packtune"

#: packtune's parts, lowest layer first; parts in one tuple share a layer and do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("configs",),                # the bundled config files, read by the loader; they import nothing
    ("config",),                 # settings, their choices and checks: no torch
    ("errors",),                 # errors that end a run in one line, raised by several layers
    ("packtune",),               # the package root: version, lazy names, registration hooks
    ("attention",),              # varlen kernels and the transformers attention function
    ("parallel",),               # sequence parallelism around the attention
    ("layers",),                 # varlen forms of layers with state (scans, convolutions) and odd attention
    ("packing",),                # packs, plans and batches (a Batch carries a parallel context)
    ("data", "loss"),            # rows to packed datasets; the loss over packed rows
    ("modeling",),               # a model switched to varlen attention
    ("ports", "loss_head"),      # native classes of remote-code families; the chunked loss head
    ("distributed",),            # processes and ranks
    ("preference",),             # preference pairs and their objectives (DPO, SimPO, ORPO, reward)
    ("recipe",),                 # the training loop and its engines
    ("convert", "demo_data"),    # checkpoint conversion; the demo's data
    ("cli",),                    # the command line
    ("demo", "__main__"),        # the demo command; python -m packtune
)

#: Imports inside functions allowed to point up (or to close a circle), each with why it is
#: there: ``(module, imported) -> reason``.
LAZY: dict[tuple[str, str], str] = {
    ("packtune", "packtune.attention.hf"):
        "registers the attention the moment transformers' modeling code is imported, not on import packtune",
    ("packtune", "packtune.ports.baichuan_alibi_config"):
        "registers baichuan_alibi with AutoConfig the moment transformers' Auto classes are imported",
    ("packtune.data.tokenizer_loader", "packtune.ports.family_tokenizers"):
        "a remote-code family's tokenizer is built by its port from the checkpoint's data files, never its code",
    ("packtune.ports.baichuan_alibi_config", "packtune.ports.baichuan_alibi"):
        "the model class is registered with its first config, never inside transformers' own imports",
}


def part_of(module: str) -> str:
    """``packtune.data.turns`` -> ``data``; ``packtune`` -> ``packtune``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "packtune"


def layer_of(part: str) -> int:
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise KeyError(f"{part!r} has no layer: add it to LAYERS in {__file__}")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        out[name] = path
    return out


def _imports(node: ast.AST, local: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for other in child.orelse:  # the else branch runs
                yield from _imports(other, local)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        yield from _imports(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def edges(mods: dict[str, Path]) -> dict[tuple[str, str], bool]:
    """``(importer, imported) -> lazy`` for every import of one packtune module by another
    (``lazy``: only inside functions)."""
    out: dict[tuple[str, str], bool] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for stmt, local in _imports(ast.parse(path.read_text()), False):
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            else:
                base = stmt.module or ""
                if stmt.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - stmt.level + 1] + ([base] if base else []))
                # ``from P import m``: the module P.m when there is one (P itself is only its
                # parent, imported first by any import of a submodule), else P's name m.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in stmt.names]
            for target in targets:
                if target in mods and target != name:
                    key = (name, target)
                    out[key] = out.get(key, True) and local
    return out


def circles(graph: dict[tuple[str, str], bool]) -> list[list[str]]:
    """The import circles (strongly connected groups of modules), ``LAZY`` imports left out."""
    nexts: dict[str, list[str]] = {}
    for (a, b), lazy in graph.items():
        if not (lazy and (a, b) in LAZY):
            nexts.setdefault(a, []).append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in nexts.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(nexts):
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[tuple[str, str], bool]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(arrows, lazy)``: module-level imports of a higher layer (or of another part of the same
    layer), and function-local ones that ``LAZY`` does not list."""
    arrows, lazy = [], []
    for (a, b), is_lazy in sorted(graph.items()):
        pa, pb = part_of(a), part_of(b)
        if pa == pb:
            continue
        up = layer_of(pb) >= layer_of(pa)
        if up and not is_lazy:
            arrows.append((a, b))
        elif up and (a, b) not in LAZY:
            lazy.append((a, b))
    return arrows, lazy


def main(argv: list[str]) -> int:
    graph = edges(modules(Path(argv[0]) if argv else ROOT))
    found = circles(graph)
    arrows, lazy = upward(graph)
    print(f"{len(found)} circles")
    for group in found:
        print("  " + " <-> ".join(group))
    print(f"{len(arrows)} arrows running back up")
    for a, b in arrows:
        print(f"  {a} ({part_of(a)}) -> {b} ({part_of(b)})")
    print(f"{len(lazy)} unlisted upward imports inside functions")
    for a, b in lazy:
        print(f"  {a} -> {b}")
    return 1 if found or arrows or lazy else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
