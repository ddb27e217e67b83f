"""Fast replay + loop tokens: per-template traces of the replay's arithmetic.

Programs of one task share a few step *templates*: the same step list with the split lengths and
the auto_unroll_max_step values abstracted. The replay's structure (stages, loop order, kinds,
annotations, attachment) depends on the template only, and its numbers (extents, loop
coefficients, unroll) are integer arithmetic on the abstracted values, with branches on them
(``pe < factor``, simplifier comparisons, atom identity in bound inference).

A template seen ``trace_after`` times is replayed once more with *traced ints*: every operation on
a value derived from the inputs is recorded into a straight-line program, every comparison (and
truth test) as a guard on its outcome. The program is compiled to a Python function; later
programs of the template evaluate it on their own values, and fall back to the full replay
when a guard fails (a template keeps up to :data:`MAX_VARIANTS` traces, one per guard outcome
seen). Anything the tracer cannot follow (a traced value hashed, converted by int()/float(),
true-divided) raises :class:`TraceError` and the template is marked full-replay only. Not
detectable: CPython indexes lists and ranges by an int subclass's value without asking it, so
the replay must never index by a split-derived value (it does not; the sample check is the
net). The token structure
(:class:`loop_tokens.Plan`) is cached with the trace; tokens of a batch are filled by one NumPy
pass over plans padded to the batch's longest.

Results are bit-identical to ``loop_tokens(replay(...))`` (tests/core/test_replay_cache.py
checks every record of the sample both ways). NumPy/stdlib only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from tlp_jax.core import loop_tokens as lt
from tlp_jax.core import replay as rp

log = logging.getLogger(__name__)

MAX_VARIANTS = 4
_UNTRACEABLE = "untraceable"


class TraceError(RuntimeError):
  """The replay used a traced value in a way the tracer cannot record."""


# --------------------------------------------------------------------------- tracing
class _Trace:
  """The recording: nodes ``(op, a, b)`` (refs are node ids or ("c", const)) and guards."""

  def __init__(self, n_inputs):
    self.nodes = [("in", k, None) for k in range(n_inputs)]
    self.guards = []
    self.seen_guards = set()


_ACTIVE: list = [None]


def _ref(x):
  if type(x) is TInt:  # pylint: disable=unidiomatic-typecheck
    return x.nid
  if type(x) is int or type(x) is bool:  # pylint: disable=unidiomatic-typecheck
    return ("c", int(x))
  raise TraceError(f"traced arithmetic with a {type(x).__name__}")


def _new(value, op, a, b):
  tr = _ACTIVE[0]
  t = TInt(value)
  tr.nodes.append((op, _ref(a), None if b is None else _ref(b)))
  t.nid = len(tr.nodes) - 1
  return t


def _guard(op, a, b, result):
  tr = _ACTIVE[0]
  g = (op, _ref(a), _ref(b), bool(result))
  if g not in tr.seen_guards:
    tr.seen_guards.add(g)
    tr.guards.append(g)
  return result


_V = int.__int__  # the plain value of a traced int (no __index__ / __int__ dispatch)


def _val(x):
  return _V(x) if isinstance(x, int) else x


class TInt(int):
  """An int whose arithmetic and comparisons are recorded on the active trace."""

  def _bin(op, fn, swap=False):  # pylint: disable=no-self-argument
    def f(self, other):
      if not isinstance(other, int):
        return NotImplemented
      a, b = (other, self) if swap else (self, other)
      if op in ("//", "%") and (type(b) is TInt or _V(b) == 0):  # pylint: disable=unidiomatic-typecheck
        _guard("!=", b, 0, _V(b) != 0)
      return _new(fn(_val(a), _val(b)), op, a, b)

    return f

  __add__ = _bin("+", lambda a, b: a + b)
  __radd__ = _bin("+", lambda a, b: a + b, True)
  __sub__ = _bin("-", lambda a, b: a - b)
  __rsub__ = _bin("-", lambda a, b: a - b, True)
  __mul__ = _bin("*", lambda a, b: a * b)
  __rmul__ = _bin("*", lambda a, b: a * b, True)
  __floordiv__ = _bin("//", lambda a, b: a // b)
  __rfloordiv__ = _bin("//", lambda a, b: a // b, True)
  __mod__ = _bin("%", lambda a, b: a % b)
  __rmod__ = _bin("%", lambda a, b: a % b, True)

  def _cmp(op, fn):  # pylint: disable=no-self-argument
    def f(self, other):
      if not isinstance(other, int):
        return NotImplemented
      return _guard(op, self, other, fn(_V(self), _val(other)))

    return f

  __lt__ = _cmp("<", lambda a, b: a < b)
  __le__ = _cmp("<=", lambda a, b: a <= b)
  __gt__ = _cmp(">", lambda a, b: a > b)
  __ge__ = _cmp(">=", lambda a, b: a >= b)
  __eq__ = _cmp("==", lambda a, b: a == b)
  __ne__ = _cmp("!=", lambda a, b: a != b)
  del _bin, _cmp

  def __divmod__(self, other):
    return self // other, self % other

  def __rdivmod__(self, other):
    return other // self, other % self

  def __neg__(self):
    return _new(-_V(self), "neg", self, None)

  def __pos__(self):
    return self

  def __abs__(self):
    return _new(abs(_V(self)), "abs", self, None)

  def __bool__(self):
    return _guard("!=", self, 0, _V(self) != 0)

  def gcd(self, other):
    """math.gcd, recorded."""
    return _new(math.gcd(_V(self), _val(other)), "gcd", self, other)

  def __hash__(self):
    raise TraceError("a traced value was hashed (its identity would be untraced)")

  def __index__(self):
    raise TraceError("a traced value was used as an index or converted")

  __int__ = __index__
  __float__ = __index__

  def __truediv__(self, other):
    raise TraceError("true division of a traced value")

  __rtruediv__ = __truediv__
  __pow__ = __truediv__
  __lshift__ = __rshift__ = __and__ = __or__ = __xor__ = __truediv__


class _PText(str):
  """A pragma text that carries its auto_unroll_max_step value as a traced int."""

  value = None


class _TracedSym(rp._Sym):  # pylint: disable=protected-access
  """Bound inference's symbol table with atoms found by comparing keys (recorded) instead of
  hashing them: whether two atoms merge then rests on guards."""

  def atom(self, key, lo, hi):
    for a, k in enumerate(self.atoms):
      if k == key:
        return a
    self.atoms.append(key)
    self.bounds.append((lo, hi))
    return len(self.atoms) - 1


# --------------------------------------------------------------------------- templates
def signature(steps: Sequence):
  """(template signature, values): the step list with split lengths and auto_unroll values
  abstracted, and those values in order."""
  # Called once per program in the tuner: list comprehensions and exact type tests (JSON gives
  # plain lists) keep it at ~10 us per program instead of ~20.
  sig = []
  vals = []
  for s in steps:
    k = s[0]
    if k == "SP":
      ls = s[4]
      sig.append(("SP", s[1], s[2], tuple([n is None for n in ls]), s[5]))
      vals += ls if None not in ls else [n for n in ls if n is not None]
    elif k == "AN" or k == "CA" or k == "CI":
      sig.append(tuple(s))  # integers only (TVM's record format); a list fails to hash
    elif k == "PR" and s[3].startswith("auto_unroll_max_step"):
      t = s[3]
      pos = t.find("$")
      sig.append(("PR", s[1], s[2], pos))
      vals.append(rp._atoi(t[pos + 1 :]) if pos >= 0 else 0)  # pylint: disable=protected-access
    else:
      sig.append(tuple([tuple(x) if type(x) is list else x for x in s]))
  return tuple(sig), vals


def _traced_steps(steps, inputs):
  out = []
  it = iter(inputs)
  for s in steps:
    k = s[0]
    if k == "SP":
      out.append([s[0], s[1], s[2], s[3], [None if n is None else next(it) for n in s[4]], s[5]])
    elif k == "PR" and s[3].startswith("auto_unroll_max_step"):
      t = _PText(s[3])
      v = next(it)
      t.value = v if s[3].find("$") >= 0 else None
      out.append([s[0], s[1], s[2], t])
    else:
      out.append(s)
  return out


class _Variant:
  """One compiled trace: fn(values) -> (ext, coef, unroll) lists, or None if a guard fails."""

  __slots__ = ("fn", "plan", "n_nodes", "n_guards")

  def __init__(self, fn, plan, n_nodes, n_guards):
    self.fn = fn
    self.plan = plan
    self.n_nodes = n_nodes
    self.n_guards = n_guards


def _raw_values(nest: rp.LoopNest):
  """Values of every plan slot (:func:`loop_tokens.raw_values`), as the replay's own objects
  (traced ints in a traced replay)."""
  return lt.raw_values(nest, lt.print_order(nest))


_PY_OPS = {
  "+": "{} + {}",
  "-": "{} - {}",
  "*": "{} * {}",
  "//": "{} // {}",
  "%": "{} % {}",
  "neg": "-{}",
  "abs": "abs({})",
  "gcd": "_gcd({}, {})",
}


def _compile(trace: _Trace, outputs):
  """Python source of the straight-line program (dead nodes dropped), compiled."""
  live = set()
  stack = [r for r in outputs if not isinstance(r, tuple)]
  for g in trace.guards:
    stack += [r for r in g[1:3] if not isinstance(r, tuple)]
  while stack:
    n = stack.pop()
    if n in live:
      continue
    live.add(n)
    op, a, b = trace.nodes[n]
    if op != "in":
      stack += [r for r in (a, b) if r is not None and not isinstance(r, tuple)]

  def r(x):
    return str(x[1]) if isinstance(x, tuple) else f"v{x}"

  lines = ["def f(x):"]
  # Guards go right after the last node they read, so a failing program stops early.
  guards_at: dict = {}
  for op, a, b, res in trace.guards:
    last = max([x for x in (a, b) if not isinstance(x, tuple)], default=-1)
    guards_at.setdefault(last, []).append((op, a, b, res))
  for n in range(len(trace.nodes)):
    if n in live:
      op, a, b = trace.nodes[n]
      if op == "in":
        lines.append(f"  v{n} = x[{a}]")
      else:
        lines.append(f"  v{n} = " + _PY_OPS[op].format(r(a), r(b) if b is not None else ""))
    for op, a, b, res in guards_at.get(n, ()):
      cond = f"{r(a)} {op} {r(b)}"
      lines.append(f"  if {'not ' if res else ''}({cond}): return None")
  out = ", ".join(r(x) for x in outputs)
  lines.append(f"  return ({out},)")
  src = "\n".join(lines)
  ns = {"_gcd": math.gcd}
  exec(compile(src, "<replay-trace>", "exec"), ns)  # pylint: disable=exec-used
  return ns["f"], len(live), len(trace.guards)


def _trace_template(skeleton, steps, n_vals, vals):
  """Traced replay of ``steps``: a :class:`_Variant`, or raises TraceError."""
  tr = _Trace(n_vals)
  inputs = []
  _ACTIVE[0] = tr
  rp._SYM_CLASS[0] = _TracedSym  # pylint: disable=protected-access
  try:
    for k, v in enumerate(vals):
      t = TInt(v)
      t.nid = k
      inputs.append(t)
    nest = rp.replay(skeleton, _traced_steps(steps, inputs))
    if not nest.concrete:
      raise TraceError("non-concrete split lengths")
    raw = _raw_values(nest)
    outputs = [_ref(x) for v in raw for x in v]
    plan = _plan_of(nest)
  finally:
    _ACTIVE[0] = None
    rp._SYM_CLASS[0] = rp._Sym  # pylint: disable=protected-access
  fn, n_nodes, n_guards = _compile(tr, outputs)
  return _Variant(fn, plan, n_nodes, n_guards)


def _plan_of(nest):
  # The plan's structure reads no traced value (loop_tokens.plan_of looks at extents only to
  # tell None, and at lengths of the access tuples), so it is built on the traced nest itself.
  return lt.plan_of(nest)


class TemplateCache:
  """Per-task cache of traced templates (keep one per skeleton, e.g. on the featurizer)."""

  def __init__(self, trace_after: int = 1):
    self.trace_after = trace_after
    self.entries: dict = {}  # signature -> [seen count, [variants]] or _UNTRACEABLE
    self.stats = {"hits": 0, "full": 0, "traced": 0, "guard_fail": 0, "untraceable": 0}

  def values(self, skeleton, steps):
    """(plan, *values) of one program (as :func:`loop_tokens.plan_and_values`); the fast path
    when its template is traced."""
    sig, vals = signature(steps)
    try:
      ent = self.entries.get(sig)
    except TypeError:  # a malformed step (a list where TVM writes an int): the full replay
      # reports it
      self.stats["full"] += 1
      return lt.plan_and_values(rp.replay(skeleton, steps))
    if ent is None:
      ent = self.entries[sig] = [0, []]
    if ent is not _UNTRACEABLE:
      for var in ent[1]:
        got = var.fn(vals)
        if got is not None:
          self.stats["hits"] += 1
          return _split_values(var.plan, got)
      if ent[1]:
        self.stats["guard_fail"] += 1
      ent[0] += 1
      if ent[0] >= self.trace_after and len(ent[1]) < MAX_VARIANTS:
        try:
          var = _trace_template(skeleton, steps, len(vals), vals)
        except TraceError as e:
          log.debug("template not traceable (%s): full replay for it", e)
          self.entries[sig] = _UNTRACEABLE
          self.stats["untraceable"] += 1
        else:
          got = var.fn(vals)
          if got is not None:
            ent[1].append(var)
            self.stats["traced"] += 1
            return _split_values(var.plan, got)
          self.entries[sig] = _UNTRACEABLE  # the trace rejects its own program: a bug guard
    self.stats["full"] += 1
    return lt.plan_and_values(rp.replay(skeleton, steps))


def _split_values(plan, got):
  return (plan,) + lt.shape_values(plan, got)


# Programs per NumPy pass of fill_padded: the pass holds (B, L, L) arrays, L = the bucket's
# longest nest (programs are bucketed by loop count, so L stays close to each program's own).
FILL_BUCKET = 128


def fill_padded(items, max_tokens: int) -> np.ndarray:
  """Tokens of programs with different plans: ``items`` are (plan, *values)
  (:func:`loop_tokens.plan_and_values`). Programs are sorted by loop count and filled in
  buckets of :data:`FILL_BUCKET` by one NumPy pass each; within a bucket plans are padded with
  never-printed loops of extent 1, read buffers of 0 bytes and dimensions of size 1 (none of
  which changes a token), so the result does not depend on the bucketing."""
  b = len(items)
  out = np.zeros((b, max_tokens, lt.WIDTH), lt.DTYPE)
  if not b:
    return out
  order = sorted(range(b), key=lambda k: items[k][0].n)
  for s in range(0, b, FILL_BUCKET):
    idx = order[s : s + FILL_BUCKET]
    out[idx] = _fill_bucket([items[k] for k in idx], max_tokens)
  return out


def _fill_bucket(items, max_tokens: int) -> np.ndarray:
  b = len(items)
  n = max(it[0].n for it in items)
  nb = max(it[0].nb for it in items)
  nd = max(it[0].nd for it in items)
  ndo = max(it[0].ndo for it in items)
  # Structure: once per distinct plan of the bucket, gathered per program.
  plan_ids: dict = {}
  pid = np.empty(b, np.intp)
  for k, it in enumerate(items):
    pid[k] = plan_ids.setdefault(id(it[0]), len(plan_ids))
  plans = {v: it[0] for it in items for v in (plan_ids[id(it[0])],)}
  u = len(plan_ids)
  static = np.zeros((u, n, lt.WIDTH))
  anc = np.zeros((u, n, n), bool)
  inner = np.zeros((u, n, n), bool)
  always = np.zeros((u, n), bool)
  out_axis = np.zeros((u, n, ndo))
  read_bytes = np.zeros((u, n, nb))
  n_reads = np.zeros((u, n))
  for g, p in plans.items():
    m = p.n
    static[g, :m] = p.static
    anc[g, :m, :m] = p.anc
    inner[g, :m, :m] = p.inner
    always[g, :m] = p.always
    out_axis[g, :m, : p.ndo] = p.out_axis
    read_bytes[g, :m, : p.nb] = p.read_bytes
    n_reads[g, :m] = p.n_reads
  ext = np.ones((b, n), np.int64)
  coef = np.ones((b, n), np.int64)
  unroll = np.zeros((b, n), np.int64)
  out_c = np.zeros((b, n), np.int64)
  read_c = np.zeros((b, n), np.int64)
  read_d = np.zeros((b, n, nb, nd), np.int64)
  read_size = np.ones((b, n, nb, nd), np.int64)
  out_size = np.ones((b, n, ndo), np.int64)
  for k, (p, e, c, un, oc, rc_, rd, rs, os_) in enumerate(items):
    m = p.n
    ext[k, :m] = e
    coef[k, :m] = c
    unroll[k, :m] = un
    out_c[k, :m] = oc
    read_c[k, :m] = rc_
    read_d[k, :m, : p.nb, : p.nd] = rd
    read_size[k, :m, : p.nb, : p.nd] = rs
    out_size[k, :m, : p.ndo] = os_
  return lt.fill_arrays(
    (static[pid], anc[pid], inner[pid], always[pid], out_axis[pid], read_bytes[pid], n_reads[pid]),
    (ext, coef, unroll, out_c, read_c, read_d, read_size, out_size),
    max_tokens,
  )


def featurize_many(
  skeleton, step_lists: Sequence, cache: TemplateCache, max_tokens: int = lt.DEFAULT_MAX_TOKENS
) -> np.ndarray:
  """(len(step_lists), max_tokens, WIDTH) float16 loop tokens of one task's programs."""
  items = [cache.values(skeleton, st) for st in step_lists]
  return fill_padded(items, max_tokens)


__all__ = [
  "TemplateCache",
  "TraceError",
  "signature",
  "featurize_many",
  "fill_padded",
  "MAX_VARIANTS",
]
