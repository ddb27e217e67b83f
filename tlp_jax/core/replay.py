"""Replays Ansor transform steps on a task skeleton: a program's final loop nest without TVM.

``replay(skeleton, steps)`` applies a record's steps (TVM 0.19 record format, every kind: AN FU
PR RE SP FSP FFSP SA CA CI CR CHR CHW RF) to the task's initial stages and then infers loop
extents the way ``ComputeDAG.infer_bound_from_state`` does (``te::InferBound`` on the normalized
schedule). It mirrors two views TVM keeps side by side:

* the auto-scheduler *state* (``loop_state.cc``/``transform_step.cc``): stage order, iterator
  names, order, kinds and annotations, ``auto_unroll_max_step``, and the attach map keyed by
  (stage index, iterator index), which is what TVM reports;
* the *te schedule* (``te/schedule``): per stage the split/fuse relations between its root axes
  and its loops, compute_at bound to loop *variables*, and the ops' data flow, which is what
  bound inference walks.

Bound inference follows ``te/schedule/bound.cc`` and ``message_passing.cc``: stages are visited
consumers first; a stage that is an output keeps its full domain, any other gets, per dimension,
the union over its consumers' accesses evaluated with interval arithmetic, where a consumer's
loops outside (and at) the attach point are symbolic points and loops inside it range over
their extents. Symbolic points are kept as affine forms so that they cancel in extents exactly
where TVM's simplifier cancels them; where they do not cancel TVM reports a non-constant extent,
and so does this module (``Loop`` extent flagged symbolic, value = its upper bound).

Pure Python, no TVM/JAX/NumPy in the hot path. Per-task work (initial ops, inline compositions)
is cached on the skeleton object.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from tlp_jax.core import skeleton as sk

log = logging.getLogger(__name__)

# Iterator kinds and annotations: TVM's IteratorKind / IteratorAnnotation enum values.
SPATIAL, REDUCE, MIXED, SPECIAL = 0, 1, 2, 3
ANNOTATIONS = (
  "none",
  "unroll",
  "vectorize",
  "parallel",
  "vthread",
  "blockIdx.x",
  "threadIdx.x",
  "blockIdx.y",
  "threadIdx.y",
  "blockIdx.z",
  "threadIdx.z",
  "tensorize",
)
# Compute locations: TVM's ComputeAtKind.
ROOT, INLINED, ITER = 0, 1, 2
PLACEHOLDER_STAGE, COMPUTE_STAGE = 0, 1

STEP_KINDS = (
  "AN",
  "FU",
  "PR",
  "RE",
  "SP",
  "FSP",
  "FFSP",
  "SA",
  "CA",
  "CI",
  "CR",
  "CHR",
  "CHW",
  "RF",
)


class ReplayError(ValueError):
  """A step cannot be replayed; the message names the step index and kind."""


# --------------------------------------------------------------------------- result types
# Plain tuples (not dataclasses) so building a nest costs little; field positions are fixed.
# Loop: (name, extent, kind, annotation, symbolic)
#   extent: int, or None where unknown (non-concrete splits, stages inlined after compute_at);
#   symbolic: True where TVM's extent is a non-constant expression (extent is then an upper
#   bound).
L_NAME, L_EXTENT, L_KIND, L_ANN, L_SYMBOLIC = range(5)
# Stage: (name, op_type, compute_at, attach_stage, attach_iter, auto_unroll_max_step,
#         storage_offset, pragmas, loops)
(
  S_NAME,
  S_OP_TYPE,
  S_COMPUTE_AT,
  S_ATTACH_STAGE,
  S_ATTACH_ITER,
  S_UNROLL,
  S_OFFSET,
  S_PRAGMAS,
  S_LOOPS,
) = range(9)
# Access info per stage (``LoopNest.access[i]``), what loop tokens need beyond the nest:
#   (is_output, is_cache, is_rfactor, loops, out_c, read_c)
#   loops: per loop (root axis of the stage's op or -1, coefficient of the loop variable in
#     that axis: the product of the extents of the split parts inside it; a fused loop is
#     followed through its inner part, the one that moves when the fused loop steps by one);
#   out_c / read_c: per root axis, the element stride of a unit step of the axis in the
#     stage's output buffer / the max over its read buffers (after inlining), row-major on
#     the full tensor shapes; 0 for reduce axes of the output and where an index is not affine;
#   reads: per effective read buffer (after inlining) ``(shape, rows)``, ``rows[d][r]`` the
#     magnitude |d index_d / d root axis r| of the access's index in dimension d: the affine
#     coefficient, or the dimension's size where the index is not affine in axis r (a non-affine
#     index: every axis it reads; an opaque one: every axis), which makes footprints conservative;
#   out_shape: the shape of the stage's output buffer (indexed by its spatial root axes).
A_OUTPUT, A_CACHE, A_RFACTOR, A_LOOPS, A_OUT_C, A_READ_C, A_READS, A_OUT_SHAPE = range(8)


class LoopNest:
  """A program's final loop nest: one entry per stage, in TVM's stage order.

  ``stages[i]`` is a tuple (see the ``S_*`` field indices): name, op type (0 placeholder,
  1 compute), compute location (0 root, 1 inlined, 2 at a loop), the attach point
  (stage index, loop index) or (-1, -1), ``auto_unroll_max_step``, storage offset, other
  pragmas ``((loop index, text), ...)``, and its loops outermost first, each a tuple
  ``(name, extent, kind, annotation, symbolic)`` (``L_*`` indices; kind 0 spatial, 1 reduce,
  2 mixed, 3 special; annotation indexes :data:`ANNOTATIONS`).
  """

  __slots__ = ("stages", "concrete", "attach_order", "access")

  def __init__(
    self, stages: tuple, concrete: bool = True, attach_order: tuple = (), access: tuple = ()
  ):
    self.stages = stages
    self.concrete = concrete
    self.attach_order = attach_order  # attached stages in TVM's attach-map order
    # Per stage (None for placeholders, inlined stages and stages without bounds):
    # (is_output, is_cache, is_rfactor, loops, out_c, read_c, reads, out_shape), see
    # :data:`A_LOOPS` ...
    self.access = access

  def __repr__(self) -> str:
    return f"LoopNest({len(self.stages)} stages)"

  def to_text(self, delete_trivial_loop: bool = False) -> str:
    """The nest printed like TVM's ``State`` printer (``PrintState``), loop mins left out.

    Attached stages follow the loop they are attached at, in attach order; with
    ``delete_trivial_loop`` loops of extent 1 are not printed (as ``str(state)`` does).
    """
    out: list[str] = []
    ph = [s[S_NAME] for s in self.stages if s[S_OP_TYPE] == PLACEHOLDER_STAGE]
    out.append("Placeholder: " + ", ".join(ph))
    attached: dict = {}
    for i in self.attach_order:
      s = self.stages[i]
      attached.setdefault((s[S_ATTACH_STAGE], s[S_ATTACH_ITER]), []).append(i)

    def emit(i, indent):
      s = self.stages[i]
      if s[S_UNROLL]:
        out.append(" " * indent + f"{s[S_NAME]} auto_unroll: {s[S_UNROLL]}")
      if s[S_OFFSET]:
        out.append(" " * indent + f"{s[S_NAME]} storage_offset: {s[S_OFFSET]}")
      d = indent
      for j, lp in enumerate(s[S_LOOPS]):
        e = lp[L_EXTENT]
        if not (delete_trivial_loop and e == 1 and not lp[L_SYMBOLIC]):
          ext = "None" if e is None else (f"~{e}" if lp[L_SYMBOLIC] else str(e))
          ann = ANNOTATIONS[lp[L_ANN]] if lp[L_ANN] else "for"  # TVM prints kNone as "for"
          out.append(" " * d + f"{ann} {lp[L_NAME]} ({ext})")
          d += 2
        for k in attached.get((i, j), ()):
          emit(k, d)
      out.append(" " * d + f"{s[S_NAME]} = ...")

    for i, s in enumerate(self.stages):
      if s[S_OP_TYPE] == COMPUTE_STAGE and s[S_COMPUTE_AT] == ROOT:
        emit(i, 0)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- ops
class _Op:
  """A te operation as bound inference sees it: axes and reads. Shared, never mutated."""

  __slots__ = (
    "name",
    "axes",
    "n_sp",
    "reads",
    "output",
    "const_matrix",
    "shape",
    "is_ph",
    "key",
    "iter_tmpl",
    "var_tmpl",
    "is_rf",
  )

  def __init__(self, name, axes, reads, output, const_matrix, shape, is_ph=False):
    self.name = name
    self.axes = axes  # ((te var name, 0 spatial | 1 reduce, extent), ...)
    self.n_sp = sum(1 for a in axes if a[1] == 0)
    self.reads = reads  # ((producer _Op, (expr per dim, ...)), ...)
    self.output = output
    self.const_matrix = const_matrix
    self.shape = shape
    self.is_ph = is_ph
    self.key = None
    # Templates of a fresh stage's state iterators and te vars (copied per replay).
    self.iter_tmpl = tuple((_clean(a[0]), a[1], 0, a[2]) for a in axes)
    self.var_tmpl = tuple((a[0], a[1]) for a in axes)
    self.is_rf = False


# Index expressions: ("A", ((pos, coef), ...), const) affine, ("T", tree), or None (opaque);
# tree: int | ("v", pos) | (op, a, b).
def _affine_from_skel(x, n):
  if x is None:
    return None
  if x[0] == "e":
    return _canon_tree(x[1])
  return ("A", tuple((i, c) for i, c in enumerate(x[:n]) if c), x[n])


def _canon_tree(t):
  """Tree -> affine form where it is affine (after substitution trees often are)."""
  a = _tree_affine(t)
  if a is not None:
    return ("A", tuple(sorted((p, c) for p, c in a[0].items() if c)), a[1])
  return ("T", t)


def _tree_affine(t):
  if isinstance(t, int):
    return {}, t
  op = t[0]
  if op == "v":
    return {t[1]: 1}, 0
  a, b = _tree_affine(t[1]), _tree_affine(t[2])
  if a is None or b is None:
    return None
  if op == "+" or op == "-":
    s = 1 if op == "+" else -1
    d = dict(a[0])
    for p, c in b[0].items():
      d[p] = d.get(p, 0) + s * c
    return d, a[1] + s * b[1]
  if op == "*":
    if not b[0]:
      return {p: c * b[1] for p, c in a[0].items()}, a[1] * b[1]
    if not a[0]:
      return {p: c * a[1] for p, c in b[0].items()}, a[1] * b[1]
    return None
  if not a[0] and not b[0]:
    x, y = a[1], b[1]
    if op == "//" and y:
      return {}, x // y
    if op == "%" and y:
      return {}, x % y
    if op == "min":
      return {}, min(x, y)
    if op == "max":
      return {}, max(x, y)
  return None


def _to_tree(e):
  if e[0] == "T":
    return e[1]
  t = e[2]
  for p, c in e[1]:
    term = ("v", p) if c == 1 else ("*", ("v", p), c)
    t = term if t == 0 else ("+", t, term)
  return t


def _subst_tree(t, m):
  if isinstance(t, int):
    return t
  if t[0] == "v":
    return m[t[1]]
  return (t[0], _subst_tree(t[1], m), _subst_tree(t[2], m))


def _subst(e, m):
  """Substitutes position ``p`` by expression ``m[p]`` (same representation) in ``e``."""
  if e is None:
    return None
  if e[0] == "A" and all(m[p] is not None and m[p][0] == "A" for p, _ in e[1]):
    d: dict = {}
    const = e[2]
    for p, c in e[1]:
      _, terms, k = m[p]
      const += c * k
      for q, cq in terms:
        d[q] = d.get(q, 0) + c * cq
    return ("A", tuple(sorted((q, c) for q, c in d.items() if c)), const)
  if any(m[p] is None for p in _positions(e)):
    return None
  return _canon_tree(
    _subst_tree(_to_tree(e), {p: _to_tree(x) for p, x in m.items() if x is not None})
  )


def _positions(e):
  if e[0] == "A":
    return [p for p, _ in e[1]]
  out = []

  def walk(t):
    if isinstance(t, int):
      return
    if t[0] == "v":
      out.append(t[1])
    else:
      walk(t[1])
      walk(t[2])

  walk(e[1])
  return out


def _ident(positions):
  return tuple(("A", ((p, 1),), 0) for p in positions)


class _TaskCache:
  """Per-skeleton precomputation, kept on the skeleton object."""

  __slots__ = ("ops", "composed", "derived", "strides")

  def __init__(self, skel: sk.Skeleton):
    ops: list = []
    for s in skel.stages:
      if s.type == sk.PLACEHOLDER:
        ops.append(_Op(s.name, (), (), False, False, s.shape, True))
        continue
      n = len(s.iters)
      axes = tuple((name, 0 if k == sk.SPATIAL else 1, e) for name, k, e in s.iters)
      reads = tuple((r.producer, tuple(_affine_from_skel(x, n) for x in r.index)) for r in s.reads)
      ops.append(_Op(s.name, axes, reads, s.output, s.const_matrix, s.shape))
    for op in ops:
      if not op.is_ph:
        op.reads = tuple((ops[p], idx) for p, idx in op.reads)
    self.ops = tuple(ops)
    self.composed: dict = {}  # (op ids, inlined flags) -> effective reads per stage
    self.derived: dict = {}  # memoized ops made by CHW / CHR (keyed by inputs)
    self.strides: dict = {}  # (op id, effective reads id) -> (out_c, read_c)


def _cache(skel: sk.Skeleton) -> _TaskCache:
  c = skel.__dict__.get("_replay_cache")
  if c is None:
    c = _TaskCache(skel)
    object.__setattr__(skel, "_replay_cache", c)
  return c


def drop_cache(skel: sk.Skeleton) -> None:
  """Forgets what :func:`replay` memoized for ``skel``'s task (it grows with the task's distinct
  program structures). A caller done with a task calls it to keep its memory bounded over many
  tasks; replays after it give the same nests, computed afresh."""
  skel.__dict__.pop("_replay_cache", None)


# --------------------------------------------------------------------------- replay state
class _Stage:
  """One stage during replay: the auto-scheduler view (iters) and the te view (vars, rels)."""

  __slots__ = (
    "op",
    "iters",
    "compute_at",
    "unroll",
    "offset",
    "pragmas",
    "vars",
    "rels",
    "leaf",
    "attach",
    "scope",
    "bound",
    "rng",
  )

  def __init__(self, op: _Op):
    self.op = op
    # iters: [state name, kind, annotation, state extent]; leaf[i] = te var of iters[i]
    self.iters = [list(t) for t in op.iter_tmpl]
    self.compute_at = ROOT
    self.unroll = 0
    self.offset = 0
    self.pragmas: list = []
    self.vars = [list(t) for t in op.var_tmpl]  # te vars: [name, kind]
    self.rels: list = []  # split / fuse / singleton relations
    self.leaf = list(range(len(op.axes)))
    self.attach = None  # te attach: (_Stage, var) or None
    self.scope = ""
    self.bound: dict = {}  # var -> thread annotation
    self.rng = None  # after inference: var -> (min, extent)


def _clean(name: str) -> str:
  # auto_scheduler's CleanName: how fresh stages name their iterators.
  return name.replace(".", "_").replace("@", "_").replace("outer", "o").replace("inner", "i")


def _ceil_div(a, b):
  return -(-a // b)


class _Replayer:
  """Applies steps to a list of _Stage; mirrors TVM's attach map keyed by indices."""

  def __init__(self, cache: _TaskCache, steps: Sequence):
    self.cache = cache
    self.steps = steps
    self.stages = [_Stage(op) for op in cache.ops]
    self.attach: dict = {}  # state attach map: stage idx -> (stage idx, iter idx)
    self.concrete = True

  # ---- attach-map helpers (AttachMap in loop_state.cc)
  def _update_iters(self, sid, mapping):
    if not self.attach:
      return
    for s, (t, i) in list(self.attach.items()):
      if t == sid and i in mapping:
        self.attach[s] = (t, mapping[i])

  def _offset_stage_ids(self, start, offset=1):
    new = {}
    for s, (t, i) in self.attach.items():
      new[s + offset if s >= start else s] = (t + offset if t >= start else t, i)
    self.attach = new

  def _attached_to(self, sid, iid):
    return any(v == (sid, iid) for v in self.attach.values())

  # ---- steps
  def run(self):
    for n, step in enumerate(self.steps):
      try:
        kind = step[0]
      except (TypeError, IndexError) as e:
        raise ReplayError(f"step {n}: not a step record: {step!r}") from e
      fn = _DISPATCH.get(kind)
      if fn is None:
        raise ReplayError(f"step {n} ({kind!r}): unknown step kind; known: {', '.join(STEP_KINDS)}")
      try:
        fn(self, n, step)
      except ReplayError:
        raise
      except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ReplayError(
          f"step {n} ({kind}): cannot apply {step!r}: {type(e).__name__}: {e}"
        ) from e

  def _stage(self, sid) -> _Stage:
    if not 0 <= sid < len(self.stages):
      raise ReplayError(f"stage {sid} out of range ({len(self.stages)} stages)")
    return self.stages[sid]

  def an(self, n, st):
    _, sid, iid, ann = st
    s = self._stage(sid)
    if not 0 <= ann < len(ANNOTATIONS):
      raise ReplayError(f"step {n} (AN): unknown annotation {ann}")
    s.iters[iid][2] = ann
    if 4 <= ann <= 10:
      s.bound[s.leaf[iid]] = ann

  def fu(self, n, st):
    _, sid, ids = st
    s = self._stage(sid)
    for a, b in zip(ids, ids[1:]):
      if b != a + 1:
        raise ReplayError(f"step {n} (FU): iterators {ids} are not consecutive")
    for i in ids[:-1]:
      if self._attached_to(sid, i):
        raise ReplayError(f"step {n} (FU): iterator {i} has stages attached")
    its = [s.iters[i] for i in ids]
    name = "".join(it[0] + "@" for it in its)
    ext = 1
    kind = SPECIAL
    for k, it in enumerate(its):
      ext = None if ext is None or it[3] is None else ext * it[3]
      kind = it[1] if k == 0 else (kind if kind == it[1] else MIXED)
    new_it = [name, kind, 0, ext]
    if not ids:
      # TVM's state keeps only the new iterator here; te inserts a singleton loop.
      v = len(s.vars)
      s.vars.append(["singleton", 0])
      s.rels.append(("1", v))
      s.iters = [new_it]
      s.leaf = [v]
      return
    b, e = ids[0], ids[-1]
    old = len(s.iters)
    var = s.leaf[b]
    for i in ids[1:]:
      outer, inner = var, s.leaf[i]
      v = len(s.vars)
      s.vars.append(
        [
          s.vars[outer][0] + "." + s.vars[inner][0] + ".fused",
          max(s.vars[outer][1], s.vars[inner][1]),
        ]
      )
      s.rels.append(("F", outer, inner, v))
      var = v
    s.iters[b : e + 1] = [new_it]
    s.leaf[b : e + 1] = [var]
    self._update_iters(sid, {i: (b if i <= e else i - e + b) for i in range(b + 1, old)})

  def pr(self, n, st):
    _, sid, iid, text = st
    s = self._stage(sid)
    if text == "debug_skip_region":
      self.attach.pop(sid, None)
    elif text.startswith("auto_unroll_max_step"):
      pos = text.find("$")
      if pos < 0:
        raise ReplayError(f"step {n} (PR): max step value not found in {text!r}")
      # A traced pragma (tlp_jax.core.replay_cache) carries its value as a traced int.
      v = getattr(text, "value", None)
      s.unroll = _atoi(text[pos + 1 :]) if v is None else v
    else:
      # TVM's state refuses other pragmas; they are kept here for the record.
      s.pragmas.append((iid, text))

  def re(self, n, st):
    _, sid, order = st
    s = self._stage(sid)
    if sorted(order) != list(range(len(s.iters))):
      raise ReplayError(f"step {n} (RE): {order} is not a permutation of {len(s.iters)} iterators")
    s.iters = [s.iters[i] for i in order]
    s.leaf = [s.leaf[i] for i in order]

  def _split(self, sid, iid, lengths, inner_to_outer):
    s = self._stage(sid)
    it = s.iters[iid]
    name, kind, ext = it[0], it[1], it[3]
    k = len(lengths)
    outs = []
    tosplit = ext
    for i in range(k):
      if inner_to_outer:
        length = lengths[k - i - 1]
        nm = f"{name}.{k - i}"
      else:
        length = lengths[i]
        nm = f"{name}.{i}"
      if length is not None and tosplit is not None:
        outs.append([nm, kind, 0, length])
        tosplit = _ceil_div(tosplit, length)
      else:
        outs.append([nm, kind, 0, None])
        tosplit = None
        if length is None:
          self.concrete = False
    if inner_to_outer:
      outs.append([f"{name}.0", kind, 0, tosplit])
      outs.reverse()
    else:
      outs.append([f"{name}.{k}", kind, 0, tosplit])
    # te view: repeated factor splits from the inside, or nparts splits from the outside.
    var = s.leaf[iid]
    vkind = s.vars[var][1]
    tvars = []
    if inner_to_outer:
      outer = var
      for i in range(k - 1, -1, -1):
        o, inn = len(s.vars), len(s.vars) + 1
        s.vars.append([s.vars[outer][0] + ".outer", vkind])
        s.vars.append([s.vars[outer][0] + ".inner", vkind])
        s.rels.append(("S", outer, o, inn, lengths[i], None))
        tvars.append(inn)
        outer = o
      tvars.append(outer)
      tvars.reverse()
    else:
      inner = var
      for i in range(k):
        o, inn = len(s.vars), len(s.vars) + 1
        s.vars.append([s.vars[inner][0] + ".outer", vkind])
        s.vars.append([s.vars[inner][0] + ".inner", vkind])
        s.rels.append(("S", inner, o, inn, None, lengths[i]))
        tvars.append(o)
        inner = inn
      tvars.append(inner)
    old = len(s.iters)
    s.iters[iid : iid + 1] = outs
    s.leaf[iid : iid + 1] = tvars
    self._update_iters(sid, {i: i + k for i in range(iid, old)})

  def sp(self, n, st):
    _, sid, iid, _extent, lengths, i2o = st
    self._split(
      sid, iid, [n if n is None or isinstance(n, int) else int(n) for n in lengths], bool(i2o)
    )

  def _src_split(self, n, src):
    if not 0 <= src < n or self.steps[src][0] != "SP":
      raise ReplayError(f"step {n}: source step {src} is not an earlier SP step")
    return self.steps[src][4]

  def fsp(self, n, st):
    _, sid, iid, src, n_split = st
    src_len = self._src_split(n, src)
    if n_split > len(src_len) + 1:
      raise ReplayError(f"step {n} (FSP): n_split {n_split} > {len(src_len) + 1}")
    lengths = list(src_len[: n_split - 1])
    last = 1
    for n_len in src_len[n_split - 1 :]:
      last = None if last is None or n_len is None else last * n_len
    lengths.append(last)
    self._split(sid, iid, lengths, True)

  def ffsp(self, n, st):
    _, sid, iid, srcs, level, factor_or_nparts = st
    f = 1
    for src in srcs:
      length = self._src_split(n, src)[level]
      if length is None:
        f = None
        break
      f *= length
    self._split(sid, iid, [f], bool(factor_or_nparts))

  def sa(self, n, st):
    _, sid, _iid, _factor, offset = st
    self._stage(sid).offset = offset

  def ca(self, n, st):
    _, sid, tid, tiid = st
    s, t = self._stage(sid), self._stage(tid)
    for it in s.iters:
      it[3] = None
    s.compute_at = ITER
    self.attach.pop(sid, None)  # re-attaching moves the stage to the end of the attach order
    self.attach[sid] = (tid, tiid)
    s.attach = (t, t.leaf[tiid])

  def ci(self, n, st):
    _, sid = st
    s = self._stage(sid)
    for i in range(len(s.iters)):
      if self._attached_to(sid, i):
        raise ReplayError(f"step {n} (CI): stages are attached to stage {sid}")
    s.compute_at = INLINED
    self.attach.pop(sid, None)
    s.attach = None

  def cr(self, n, st):
    _, sid = st
    s = self._stage(sid)
    for it in s.iters:
      it[3] = None
    s.compute_at = ROOT
    self.attach.pop(sid, None)
    s.attach = None

  def _replace_reads(self, old: _Op, new: _Op, only=None):
    """te's ReplaceDataFlow: readers of ``old`` read ``new``; every op whose inputs changed is
    itself replaced, so the change cascades to its readers (stages are in topological order).
    ``only`` restricts the first substitution to these stages (cache_read's readers)."""
    repl = {old: new}
    for s in self.stages:
      op = s.op
      if op.is_ph or op is new:
        continue
      hit = False
      for p, _ in op.reads:
        if p in repl and (p is not old or only is None or s in only):
          hit = True
          break
      if not hit:
        continue
      reads = tuple(
        ((repl[p] if (p in repl and (p is not old or only is None or s in only)) else p), i)
        for p, i in op.reads
      )
      nop = _derive(
        self.cache,
        ("repl", op) + tuple(p for p, _ in reads),
        lambda op=op, r=reads: _Op(op.name, op.axes, r, op.output, op.const_matrix, op.shape),
      )
      repl[op] = nop
      s.op = nop

  def chr(self, n, st):
    _, sid, scope, readers = st
    s = self._stage(sid)
    x = s.op
    names = {t.op.name for t in self.stages}
    base = x.name
    while f"{base}.{scope}" in names:
      base += ".d"
    shape = x.shape
    reader_stages = [self._stage(r) for r in readers]
    cop = _derive(
      self.cache,
      ("chr", x, scope, base),
      lambda: _Op(
        f"{base}.{scope}",
        tuple((f"ax{i}", 0, e) for i, e in enumerate(shape)),
        ((x, _ident(range(len(shape)))),),
        False,
        False,
        shape,
      ),
    )
    self._replace_reads(x, cop, only=reader_stages)
    new = _Stage(cop)
    new.scope = scope
    self.stages.insert(sid + 1, new)
    self._offset_stage_ids(sid + 1)

  def chw(self, n, st):
    _, sid, scope = st
    s = self._stage(sid)
    x = s.op
    if s.rels:
      raise ReplayError(
        f"step {n} (CHW): stage {sid} was transformed before cache_write; "
        "TVM's auto-scheduler assumes it was not"
      )
    if x.is_ph:
      raise ReplayError(f"step {n} (CHW): stage {sid} is a placeholder")

    def make():
      axes = tuple((a[0] + ".c", a[1], a[2]) if a[1] == 0 else a for a in x.axes)
      cop = _Op(f"{x.name}.{scope}", axes, x.reads, False, x.const_matrix, x.shape)
      nop = _Op(
        x.name, x.axes[: x.n_sp], ((cop, _ident(range(x.n_sp))),), x.output, x.const_matrix, x.shape
      )
      return cop, nop

    cop, nop = _derive(self.cache, ("chw", x, scope), make)
    self._replace_reads(x, nop)
    cache_stage = _Stage(cop)
    cache_stage.scope = scope
    fresh = _Stage(nop)
    fresh.attach = s.attach  # te keeps the stage object (and its attach spec)
    fresh.bound = {}
    self.stages[sid] = fresh
    self.stages.insert(sid, cache_stage)
    self._offset_stage_ids(sid, 1)

  def rf(self, n, st):
    _, sid, iid, factor_iter = st
    s = self._stage(sid)
    x = s.op
    if x.is_ph:
      raise ReplayError(f"step {n} (RF): stage {sid} is a placeholder")
    axis = s.leaf[iid]
    if s.vars[axis][1] != 1:
      raise ReplayError(f"step {n} (RF): iterator {iid} is not a reduction iterator")
    # Touched vars: everything connected to `axis` through the relations (PassUp/DownBitMask).
    touched = {axis}
    for r in reversed(s.rels):
      if r[0] == "S" and (r[2] in touched or r[3] in touched):
        touched.add(r[1])
      elif r[0] == "F" and r[3] in touched:
        touched.add(r[1])
        touched.add(r[2])
    for r in s.rels:
      if r[0] == "S" and r[1] in touched:
        touched.add(r[2])
        touched.add(r[3])
      elif r[0] == "F" and (r[1] in touched or r[2] in touched):
        touched.add(r[3])
    n_sp = x.n_sp
    if any(v in touched for v in range(n_sp)):
      raise ReplayError(f"step {n} (RF): the factored axis touches a spatial axis")
    # Domains of touched vars without tightening (PassDownDomain with allow_missing).
    dom = {v: x.axes[v][2] for v in range(len(x.axes)) if v in touched}
    for r in s.rels:
      if r[0] == "S" and r[1] in dom:
        pe = dom[r[1]]
        if r[4] is not None:
          dom[r[3]], dom[r[2]] = r[4], _ceil_div(pe, r[4])
        else:
          dom[r[2]], dom[r[3]] = r[5], _ceil_div(pe, r[5])
      elif r[0] == "F" and r[1] in dom and r[2] in dom:
        dom[r[3]] = dom[r[1]] * dom[r[2]]
    fpos = factor_iter if factor_iter >= 0 else n_sp + 1 + factor_iter
    if not 0 <= fpos <= n_sp:
      raise ReplayError(f"step {n} (RF): factor axis {factor_iter} out of range")
    # rf op: spatial axes with `axis` inserted at fpos; reduce: untouched roots, then the
    # touched leaves other than `axis` in loop order.
    sp_pos = [j if j < fpos else j + 1 for j in range(n_sp)]
    axes = [x.axes[j] for j in range(n_sp)]
    axes.insert(fpos, (s.vars[axis][0], 0, dom[axis]))
    pos_of = {axis: fpos}
    red_map: dict = {}
    for v in range(n_sp, len(x.axes)):
      if v not in touched:
        red_map[v] = len(axes)
        axes.append(x.axes[v])
    for v in s.leaf:
      if v in touched and v != axis:
        pos_of[v] = len(axes)
        axes.append((s.vars[v][0], 1, dom[v]))
    # Values of touched roots over the rf op's axes (PassUpIndex).
    val = {v: (0 if dom[v] == 1 else ("v", p)) for v, p in pos_of.items()}
    for r in reversed(s.rels):
      if r[0] == "S" and r[2] in val and r[3] in val:
        f = dom[r[3]]
        val[r[1]] = ("+", val[r[3]], ("*", val[r[2]], f))
      elif r[0] == "F" and r[3] in val:
        f = dom[r[2]]
        val[r[1]] = ("//", val[r[3]], f)
        val[r[2]] = ("%", val[r[3]], f)
    m = {}
    for j in range(n_sp):
      m[j] = ("A", ((sp_pos[j], 1),), 0)
    for v in range(n_sp, len(x.axes)):
      m[v] = ("A", ((red_map[v], 1),), 0) if v in red_map else _canon_tree(val[v])
    reads = tuple((p, tuple(_subst(e, m) for e in idx)) for p, idx in x.reads)
    rop = _Op(
      x.name + ".rf",
      tuple(axes),
      reads,
      False,
      x.const_matrix,
      tuple(a[2] for a in axes if a[1] == 0),
    )
    rop.is_rf = True
    repl_axes = [(f"ax{i}", 0, e) for i, e in enumerate(x.shape)]
    repl_axes.append((s.vars[axis][0] + ".v", 1, dom[axis]))
    ridx = [("A", ((j, 1),), 0) for j in range(n_sp)]
    ridx.insert(fpos, ("A", ((n_sp, 1),), 0))
    nop = _Op(
      x.name + ".repl", tuple(repl_axes), ((rop, tuple(ridx)),), x.output, x.const_matrix, x.shape
    )
    self._replace_reads(x, nop)
    rf_stage = _Stage(rop)
    fresh = _Stage(nop)
    fresh.compute_at = s.compute_at
    fresh.attach = s.attach
    self.stages[sid] = fresh
    self.stages.insert(sid, rf_stage)
    self._offset_stage_ids(sid)


def _atoi(text: str) -> int:
  # C atoi: leading integer, 0 when there is none.
  j = 0
  if text[:1] in "+-":
    j = 1
  while j < len(text) and text[j].isdigit():
    j += 1
  try:
    return int(text[:j])
  except ValueError:
    return 0


def _derive(cache: _TaskCache, key, make):
  # Ops made by CHW/CHR/read replacement are memoized per task so that identical programs share
  # op objects (and so share inline compositions).
  k = tuple(id(x) if isinstance(x, _Op) else x for x in key)
  v = cache.derived.get(k)
  if v is None:
    v = make()
    cache.derived[k] = v
    cache.derived[(k, "keep")] = key  # keeps the key's ops alive, so ids stay unique
  return v


_DISPATCH = {
  "AN": _Replayer.an,
  "FU": _Replayer.fu,
  "PR": _Replayer.pr,
  "RE": _Replayer.re,
  "SP": _Replayer.sp,
  "FSP": _Replayer.fsp,
  "FFSP": _Replayer.ffsp,
  "SA": _Replayer.sa,
  "CA": _Replayer.ca,
  "CI": _Replayer.ci,
  "CR": _Replayer.cr,
  "CHR": _Replayer.chr,
  "CHW": _Replayer.chw,
  "RF": _Replayer.rf,
}


# --------------------------------------------------------------------------- symbolic forms
# A form is an int or ("S", const, ((atom id, coef), ...)) with atoms sorted; atoms are loop
# variables held as symbolic points, or floordiv/floormod/min/max of forms that do not
# simplify. Each atom has numeric bounds, used where TVM's analyzer proves comparisons from
# variable ranges.
class _Sym:
  __slots__ = ("atoms", "index", "bounds")

  def __init__(self):
    self.atoms: list = []  # atom id -> key
    self.index: dict = {}  # key -> atom id
    self.bounds: list = []  # atom id -> (lo, hi)

  def atom(self, key, lo, hi):
    a = self.index.get(key)
    if a is None:
      a = len(self.atoms)
      self.atoms.append(key)
      self.index[key] = a
      self.bounds.append((lo, hi))
    return a

  def var(self, key, ext):
    return ("S", 0, ((self.atom(("x", key), 0, ext - 1), 1),))

  def lohi(self, f):
    if isinstance(f, int):
      return f, f
    lo = hi = f[1]
    for a, c in f[2]:
      blo, bhi = self.bounds[a]
      if c > 0:
        lo += c * blo
        hi += c * bhi
      else:
        lo += c * bhi
        hi += c * blo
    return lo, hi

  def floordiv(self, f, c):
    """floordiv(f, c) for c > 0, canonicalised like TVM's simplifier: multiples of ``c`` are
    pulled out, and with g = gcd(coefficients, c) a remainder below ``g`` is dropped
    (floordiv(4x + 3, 16) == floordiv(x, 4)), so equal quotients share one atom."""
    if isinstance(f, int):
      return f // c
    out_terms = []
    rest = []
    for a, k in f[2]:
      if k % c == 0:
        out_terms.append((a, k // c))
      else:
        rest.append((a, k))
    q, b = divmod(f[1], c)
    if not rest:
      return _mk(q, tuple(out_terms))
    g = c
    for _, k in rest:
      g = _gcd(g, k)
    if g > 1:
      rest = [(a, k // g) for a, k in rest]
      b //= g
      c //= g
    base = ("S", b, tuple(rest))
    lo, hi = self.lohi(base)
    atom = self.atom(("fd", base, c), lo // c, hi // c)
    return _add(_mk(q, tuple(out_terms)), ("S", 0, ((atom, 1),)))

  def floormod(self, f, c):
    """floormod(f, c) of a point, canonicalised like :meth:`floordiv`:
    floormod(g*x + b, g*c') == g*floormod(x + b // g, c') + b % g. It stays an atom (not
    f - c*floordiv(f, c)) because relaxing it must give [0, c - 1], as TVM's interval rule."""
    if isinstance(f, int):
      return f % c
    rest = [(a, k) for a, k in f[2] if k % c]
    b = f[1] % c
    if not rest:
      return b
    g = c
    for _, k in rest:
      g = _gcd(g, k)
    r = 0
    if g > 1:
      rest = [(a, k // g) for a, k in rest]
      b, r = divmod(b, g)
      c //= g
    base = ("S", b, tuple(rest))
    lo, hi = self.lohi(base)
    # [lo % c, hi % c] when lo and hi share a quotient, else [0, c - 1]; as arithmetic
    # (same = 1 // (|quotient gap| + 1): 1 iff the gap is 0), so a traced replay records no
    # guard on it (replay_cache) and programs of one template keep sharing their trace.
    same = 1 // (abs(hi // c - lo // c) + 1)
    blo, bhi = same * (lo % c), same * (hi % c) + (1 - same) * (c - 1)
    atom = self.atom(("fm", base, c), blo, bhi)
    return ("S", r, ((atom, g),))

  def minmax(self, a, b, is_min):
    d = _sub(a, b)
    if isinstance(d, int):
      return (a if d <= 0 else b) if is_min else (a if d >= 0 else b)
    lo, hi = self.lohi(d)
    if hi <= 0:
      return a if is_min else b
    if lo >= 0:
      return b if is_min else a
    alo, ahi = self.lohi(a)
    blo, bhi = self.lohi(b)
    bnd = (min(alo, blo), min(ahi, bhi)) if is_min else (max(alo, blo), max(ahi, bhi))
    return ("S", 0, ((self.atom(("min" if is_min else "max", a, b), *bnd), 1),))


def _gcd(a, b):
  # math.gcd would strip a traced int (replay_cache) of its trace; traced ints define .gcd.
  if type(a) is int and type(b) is int:  # pylint: disable=unidiomatic-typecheck
    return math.gcd(a, b)
  return a.gcd(b) if type(a) is not int else b.gcd(a)  # pylint: disable=unidiomatic-typecheck


# The _Sym class bound inference uses; tracing (replay_cache) swaps in one whose atom lookup
# compares keys with == (recorded) instead of hashing them.
_SYM_CLASS = [None]


def _mk(const, terms):
  terms = tuple(t for t in terms if t[1])
  return const if not terms else ("S", const, terms)


_SYM_CLASS[0] = _Sym


def _add(a, b):
  if isinstance(a, int):
    if isinstance(b, int):
      return a + b
    return ("S", b[1] + a, b[2])
  if isinstance(b, int):
    return ("S", a[1] + b, a[2])
  d = dict(a[2])
  for k, c in b[2]:
    d[k] = d.get(k, 0) + c
  return _mk(a[1] + b[1], tuple(sorted(d.items())))


def _scale(a, k):
  if isinstance(a, int):
    return a * k
  if k == 0:
    return 0
  return ("S", a[1] * k, tuple((x, c * k) for x, c in a[2]))


def _sub(a, b):
  return _add(a, _scale(b, -1))


_INF = None  # an unbounded interval end (opaque index)


def _eval_interval(sym: _Sym, e, env):
  """Interval (lo, hi) of index expression ``e``; ``env[pos]`` is an interval of forms."""
  if e is None:
    return None
  if e[0] == "A":
    lo = hi = e[2]
    for p, c in e[1]:
      iv = env[p]
      if iv is None:
        return None
      a, b = iv
      if c == 1:
        lo = _add(lo, a)
        hi = _add(hi, b)
      elif c > 0:
        lo = _add(lo, _scale(a, c))
        hi = _add(hi, _scale(b, c))
      else:
        lo = _add(lo, _scale(b, c))
        hi = _add(hi, _scale(a, c))
    return lo, hi
  return _eval_tree(sym, e[1], env)


def _eval_tree(sym, t, env):
  if isinstance(t, int):
    return t, t
  op = t[0]
  if op == "v":
    return env[t[1]]
  a = _eval_tree(sym, t[1], env)
  b = _eval_tree(sym, t[2], env)
  if a is None or b is None:
    return None
  if op == "+":
    return _add(a[0], b[0]), _add(a[1], b[1])
  if op == "-":
    return _sub(a[0], b[1]), _sub(a[1], b[0])
  point_b = isinstance(b[0], int) and b[0] == b[1]
  if op == "*":
    if point_b or (isinstance(a[0], int) and a[0] == a[1]):
      if not point_b:
        a, b = b, a
      k = b[0]
      return (_scale(a[0], k), _scale(a[1], k)) if k >= 0 else (_scale(a[1], k), _scale(a[0], k))
    return None
  if op in ("//", "%"):
    if not point_b or b[0] <= 0:
      return None
    c = b[0]
    if op == "//":
      return sym.floordiv(a[0], c), sym.floordiv(a[1], c)
    if a[0] == a[1]:
      v = sym.floormod(a[0], c)
      return v, v
    qmin, qmax = sym.floordiv(a[0], c), sym.floordiv(a[1], c)
    d = _sub(qmax, qmin)
    if isinstance(d, int) and d == 0:
      return _sub(a[0], _scale(qmin, c)), _sub(a[1], _scale(qmin, c))
    if not isinstance(d, int) and sym.lohi(d) == (0, 0):
      return _sub(a[0], _scale(qmin, c)), _sub(a[1], _scale(qmin, c))
    return 0, c - 1
  if op == "min":
    return sym.minmax(a[0], b[0], True), sym.minmax(a[1], b[1], True)
  if op == "max":
    return sym.minmax(a[0], b[0], False), sym.minmax(a[1], b[1], False)
  return None


def _relax(sym: _Sym, f, relaxed, upper: bool):
  """Bound of form ``f`` with the atoms in ``relaxed`` (loop variables) ranging over their
  extents (``arith::EvalSet`` with a relax map); others stay symbolic."""
  if isinstance(f, int) or not relaxed:
    return f
  out = f[1]
  for a, c in f[2]:
    key = sym.atoms[a]
    if key[0] == "x":
      if a in relaxed:
        lo, hi = sym.bounds[a]
        out = _add(out, c * (hi if (c > 0) == upper else lo))
      else:
        out = _add(out, ("S", 0, ((a, c),)))
      continue
    want_upper = (c > 0) == upper
    if key[0] in ("fd", "fm"):
      base, d = key[1], key[2]
      lo, hi = _relax(sym, base, relaxed, False), _relax(sym, base, relaxed, True)
      if key[0] == "fd":
        v = sym.floordiv(hi if want_upper else lo, d)
      else:
        if lo == hi:
          v = sym.floormod(lo, d)
        else:
          q0, q1 = sym.floordiv(lo, d), sym.floordiv(hi, d)
          dq = _sub(q1, q0)
          if (isinstance(dq, int) and dq == 0) or (
            not isinstance(dq, int) and sym.lohi(dq) == (0, 0)
          ):
            v = _sub(hi if want_upper else lo, _scale(q0, d))
          else:
            v = d - 1 if want_upper else 0
    else:  # min / max
      x = _relax(sym, key[1], relaxed, want_upper)
      y = _relax(sym, key[2], relaxed, want_upper)
      v = sym.minmax(x, y, key[0] == "min")
    out = _add(out, _scale(v, c))
  return out


# --------------------------------------------------------------------------- bound inference
_THREAD_RANK = {4: 1, 5: 0, 6: 1, 7: 0, 8: 1, 9: 0, 10: 1}
_SCOPE_RANK = {"global": 0, "shared": 1, "warp": 2, "local": 3}


def _legal_attach(t: _Stage, var):
  # LegalizeInvalidAttach: a split attach var moves to its inner part, a fused one to the fuse.
  leaf = set(t.leaf)
  while var not in leaf:
    for r in t.rels:
      if r[0] == "S" and r[1] == var:
        var = r[3]
        break
      if r[0] == "F" and r[2] == var:
        var = r[3]
        break
    else:
      return None
  return var


def _attach_path(s: _Stage):
  """te's attach path: (stage, var) of every enclosing loop, innermost first."""
  path = []
  seen = set()
  cur = s
  while cur.attach is not None and cur.compute_at != INLINED:
    if id(cur) in seen:
      raise ReplayError("compute_at stages form a loop")
    seen.add(id(cur))
    t, var = cur.attach
    var = _legal_attach(t, var)
    if var is None or var not in t.leaf:
      raise ReplayError(
        f"invalid schedule: attach point of {cur.op.name} is not a loop of {t.op.name}"
      )
    k = t.leaf.index(var)
    for j in range(k, -1, -1):
      path.append((t, t.leaf[j]))
    cur = t
  return path


def _storage_rank(s: _Stage, path) -> int:
  if s.scope:
    return _SCOPE_RANK.get(s.scope.split(".")[0], 0)
  mx = -1
  for t, v in path:
    a = t.bound.get(v)
    if a is not None:
      mx = max(mx, _THREAD_RANK[a])
  return {-1: 0, 0: 1, 1: 3}[mx]


def _need_relax(t: _Stage, v, found: bool, rank: int) -> bool:
  a = t.bound.get(v)
  if a is None:
    return not found
  tr = _THREAD_RANK[a]
  if rank == 2 and tr == 1 and a in (6,):
    return True
  return rank <= tr


def _effective_reads(cache: _TaskCache, stages: list):
  """Reads of every non-inlined stage after inlining (InjectInline), keyed by stage index."""
  key = tuple((id(s.op), s.compute_at == INLINED) for s in stages)
  hit = cache.composed.get(key)
  if hit is not None:
    return hit
  inlined = {s.op for s in stages if s.compute_at == INLINED}
  memo: dict = {}

  def expand(op):
    got = memo.get(op)
    if got is not None:
      return got
    out = []
    for p, idx in op.reads:
      if p in inlined:
        if p.const_matrix:
          continue
        for q, idx2 in expand(p):
          m = {j: idx[j] for j in range(len(idx))}
          out.append((q, tuple(_subst(e, m) for e in idx2)))
      else:
        out.append((p, idx))
    memo[op] = out
    return out

  res = [None if (s.compute_at == INLINED or s.op.is_ph) else expand(s.op) for s in stages]
  cache.composed[key] = res
  cache.composed[(key, "keep")] = [s.op for s in stages]
  return res


def _infer_bounds(cache: _TaskCache, stages: list):
  """te::InferBound over the replayed schedule; fills each stage's ``rng``."""
  reads = _effective_reads(cache, stages)
  sym = _SYM_CLASS[0]()
  consumers: dict = {}
  for ci, rd in enumerate(reads):
    if rd is None:
      continue
    for p, idx in rd:
      consumers.setdefault(p, {}).setdefault(ci, []).append(idx)
  for si in range(len(stages) - 1, -1, -1):
    s = stages[si]
    if s.op.is_ph or s.compute_at == INLINED:
      continue
    op = s.op
    rng: dict = {}
    if op.output:
      for v, a in enumerate(op.axes):
        rng[v] = (0, a[2], False)
    else:
      path = _attach_path(s)
      stage_attach = path[0] if path else None
      rank = _storage_rank(s, path)
      dims: list = [[] for _ in range(op.n_sp)]
      for ci, idxs in consumers.get(op, {}).items():
        env = _consumer_domain(sym, stages[ci], stage_attach, rank)
        for idx in idxs:
          for d, e in enumerate(idx):
            iv = _eval_interval(sym, e, env)
            dims[d].append(_clamp(sym, iv, op.shape[d]))
      for v in range(op.n_sp):
        ivs = dims[v]
        if not ivs:
          rng[v] = (0, op.axes[v][2], False)
          continue
        lo, hi = ivs[0]
        for a, b in ivs[1:]:
          lo = sym.minmax(lo, a, True)
          hi = sym.minmax(hi, b, False)
        ext = _sub(hi, lo)
        if isinstance(ext, int):
          rng[v] = (lo, ext + 1, False)
        else:
          rng[v] = (lo, sym.lohi(ext)[1] + 1, True)
      for v in range(op.n_sp, len(op.axes)):
        rng[v] = (0, op.axes[v][2], False)
    _pass_down(s, rng)
    s.rng = rng


def _clamp(sym, iv, size):
  # PropBoundToInputs: an access interval that provably covers the tensor is the tensor.
  if iv is None:
    return 0, size - 1
  lo, hi = iv
  if sym.lohi(lo)[1] <= 0 and sym.lohi(hi)[0] >= size - 1:
    return 0, size - 1
  return lo, hi


def _dominated_by_thread(s: _Stage):
  if not s.bound:
    return set()
  dom = set(s.bound)
  for r in reversed(s.rels):
    if r[0] == "S" and (r[2] in dom or r[3] in dom):
      dom.add(r[1])
    elif r[0] == "F" and r[3] in dom:
      dom.add(r[1])
      dom.add(r[2])
  return dom


def _pass_down(s: _Stage, rng: dict):
  thread = _dominated_by_thread(s)
  for r in s.rels:
    kind = r[0]
    if kind == "S":
      _, parent, outer, inner, factor, nparts = r
      pmin, pe, psym = rng[parent]
      if factor is not None:
        ie = factor if (inner in thread or pe == 0 or not pe < factor) else pe
        rng[inner] = (0, ie, psym)
        rng[outer] = (0, _ceil_div(pe, factor), psym)
      else:
        oe = nparts if (outer in thread or pe == 0 or not pe < nparts) else pe
        rng[outer] = (0, oe, psym)
        rng[inner] = (0, _ceil_div(pe, nparts), psym)
    elif kind == "F":
      _, outer, inner, fused = r
      rng[fused] = (0, rng[outer][1] * rng[inner][1], rng[outer][2] or rng[inner][2])
    else:
      rng[r[1]] = (0, 1, False)


def _consumer_domain(sym: _Sym, c: _Stage, stage_attach, rank):
  """Intervals of consumer ``c``'s root axes for one iteration at the producer's attach point
  (InferRootBound's up_state / relax_set / PassUpDomain)."""
  rng = c.rng
  up: dict = {}
  found = False
  cid = id(c)
  for j in range(len(c.leaf) - 1, -1, -1):
    v = c.leaf[j]
    if stage_attach is not None and stage_attach[0] is c and stage_attach[1] == v:
      found = True
    ext = rng[v][1]
    # TVM takes the single point for an extent of 1 before asking NeedRelax; for a relaxed loop
    # the range [0, ext - 1] is that point, so the extent is compared only where it matters
    # (keeps one traced template for split lengths of 1, replay_cache).
    if _need_relax(c, v, found, rank):
      up[v] = (0, ext - 1)
    elif ext == 1:
      up[v] = (0, 0)
    else:
      p = sym.var((cid, v), ext)
      up[v] = (p, p)
  relaxed = set()
  for t, v in _attach_path(c):
    if stage_attach is not None and stage_attach[0] is t and stage_attach[1] == v:
      found = True
    if _need_relax(t, v, found, rank):
      relaxed.add(sym.atom(("x", (id(t), v)), 0, t.rng[v][1] - 1))
  for r in reversed(c.rels):
    kind = r[0]
    if kind == "S":
      _, parent, outer, inner, _f, _n = r
      o, i = up[outer], up[inner]
      pmin, pe, _ = rng[parent]
      if o == (0, rng[outer][1] - 1) and i == (0, rng[inner][1] - 1):
        up[parent] = (pmin, _add(pmin, pe - 1))
      else:
        f = rng[inner][1]
        up[parent] = (
          _add(_add(_scale(o[0], f), i[0]), pmin),
          _add(_add(_scale(o[1], f), i[1]), pmin),
        )
    elif kind == "F":
      _, outer, inner, fused = r
      fv = up[fused]
      fe = rng[fused][1]
      omin, ie = rng[outer][0], rng[inner][1]
      imin = rng[inner][0]
      if fv == (0, fe - 1):
        up[outer] = (omin, _add(omin, rng[outer][1] - 1))
        up[inner] = (imin, _add(imin, ie - 1))
      elif fv[0] == fv[1]:
        q = _add(sym.floordiv(fv[0], ie), omin)
        m = _add(sym.floormod(fv[0], ie), imin)
        up[outer] = (q, q)
        up[inner] = (m, m)
      else:
        up[outer] = (_add(omin, sym.floordiv(fv[0], ie)), _add(omin, sym.floordiv(fv[1], ie)))
        span = _sub(fv[1], fv[0])
        if (
          isinstance(span, int)
          and ie % (span + 1) == 0
          and isinstance(sym.floormod(fv[0], span + 1), int)
          and sym.floormod(fv[0], span + 1) == 0
        ):
          up[inner] = (_add(imin, sym.floormod(fv[0], ie)), _add(imin, sym.floormod(fv[1], ie)))
        else:
          up[inner] = (imin, _add(imin, ie - 1))
  env = []
  n_root = len(c.op.axes)
  for v in range(n_root):
    iv = up.get(v)
    if iv is None:
      pmin, pe, _ = rng[v]
      iv = (pmin, _add(pmin, pe - 1))
    elif v in set(c.leaf):
      # A root loop is rebased (RebaseNonZeroMinLoop): its value is the loop's plus the min.
      pmin = rng[v][0]
      if iv == (0, rng[v][1] - 1):
        iv = (pmin, _add(pmin, rng[v][1] - 1))
      else:
        iv = (_add(iv[0], pmin), _add(iv[1], pmin))
    if relaxed:
      iv = (_relax(sym, iv[0], relaxed, False), _relax(sym, iv[1], relaxed, True))
    env.append(iv)
  return env


# --------------------------------------------------------------------------- entry point
def replay(skeleton: sk.Skeleton, steps: Sequence, infer_bounds: bool = True) -> LoopNest:
  """Final loop nest of the program ``steps`` (a record's step list) of ``skeleton``'s task.

  Raises:
    ReplayError: a step is malformed, of an unknown kind, or not applicable (names the step).
  """
  cache = _cache(skeleton)
  rp = _Replayer(cache, steps)
  rp.run()
  stages = rp.stages
  if infer_bounds and rp.concrete:
    _infer_bounds(cache, stages)
  out = []
  access = []
  eff = None
  for i, s in enumerate(stages):
    if s.op.is_ph:
      out.append((s.op.name, PLACEHOLDER_STAGE, ROOT, -1, -1, 0, 0, (), ()))
      access.append(None)
      continue
    rng = s.rng
    if rng is None or s.compute_at == INLINED:
      loops = tuple((it[0], it[3], it[1], it[2], False) for it in s.iters)
      access.append(None)
    else:
      loops = tuple((it[0], rng[v][1], it[1], it[2], rng[v][2]) for it, v in zip(s.iters, s.leaf))
      if eff is None:
        eff = _effective_reads(cache, stages)
      access.append(_stage_access(cache, s, eff[i]))
    at = rp.attach.get(i, (-1, -1))
    out.append(
      (
        s.op.name,
        COMPUTE_STAGE,
        s.compute_at,
        at[0],
        at[1],
        s.unroll,
        s.offset,
        tuple(s.pragmas),
        loops,
      )
    )
  return LoopNest(tuple(out), rp.concrete, tuple(rp.attach), tuple(access))


def _row_major(shape):
  st = [1] * len(shape)
  for d in range(len(shape) - 2, -1, -1):
    st[d] = st[d + 1] * shape[d + 1]
  return st


def _op_strides(cache: _TaskCache, op: _Op, reads):
  """(out_c, read_c, footprint reads) of ``op`` with effective ``reads`` (see :data:`A_OUT_C`,
  :data:`A_READS`), memoized."""
  key = (id(op), id(reads))
  hit = cache.strides.get(key)
  if hit is not None:
    return hit
  n = len(op.axes)
  ost = _row_major(op.shape)
  out_c = tuple(ost[r] if r < op.n_sp and r < len(ost) else 0 for r in range(n))
  read_c = [0] * n
  foot = []
  for p, idx in reads:
    pst = _row_major(p.shape)
    c = [0] * n
    bad = set()
    rows = []
    for d, e in enumerate(idx):
      size = p.shape[d]
      if e is None:
        bad = set(range(n))
        rows.append((size,) * n)
        continue
      if e[0] == "A":
        row = [0] * n
        for r, k in e[1]:
          c[r] += pst[d] * k
          row[r] += k
        rows.append(tuple(abs(x) for x in row))
      else:
        pos = _positions(e)
        bad.update(pos)
        rows.append(tuple(size if r in pos else 0 for r in range(n)))
    foot.append((p.shape, tuple(rows)))
    for r in range(n):
      if r not in bad:
        read_c[r] = max(read_c[r], abs(c[r]))
  res = (out_c, tuple(read_c), tuple(foot))
  cache.strides[key] = res
  cache.strides[(key, "keep")] = (op, reads)  # keeps the ids unique
  return res


def _stage_access(cache: _TaskCache, s: _Stage, reads):
  """Access info of a bound stage (:data:`A_OUTPUT` ... :data:`A_OUT_SHAPE`)."""
  n_root = len(s.op.axes)
  made: dict = {}
  for r in s.rels:
    if r[0] == "S":
      made[r[2]] = (r[1], r[3])  # outer: step of one moves the parent by inner's extent
      made[r[3]] = (r[1], None)
    elif r[0] == "F":
      made[r[3]] = (r[2], None)  # fused: follow the inner (fastest-moving) part
    else:
      made[r[1]] = None  # singleton: no root axis
  rng = s.rng
  loops = []
  for v in s.leaf:
    coef = 1
    while v >= n_root:
      m = made.get(v)
      if m is None:
        v = -1
        break
      if m[1] is not None:
        coef = coef * rng[m[1]][1]
      v = m[0]
    loops.append((v, coef))
  out_c, read_c, foot = _op_strides(cache, s.op, reads)
  return (s.op.output, bool(s.scope), s.op.is_rf, tuple(loops), out_c, read_c, foot, s.op.shape)


def replay_record_line(skeletons, line) -> LoopNest:
  """Replays one measure-record JSON line (``{"i": [[workload_key, ...], [[], steps]], ...}``)."""
  import json  # pylint: disable=import-outside-toplevel

  rec = json.loads(line)
  key = rec["i"][0][0]
  if key not in skeletons:
    raise ReplayError(f"no skeleton for workload {key}")
  return replay(skeletons[key], rec["i"][1][1])


__all__ = ["replay", "replay_record_line", "LoopNest", "ReplayError", "ANNOTATIONS", "STEP_KINDS"]
