"""Loop tokens: a replayed loop nest as a compact float16 token block for TLP's attention model.

One token per loop, in the order loops appear in the final printed nest (TVM's ``PrintState``
with trivial loops deleted): root stages in stage order, a stage attached by compute_at nested
right after the loop it is attached at (attached stages in attach-map order); inlined stages
and placeholders have none. Loops of extent 1 are dropped unless annotated (or their extent is
symbolic); the sequence is cropped to ``max_tokens`` (outermost first) and zero-padded.

Layout version 2, ``WIDTH`` = 24 columns (:data:`COLUMNS`), every value exactly a float16
(rounded to float16 when the token is made, so float16 storage loses nothing)::

   0 is_loop             1 for every real token (padding rows are all zero)
   1 stage               ordinal of the loop's stage among the printed stages (0, 1, ...)
   2 stage_output        the stage is an output of the compute DAG
   3 stage_cache         the stage was made by cache_read / cache_write (.local, .shared, ...)
   4 stage_rfactor       the stage is an rfactor (.rf) stage
   5 stage_attached      the stage is computed at a loop of another stage (else at root)
   6 depth               number of printed loops enclosing this one in the whole nest
   7 reduce              1 reduce, 0.5 mixed (a fuse of spatial and reduce), 0 spatial/special
   8 log2_extent         log2(extent)
   9 ann_parallel       10 ann_vectorize     11 ann_unroll     12 ann_vthread
  13 ann_block           blockIdx.x/y/z     14 ann_thread        threadIdx.x/y/z
  15 log2_unroll         log2(1 + the stage's auto_unroll_max_step pragma)
  16 log2_outer          log2(product of the extents of all enclosing loops): times entered
  17 log2_inner          log2(product of the extents of the same stage's loops inside it)
  18 log2_out_stride     log2(1 + |element stride| of this loop in the stage's output buffer)
  19 log2_read_stride    log2(1 + max over the stage's read buffers of the same)
  20 symbolic_extent     TVM's extent is not a constant (log2_extent is then its upper bound)
  21 log2_read_bytes     log2(1 + bytes the stage's reads touch in one execution of this loop)
  22 log2_write_bytes    log2(1 + bytes the stage's output access touches in the same)
  23 log2_reuse          log2(1 + read accesses executed there / read elements touched there)

Strides compose the split/fuse relations from the loop to its root iterator (a split's outer
part steps by the inner part's extent; a fused loop is followed through its inner part, the one
that moves when it steps) with the affine index coefficients of the skeleton (after inlining)
and the full tensors' row-major shapes; an index that is not affine in the iterator gives 0.

Footprints (columns 21-23, Ansor's "touch" features per loop) are over the *body of the loop
including the loop itself*: this loop and every loop of the same stage inside it (loops of
stages attached inside are not counted). Per buffer dimension ``d``, the touched range is
``min(size_d, 1 + sum over those loops m of |d index_d / d var_m| * (extent_m - 1))``, where
``|d index_d / d var_m|`` is the loop's coefficient on its root axis (as for strides) times the
magnitude of the axis' affine coefficient in ``index_d``. An index that is not affine in the
axis (floordiv/mod, min/max trees) or opaque (it loads another tensor) counts the dimension's
full size as soon as such a loop spans more than one iteration: conservative. Elements are the
product of the ranges over dimensions, bytes = elements * 4 (skeletons carry no dtypes; every
TenSet task is float32). ``log2_read_bytes`` sums over the stage's read accesses after inlining
(each access counted once, as in ``reads`` of the skeleton), ``log2_write_bytes`` is the output
buffer (indexed by the spatial root axes; reduce loops do not move it). ``log2_reuse`` is
``log2(1 + product of those loops' extents * number of read accesses / read elements touched)``:
how often each touched element is read in the body (0 for a stage without reads). A fused loop
is, like for strides, followed through its inner part only (ranges are capped at the size).

``max_tokens`` default :data:`DEFAULT_MAX_TOKENS` is the 99th percentile of printed-loop counts
over the shared tenset-mini records (both hardware), see ``bench/replay_throughput.py``.

NumPy only (no TVM / JAX). Tokens of many nests are filled per batch with NumPy
(:func:`fill`), the scalar API is the same code with a batch of one, so both are bit-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from tlp_jax.core import replay as rp

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2
COLUMNS = (
  "is_loop",
  "stage",
  "stage_output",
  "stage_cache",
  "stage_rfactor",
  "stage_attached",
  "depth",
  "reduce",
  "log2_extent",
  "ann_parallel",
  "ann_vectorize",
  "ann_unroll",
  "ann_vthread",
  "ann_block",
  "ann_thread",
  "log2_unroll",
  "log2_outer",
  "log2_inner",
  "log2_out_stride",
  "log2_read_stride",
  "symbolic_extent",
  "log2_read_bytes",
  "log2_write_bytes",
  "log2_reuse",
)
WIDTH = len(COLUMNS)
DEFAULT_MAX_TOKENS = 40  # p99 of printed loops on tenset-mini is 39 (0.56% cropped)
DTYPE = np.float16
(
  C_IS_LOOP,
  C_STAGE,
  C_OUTPUT,
  C_CACHE,
  C_RFACTOR,
  C_ATTACHED,
  C_DEPTH,
  C_REDUCE,
  C_LOG_EXT,
  C_PARALLEL,
  C_VECTORIZE,
  C_UNROLL,
  C_VTHREAD,
  C_BLOCK,
  C_THREAD,
  C_LOG_UNROLL,
  C_LOG_OUTER,
  C_LOG_INNER,
  C_OUT_STRIDE,
  C_READ_STRIDE,
  C_SYMBOLIC,
  C_READ_BYTES,
  C_WRITE_BYTES,
  C_REUSE,
) = range(WIDTH)
ELEMENT_BYTES = 4  # skeletons carry no dtypes; TenSet's tasks are all float32
N_VALUES = 8  # value vectors per program: see :func:`plan_and_values`

# Annotation index (replay.ANNOTATIONS) -> one-hot column.
_ANN_COL = {
  1: C_UNROLL,
  2: C_VECTORIZE,
  3: C_PARALLEL,
  4: C_VTHREAD,
  5: C_BLOCK,
  6: C_THREAD,
  7: C_BLOCK,
  8: C_THREAD,
  9: C_BLOCK,
  10: C_THREAD,
}
_KIND_VALUE = {rp.SPATIAL: 0.0, rp.REDUCE: 1.0, rp.MIXED: 0.5, rp.SPECIAL: 0.0}


class Plan:
  """The value-independent part of a nest's tokens: loops in print order and their relations.

  ``L`` loops (trivial ones included; which are printed depends on the extents). Per program
  the values (:data:`N_VALUES` arrays, see :func:`plan_and_values`) are the loop extents, the
  loop coefficients (see ``replay.A_LOOPS``), the stages' auto_unroll_max_step, the loops' unit
  strides in the output / read buffers and the footprint inputs (these depend on split lengths
  where a stage's tensor shape does, e.g. rfactor).
  """

  __slots__ = (
    "static",
    "anc",
    "inner",
    "always",
    "out_axis",
    "read_bytes",
    "n_reads",
    "d_idx",
    "s_idx",
    "o_idx",
    "n",
    "nb",
    "nd",
    "ndo",
  )

  def __init__(
    self, static, anc, inner, always, out_axis, read_bytes, n_reads, d_idx, s_idx, o_idx
  ):
    self.static = static  # (L, WIDTH) float64: columns that depend on structure only
    self.anc = anc  # (L, L) bool: anc[l, a] loop a encloses loop l
    self.inner = inner  # (L, L) bool: inner[l, a] loop a is inside l in l's stage
    self.always = always  # (L,) bool: printed whatever the extent (annotated / symbolic)
    self.out_axis = out_axis  # (L, NDo) float64: 1 where the loop's root axis indexes dim
    self.read_bytes = read_bytes  # (L, NB) float64: element bytes per read buffer, 0 padding
    self.n_reads = n_reads  # (L,) float64: read accesses of the loop's stage
    # Indices into the value table (see :func:`raw_values`, :func:`shape_values`):
    self.d_idx = d_idx  # (L, NB, ND): |d index / d root axis| of the loop's axis
    self.s_idx = s_idx  # (L, NB, ND): the read dimension's size
    self.o_idx = o_idx  # (L, NDo): the output dimension's size
    self.n = len(always)
    self.nb, self.nd = d_idx.shape[1:]  # read buffers, dimensions of a read buffer (padded)
    self.ndo = out_axis.shape[1]


def print_order(nest: rp.LoopNest):
  """``[(stage index, loop index, ordinal of the stage, enclosing (stage, loop) list)]`` for
  every loop of every printed stage, in print order."""
  attached: dict = {}
  for i in nest.attach_order:
    s = nest.stages[i]
    attached.setdefault((s[rp.S_ATTACH_STAGE], s[rp.S_ATTACH_ITER]), []).append(i)
  out = []
  ordinal = [0]

  def emit(i, enclosing):
    k = ordinal[0]
    ordinal[0] += 1
    enc = list(enclosing)
    for j in range(len(nest.stages[i][rp.S_LOOPS])):
      out.append((i, j, k, tuple(enc)))
      enc.append((i, j))
      for c in attached.get((i, j), ()):
        emit(c, enc)

  for i, s in enumerate(nest.stages):
    if s[rp.S_OP_TYPE] == rp.COMPUTE_STAGE and s[rp.S_COMPUTE_AT] == rp.ROOT:
      emit(i, ())
  return out


def _access(nest, i):
  acc = nest.access[i] if nest.access else None
  if acc is None:
    raise ValueError(
      f"stage {nest.stages[i][rp.S_NAME]} has no bounds (replay with "
      "infer_bounds and concrete split lengths)"
    )
  return acc


def _table_stages(order) -> list:
  """Printed stages in order of first loop: the order of their segments in the value table."""
  seen: dict = {}
  for i, _, _, _ in order:
    seen.setdefault(i, None)
  return list(seen)


def raw_values(nest: rp.LoopNest, order) -> list:
  """A nest's values as flat lists of the replay's own ints (traced ints in a traced replay,
  see ``replay_cache``): ext, coef, unroll, out_c, read_c (one per loop in ``order``), and the
  footprint table: per printed stage (:func:`_table_stages` order), per read buffer and
  dimension the row |d index / d root axis r| over its root axes r (``replay.A_READS``), then
  per read buffer the dimension sizes, then the output's dimension sizes. :class:`Plan` holds
  the indices that spread the table over loops (it is per stage, not per loop, to keep traced
  programs short)."""
  ext, coef, unroll, out_c, read_c, table = [], [], [], [], [], []
  for i, j, _, _ in order:
    st = nest.stages[i]
    acc = nest.access[i]
    e = st[rp.S_LOOPS][j][rp.L_EXTENT]
    ext.append(1 if e is None else e)
    axis, cf = acc[rp.A_LOOPS][j]
    coef.append(cf)
    unroll.append(st[rp.S_UNROLL])
    out_c.append(acc[rp.A_OUT_C][axis] if axis >= 0 else 0)
    read_c.append(acc[rp.A_READ_C][axis] if axis >= 0 else 0)
  for i in _table_stages(order):
    acc = nest.access[i]
    for _, rows in acc[rp.A_READS]:
      for row in rows:
        table.extend(row)
    for shape, _ in acc[rp.A_READS]:
      table.extend(shape)
    table.extend(acc[rp.A_OUT_SHAPE])
  return [ext, coef, unroll, out_c, read_c, table]


def shape_values(plan: Plan, flat) -> tuple:
  """The :func:`raw_values` lists concatenated (plain ints) -> the :data:`N_VALUES` value arrays
  (a single conversion per program): ext, coef, unroll, out_c, read_c (L,) int64; read_d and
  read_size (L, NB, ND): per loop, read buffer and dimension |d index / d loop's root axis| and
  the dimension's size (0 and 1 for padding); out_size (L, NDo) (1 for padding)."""
  n = plan.n
  flat = np.asarray(flat, np.int64)
  k = 5 * n
  table = np.concatenate([flat[k:], _SENTINELS])
  return (
    flat[:n],
    flat[n : 2 * n],
    flat[2 * n : 3 * n],
    flat[3 * n : 4 * n],
    flat[4 * n : k],
    table[plan.d_idx],
    table[plan.s_idx],
    table[plan.o_idx],
  )


_SENTINELS = np.array([0, 1], np.int64)  # the table's padding entries: ZERO, ONE


def plan_of(nest: rp.LoopNest, order=None) -> Plan:
  """The :class:`Plan` of a replayed nest (structure only; values are not read)."""
  if order is None:
    order = print_order(nest)
  n = len(order)
  # Per printed stage, its segment of the value table (see raw_values) as index templates.
  segs = []
  t = 0
  for i in _table_stages(order):
    acc = _access(nest, i)
    n_root = len(acc[rp.A_OUT_C])
    ds = [len(shape) for shape, _ in acc[rp.A_READS]]
    n_out = len(acc[rp.A_OUT_SHAPE])
    segs.append((i, t, n_root, ds, n_out))
    t += sum(ds) * (n_root + 1) + n_out
  zero, one = t, t + 1
  nb = max([len(g[3]) for g in segs], default=0)
  nd = max([d for g in segs for d in g[3]], default=0)
  ndo = max([g[4] for g in segs], default=0)
  seg_of = {}
  d_tmpl = np.full((len(segs), nb, nd), -1, np.intp)  # row start of each read dimension
  s_tmpl = np.full((len(segs), nb, nd), one, np.intp)
  o_tmpl = np.full((len(segs), ndo), one, np.intp)
  for g, (i, base, n_root, ds, n_out) in enumerate(segs):
    seg_of[i] = g
    sizes = base + sum(ds) * n_root
    before = 0
    for r, nd_r in enumerate(ds):
      d_tmpl[g, r, :nd_r] = base + (before + np.arange(nd_r)) * n_root
      s_tmpl[g, r, :nd_r] = sizes + before + np.arange(nd_r)
      before += nd_r
    o_tmpl[g, :n_out] = sizes + before + np.arange(n_out)
  loop_seg = np.array([seg_of[i] for i, _, _, _ in order], np.intp)
  loop_axis = np.array([nest.access[i][rp.A_LOOPS][j][0] for i, j, _, _ in order], np.intp)
  d_idx = d_tmpl[loop_seg]
  d_idx = np.where(
    (d_idx >= 0) & (loop_axis >= 0)[:, None, None], d_idx + loop_axis[:, None, None], zero
  )
  s_idx = s_tmpl[loop_seg]
  o_idx = o_tmpl[loop_seg]
  pos = {(i, j): p for p, (i, j, _, _) in enumerate(order)}
  static = np.zeros((n, WIDTH))
  anc = np.zeros((n, n), bool)
  inner = np.zeros((n, n), bool)
  always = np.zeros(n, bool)
  # The output is indexed by the spatial root axes in order: loop axis a moves dimension a.
  seg_n_out = np.array([g[4] for g in segs], np.intp)[loop_seg]
  out_axis = ((np.arange(ndo) == loop_axis[:, None]) & (loop_axis < seg_n_out)[:, None]).astype(
    np.float64
  )
  n_reads = np.array([len(g[3]) for g in segs], np.float64)[loop_seg]
  read_bytes = np.where(np.arange(nb) < n_reads[:, None], float(ELEMENT_BYTES), 0.0)
  for p, (i, j, k, enc) in enumerate(order):
    st = nest.stages[i]
    acc = _access(nest, i)
    lp = st[rp.S_LOOPS][j]
    row = static[p]
    row[C_IS_LOOP] = 1
    row[C_STAGE] = k
    row[C_OUTPUT] = acc[rp.A_OUTPUT]
    row[C_CACHE] = acc[rp.A_CACHE]
    row[C_RFACTOR] = acc[rp.A_RFACTOR]
    row[C_ATTACHED] = st[rp.S_COMPUTE_AT] == rp.ITER
    row[C_REDUCE] = _KIND_VALUE[lp[rp.L_KIND]]
    col = _ANN_COL.get(lp[rp.L_ANN])
    if col is not None:
      row[col] = 1
    row[C_SYMBOLIC] = lp[rp.L_SYMBOLIC]
    always[p] = lp[rp.L_ANN] != 0 or lp[rp.L_SYMBOLIC] or lp[rp.L_EXTENT] is None
    for e in enc:
      anc[p, pos[e]] = True
    for jj in range(j + 1, len(st[rp.S_LOOPS])):
      inner[p, pos[(i, jj)]] = True
  return Plan(static, anc, inner, always, out_axis, read_bytes, n_reads, d_idx, s_idx, o_idx)


def structure_key(nest: rp.LoopNest) -> tuple:
  """Everything of a nest that :func:`print_order` and :func:`plan_of` read, and nothing else:
  the attach order and, per stage, its op type, compute location, attach point, per loop (kind,
  annotation, symbolic, extent unknown), and the shape of its access info (output / cache /
  rfactor flags, each loop's root axis, the number of root axes, the rank of each read buffer
  and of the output). Two nests with equal keys have the same print order and plan; the
  values (extents, coefficients, strides, sizes, unroll) are not part of it."""
  acc = nest.access
  key = [nest.attach_order]
  for i, s in enumerate(nest.stages):
    a = acc[i] if acc else None
    key.append(
      (
        s[rp.S_OP_TYPE],
        s[rp.S_COMPUTE_AT],
        s[rp.S_ATTACH_STAGE],
        s[rp.S_ATTACH_ITER],
        tuple(
          [
            (lp[rp.L_KIND], lp[rp.L_ANN], lp[rp.L_SYMBOLIC], lp[rp.L_EXTENT] is None)
            for lp in s[rp.S_LOOPS]
          ]
        ),
        None
        if a is None
        else (
          a[rp.A_OUTPUT],
          a[rp.A_CACHE],
          a[rp.A_RFACTOR],
          tuple([x[0] for x in a[rp.A_LOOPS]]),
          len(a[rp.A_OUT_C]),
          tuple([len(shape) for shape, _ in a[rp.A_READS]]),
          len(a[rp.A_OUT_SHAPE]),
        ),
      )
    )
  return tuple(key)


# structure_key -> (print order, plan): programs of a task share a few structures (the split
# lengths and unroll values change only the values), and the plan is most of the tokens' cost.
# Plans are never mutated. Bounded: cleared when full (a build walks the records task by task).
PLAN_CACHE_SIZE = 4096
_PLAN_CACHE: dict = {}


def plan_and_values(nest: rp.LoopNest):
  """(:class:`Plan`, ext, coef, unroll, out_c, read_c, read_d, read_size, out_size) of a
  replayed nest: values as int64 arrays, (L,) for the first five (out_c / read_c: output / max
  read stride per unit coefficient), (L, NB, ND) for read_d / read_size, (L, NDo) for
  out_size (see :func:`raw_values`). The plan is shared by nests of one
  :func:`structure_key` (cached)."""
  key = structure_key(nest)
  hit = _PLAN_CACHE.get(key)
  if hit is None:
    order = print_order(nest)
    hit = (order, plan_of(nest, order))
    if len(_PLAN_CACHE) >= PLAN_CACHE_SIZE:
      _PLAN_CACHE.clear()
    _PLAN_CACHE[key] = hit
  order, plan = hit
  ext, coef, unroll, out_c, read_c, table = raw_values(nest, order)
  return (plan,) + shape_values(plan, ext + coef + unroll + out_c + read_c + table)


def _log2(x):
  return np.log2(x.astype(np.float64))


def _bmm(a, b):
  # (B, L, L) bool x (B, L, Q) int64 -> int64. Done in float64 (BLAS): every term and partial
  # sum is an integer below 2**53, so the result is exact whatever the summation order.
  return np.matmul(a.astype(np.float64), b.astype(np.float64))


def fill(plan: Plan, *values, max_tokens: int) -> np.ndarray:
  """Tokens of a batch of programs sharing ``plan``: ``values`` are the :data:`N_VALUES` arrays of
  :func:`plan_and_values` with a leading batch axis B; returns (B, max_tokens, WIDTH) float16."""
  b = np.shape(values[0])[0]

  def rep(x):
    return np.broadcast_to(x, (b,) + x.shape)

  struct = tuple(
    rep(x)
    for x in (
      plan.static,
      plan.anc,
      plan.inner,
      plan.always,
      plan.out_axis,
      plan.read_bytes,
      plan.n_reads,
    )
  )
  return fill_arrays(struct, values, max_tokens)


def fill_arrays(struct, values, max_tokens: int) -> np.ndarray:
  """:func:`fill` with a plan per program, stacked: ``struct`` = (static (B, L, WIDTH), anc and
  inner (B, L, L), always (B, L), out_axis (B, L, NDo), read_bytes (B, L, NB), n_reads (B, L)),
  ``values`` as in :func:`fill`. Padding loops (extent 1, not ``always``, no relations) make no
  token; padding read buffers have read_bytes 0, padding dimensions size 1 and derivative 0."""
  static, anc, inner, always, out_axis, read_bytes, n_reads = struct
  ext, coef, unroll, out_c, read_c, read_d, read_size, out_size = (
    np.asarray(v, np.int64) for v in values
  )
  b, n = ext.shape
  out = np.zeros((b, max_tokens, WIDTH), DTYPE)
  if n == 0:
    return out
  keep = (ext != 1) | always
  tok = np.array(static, np.float64)
  tok[:, :, C_DEPTH] = (keep[:, None, :] & anc).sum(-1)
  tok[:, :, C_LOG_EXT] = _log2(ext)
  tok[:, :, C_LOG_UNROLL] = _log2(1 + unroll)
  ext3 = ext[:, None, :]
  tok[:, :, C_LOG_OUTER] = _log2(np.where(anc, ext3, 1).prod(-1))
  inner_prod = np.where(inner, ext3, 1).prod(-1)
  tok[:, :, C_LOG_INNER] = _log2(inner_prod)
  tok[:, :, C_OUT_STRIDE] = _log2(1 + out_c * coef)
  tok[:, :, C_READ_STRIDE] = _log2(1 + read_c * coef)
  # Footprints over the body including the loop: the loop itself and its stage's inner loops.
  body = np.array(inner)
  idx = np.arange(n)
  body[:, idx, idx] = True
  step = (coef * (ext - 1))[:, :, None]
  nb, nd = read_d.shape[2:]
  span = _bmm(body, (read_d.reshape(b, n, nb * nd) * step)).reshape(b, n, nb, nd)
  read_elems = np.minimum(read_size, 1 + span).prod(-1)  # (B, L, NB)
  tok[:, :, C_READ_BYTES] = np.log2(1 + (read_elems * read_bytes).sum(-1))
  touched = (read_elems * (read_bytes > 0)).sum(-1)
  accesses = (inner_prod * ext).astype(np.float64) * n_reads
  tok[:, :, C_REUSE] = np.log2(
    1 + np.divide(accesses, touched, out=np.zeros_like(accesses), where=touched > 0)
  )
  out_span = _bmm(body, out_axis * step)
  write_elems = np.minimum(out_size, 1 + out_span).prod(-1)
  tok[:, :, C_WRITE_BYTES] = np.log2(1 + write_elems * ELEMENT_BYTES)
  # Printed loops first, in order (stable sort), then crop.
  order = np.argsort(~keep, axis=1, kind="stable")[:, :max_tokens]
  rows = np.take_along_axis(tok, order[:, :, None], axis=1)
  rows *= np.take_along_axis(keep, order, axis=1)[:, :, None]
  m = rows.shape[1]
  out[:, :m] = rows.astype(DTYPE)
  return out


def loop_tokens(
  nest: rp.LoopNest, skeleton=None, max_tokens: int = DEFAULT_MAX_TOKENS
) -> np.ndarray:
  """(max_tokens, WIDTH) float16 tokens of a replayed nest; zero rows pad.

  ``skeleton`` is accepted for symmetry with the replay (the access patterns the tokens need
  are already on the nest, ``nest.access``).
  """
  del skeleton
  plan, *vals = plan_and_values(nest)
  return fill(plan, *(v[None] for v in vals), max_tokens=max_tokens)[0]


def loop_tokens_many(
  nests: Sequence[rp.LoopNest], skeleton=None, max_tokens: int = DEFAULT_MAX_TOKENS
) -> np.ndarray:
  """(len(nests), max_tokens, WIDTH) float16: :func:`loop_tokens` of each nest."""
  out = np.zeros((len(nests), max_tokens, WIDTH), DTYPE)
  for k, nest in enumerate(nests):
    out[k] = loop_tokens(nest, skeleton, max_tokens)
  return out


def model_input(steps: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """The model's input of step features and loop tokens: ``(N, L + T, E + W)`` float32.

  The two token kinds use disjoint columns (as the deleted TVM store version did): rows ``[:L]``
  columns ``[:E]`` are the ``(N, L, E)`` steps, rows ``[L:]`` columns ``[E:]`` the ``(N, T, W)``
  tokens (float16 -> float32 is exact), zero elsewhere. The model's first Linear thus embeds each
  kind with its own weights, and padding rows of either kind stay all-zero. Datasets store the two
  compact arrays; this block is only ever made per batch (``tlp_jax.train.step.model_input`` is
  the same on device).
  """
  steps = np.asarray(steps)
  tokens = np.asarray(tokens)
  if steps.ndim != 3 or tokens.ndim != 3 or steps.shape[0] != tokens.shape[0]:
    raise ValueError(
      f"expected (N, L, E) steps and (N, T, W) tokens with the same N, got "
      f"{steps.shape} and {tokens.shape}"
    )
  n, length, width = steps.shape
  _, num_tokens, token_width = tokens.shape
  out = np.zeros((n, length + num_tokens, width + token_width), np.float32)
  out[:, :length, :width] = steps
  out[:, length:, width:] = tokens
  return out


def n_printed_loops(nest: rp.LoopNest) -> int:
  """Number of tokens before cropping (printed loops of the nest)."""
  plan, ext = plan_and_values(nest)[:2]
  return int(((ext != 1) | plan.always).sum())


__all__ = [
  "LAYOUT_VERSION",
  "COLUMNS",
  "WIDTH",
  "DEFAULT_MAX_TOKENS",
  "ELEMENT_BYTES",
  "N_VALUES",
  "Plan",
  "print_order",
  "raw_values",
  "shape_values",
  "plan_of",
  "plan_and_values",
  "structure_key",
  "PLAN_CACHE_SIZE",
  "fill",
  "fill_arrays",
  "loop_tokens",
  "loop_tokens_many",
  "model_input",
  "n_printed_loops",
]
