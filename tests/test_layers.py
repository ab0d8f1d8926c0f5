"""The engine's layers (CONTRIBUTING.md, "Layers"): imports only go down, and there is no circle.

Every import statement of ``editor/`` and ``ui/`` counts, wherever it stands (module
level, inside a function, under ``TYPE_CHECKING``): a type-only import that runs upward
is still a dependency upward. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: module -> layer; a module may import modules of its own layer or below, never above
LAYERS: dict[str, int] = {
    # 0: plain data and pure functions (no loaded model)
    "editor.options": 0, "editor.progress": 0, "editor.prompts": 0, "editor.plan": 0,
    "editor.ddim": 0, "editor.images": 0, "editor.scenes": 0, "editor.metrics": 0,
    "editor.fileio": 0, "editor.compose": 0,
    # 1: the loaded model and its primitives
    "editor.loading": 1, "editor.model": 1,
    # 2: the algorithms
    "editor.attention": 2, "editor.blending": 2, "editor.embeddings": 2, "editor.fastpath": 2, "editor.fastedit": 2,
    "editor.inversion": 2, "editor.sampling": 2, "editor.editing": 2,
    # 3: the facade
    "editor.facade": 3,
    # 4: what the faces share
    "editor.cache": 4, "editor.manifest": 4,
    # 5: batch runs, comparisons, benchmarks
    "editor.batch": 5, "editor.compare": 5, "editor.bench": 5,
    "editor.ray_engine": 5,
    # 6: the faces a person runs, and the package's public surface
    "editor.cli": 6, "editor.__main__": 6, "editor": 6, "ui.app": 6, "ui": 6,
}
#: the only import of the web app from the engine's package: ``pivot-edit ui`` starts it
ALLOWED_UI_IMPORTERS = {"editor.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("editor", "ui"):
        for path in sorted((ROOT / pkg).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Our modules that ``name`` imports (resolved relative imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            known = set(_modules())
            subs = {f"{mod}.{a.name}" for a in node.names} & known  # "from . import x"
            found.update(subs or {mod})
    known = set(_modules())
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in _modules().items()}


def test_every_module_has_a_layer():
    missing = sorted(set(_modules()) - set(LAYERS))
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_imports_only_go_down():
    bad = _upward(_graph())
    assert not bad, "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})"
            for src, dsts in graph.items() for dst in sorted(dsts) if LAYERS[dst] > LAYERS[src]]


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_engine_never_imports_gradio_or_the_web_app():
    for name, path in _modules().items():
        if not name.startswith("editor"):
            continue
        tree = ast.parse(path.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m.split(".")[0] == "gradio" for m in mods), name
        if name not in ALLOWED_UI_IMPORTERS:
            assert not any(m.split(".")[0] == "ui" for m in mods), name


def test_the_checker_sees_violations(tmp_path, monkeypatch):
    """The checker itself: an upward import and a circle in a scratch package are found."""
    pkg = tmp_path / "editor"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text("from .facade import Editor\n")  # 1 -> 3: upward
    (pkg / "facade.py").write_text("from . import model\n")
    (tmp_path / "ui").mkdir()
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    graph = _graph()
    assert graph["editor.model"] == {"editor.facade"} and graph["editor.facade"] == {"editor.model"}
    assert _upward(graph) == ["editor.model (layer 1) imports editor.facade (layer 3)"]
    assert _cycle(graph) in (["editor.facade", "editor.model", "editor.facade"],
                             ["editor.model", "editor.facade", "editor.model"])
