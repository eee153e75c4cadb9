"""The house rules that keep the package readable: imports point one way, modules stay short.

Every import counts, the lazy ones inside functions too: a lazy import that
closes a cycle is still a cycle for a reader.
"""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent
MAX_LINES = 500


def package_folders() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    found = {}
    for package, folder in sorted(package_folders().items(), key=lambda kv: -len(kv[0])):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.setdefault(".".join([package, *parts]), path)
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's own modules that ``name`` imports (top-level or lazily)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets |= {base} | {f"{base}.{a.name}" for a in node.names}
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name and not target.startswith(name + "."):
            resolved.add(target)
    return resolved


def stage(name: str) -> str:
    """The subpackage a module belongs to (``ifp_mlx.select``), or ``ifp_mlx`` for the root."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and (ROOT / "ifp_mlx" / parts[1]).is_dir()) else parts[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        deps = imports(name, path, known)
        # a package's __init__ and its own modules are one unit
        edges[name] = {d for d in deps if not d.startswith(name + ".") and not name.startswith(d + ".")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules():
    assert cycles(graph()) == []


def test_no_import_cycle_between_stages():
    stages: dict[str, set[str]] = {}
    for name, deps in graph().items():
        stages.setdefault(stage(name), set()).update(stage(d) for d in deps if stage(d) != stage(name))
    assert cycles(stages) == []


def test_the_stages_point_one_way():
    """model <- select <- gather/engine <- chat/serve/train/evaluate/bench <- cli; convert beside."""
    rank = {
        "ifp_mlx": 0, "ifp_mlx.model": 1, "ifp_mlx.data": 1, "ifp_mlx.select": 2, "ifp_mlx.gather": 2,
        "ifp_mlx.convert": 3, "ifp_mlx.engine": 3, "ifp_mlx.train": 4, "ifp_mlx.evaluate": 4,
        "ifp_mlx.bench": 4, "ifp_mlx.chat": 4, "ifp_mlx.serve": 4, "ifp_mlx.cli": 5, "ifp_mlx.metal_kernels": 0,
    }
    upward = [
        f"{name} -> {dep}" for name, deps in graph().items() for dep in deps
        if rank[stage(dep)] > rank[stage(name)]
    ]
    assert upward == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_is_short():
    long = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
