"""The layout is the architecture (docs/architecture.md): each package under egressd/ is one stage, imports go
only the allowed ways, no module reaches into another's privates, and modules stay small. Read from the
source with ast: no import of egressd happens here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "egressd"
STAGES = ("common", "model", "feed", "desired", "ruleset", "kernel", "intercept", "reconcile", "agent")
# What each package may import from egressd, besides itself. Data flows feed -> desired -> reconcile ->
# ruleset -> kernel; reconcile drives the last two, the agent wires everything, cli.py is the entry point.
ALLOWED = {
    "common": set(),
    "model": {"common"},
    "feed": {"common", "model"},
    "desired": {"common", "model"},
    "ruleset": {"common", "model", "desired"},
    "kernel": {"common", "model", "ruleset"},
    # The DNS proxy: judges names (ruleset), writes learned addresses and makes its sockets (kernel).
    "intercept": {"common", "model", "desired", "ruleset", "kernel"},
    "reconcile": {"common", "model", "desired", "ruleset", "kernel", "intercept"},
    "agent": {"common", "model", "feed", "desired", "ruleset", "kernel", "intercept", "reconcile"},
    "cli": {"common", "model", "feed", "desired", "ruleset", "kernel", "intercept", "reconcile", "agent"},
    "__main__": {"cli"},
    "__init__": set(),
}
MAX_LINES = 400
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60
LONG_REASON = "# long because"  # a longer function says why in a comment that starts so


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield rel, ast.parse(path.read_text())


def stage(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def egressd_imports(tree: ast.AST):
    """(module, names) of every `from egressd... import ...`, at any depth (function-level ones too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "egressd":
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("egressd."):
                    yield a.name, []


def test_every_module_lives_in_a_stage():
    loose = [str(rel) for rel, _ in modules() if len(rel.parts) == 1 and rel.stem not in ALLOWED]
    assert loose == []
    assert {rel.parts[0] for rel, _ in modules() if len(rel.parts) > 1} == set(STAGES)


def test_imports_go_only_the_allowed_ways():
    wrong = []
    for rel, tree in modules():
        own = stage(rel)
        for module, _ in egressd_imports(tree):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            if target != own and target != "__init__" and target not in ALLOWED[own]:
                wrong.append(f"{rel}: imports {module}")
    assert wrong == []


def test_no_module_imports_another_modules_privates():
    wrong = [
        f"{rel}: from {module} import {name}"
        for rel, tree in modules()
        for module, names in egressd_imports(tree)
        for name in names
        if name.startswith("_") and name != "__version__"
    ]
    assert wrong == []


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for rel, tree in modules():
        me = "egressd." + ".".join(rel.with_suffix("").parts)
        graph[me] = {m for m, _ in egressd_imports(tree) if m != me}
    seen, on_path, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in on_path:
            cycles.append([*on_path[on_path.index(node) :], node])
            return
        if node in seen or node not in graph:
            return
        seen.add(node)
        on_path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        on_path.pop()

    for node in sorted(graph):
        visit(node)
    assert cycles == []


def test_modules_stay_small():
    wrong = []
    for rel, _ in modules():
        lines = (PACKAGE / rel).read_text().count("\n")
        if lines > MAX_LINES:
            wrong.append(f"{rel}: {lines} lines (at most {MAX_LINES})")
    assert wrong == []


def test_classes_and_functions_stay_small():
    wrong = []
    for rel, tree in modules():
        source = (PACKAGE / rel).read_text().splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS_LINES:
                wrong.append(f"{rel}: class {node.name} is {size} lines (at most {MAX_CLASS_LINES})")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and size > MAX_FUNCTION_LINES:
                body = source[node.lineno - 1 : node.end_lineno]
                if not any(line.strip().startswith(LONG_REASON) for line in body):
                    wrong.append(f"{rel}: {node.name}() is {size} lines (at most {MAX_FUNCTION_LINES})")
    assert wrong == []
