r"""Extracts a task's loop-nest skeleton (:mod:`tlp_jax.core.skeleton`) with TVM, once per task.

CLI: the skeletons of every task of a TenSet dir, once, so the dataset build, training, export
and the NumPy predictor never need TVM::

  python -m tlp_jax.tvm.skeleton_extract --tenset_dir DIR [--out PATH]

reads ``DIR/network_info/all_tasks.pkl`` (restricted unpickler, :mod:`tlp_jax.tvm.search_tasks`)
and writes ``DIR/network_info/skeletons.json`` (or ``--out``) atomically. A task TVM cannot
describe is listed in the file's ``failed`` map with the reason (never silently dropped).

Walks the ComputeDAG's ops in order; for every compute op, every ProducerLoad of its body (found
with ``tvm.tir.stmt_functor.post_order_visit``) becomes a read whose indices are written as
affine coefficients over the op's iterators (``tvm.arith.detect_linear_equation``), or as a small
expression tree when TVM's bound inference can still evaluate them (floordiv/floormod by
constants, min/max), or as opaque. Nothing here runs per program.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence

from absl import app, flags

from tlp_jax.core import skeleton as sk
from tlp_jax.core import tenset
from tlp_jax.tvm import search_tasks

log = logging.getLogger(__name__)


def _tvm():
  # TVM is imported lazily so that importing this module (e.g. for its CLI flags) never needs it.
  import tvm

  return tvm


def _int(x):
  tvm = _tvm()
  if isinstance(x, int):
    return x
  if isinstance(x, tvm.tir.IntImm):
    return int(x.value)
  if isinstance(x, tvm.tir.PrimExpr):
    # Extents such as ``int64(n)`` casts fold to constants.
    y = tvm.arith.Analyzer().simplify(x)
    if isinstance(y, tvm.tir.IntImm):
      return int(y.value)
  return None


def _const(x, what: str) -> int:
  v = _int(x)
  if v is None:
    raise ValueError(f"{what} is not a constant: {x}")
  return v


def _tree(e, var_pos: Mapping):
  """Index expression -> skeleton tree, or None where TVM's interval arithmetic gives up."""
  tir = _tvm().tir
  if isinstance(e, tir.IntImm):
    return int(e.value)
  if isinstance(e, tir.Var):
    return ("v", var_pos[e]) if e in var_pos else None
  if isinstance(e, tir.Cast):
    return _tree(e.value, var_pos)
  ops = (
    (tir.Add, "+"),
    (tir.Sub, "-"),
    (tir.Mul, "*"),
    (tir.FloorDiv, "//"),
    (tir.FloorMod, "%"),
    (tir.Min, "min"),
    (tir.Max, "max"),
    # Truncated div/mod agree with floor ones on the non-negative indices of te ops.
    (tir.Div, "//"),
    (tir.Mod, "%"),
  )
  for cls, name in ops:
    if isinstance(e, cls):
      a, b = _tree(e.a, var_pos), _tree(e.b, var_pos)
      if a is None or b is None:
        return None
      return (name, a, b)
  return None


def _index(e, axis_vars: list, var_pos: Mapping):
  tvm = _tvm()
  coefs = tvm.arith.detect_linear_equation(e, axis_vars) if axis_vars else []
  if axis_vars and len(coefs) == len(axis_vars) + 1:
    ints = [_int(c) for c in coefs]
    if all(c is not None for c in ints):
      return tuple(ints)
  if not axis_vars:
    v = _int(tvm.arith.Analyzer().simplify(e))
    if v is not None:
      return (v,)
  t = _tree(e, var_pos)
  if t is None:
    return None
  if isinstance(t, int):
    return tuple([0] * len(axis_vars) + [t])
  return ("e", t)


def skeleton_from_dag(workload_key: str, dag) -> sk.Skeleton:
  """Skeleton of a ``tvm.auto_scheduler.ComputeDAG`` (its ``ops`` order is the stage order)."""
  tvm = _tvm()
  te = tvm.te
  ops = list(dag.ops)
  op_index = {op: i for i, op in enumerate(ops)}
  read_by: set = set()
  stages = []
  for i, op in enumerate(ops):
    shape = tuple(_const(x, f"{workload_key}: shape of {op.name}") for x in op.output(0).shape)
    if isinstance(op, te.PlaceholderOp):
      stages.append(sk.StageSkeleton(op.name, sk.PLACEHOLDER, shape))
      continue
    if not isinstance(op, te.ComputeOp):
      raise ValueError(
        f"{workload_key}: stage {i} ({op.name}) is a {type(op).__name__}; only "
        "placeholder and compute ops are supported"
      )
    axes = list(op.axis) + list(op.reduce_axis)
    iters = tuple(
      (
        str(iv.var.name),
        sk.SPATIAL if j < len(op.axis) else sk.REDUCE,
        _const(iv.dom.extent, f"{workload_key}: extent of {op.name}.{iv.var.name}"),
      )
      for j, iv in enumerate(axes)
    )
    axis_vars = [iv.var for iv in axes]
    var_pos = {v: j for j, v in enumerate(axis_vars)}
    loads = []

    def visit(n, loads=loads):
      if isinstance(n, tvm.tir.ProducerLoad):
        loads.append(n)

    for b in op.body:
      tvm.tir.stmt_functor.post_order_visit(b, visit)
    reads, seen = [], set()
    for ld in loads:
      prod = ld.producer.op
      if prod not in op_index:
        raise ValueError(f"{workload_key}: {op.name} reads {prod.name}, which is not a DAG op")
      p = op_index[prod]
      idx = tuple(_index(x, axis_vars, var_pos) for x in ld.indices)
      if (p, idx) not in seen:
        seen.add((p, idx))
        reads.append(sk.Read(p, idx))
      read_by.add(p)
    attrs = op.attrs if op.attrs is not None else {}
    stages.append(
      sk.StageSkeleton(
        op.name,
        sk.COMPUTE,
        shape,
        iters,
        tuple(reads),
        False,
        "const_matrix" in attrs,
        int(op.num_outputs),
      )
    )
  stages = [
    s
    if s.type == sk.PLACEHOLDER
    else sk.StageSkeleton(
      s.name, s.type, s.shape, s.iters, s.reads, i not in read_by, s.const_matrix, s.num_outputs
    )
    for i, s in enumerate(stages)
  ]
  # Round-trip through the validator: a skeleton that would not load is caught here, per task.
  return sk.Skeleton.from_dict(
    sk.Skeleton(workload_key, tuple(stages)).to_dict(), f"<extracted {workload_key}>"
  )


def skeleton_from_task(task) -> sk.Skeleton:
  """Skeleton of a ``tvm.auto_scheduler.SearchTask``."""
  return skeleton_from_dag(task.workload_key, task.compute_dag)


def skeletons_from_tasks(tasks: Iterable) -> dict[str, sk.Skeleton]:
  """``{workload_key: skeleton}`` of many tasks (the first task of a repeated key wins)."""
  out = {}
  for t in tasks:
    if t.workload_key not in out:
      out[t.workload_key] = skeleton_from_task(t)
  log.info("extracted %d skeletons", len(out))
  return out


def skeletons_from_tasks_with_failures(
  tasks: Iterable,
) -> tuple[dict[str, sk.Skeleton], dict[str, str]]:
  """Like :func:`skeletons_from_tasks`, but a task that cannot be described (an op kind the
  skeleton format lacks, a non-constant shape) is recorded as ``{workload_key: reason}``."""
  tvm = _tvm()
  out, failed = {}, {}
  for t in tasks:
    key = str(t.workload_key)
    if key in out or key in failed:
      continue
    try:
      out[key] = skeleton_from_task(t)
    except (ValueError, KeyError, tvm.TVMError) as e:
      failed[key] = f"{type(e).__name__}: {e}".splitlines()[0]
      log.warning("no skeleton for %s: %s", key, failed[key])
  return out, failed


def extract_tenset(tenset_dir: str, out: str | None = None) -> tuple[str, dict, dict]:
  """Extracts the skeleton of every task of ``TENSET/network_info/all_tasks.pkl`` and writes
  them (atomically) to ``out`` (default :func:`skeleton.tenset_skeletons_path`).

  Returns:
    (path written, {workload_key: skeleton}, {workload_key: failure reason}).

  Raises:
    FileNotFoundError: no ``all_tasks.pkl``.
    ImportError: TVM is not installed.
    search_tasks.SearchTaskFileError: ``all_tasks.pkl`` is no readable SearchTask pickle.
  """
  pkl = tenset.all_tasks_path(tenset_dir)
  if not os.path.isfile(pkl):
    raise FileNotFoundError(
      f"{pkl}: not found; skeletons are extracted from TenSet's {tenset.ALL_TASKS_FILE}"
    )
  tasks = search_tasks.load_search_tasks(pkl)
  skels, failed = skeletons_from_tasks_with_failures(tasks)
  path = out or sk.tenset_skeletons_path(tenset_dir)
  sk.save_collection(path, skels, failed=failed)
  return path, skels, failed


def main(argv: Sequence[str]) -> None:
  """Writes the skeletons of a TenSet dir (see the module docstring)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  try:
    path, skels, failed = extract_tenset(flags.FLAGS.tenset_dir, flags.FLAGS.out or None)
  except (OSError, ImportError, search_tasks.SearchTaskFileError) as e:
    raise SystemExit(f"error: {e}") from None
  stats = sk.collection_size_stats(skels)
  print(
    f"wrote {path}: {len(skels)} skeletons ({stats.get('total_bytes', 0)} bytes of JSON), "
    f"{len(failed)} tasks failed, in {time.perf_counter() - start:.1f} s"
  )
  for key, reason in sorted(failed.items()):
    print(f"  failed {key}: {reason}")


if __name__ == "__main__":
  # Flags only when run as a script: library users (the tuner's cost model) import this module.
  flags.DEFINE_string(
    "tenset_dir", None, "TenSet root directory (reads network_info/all_tasks.pkl).", required=True
  )
  flags.DEFINE_string("out", "", "Output JSON (default: TENSET_DIR/network_info/skeletons.json).")
  app.run(main)
