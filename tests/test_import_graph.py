"""packtune's import structure (``scripts/import_graph.py``): no circles between modules, no
arrow running back up its layers, and every import inside a function that points up is listed
with its reason. The tool is first shown to find each of these in a small package made for it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"


@pytest.fixture(scope="module")
def graph_tool():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "packtune" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "packtune"


def test_the_tool_finds_circles_upward_arrows_and_unlisted_lazy_imports(graph_tool, tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "config/__init__.py": "",
        "config/a.py": "from packtune.config import b\n",
        "config/b.py": "def f():\n    from packtune.config.a import x\n",      # lazy, but closes a circle
        "data/__init__.py": "",
        "data/d.py": "from packtune.recipe.r import run\n",                       # data -> recipe: up
        "data/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from packtune.recipe import r\n",
        "recipe/__init__.py": "",
        "recipe/r.py": "from packtune.data.d import y\nfrom packtune.config.a import z\n",
        "recipe/s.py": "def g():\n    from packtune.cli import main\n",             # lazy and up, unlisted
        "cli/__init__.py": "",
        "cli/main.py": "",
    })
    graph = graph_tool.edges(graph_tool.modules(pkg))
    assert ("packtune.data.e", "packtune.recipe.r") not in graph  # a TYPE_CHECKING import never runs
    assert graph_tool.circles(graph) == [["packtune.config.a", "packtune.config.b"],
                                         ["packtune.data.d", "packtune.recipe.r"]]
    arrows, lazy = graph_tool.upward(graph)
    assert arrows == [("packtune.data.d", "packtune.recipe.r")]
    assert lazy == [("packtune.recipe.s", "packtune.cli.main")]


def test_packtune_has_no_circles_and_no_arrows_running_back_up(graph_tool):
    mods = graph_tool.modules()
    for part in {graph_tool.part_of(m) for m in mods}:
        graph_tool.layer_of(part)  # every part has its layer (KeyError otherwise)
    graph = graph_tool.edges(mods)
    assert graph_tool.circles(graph) == []
    arrows, lazy = graph_tool.upward(graph)
    assert arrows == [] and lazy == []
    # Every listed lazy import still exists and is inside a function.
    for key in graph_tool.LAZY:
        assert graph.get(key) is True, key
