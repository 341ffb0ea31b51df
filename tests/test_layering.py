"""Imports flow one way — config → kernels / ops → model → convert → pretrained → distill → parallel → train →
cli — with no cycles, counting imports inside functions too (they hide a cycle; they do not remove it)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [("kdarch.checks", "kdarch.io", "kdarch.config", "kdarch.testing"), ("kdarch.kernels",), ("kdarch.ops",),
          ("kdarch.model",), ("kdarch.convert",), ("kdarch.pretrained",), ("kdarch.distill",), ("kdarch.parallel",),
          ("kdarch.train",),
          ("kdarch.cli", "kdarch.__main__", "kdarch")]


def modules() -> dict[str, Path]:
    found = {}
    for base, pkg in ((ROOT / "kdarch", "kdarch"), (ROOT / "kernels", "kdarch.kernels")):
        for f in base.rglob("*.py"):
            parts = f.relative_to(base).with_suffix("").parts
            name = ".".join((pkg, *parts))
            found[name.removesuffix(".__init__")] = f
    return found


def layer(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    return best[0]


def imports(name: str, file: Path, known) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:  # `from pkg import mod` imports pkg.mod
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            targets = subs or [node.module]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("kdarch"):
                out.add(t)
    return out


def test_imports_flow_one_way_without_cycles():
    known = modules()
    graph = {m: imports(m, f, known) for m, f in known.items()}
    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts
                    if layer(t) > layer(m) and m != "kdarch")  # the top-level package re-exports the API
    assert not upward, upward
    # no cycle among modules (a package's __init__ re-exporting its own modules is not one)
    edges = {m: {t for t in ts if not m.startswith(t + ".") and t != m.rpartition(".")[0]} for m, ts in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in edges.get(m, ()):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2
    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, cycles
