"""The package's shape: imports only go down the flow, no circle, short functions, a pinned surface.

The flow is solver -> stream -> sinks, with the public calls (``faces``) on top and a few modules
at the bottom that everything may share (``_result``, ``_control``, ``_exceptions``, ``events``).
``ALLOWED`` below is the rule as data: for each part of the package, the parts its modules may
import. ``docs/architecture.rst`` draws the same picture.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import nlsq_stream

PACKAGE = Path(nlsq_stream.__file__).parent
ROOT = "nlsq_stream"

# part -> the parts its modules may import (besides modules of their own part).
ALLOWED: dict[str, set[str]] = {
    # the bottom: shared values, imports nothing of the package (but events -> _result)
    "_result": set(),
    "_control": set(),
    "_exceptions": set(),
    # JAX's persistent compilation cache, off unless asked (bottom: imports nothing)
    "_compile_cache": set(),
    # running CPU programs on the calling thread, an explicit opt-in (bottom: imports nothing)
    "_dispatch": set(),
    # events may import _result: both are bottom-level value modules (FitFinished.result is an
    # OptimizeResult), and _result imports nothing of the package, so no circle can form
    "events": {"_result"},
    # the flow
    # the solver may read whether the compile cache is on (program_cache keeps its programs)
    "solver": {"_result", "_compile_cache"},
    "stream": {"solver", "events", "_result", "_control", "_exceptions"},
    "sinks": {"events", "_control"},
    # on top of the flow
    "faces": {"solver", "stream", "sinks", "_result", "_exceptions"},
    # fits in blocks with Dask (the dask extra): beside faces, each block one curve_fit_batch
    # (and _control: a job registers its id, so stop_fit(batch_id) stops it on every worker)
    "dask": {"faces", "solver", "stream", "sinks", "events", "_result", "_control", "_exceptions"},
    "async_logger": {"stream", "events", "_result"},
    "replay": {"events"},
    "notebook": {"sinks"},
    "benchmarks": {
        "dask",
        "faces",
        "solver",
        "stream",
        "sinks",
        "events",
        "_result",
        "_compile_cache",
        "_dispatch",
    },
    "cli": {"benchmarks", "faces", "events", "replay", "sinks", "_compile_cache"},
}

# Imports inside a function are allowed only where the target needs an optional extra, so that
# importing the package does not import it: (importing module, imported module).
LAZY_FOR_AN_EXTRA = {
    ("nlsq_stream.sinks.display", "nlsq_stream.sinks.widget"),
    # bench dask needs the dask extra: imported only when asked for
    ("nlsq_stream.benchmarks", "nlsq_stream.benchmarks.dask"),
}

MAX_FUNCTION_LINES = 80

# The public surface: the names each public module exports (a change here is an API change).
SURFACE = {
    "nlsq_stream": [
        "BatchFinished",
        "BatchProgress",
        "BatchResult",
        "BatchStarted",
        "FitError",
        "FitFailed",
        "FitFinished",
        "FitStarted",
        "FitStream",
        "Iteration",
        "OptimizeResult",
        "OptimizeWarning",
        "ReplayWarning",
        "SinkError",
        "async_logger",
        "curve_fit",
        "curve_fit_batch",
        "enable_compile_cache",
        "enable_inline_dispatch",
        "events",
        "fit_stream",
        "fit_stream_batch",
        "iter_events",
        "least_squares",
        "least_squares_batch",
        "least_squares_stream",
        "replay",
        "sinks",
        "stop_fit",
        "subscribe",
    ],
    "nlsq_stream.sinks": [
        "ConsoleSink",
        "JsonlSink",
        "LoggingSink",
        "default_display",
        "in_notebook",
    ],
    "nlsq_stream.events": [
        "BatchFinished",
        "BatchProgress",
        "BatchStarted",
        "Event",
        "EventBatch",
        "EventDecodeError",
        "FitFailed",
        "FitFinished",
        "FitStarted",
        "Iteration",
        "QUANTILES",
        "ROW_COLUMNS",
        "SCHEMA_VERSION",
        "TERMINAL",
        "event_from_dict",
        "event_from_json",
        "iterations_from_rows",
    ],
    "nlsq_stream.async_logger": [
        "FIT_ID",
        "is_jax_array",
        "log_convergence_async",
        "log_iteration_async",
        "logger",
    ],
    "nlsq_stream.replay": ["ReplayWarning", "iter_events", "replay"],
    "nlsq_stream.notebook": ["FitWidget", "MAX_POINTS", "in_notebook"],
    "nlsq_stream.dask": [
        "BlockFit",
        "BlockFitError",
        "BlockJob",
        "curvefit",
        "fit_blocks",
        "submit_blocks",
    ],
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _part(module: str) -> str:
    """The part of the package a module belongs to: ``nlsq_stream.stream.hub`` -> ``stream``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The package modules an ``import from`` names (``from . import x`` may name submodules)."""
    is_package = MODULES[module].name == "__init__.py"
    if node.level:
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith(ROOT):
        return []
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.append(sub if sub in MODULES else target)
    return found


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported package module, line, inside a function?) for every import in ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                out.extend((t, child.lineno, in_function) for t in _resolve(module, child))
            elif isinstance(child, ast.Import):
                out.extend(
                    (a.name, child.lineno, in_function)
                    for a in child.names
                    if a.name.startswith(ROOT)
                )
            visit(child, inner)

    visit(tree, False)
    return out


def test_every_part_of_the_package_has_a_rule():
    parts = {_part(m) for m in MODULES} - {"__init__"}
    assert parts <= set(ALLOWED), f"parts without a rule in ALLOWED: {parts - set(ALLOWED)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down_the_flow(module):
    part = _part(module)
    if part == "__init__":
        return  # the package's face re-exports the public names
    bad = [
        f"line {line}: {module} imports {target} ({_part(target)} is not below {part})"
        for target, line, _ in _imports(module)
        if _part(target) != part and _part(target) not in ALLOWED[part]
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_inside_a_function_dodges_the_rule(module):
    bad = [
        f"line {line}: {module} imports {target} inside a function"
        for target, line, lazy in _imports(module)
        if lazy and (module, target) not in LAZY_FOR_AN_EXTRA
    ]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph = {m: {t for t, _, lazy in _imports(m) if t != m} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if t not in MODULES:
                continue
            if state.get(t) == 1:
                circle = [*path[path.index(t) :], t]
                pytest.fail("import circle: " + " -> ".join(circle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_rule_catches_an_import_back_up_the_flow(tmp_path, monkeypatch):
    # The checker itself, on a module written to break the rule: a sink importing the solver.
    bad = PACKAGE / "sinks" / "console.py"
    source = bad.read_text(encoding="utf-8") + "\nfrom ..solver import engine\n"
    fake = tmp_path / "console.py"
    fake.write_text(source, encoding="utf-8")
    monkeypatch.setitem(MODULES, "nlsq_stream.sinks.console", fake)
    with pytest.raises(AssertionError, match=r"imports nlsq_stream\.solver\.engine"):
        test_imports_only_go_down_the_flow("nlsq_stream.sinks.console")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_are_short(module):
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    long = [
        f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in {module}: {long}"


@pytest.mark.parametrize("name", sorted(SURFACE))
def test_public_surface_is_pinned(name):
    if name == "nlsq_stream.notebook":
        pytest.importorskip("anywidget", reason="the notebook extra is not installed")
    if name == "nlsq_stream.dask":
        pytest.importorskip("dask", reason="the dask extra is not installed")
    module = importlib.import_module(name)
    assert sorted(module.__all__) == SURFACE[name]
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.__all__ names {attr}, which it does not define"


@pytest.mark.parametrize("part", ["solver", "stream", "sinks", "faces", "benchmarks", "cli"])
def test_every_subpackage_says_what_it_owns(part):
    doc = importlib.import_module(f"{ROOT}.{part}").__doc__
    assert doc and len(doc.split()) >= 30, f"nlsq_stream.{part} needs a docstring paragraph"
