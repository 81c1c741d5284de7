"""The house's shape: imports point one way through the stages, and no module imports itself
back through others (an import circle). Read from the source, function-level imports too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a module may import its own layer or those below, never one above.
LAYERS = (
    {"prostate_seg", "errors", "files", "settings", "runs", "jobs"},  # the base: run folders, jobs
    {"config"},  # composing configs (job names as a resolver)
    {"data", "models", "losses"},
    {"inference"},
    {"training"},
    {"study"},  # statistics and the report over the runs' folders
    {"command_line"},  # a command line checked against its configs
    {"cli", "__main__"},  # the commands
    {"hydra_plugins"},  # the sweeper and launchers Hydra finds, which check jobs as it does
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The project's modules ``path`` imports (``from a import b`` counts ``a.b`` if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for package in ("prostate_seg", "hydra_plugins")
             for p in (ROOT / package).rglob("*.py")}
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module and module.startswith("prostate_seg") else (
        module.split(".")[0])
    (index,) = [i for i, names in enumerate(LAYERS) if part in names]
    return index


def test_every_import_points_down_the_stages():
    upward = [f"{m} -> {d}" for m, deps in graph().items() for d in deps
              if layer(d) > layer(m)]
    assert not upward, upward


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(edges[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [module, dep]
            if dep not in state and (circle := visit(dep, path + [dep])):
                return circle
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (circle := visit(module, [module])):
            raise AssertionError(" -> ".join(circle))


def test_the_checks_see_an_upward_import_and_a_circle(monkeypatch):
    """The two checks above on a graph with a planted fault (they could not fail otherwise)."""
    planted = {"prostate_seg.data.split": {"prostate_seg.training.fit"},
               "prostate_seg.training.fit": {"prostate_seg.data.split"}}
    monkeypatch.setattr(__import__(__name__), "graph", lambda: planted)
    for check in (test_every_import_points_down_the_stages, test_no_import_circle):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} missed the planted fault")
