"""The dependency rule between the project's packages, checked on the source.

    apollo.optim <- apollo.common <- apollo.models <- apollo.lm, apollo.agents
                 <- apollo.studies <- experiments, benchmarks

A module may import its own package and the packages below it, never one beside
or above it: `apollo.lm` and `apollo.agents` never import each other, and nothing
under `apollo/` imports `experiments` or `benchmarks`. Every import counts,
function-local ones included (they hide an edge, they do not remove it), and no
two modules may import each other, directly or through others.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP_LEVEL = ("apollo", "experiments", "benchmarks")

# Layer of each package; a module may import only layers strictly below its own,
# plus its own package. Packages on one layer are independent of each other.
LAYERS: dict[str, int] = {
  "apollo.optim": 0,
  "apollo.common": 1,
  "apollo.models": 2,
  "apollo.lm": 3,
  "apollo.agents": 3,
  "apollo.studies": 4,
  "experiments": 5,
  "benchmarks": 5,
}


def package_of(module: str) -> str:
  """The entry of LAYERS that owns ``module`` ('apollo' itself counts as apollo.common)."""
  parts = module.split(".")
  if parts[0] != "apollo":
    return parts[0]
  if len(parts) == 1:
    return "apollo.common"
  return ".".join(parts[:2])


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
  """Every project module ``source`` imports (``from a import b`` counts as a.b
  when b is a module and as ``a`` otherwise; both are kept: a over-approximation
  that only ever adds edges inside one package)."""
  found: set[str] = set()
  package = module if is_package else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      found.add(target)
      found.update(f"{target}.{alias.name}" for alias in node.names)
  return {m for m in found if m.split(".")[0] in TOP_LEVEL}


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """Module -> the project modules it imports (only modules that exist as files)."""
  sources = {}
  for top in TOP_LEVEL:
    for path in sorted((root / top).rglob("*.py")):
      sources[module_name(path, root)] = (path.read_text(), path.name == "__init__.py")
  graph = {}
  for module, (source, is_package) in sources.items():
    targets = imports_of(source, module, is_package)
    graph[module] = {t for t in targets if t in sources and t != module}
  return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
  problems = []
  for module, targets in sorted(graph.items()):
    own = package_of(module)
    for target in sorted(targets):
      other = package_of(target)
      if other != own and LAYERS[other] >= LAYERS[own]:
        problems.append(f"{module} imports {target} ({own} may not import {other})")
  return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan's algorithm).

  A package's ``__init__`` importing its own submodules is not a cycle when the
  submodules import their siblings directly, so edges from a package to its own
  submodules are ignored.
  """
  edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return found


def test_every_package_has_a_layer():
  graph = import_graph(ROOT)
  assert {package_of(m) for m in graph} <= set(LAYERS)


def test_imports_follow_the_layers():
  assert layer_violations(import_graph(ROOT)) == []


def test_no_import_cycles():
  assert cycles(import_graph(ROOT)) == []


def _copy_tree(tmp_path: pathlib.Path) -> pathlib.Path:
  for top in TOP_LEVEL:
    for path in (ROOT / top).rglob("*.py"):
      dest = tmp_path / path.relative_to(ROOT)
      dest.parent.mkdir(parents=True, exist_ok=True)
      dest.write_text(path.read_text())
  return tmp_path


@pytest.mark.parametrize(
  "module_file, line",
  [
    # A function-local import of the sibling method package.
    ("apollo/agents/guidance.py", "def _f():\n  import apollo.lm\n"),
    ("apollo/lm/data/keywords.py", "from apollo.agents import guidance\n"),
    ("apollo/models/tokenizer.py", "from apollo.lm.data import keywords\n"),
    ("apollo/common/mesh.py", "import experiments\n"),
    ("apollo/optim/apollo.py", "from apollo.common import mesh\n"),
  ],
)
def test_a_forbidden_import_is_caught(tmp_path, module_file, line):
  root = _copy_tree(tmp_path)
  path = root / module_file
  path.write_text(path.read_text() + "\n" + line)
  problems = layer_violations(import_graph(root))
  assert problems, "the forbidden import was not found"
  assert {p.split(" imports ")[0] for p in problems} == {module_name(path, root)}


def test_a_cycle_is_caught(tmp_path):
  root = _copy_tree(tmp_path)
  guidance = root / "apollo/agents/guidance.py"
  assert "apollo.agents.guidance" in import_graph(root)["apollo.agents.storage"]
  before = cycles(import_graph(root))
  guidance.write_text(guidance.read_text() + "\ndef _f():\n  from apollo.agents import storage\n")
  after = cycles(import_graph(root))
  assert [c for c in after if c not in before] == [
    ["apollo.agents.guidance", "apollo.agents.storage"]
  ]
