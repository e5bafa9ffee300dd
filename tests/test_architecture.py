"""The layering of docs/architecture.md, kept true: imports go down, never sideways or up, and never round in a circle.

    mvlm (the application)  ->  mvlm_convert | mvlm_bench (the two sides)  ->  mvlm_core (the base)

The import graph is read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import``
counts, at module level or inside a function. ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mvlm", "mvlm_core", "mvlm_convert", "mvlm_bench", "mvlm_tune")
# what each package may import from the project (itself always)
ALLOWED = {
    "mvlm_core": set(),
    "mvlm_convert": {"mvlm_core"},
    "mvlm_bench": {"mvlm_core"},
    "mvlm_tune": {"mvlm_core", "mvlm_convert", "mvlm_bench"},  # tune composes both sides
    "mvlm": {"mvlm_core", "mvlm_convert", "mvlm_bench", "mvlm_tune"},
}
# third-party imports of the base: the GGUF library, numpy, and the bindings the host backend calls
CORE_THIRD_PARTY = {"gguf", "numpy", "llama_cpp", "rich", "PIL"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported name, line) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:
                full = f"{source}.{a.name}"
                out.append((full if full in MODULES else source, node.lineno))
    return out


def _project_module(name: str) -> str | None:
    """The project module an imported name lands in (its longest known prefix), None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}."""
    g: dict[str, dict[str, int]] = {}
    for mod, path in MODULES.items():
        edges: dict[str, int] = {}
        for name, line in _imports(mod, path):
            target = _project_module(name)
            if target is not None and target != mod:
                edges.setdefault(target, line)
        g[mod] = edges
    return g


GRAPH = _graph()


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_packages_exist():
    for pkg in PACKAGES:
        assert (REPO / pkg / "__init__.py").is_file(), f"{pkg}/__init__.py missing"
    assert (REPO / "mvlm" / "__main__.py").is_file(), "python -m mvlm needs mvlm/__main__.py"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_down(package):
    wrong = [
        f"{MODULES[mod].relative_to(REPO)}:{line} imports {target}"
        for mod, edges in sorted(GRAPH.items()) if _top(mod) == package
        for target, line in sorted(edges.items())
        if _top(target) != package and _top(target) not in ALLOWED[package]
    ]
    may = ", ".join(sorted(ALLOWED[package])) or "no other project package"
    assert not wrong, f"{package} may import {may} (docs/architecture.md):\n" + "\n".join(wrong)


def test_the_base_needs_no_heavy_third_party_package():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = []
    for mod, path in MODULES.items():
        if _top(mod) != "mvlm_core":
            continue
        for name, line in _imports(mod, path):
            top = name.split(".")[0]
            if top not in stdlib and top not in PACKAGES and top not in CORE_THIRD_PARTY:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not wrong, f"mvlm_core may import the standard library and {sorted(CORE_THIRD_PARTY)}:\n" + "\n".join(wrong)


def _find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, {})))))
    return None


def test_no_import_cycles():
    cycle = _find_cycle(GRAPH)
    if cycle:
        steps = [f"{a} ({MODULES[a].relative_to(REPO)}:{GRAPH[a][b]}) -> {b}"
                 for a, b in zip(cycle[:-1], cycle[1:], strict=True)]
        pytest.fail("import cycle: " + " -> ".join(cycle) + "\n" + "\n".join(steps))


def test_the_cycle_finder_finds_a_cycle():
    g = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert _find_cycle(g) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1}}) is None


@pytest.mark.slow
def test_nothing_refers_outside_the_repository():
    needle = "../" + "shared"  # built, so this file does not find itself
    skip = {".git", ".venv", "build", "dist", "out", "__pycache__", ".ruff_cache", ".pytest_cache"}
    hits = []
    for f in sorted(REPO.rglob("*")):
        if f.suffix not in (".py", ".md") or skip & set(f.relative_to(REPO).parts) or not f.is_file():
            continue
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if needle in line:
                hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "files outside the repository are referred to (copy what the tests need into tests/data):\n" + \
        "\n".join(hits)


@pytest.mark.slow
def test_the_cli_starts_without_the_numeric_libraries():
    """`mvlm --help` and a refused `mvlm bench` load neither numpy, gguf-py nor torch: every command's start and every
    one-line refusal would otherwise pay for them (measured: 0.34 s -> 0.24 s for a refused bench)."""
    import subprocess

    probe = ("import sys, runpy; sys.argv = ['mvlm'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('mvlm', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print(sorted(m for m in ('numpy', 'gguf', 'torch') if m in sys.modules), file=sys.stderr)")
    for args in (["--help"], ["bench", "--device", "local", "--model", "/nonexistent.gguf"]):
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.stderr.strip().splitlines()[-1] == "[]", (args, r.stderr)


# --- the bench pipeline (docs/architecture.md, "The bench side is one streaming pipeline") ---------------------------
# The stages of mvlm_bench, top to bottom: a module may import its own stage and the ones below it.
STAGES = ("cli", "sinks", "papers", "views", "decide", "session", "history", "records", "plan", "device")


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "mvlm_bench" and parts[1] in STAGES else None


def test_the_bench_side_is_the_pipelines_stages_and_nothing_else():
    loose = sorted(str(f.relative_to(REPO)) for f in (REPO / "mvlm_bench").glob("*.py") if f.name != "__init__.py")
    assert not loose, f"every mvlm_bench module belongs to a stage ({', '.join(STAGES)}): {loose}"
    assert {p.name for p in (REPO / "mvlm_bench").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(STAGES)


def test_the_pipelines_stages_import_downwards():
    wrong = []
    for mod, edges in sorted(GRAPH.items()):
        here = _stage(mod)
        if here is None:
            continue
        for target, line in sorted(edges.items()):
            there = _stage(target)
            if there is not None and STAGES.index(there) < STAGES.index(here):
                wrong.append(f"{MODULES[mod].relative_to(REPO)}:{line} ({here}) imports {target} ({there})")
    assert not wrong, "a stage imports only itself and the stages below it:\n" + "\n".join(wrong)


def test_cli_modules_never_import_one_another():
    wrong = [f"{MODULES[mod].relative_to(REPO)}:{line} imports {target}"
             for mod, edges in sorted(GRAPH.items()) if mod.startswith("mvlm_bench.cli.")
             for target, line in sorted(edges.items()) if target.startswith("mvlm_bench.cli")]
    assert not wrong, "a CLI module parses options, calls the library and prints; shared code is library code:\n" + \
        "\n".join(wrong)


@pytest.mark.slow
def test_tests_import_no_logic_from_cli_modules():
    wrong = []
    for f in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "mvlm_bench.cli" or n.startswith("mvlm_bench.cli.") for n in names):
                wrong.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert not wrong, "tests reach commands through `mvlm ...` and logic through the library, never mvlm_bench.cli:\n" + \
        "\n".join(wrong)


def _private_uses() -> list[str]:
    """``from project.module import _name`` and ``module._name`` across modules (dunder names aside)."""
    out = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and _top(node.module) in PACKAGES:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        out.append(f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{a.name}")
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name: a.name for a in node.names if _top(a.name) in PACKAGES}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                out.append(f"{path.relative_to(REPO)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return out


@pytest.mark.slow
def test_no_private_name_is_used_from_another_module():
    wrong = _private_uses()
    assert not wrong, "a name another module needs is public (no leading underscore):\n" + "\n".join(wrong)


MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


@pytest.mark.slow
def test_no_function_over_80_lines_and_no_bench_module_over_600():
    long_functions, long_modules = [], []
    for mod, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if mod.startswith("mvlm_bench") and len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long_functions)
    assert not long_modules, f"bench modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long_modules)


def test_only_the_device_layer_knows_transport_kinds():
    """Outside mvlm_bench/device, nothing compares a transport's kind (``profile.transport == "adb"``) nor tests a
    transport's class (``isinstance(t, LocalTransport)``): it asks ``transport.capabilities``."""
    kinds = {"local", "ssh", "adb"}
    wrong = []
    for mod, path in MODULES.items():
        if not mod.startswith("mvlm_bench.") or mod.startswith("mvlm_bench.device"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                names = [s for s in sides if isinstance(s, ast.Attribute) and s.attr in ("transport", "kind")]
                strings = [s for s in sides if isinstance(s, ast.Constant) and s.value in kinds]
                tuples = [s for s in sides if isinstance(s, ast.Tuple | ast.Set | ast.List)
                          and any(isinstance(e, ast.Constant) and e.value in kinds for e in s.elts)]
                if names and (strings or tuples):
                    wrong.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" and \
                    any(isinstance(a, ast.Name) and a.id.endswith("Transport") for a in ast.walk(node.args[1])):
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not wrong, "ask transport.capabilities instead:\n" + "\n".join(wrong)
