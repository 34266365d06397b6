"""Dependencies point one way: the import graph of src/vlmlab, read with `ast`.

Every `import` counts, also those inside functions (lazy imports still run and still tie the
modules together) and under `if TYPE_CHECKING:`. Checked: no import cycle between modules; no
cycle between units (a subpackage, or a top-level module) and no edge that goes up the layer
table below; only `vlmlab.tracking` imports MLflow; the README's module map names exactly the
modules that exist. Each test collects every violation and reports them all at once.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "vlmlab"

# Units from low to high: a unit may import units of its own layer or of lower layers only.
# Units of one layer are peers; (b) still forbids cycles between them.
LAYERS: list[tuple[str, ...]] = [
    ("vlmlab", "errors", "logs"),  # leaves: no vlmlab imports
    ("registry",),  # named classes found by import (scorers, templates)
    ("schema",),  # typed config, validated at the entry
    ("config",),  # compose + validate
    ("text", "visual"),  # tokens, labels, chat templates; image-token counts: below models and data
    ("models",),  # encoder | connector | llm -> VisionLanguageModel, HF export/import
    ("stages",),  # stage policy: what trains
    ("data",),  # shards -> tokenised, masked batches
    ("curate",),  # vlmlab curate: content filters, duplicates (builds the encoder via models)
    ("checkpoints",),  # stage chain, meta, Lightning IO
    ("training",),  # LightningModule, precision, strategies
    ("tracking",),  # MLflow: the only unit that talks to it; logs results it is handed
    ("eval",),  # generation, scorers, benchmarks: returns results (resolves run ids via tracking)
    ("distributed", "launch"),  # process launch: DDP ranks in sweeps, SLURM
    ("train",),  # the stage recipe
    ("merge", "plan"),  # verbs built on the recipe's pieces
    ("cli",),  # `vlmlab <verb>`
    ("__main__",),
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
MLFLOW_HOME = "vlmlab.tracking"


@dataclass(frozen=True)
class Module:
    name: str  # dotted: vlmlab.models.vlm; a package is its __init__
    path: Path
    is_package: bool


def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        found[name] = Module(name, path, is_package)
    return found


def imported_names(module: Module, mods: dict[str, Module]) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of everything `module` imports, anywhere in its body.

    `from a import b` names `a.b` when that is a module, else `a` (b is a name defined in a).
    """
    tree = ast.parse(module.path.read_text(), str(module.path))
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..a import b
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in mods else base), node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {vlmlab module it imports: first line}."""
    mods = modules()
    graph: dict[str, dict[str, int]] = {name: {} for name in mods}
    for module in mods.values():
        for name, line in imported_names(module, mods):
            while name and name not in mods:  # `import vlmlab.a.b` of a name: its module
                name = name.rpartition(".")[0]
            if name.split(".")[0] == "vlmlab" and name != module.name:
                graph[module.name].setdefault(name, line)
    return graph


def unit_of(module: str) -> str:
    """vlmlab.models.vlm -> models; vlmlab.cli -> cli; vlmlab -> vlmlab."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _rel(module: str) -> str:
    return str(modules()[module].path.relative_to(REPO))


# ------------------------------------------------------------------------------------ (a)


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    problems = []
    for component in cycles({m: set(targets) for m, targets in graph.items()}):
        inside = [
            f"{_rel(a)}:{line} imports {b}"
            for a in component
            for b, line in sorted(graph[a].items())
            if b in component
        ]
        problems.append(f"cycle {' <-> '.join(component)}: " + "; ".join(inside))
    assert not problems, "import cycles between modules:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------ (b)


def unit_edges() -> dict[tuple[str, str], list[str]]:
    """(unit, unit it imports) -> where, for edges between different units."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, targets in import_graph().items():
        for target, line in sorted(targets.items()):
            a, b = unit_of(module), unit_of(target)
            if a != b:
                edges[a, b].append(f"{_rel(module)}:{line} imports {target}")
    return edges


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(m) for m in modules()}
    missing = sorted(units - set(LAYER))
    stale = sorted(set(LAYER) - units)
    assert not missing, f"units missing from LAYERS in {__file__}: {missing}"
    assert not stale, f"LAYERS names units that do not exist: {stale}"


def test_dependencies_between_units_point_down() -> None:
    edges = unit_edges()
    problems = []
    for component in cycles({a: {b for (x, b) in edges if x == a} for (a, _) in edges}):
        problems.append(f"unit cycle {' <-> '.join(component)}")
    for (a, b), where in sorted(edges.items()):
        if a in LAYER and b in LAYER and LAYER[b] > LAYER[a]:
            problems.append(
                f"{a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]}): " + "; ".join(where)
            )
    assert not problems, "dependencies that do not point down:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------ (c)


def test_only_tracking_imports_mlflow() -> None:
    problems = []
    mods = modules()
    for module in mods.values():
        if module.name == MLFLOW_HOME or module.name.startswith(MLFLOW_HOME + "."):
            continue
        for name, line in imported_names(module, mods):
            if name == "mlflow" or name.startswith("mlflow."):
                problems.append(f"{module.path.relative_to(REPO)}:{line} imports {name}")
    assert not problems, "MLflow outside vlmlab.tracking:\n" + "\n".join(sorted(set(problems)))


def test_text_templates_import_no_heavy_library() -> None:
    """`vlmlab.text` sits below models and data and is read by light commands: loading every
    template (the whole registry) must not import torch, transformers or lightning."""
    code = (
        "import sys; from vlmlab.text.templates import available_templates; available_templates(); "
        "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------------------ (d)

MAP_HEADING = "### Module map"


def readme_module_map(readme: str) -> dict[str, set[str]]:
    """The map's tree: folder path (relative to src/vlmlab, "" for it) -> the entries listed.

    The map is the first fenced block after `### Module map`: one entry per line, its path
    first (`name.py` or `name/`), indented two spaces per level below `src/vlmlab/`; the text
    after the path is prose and is not read.
    """
    if MAP_HEADING not in readme:
        return {}
    after = readme.split(MAP_HEADING, 1)[1]
    block = after.split("```", 2)[1].splitlines()[1:]
    tree: dict[str, set[str]] = defaultdict(set)
    stack: list[str] = []  # the folders above the current line
    inside = False
    for line in block:
        if not line.strip():
            continue
        if line.startswith("src/vlmlab/"):
            inside, stack = True, []
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent == 0:
            inside = False
        entry = line.split()[0]
        if not inside or not re.fullmatch(r"[\w.]+\.py|\w+/", entry):
            continue  # a continuation line of prose
        depth = indent // 2 - 1
        if indent % 2 or depth > len(stack):
            continue  # prose aligned under the description column
        del stack[depth:]
        tree["/".join(stack)].add(entry)
        if entry.endswith("/"):
            stack.append(entry.rstrip("/"))
    return tree


def on_disk(folder: Path) -> set[str]:
    """A package's entries as the map writes them: modules and subpackages, no __init__."""
    entries = {p.name for p in folder.glob("*.py") if p.name not in ("__init__.py",)}
    entries |= {f"{p.name}/" for p in folder.iterdir() if (p / "__init__.py").exists()}
    return entries


def test_readme_module_map_lists_exactly_the_modules() -> None:
    tree = readme_module_map((REPO / "README.md").read_text())
    assert tree, f"README.md has no module map under {MAP_HEADING!r}"
    problems = []
    folders = {""} | {
        p.relative_to(PACKAGE).as_posix() for p in PACKAGE.iterdir() if (p / "__init__.py").exists()
    }
    for folder in sorted(folders | set(tree)):  # every package, one level down; deeper if listed
        path = PACKAGE / folder
        listed = tree.get(folder, set())
        if not path.is_dir():
            problems.append(f"the map has src/vlmlab/{folder}/, which does not exist")
            continue
        actual = on_disk(path) - ({"__main__.py"} if folder == "" else set())
        for entry in sorted(actual - listed):
            problems.append(f"src/vlmlab/{folder + '/' if folder else ''}{entry} is not in the map")
        for entry in sorted(listed - actual):
            problems.append(
                f"the map lists src/vlmlab/{folder + '/' if folder else ''}{entry}, which does not exist"
            )
    assert not problems, "README.md module map vs src/vlmlab:\n" + "\n".join(problems)


def test_readme_map_parser_reads_nesting() -> None:
    """The structural reader itself: nesting by indentation, prose ignored."""
    text = (
        "### Module map\n\n```\nconf/   x\nsrc/vlmlab/\n  a.py      prose b.py c/\n"
        "                 more prose d.py\n  pkg/      prose\n    inner.py  x\n    sub/\n"
        "      deep.py\n  z.py\ntests/   y\n```\n"
    )
    assert readme_module_map(text) == {
        "": {"a.py", "pkg/", "z.py"},
        "pkg": {"inner.py", "sub/"},
        "pkg/sub": {"deep.py"},
    }


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(graph) == expected
