"""The layout's rules, read from the code's own imports: no import circles, the library never imports the Ray shell
(`actors/`) or the entry points (`jobs/`), and the maths (algorithms, rewards, diffusion, rollout, training) imports
no Ray. Imports inside functions count; imports under `if TYPE_CHECKING:` do not (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ralign", "actors", "jobs")
RAY_FREE = ("ralign.algorithms", "ralign.rewards", "ralign.diffusion", "ralign.rollout", "ralign.training",
            "ralign.models", "ralign.world")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        raw = _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py")
        graph[name] = {m for m in raw if m in modules and m != name} | {m for m in raw if m.split(".")[0] == "ray"}
    return graph


def test_no_import_circles():
    graph = {k: {m for m in v if not m.startswith("ray")} for k, v in import_graph().items()}
    # A package's __init__ that only hands names on (ralign.ops.k8s) is its face, not a room of its own: importing
    # `ralign.ops.k8s.render` runs it, but it is not part of a loop through its children.
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_library_never_imports_the_shell_or_the_entry_points():
    offenders = {m: sorted(i for i in deps if i.split(".")[0] in ("actors", "jobs"))
                 for m, deps in import_graph().items() if m.split(".")[0] == "ralign"}
    assert not {m: d for m, d in offenders.items() if d}


def test_the_maths_imports_no_ray():
    offenders = {m: sorted(i for i in deps if i.split(".")[0] == "ray")
                 for m, deps in import_graph().items() if m.startswith(RAY_FREE)}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_reward_can_reach_the_oracle():
    """The oracle only measures: no reward, reward model, algorithm or the rollout path may import it, directly or
    through other modules (the reward registry's builders are named in strings, so they are walked too)."""
    graph = import_graph()
    registry = ROOT / "ralign" / "rewards" / "registry.py"
    builders = {line.split('"')[3].split(":")[0] for line in registry.read_text().splitlines() if '": "ralign.rewards.' in line}
    assert "ralign.rewards.clip_score" in builders

    def reached(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    guarded = [m for m in graph if m.startswith(("ralign.rewards", "ralign.models", "ralign.algorithms", "ralign.rollout"))]
    offenders = sorted(m for m in set(guarded) | builders if "ralign.world.oracle" in reached(m))
    assert not offenders, f"these reach ralign.world.oracle: {offenders}"


def test_the_walk_sees_imports_inside_functions_and_skips_type_checking_blocks():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import actors.rollout\ndef f():\n    import jobs.cli\n"
    assert _imports(ast.parse(source), "ralign.x", False) >= {"jobs.cli"}
    assert "actors.rollout" not in _imports(ast.parse(source), "ralign.x", False)
