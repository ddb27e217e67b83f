"""The import graph of the packages: one-way dependencies, no JAX/TVM where they do not belong.

Every module of ``tlp_jax`` and ``data_pipelines`` is parsed (``ast``, nothing is imported) and
its imports are checked against the dependency rule (docs/DESIGN.md)::

    tlp_jax.core  <-  data_pipelines  <-  tlp_jax.train  <-  tlp_jax.evaluation
          ^                 ^
          +---- tlp_jax.tvm +   (only what needs TVM imports tlp_jax.tvm)

* ``tlp_jax.core`` is NumPy only: no JAX (flax, optax, orbax), TVM or TensorFlow (TFDS).
* ``data_pipelines`` builds and loads the dataset without JAX or the trainer.
* Nothing outside ``tlp_jax.tvm`` imports it, except the TVM-needing CLI paths listed in
  :data:`EXCEPTIONS`, and those only inside a function.
* The serving side (``tlp_jax.core.predictor``, ``tlp_jax.tvm.cost_model``) never reaches the
  trainer, the evaluation, the XGBoost baseline or the dataset build, directly or not.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
ROOTS = ("tlp_jax", "data_pipelines")

# Most specific first: a module belongs to the first package it is in.
PACKAGES = (
  "tlp_jax.core",
  "tlp_jax.train",
  "tlp_jax.evaluation",
  "tlp_jax.tvm",
  "data_pipelines",
  "tlp_jax",
)
MAY_IMPORT = {
  "tlp_jax": set(),
  "tlp_jax.core": {"tlp_jax.core"},
  "data_pipelines": {"tlp_jax.core", "data_pipelines"},
  "tlp_jax.train": {"tlp_jax.core", "data_pipelines", "tlp_jax.train"},
  "tlp_jax.evaluation": {"tlp_jax.core", "data_pipelines", "tlp_jax.train", "tlp_jax.evaluation"},
  "tlp_jax.tvm": {"tlp_jax.core", "data_pipelines", "tlp_jax.tvm"},
}
# (importing module, imported package) allowed beyond MAY_IMPORT; lazy_only: inside a function.
EXCEPTIONS = {
  # The baseline reports its ranking next to TLP's through the evaluator.
  ("tlp_jax.tvm.xgb_baseline", "tlp_jax.evaluation"): {"lazy_only": False},
  # The sample's all_tasks.pkl subset, when TVM is installed.
  ("data_pipelines.make_sample", "tlp_jax.tvm"): {"lazy_only": True},
}
JAX = frozenset({"jax", "jaxlib", "flax", "optax", "orbax"})
TF = frozenset({"tensorflow", "tensorflow_datasets"})
BANNED_THIRD_PARTY = {
  "tlp_jax.core": JAX | TF | {"tvm"},
  "data_pipelines": JAX | {"tensorflow"},  # TFDS builds and reads without TensorFlow
}
SERVING = ("tlp_jax.core.predictor", "tlp_jax.tvm.cost_model")
SERVING_NEVER_REACHES = (
  "tlp_jax.train",
  "tlp_jax.evaluation",
  "tlp_jax.tvm.xgb_baseline",
  "data_pipelines",
)
SERVING_BANNED_THIRD_PARTY = JAX | TF
RUNTIME_CORE_MODULES = (
  "tlp_jax.core.predictor",
  "tlp_jax.core.features",
  "tlp_jax.core.records",
  "tlp_jax.core.metrics",
  "tlp_jax.core.network_info",
)


@dataclasses.dataclass(frozen=True)
class Import:
  """One import statement's target (absolute dotted name) and where it is."""

  target: str
  lazy: bool = False  # inside a function or the ``if __name__ == "__main__":`` block
  line: int = 0


# ---- the checker ---------------------------------------------------------------------------


def _is_main_guard(node: ast.AST) -> bool:
  return (
    isinstance(node, ast.If)
    and isinstance(node.test, ast.Compare)
    and isinstance(node.test.left, ast.Name)
    and node.test.left.id == "__name__"
  )


def imports_of(
  source: str, module: str, is_package: bool, known: frozenset[str] = frozenset()
) -> list[Import]:
  """The imports of a module's source; ``from X import Y`` is ``X.Y`` when that is a module of
  ``known``, else ``X``. Relative imports are made absolute."""
  out = []
  package = module if is_package else module.rpartition(".")[0]

  def visit(node: ast.AST, lazy: bool) -> None:
    if isinstance(node, ast.Import):
      out.extend(Import(a.name, lazy, node.lineno) for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(Import(sub if sub in known else base, lazy, node.lineno))
    lazy_below = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in ast.iter_child_nodes(node):
      visit(child, lazy_below or _is_main_guard(node) and child in node.body)

  visit(ast.parse(source), False)
  return out


def project_graph(repo: pathlib.Path = REPO, roots=ROOTS) -> dict[str, list[Import]]:
  """``{module: imports}`` of every module under the given package roots."""
  files = {}
  for root in roots:
    for path in sorted((repo / root).rglob("*.py")):
      rel = path.relative_to(repo).with_suffix("")
      parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
      files[".".join(parts)] = path
  known = frozenset(files)
  return {
    m: imports_of(p.read_text(encoding="utf-8"), m, p.name == "__init__.py", known)
    for m, p in files.items()
  }


def package_of(module: str) -> str | None:
  """The project package of a module (most specific of :data:`PACKAGES`), None if outside."""
  for p in PACKAGES:
    if module == p or module.startswith(p + "."):
      return p
  return None


def _within(module: str, prefixes) -> str | None:
  for p in prefixes:
    if module == p or module.startswith(p + "."):
      return p
  return None


def reachable(graph: dict[str, list[Import]], start: str) -> dict[str, list[str]]:
  """Project modules reachable from ``start`` (every import, lazy ones too), with a path each."""
  paths = {start: [start]}
  todo = [start]
  while todo:
    m = todo.pop()
    for imp in graph.get(m, ()):
      # Importing a.b.c runs a and a.b too.
      parts = imp.target.split(".")
      for i in range(1, len(parts) + 1):
        t = ".".join(parts[:i])
        if t in graph and t not in paths:
          paths[t] = paths[m] + [t]
          todo.append(t)
  return paths


def violations(graph: dict[str, list[Import]]) -> list[str]:
  """Every import that breaks the dependency rule, as readable lines (empty = clean)."""
  out = []
  for module, imports in sorted(graph.items()):
    own = package_of(module)
    banned = BANNED_THIRD_PARTY.get(own, frozenset())
    for imp in imports:
      where = f"{module}:{imp.line} imports {imp.target}"
      target_pkg = package_of(imp.target)
      if target_pkg is None:
        top = imp.target.split(".")[0]
        if top in banned:
          out.append(f"{where}: {own} never imports {top}")
        continue
      if target_pkg == "tlp_jax" or target_pkg in MAY_IMPORT[own]:
        continue
      exception = EXCEPTIONS.get((module, target_pkg))
      if exception is None:
        out.append(f"{where}: {own} may not import {target_pkg}")
      elif exception["lazy_only"] and not imp.lazy:
        out.append(f"{where}: allowed only inside a function (it needs TVM)")
  for start in SERVING:
    if start not in graph:
      continue
    for module, path in sorted(reachable(graph, start).items()):
      hit = _within(module, SERVING_NEVER_REACHES)
      if hit:
        out.append(f"serving side {start} reaches {hit}: {' -> '.join(path)}")
      for imp in graph.get(module, ()):
        top = imp.target.split(".")[0]
        if top in SERVING_BANNED_THIRD_PARTY:
          out.append(f"serving side {start} reaches {top}: {' -> '.join(path)}:{imp.line}")
  return out


# ---- the repository -------------------------------------------------------------------------


def test_the_repository_follows_the_dependency_rule():
  graph = project_graph()
  assert {
    "tlp_jax.core.records",
    "tlp_jax.tvm.cost_model",
    "data_pipelines.tenset_tfds",
    "tlp_jax.train.model",
  } <= set(graph)
  assert violations(graph) == []


def test_the_builder_never_imports_tvm():
  graph = project_graph()
  reached = reachable(graph, "data_pipelines.tenset_tfds")
  assert not [m for m in reached if m.startswith("tlp_jax.tvm")]


def test_importing_the_core_leaves_jax_tvm_and_tensorflow_out():
  code = textwrap.dedent(f"""
      import sys
      for name in {RUNTIME_CORE_MODULES!r}:
        __import__(name)
      banned = {sorted(JAX | TF | {"tvm"})!r}
      print(sorted(m for m in sys.modules if m.split(".")[0] in banned))
  """)
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
  )
  assert proc.stdout.strip() == "[]", proc.stdout


# ---- the checker on made-up graphs ----------------------------------------------------------


def _check(graph):
  return "\n".join(violations(graph))


def test_checker_finds_each_kind_of_violation():
  graph = {
    "tlp_jax.core.features": [Import("jax.numpy", line=3)],
    "tlp_jax.core.records": [Import("data_pipelines.loader", lazy=True, line=4)],
    "data_pipelines.loader": [Import("tlp_jax.train.model", line=5), Import("flax", line=6)],
    "data_pipelines.tenset_tfds": [Import("tlp_jax.tvm.search_tasks", lazy=True, line=7)],
    "data_pipelines.make_sample": [Import("tlp_jax.tvm.search_tasks", line=8)],
    "tlp_jax.train.model": [Import("tlp_jax.evaluation.eval_lib", line=9)],
    "tlp_jax.tvm.collect": [Import("tlp_jax.evaluation.eval_lib", line=10)],
    "tlp_jax.evaluation.eval_lib": [],
    "tlp_jax.tvm.search_tasks": [],
  }
  found = _check(graph)
  for expected in (
    "tlp_jax.core.features:3 imports jax.numpy: tlp_jax.core never imports jax",
    "tlp_jax.core.records:4 imports data_pipelines.loader: tlp_jax.core may not import "
    "data_pipelines",
    "data_pipelines.loader:5 imports tlp_jax.train.model: data_pipelines may not import "
    "tlp_jax.train",
    "data_pipelines.loader:6 imports flax: data_pipelines never imports flax",
    "data_pipelines.tenset_tfds:7 imports tlp_jax.tvm.search_tasks: data_pipelines may not "
    "import tlp_jax.tvm",
    "data_pipelines.make_sample:8 imports tlp_jax.tvm.search_tasks: allowed only inside a function",
    "tlp_jax.train.model:9 imports tlp_jax.evaluation.eval_lib: tlp_jax.train may not import "
    "tlp_jax.evaluation",
    "tlp_jax.tvm.collect:10 imports tlp_jax.evaluation.eval_lib: tlp_jax.tvm may not import "
    "tlp_jax.evaluation",
  ):
    assert expected in found, expected
  assert len(violations(graph)) == 8


def test_checker_follows_the_serving_side_through_other_modules():
  graph = {
    "tlp_jax.tvm.cost_model": [Import("tlp_jax.tvm.skeleton_extract")],
    "tlp_jax.tvm.skeleton_extract": [Import("tlp_jax.tvm.xgb_baseline", lazy=True)],
    "tlp_jax.tvm.xgb_baseline": [Import("tlp_jax.evaluation.eval_lib")],
    "tlp_jax.evaluation.eval_lib": [Import("optax", lazy=True)],
  }
  found = _check(graph)
  chain = "tlp_jax.tvm.cost_model -> tlp_jax.tvm.skeleton_extract -> tlp_jax.tvm.xgb_baseline"
  assert f"serving side tlp_jax.tvm.cost_model reaches tlp_jax.tvm.xgb_baseline: {chain}" in found
  assert "reaches tlp_jax.evaluation" in found and "reaches optax" in found


def test_checker_accepts_the_allowed_shapes():
  graph = {
    "tlp_jax.core.records": [Import("numpy"), Import("tlp_jax.core.features")],
    "tlp_jax.core.features": [],
    "data_pipelines.make_sample": [
      Import("tlp_jax.tvm.search_tasks", lazy=True),
      Import("tensorflow_datasets"),
    ],
    "tlp_jax.tvm.xgb_baseline": [
      Import("tlp_jax.evaluation.eval_lib"),
      Import("data_pipelines.loader"),
    ],
    "tlp_jax.evaluation.eval_lib": [Import("tlp_jax.train.export", lazy=True)],
    "tlp_jax.tvm.search_tasks": [Import("tvm")],
    "tlp_jax.tvm.cost_model": [Import("tlp_jax.core.predictor"), Import("tvm")],
    "tlp_jax.core.predictor": [Import("tlp_jax.core.features")],
  }
  assert violations(graph) == []


@pytest.mark.parametrize(
  "source,module,is_package,want",
  [
    ("import jax.numpy as jnp\n", "tlp_jax.core.x", False, [Import("jax.numpy", False, 1)]),
    (
      "from . import features\n",
      "tlp_jax.core.x",
      False,
      [Import("tlp_jax.core.features", False, 1)],
    ),
    ("from .. import train\n", "tlp_jax.core.x", False, [Import("tlp_jax.train", False, 1)]),
    ("from .core import records\n", "tlp_jax", True, [Import("tlp_jax.core.records", False, 1)]),
    ("from tlp_jax.core import NAME\n", "m", False, [Import("tlp_jax.core", False, 1)]),
    ("def f():\n  import tvm\n", "m", False, [Import("tvm", True, 2)]),
    (
      "class C:\n  def f(self):\n    from tvm import auto_scheduler\n",
      "m",
      False,
      [Import("tvm", True, 3)],
    ),
    (
      "if __name__ == '__main__':\n  import absl.app\nelse:\n  import os\n",
      "m",
      False,
      [Import("absl.app", True, 2), Import("os", False, 4)],
    ),
    (
      "try:\n  import orjson\nexcept ImportError:\n  pass\n",
      "m",
      False,
      [Import("orjson", False, 2)],
    ),
  ],
)
def test_imports_of(source, module, is_package, want):
  known = frozenset({"tlp_jax.core.features", "tlp_jax.core.records", "tlp_jax.train"})
  assert imports_of(source, module, is_package, known) == want
