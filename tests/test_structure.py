"""The package's import structure: layers import only downward, no cycles, the record stays torch-free.

Layers, bottom to top (a module may import its own package and any lower layer):

    0  data, limits                      the shipped offline data; operator limits (environment)
    1  analysis, methods                 the math: ΔM/ΔD, the adapter registry
    2  config                            RunConfig (its run order asks the registry which methods take a rank)
    3  record                            torch-free: events, the accumulator, tables, files, schema
    4  engine                            models, tasks, the one training loop (emits record events)
    5  figures, teach                    plotly figures of a record; lessons, cards, memory bill
    6  ui, api                           the Gradio app; the one-import Python API
    6  cli_output                        what the command line prints (progress, the results table)
    6.5 cli_claims, cli_runs             `bora-lab reproduce` (the paper claims); `predict` and `export` (a trained run)
    7  cli                               the command line (its `app` command opens the ui)

Checked on the source text (``ast``), so every import counts, including those inside functions.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "bora_lab"
LAYERS = {"data": 0, "limits": 0, "analysis": 1, "methods": 1, "config": 2, "record": 3, "engine": 4, "figures": 5,
          "teach": 5, "ui": 6, "api": 6, "cli_output": 6, "cli_claims": 6.5, "cli_runs": 6.5, "cli": 7, "__main__": 8, "__init__": 0}


def _unit(module: str) -> str:
    """``bora_lab.engine.trainer`` -> ``engine``; ``bora_lab`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> dict[str, set[str]]:
    """module name -> the bora_lab modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("bora_lab")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("bora_lab"):
                    target = node.module
                else:
                    continue
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names if (PKG.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                          or (PKG.parent / f"{target}.{a.name}".replace(".", "/")).is_dir()}
        graph[name] = found
    return graph


def test_imports_go_only_downward():
    upward = []
    for module, targets in _imports().items():
        for target in targets:
            src, dst = _unit(module), _unit(target)
            if src != dst and dst != "__init__" and LAYERS[dst] >= LAYERS[src]:
                upward.append(f"{module} -> {target} ({src} layer {LAYERS[src]}, {dst} layer {LAYERS[dst]})")
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    imports = _imports()
    graph = {m: {t for t in ts if t in imports and t != m} for m, ts in imports.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt == node.rpartition(".")[0] or node.startswith(nxt + "."):
                continue  # a module importing its own package's __init__ (re-exports) is not a cycle
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_package_has_a_layer():
    units = {_unit(m) for m in _imports()}
    assert units <= set(LAYERS), f"packages without a layer: {units - set(LAYERS)}"


@pytest.mark.parametrize("module", ["bora_lab.record", "bora_lab.figures", "bora_lab.config"])
def test_record_and_figures_load_no_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules, 'gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr
