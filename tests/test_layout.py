"""The house is one-way (DESIGN.md §Layout): no import circle, counting imports made inside
functions, and none of the arrows the design forbids. Read from the source (AST), not by
importing, so an arrow on a rarely taken code path counts as much as one at the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "attnflow_zoo"
CLI = ROOT / "cli"

#: The floor of the house: these import only each other (and torch / the standard library).
GROUND = ("errors", "settings", "_io", "progress", "precision", "compilation",
          "online", "resources", "guidance", "core", "layers", "logdet_estimators", "priors")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    base = current.split(".") if current else []
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *(target.split(".") if target else [])])


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(package modules, top-level external packages) that ``name`` imports anywhere."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inner, outer = set(), set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("attnflow_zoo"):
                    inner.add(alias.name.removeprefix("attnflow_zoo").lstrip("."))
                else:
                    outer.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("attnflow_zoo"):
                    target = node.module.removeprefix("attnflow_zoo").lstrip(".")
                else:
                    outer.add((node.module or "").split(".")[0])
                    continue
            else:
                target = _resolve(name, is_package, node.level, node.module)
            for alias in node.names:  # `from .models import attnflow` names a submodule
                sub = f"{target}.{alias.name}" if target else alias.name
                inner.add(sub if sub in modules else target)
    inner.discard(name)
    return {m for m in inner if m in modules}, outer


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    edges, external = {}, {}
    for name, path in modules.items():
        edges[name], external[name] = _imports(name, path, modules)
    return edges, external


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def _in(module: str, *groups: str) -> bool:
    return any(module == g or module.startswith(g + ".") for g in groups)


def test_the_graph_is_read() -> None:
    edges, external = _graph()
    assert "factory" in edges["training.preset"] and "core" in edges["layers.linear"]
    assert "models.attnflow" in edges["factory"]  # `from .models import attnflow` is seen
    assert "torch" in external["core"]


def test_no_import_circle() -> None:
    edges, _ = _graph()
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


FORBIDDEN = [
    # (importer groups, imported groups, why)
    (GROUND, ("registry", "checkpoint", "hub", "metrics", "models", "factory", "data", "training",
              "evaluation", "publishing", "workflows", "testing"),
     "the ground floor imports nothing above it"),
    (("registry",), tuple(m for m in _modules() if m not in ("errors", "settings", "registry")),
     "the registry is a leaf (its recipes speak the training vocabulary of settings)"),
    (("checkpoint", "hub"), ("models", "factory", "training", "evaluation", "publishing",
                             "workflows"),
     "the on-disk format knows no models and renders no card"),
    (("models",), ("factory", "training", "evaluation", "publishing", "workflows"),
     "models know nothing of what uses them"),
    (("data",), ("models", "factory", "training", "evaluation", "publishing", "workflows"),
     "data knows no models"),
    (("training",), ("evaluation", "publishing", "workflows"),
     "training knows nothing of what scores or publishes it"),
    (("evaluation",), ("publishing", "workflows"), "evaluation publishes nothing"),
    (("publishing",), ("workflows",), "publishing runs no workflow"),
]


@pytest.mark.parametrize("importers,imported,why", FORBIDDEN)
def test_no_forbidden_arrow(importers: tuple[str, ...], imported: tuple[str, ...],
                            why: str) -> None:
    edges, _ = _graph()
    bad = sorted(f"{a} -> {b}" for a, targets in edges.items() if _in(a, *importers)
                 for b in targets if _in(b, *imported))
    assert not bad, f"{why}: {bad}"


def test_third_party_arrows() -> None:
    _, external = _graph()
    core = external["core"] - set(sys.stdlib_module_names)
    assert core == {"torch"}, core
    assert not (external["registry"] - set(sys.stdlib_module_names))
    for module, packages in external.items():
        assert not packages & {"typer", "attnflow_cli", "click"}, module
        # online's one job is asking huggingface_hub whether the Hub can be reached; it imports
        # it inside functions (test_importing_layers_loads_no_hub checks the ground stays light).
        if _in(module, *GROUND) and module != "online":
            assert not packages & {"huggingface_hub", "safetensors"}, module


def test_cli_imports_no_torch() -> None:
    for path in CLI.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "torch" for n in names), path.name


def test_importing_layers_loads_no_hub() -> None:
    code = ("import sys, attnflow_zoo.layers, attnflow_zoo.priors, attnflow_zoo.core; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('huggingface_hub', 'safetensors', 'datasets', 'typer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out


#: Functions a reader can hold (STYLE.md rule 10): lines from ``def`` to the end.
MAX_FUNCTION_LINES = 80
#: Files may grow where one idea needs it (a model file with its presets), this far.
MAX_FILE_LINES = 700


def test_library_functions_are_short_enough_to_hold() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert not long, long


def test_library_files_stay_under_the_cap() -> None:
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= MAX_FILE_LINES, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_no_library_function_is_over_mccabe_12() -> None:
    """ruff's C901 with pyproject's max-complexity (12): the same rule the lint job runs."""
    pytest.importorskip("ruff")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "C901",
                           "--output-format", "concise", str(PACKAGE)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_every_public_module_is_reachable_from_the_package() -> None:
    """``az.<name>`` reaches a module of that name (``az.recipes``, ``az.precision``,
    ``az.latents`` ...): the package lists its public names once and finds its submodules."""
    import attnflow_zoo as az

    for name in _modules():
        short = name.split(".")[-1] if name else ""
        if not short or short.startswith("_"):
            continue
        assert getattr(az, short).__name__.split(".")[-1] == short, name


def test_an_empty_registry_says_where_presets_come_from() -> None:
    """In a fresh interpreter the registry alone holds no preset (the model modules register
    them when ``factory`` is imported): it says so rather than "unknown model", and after
    ``az.list_models()`` the same lookup finds the preset."""
    code = ("import attnflow_zoo.registry as r, attnflow_zoo as az\n"
            "try:\n    r.get_entry('tarflow_digits')\nexcept az.ConfigError as e:\n    print(e)\n"
            "az.list_models()\nprint(r.preset_config('tarflow_digits').width)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()
    assert "No preset is registered yet" in out[0] and "attnflow_zoo.factory" in out[0]
    assert out[1] == "128"
