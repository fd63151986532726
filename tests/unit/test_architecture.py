"""The package's import graph, read from the source with `ast`: no module imports itself back at run time (at
module level or inside a function; `if TYPE_CHECKING:` blocks aside), every import goes down the layers of
docs/architecture.md (or stays in its layer), and no underscore-prefixed name crosses a module boundary."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = "diffusionlens"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE


@dataclass
class ModuleImports:
    """What one module imports from the package: the modules it loads, and the names it takes from them."""

    edges: set[str] = field(default_factory=set)
    private_names: list[tuple[str, str, int]] = field(default_factory=list)  # (source module, name, line)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(path): path for path in sorted(package_dir.rglob("*.py"))}


def is_type_checking_block(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement Python can execute, wherever it sits, except under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking_block(child):
                for orelse in child.orelse:  # the `else:` branch does run
                    visit_statement(orelse)
                continue
            visit_statement(child)

    def visit_statement(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        visit(node)

    visit(tree)
    return found


def absolute_source(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def loaded_modules(name: str, importer: str, modules: dict[str, Path]) -> set[str]:
    """Importing `a.b.c` runs `a/__init__`, `a.b/__init__` and `a.b.c`: each one that is ours is an edge, except
    the importer's own enclosing packages, whose `__init__` Python runs before the importer itself."""
    return ((ancestors(name) - ancestors(importer)) | {name}) & modules.keys()


def read_imports(modules: dict[str, Path]) -> dict[str, ModuleImports]:
    graph: dict[str, ModuleImports] = {}
    for importer, path in modules.items():
        imports = ModuleImports()
        is_package = path.name == "__init__.py"
        for node in runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    imports.edges |= loaded_modules(alias.name, importer, modules)
                continue
            source = absolute_source(node, importer, is_package)
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            loaded = loaded_modules(source, importer, modules)
            if source in ancestors(importer):  # already running; only a name read from it is an edge (below)
                loaded.discard(source)
            imports.edges |= loaded
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # `from pkg import module` loads the module
                    imports.edges.add(submodule)
                    continue
                if source in modules:  # `from pkg import name` reads pkg/__init__'s namespace
                    imports.edges.add(source)
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    imports.private_names.append((source, alias.name, node.lineno))
        imports.edges.discard(importer)
        graph[importer] = imports
    return graph


def strongly_connected_components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the package is deeper than a comfortable recursion)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = lowlink[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = lowlink[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    lowlink[node] = min(lowlink[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def import_cycles(graph: dict[str, ModuleImports]) -> list[list[str]]:
    edges = {name: imports.edges for name, imports in graph.items()}
    return [component for component in strongly_connected_components(edges) if len(component) > 1]


# The layers of docs/architecture.md, lowest first: a module may import its own layer and the ones below.
# Each entry is a module or a package prefix (the longest match wins); "" is the package's own __init__.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundations",
        (
            "config",
            "tokens",
            "losses",
            "hooks",
            "hooks.points",
            "hooks.point_context",
            "cache",
            "cache.selectors",
            "cache.storage",
            "weights",
            "weights.factored_matrix",
            "sampling.settings",
            "sampling.noise",
        ),
    ),
    ("architecture", ("components", "hooks.names", "hooks.shapes")),
    (
        "weights and caches",
        (
            "weights.checkpoint",
            "weights.device_map",
            "weights.tl_weights",
            "weights.fingerprint",
            "cache.activation",
            "cache.decomposition",
            "cache.denoising",
            "cache.gradients",
        ),
    ),
    ("running the model", ("sampling", "model", "causal_lm")),
    (
        "tools",
        ("", "analysis", "features", "graphs", "lens", "patching", "viz", "toy", "serial_depth", "distributed", "cli"),
    ),
]


def layer_of(module: str) -> int:
    """The layer index of `module` (a full dotted name), by the longest entry of LAYERS that covers it."""
    relative = module.removeprefix(PACKAGE).removeprefix(".")
    matches = [
        (len(entry), index)
        for index, (_, entries) in enumerate(LAYERS)
        for entry in entries
        if relative == entry or (entry and relative.startswith(entry + "."))
    ]
    if not matches:
        raise KeyError(f"{module} is in no layer: add it to LAYERS here and to docs/architecture.md")
    return max(matches)[1]


def upward_imports(graph: dict[str, ModuleImports]) -> list[str]:
    return [
        f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for importer, imports in sorted(graph.items())
        for target in sorted(imports.edges)
        if layer_of(target) > layer_of(importer)
    ]


# ---------------------------------------------------------------------- the checker checks itself
def write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for relative, source in files.items():
        path = root / PACKAGE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return {module_name_under(root, path): path for path in sorted((root / PACKAGE).rglob("*.py"))}


def module_name_under(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_checker_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    modules = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "def f():\n    from diffusionlens.high import g\n    return g\n",
            "high.py": "from diffusionlens.low import f\n",
        },
    )
    assert import_cycles(read_imports(modules)) == [["diffusionlens.high", "diffusionlens.low"]]


def test_checker_ignores_type_checking_imports_but_not_their_else_branch(tmp_path):
    files = {
        "__init__.py": "",
        "high.py": "from diffusionlens.low import f\n",
        "low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from diffusionlens.high import g\n",
    }
    assert import_cycles(read_imports(write_package(tmp_path / "a", files))) == []
    files["low.py"] += "else:\n    import diffusionlens.high\n"
    assert import_cycles(read_imports(write_package(tmp_path / "b", files))) == [
        ["diffusionlens.high", "diffusionlens.low"]
    ]


def test_checker_counts_a_package_init_and_a_submodule_named_in_from_import(tmp_path):
    modules = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "sub/__init__.py": "from diffusionlens.sub.leaf import x\n",
            "sub/leaf.py": "x = 1\n",
            # importing any name from the package runs its __init__, which imports leaf, which imports user
            "user.py": "from diffusionlens.sub import leaf\n",
            "sub/other.py": "from . import leaf\nfrom ..user import y\n",
        },
    )
    graph = read_imports(modules)
    assert graph["diffusionlens.user"].edges == {"diffusionlens.sub", "diffusionlens.sub.leaf"}
    # its own package's __init__ has already run when `other` runs; `from . import leaf` loads only leaf
    assert graph["diffusionlens.sub.other"].edges == {"diffusionlens.sub.leaf", "diffusionlens.user"}
    # user -> sub/__init__ -> leaf: no cycle, until leaf needs user back
    assert import_cycles(graph) == []
    modules = write_package(tmp_path, {"sub/leaf.py": "from diffusionlens.user import y\nx = 1\n"})
    assert import_cycles(read_imports(modules)) == [
        ["diffusionlens.sub", "diffusionlens.sub.leaf", "diffusionlens.user"]
    ]


def test_checker_finds_private_names_but_not_dunders(tmp_path):
    modules = write_package(
        tmp_path,
        {
            "__init__.py": "from diffusionlens.a import __version__\n",
            "a.py": "__version__ = '1'\n_secret = 2\n",
            "b.py": "def f():\n    from .a import _secret\n",
        },
    )
    graph = read_imports(modules)
    assert graph["diffusionlens"].private_names == []
    assert graph["diffusionlens.b"].private_names == [("diffusionlens.a", "_secret", 2)]


# ---------------------------------------------------------------------- the package itself
@pytest.fixture(scope="module")
def package_graph() -> dict[str, ModuleImports]:
    return read_imports(package_modules())


def test_no_import_cycle_at_run_time(package_graph):
    cycles = import_cycles(package_graph)
    assert not cycles, "import cycles (move the shared code down a layer, see docs/architecture.md):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


def test_imports_go_down_the_layers(package_graph):
    upward = upward_imports(package_graph)
    assert not upward, "imports from a higher layer (see docs/architecture.md):\n" + "\n".join(upward)


def test_layer_check_sees_an_upward_import():
    graph = {"diffusionlens.cache.denoising": ModuleImports(edges={"diffusionlens.sampling.settings"})}
    assert upward_imports(graph) == []
    graph["diffusionlens.cache.denoising"].edges.add("diffusionlens.sampling")  # sampling/__init__ runs generate
    assert upward_imports(graph) == [
        "diffusionlens.cache.denoising (weights and caches) imports diffusionlens.sampling (running the model)"
    ]
    with pytest.raises(KeyError, match="in no layer"):
        layer_of("diffusionlens.new_module")


def test_no_underscore_name_imported_across_modules(package_graph):
    crossings = {
        (importer, source, name)
        for importer, imports in package_graph.items()
        for source, name, _ in imports.private_names
    }
    assert not crossings, "private names used across modules (make them public or move them):\n" + "\n".join(
        f"{importer} imports {name} from {source}" for importer, source, name in sorted(crossings)
    )


def test_viewer_assets_are_package_data():
    # A wheel ships only what pyproject's package-data names: an asset outside its globs would install a
    # viewer that fails on first use, far from this change.
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"][PACKAGE]
    assets = sorted((PACKAGE_DIR / "viz" / "assets").iterdir())
    assert assets, "diffusionlens/viz/assets is empty"
    unshipped = [a.name for a in assets if not any(a.relative_to(PACKAGE_DIR).match(g) for g in globs)]
    assert not unshipped, f"add these to [tool.setuptools.package-data] in pyproject.toml: {unshipped}"
