"""Loop tokens: a replayed loop nest as a compact float16 token block for TLP's attention model.

One token per loop, in the order loops appear in the final printed nest (TVM's ``PrintState``
with trivial loops deleted): root stages in stage order, a stage attached by compute_at nested
right after the loop it is attached at (attached stages in attach-map order); inlined stages
and placeholders have none. Loops of extent 1 are dropped unless annotated (or their extent is
symbolic); the sequence is cropped to ``max_tokens`` (outermost first) and zero-padded.

Layout version 1, ``WIDTH`` = 21 columns (:data:`COLUMNS`), every value exactly a float16
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

Strides compose the split/fuse relations from the loop to its root iterator (a split's outer
part steps by the inner part's extent; a fused loop is followed through its inner part, the one
that moves when it steps) with the affine index coefficients of the skeleton (after inlining)
and the full tensors' row-major shapes; an index that is not affine in the iterator gives 0.

``max_tokens`` default :data:`DEFAULT_MAX_TOKENS` is the 99th percentile of printed-loop counts
over the shared tenset-mini records (both hardware), see ``bench/replay_throughput.py``.

NumPy only (no TVM / JAX). Tokens of many nests are filled per batch with NumPy
(:func:`fill`), the scalar API is the same code with a batch of one, so both are bit-identical.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from tlp_jax.core import replay as rp

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
COLUMNS = ("is_loop", "stage", "stage_output", "stage_cache", "stage_rfactor", "stage_attached",
           "depth", "reduce", "log2_extent", "ann_parallel", "ann_vectorize", "ann_unroll",
           "ann_vthread", "ann_block", "ann_thread", "log2_unroll", "log2_outer", "log2_inner",
           "log2_out_stride", "log2_read_stride", "symbolic_extent")
WIDTH = len(COLUMNS)
DEFAULT_MAX_TOKENS = 40   # p99 of printed loops on tenset-mini is 39 (0.56% cropped)
DTYPE = np.float16
(C_IS_LOOP, C_STAGE, C_OUTPUT, C_CACHE, C_RFACTOR, C_ATTACHED, C_DEPTH, C_REDUCE, C_LOG_EXT,
 C_PARALLEL, C_VECTORIZE, C_UNROLL, C_VTHREAD, C_BLOCK, C_THREAD, C_LOG_UNROLL, C_LOG_OUTER,
 C_LOG_INNER, C_OUT_STRIDE, C_READ_STRIDE, C_SYMBOLIC) = range(WIDTH)

# Annotation index (replay.ANNOTATIONS) -> one-hot column.
_ANN_COL = {1: C_UNROLL, 2: C_VECTORIZE, 3: C_PARALLEL, 4: C_VTHREAD, 5: C_BLOCK, 6: C_THREAD,
            7: C_BLOCK, 8: C_THREAD, 9: C_BLOCK, 10: C_THREAD}
_KIND_VALUE = {rp.SPATIAL: 0.0, rp.REDUCE: 1.0, rp.MIXED: 0.5, rp.SPECIAL: 0.0}


class Plan:
  """The value-independent part of a nest's tokens: loops in print order and their relations.

  ``L`` loops (trivial ones included; which are printed depends on the extents). Per program
  the values are the loop extents, the loop coefficients (see ``replay.A_LOOPS``), the
  stages' auto_unroll_max_step and the loops' unit strides in the output / read buffers (these
  depend on split lengths where a stage's tensor shape does, e.g. rfactor), each an ``(L,)``
  int vector in plan order.
  """
  __slots__ = ("static", "anc", "inner", "always", "n")

  def __init__(self, static, anc, inner, always):
    self.static = static    # (L, WIDTH) float64: columns that depend on structure only
    self.anc = anc          # (L, L) bool: anc[l, a] loop a encloses loop l
    self.inner = inner      # (L, L) bool: inner[l, a] loop a is inside l in l's stage
    self.always = always    # (L,) bool: printed whatever the extent (annotated / symbolic)
    self.n = len(always)


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


def plan_and_values(nest: rp.LoopNest):
  """(:class:`Plan`, extents, coefficients, unroll, out_c, read_c) of a replayed nest (values
  as (L,) int64 vectors; out_c / read_c: output / max read stride per unit coefficient)."""
  order = print_order(nest)
  n = len(order)
  pos = {(i, j): p for p, (i, j, _, _) in enumerate(order)}
  static = np.zeros((n, WIDTH))
  anc = np.zeros((n, n), bool)
  inner = np.zeros((n, n), bool)
  always = np.zeros(n, bool)
  out_c = np.zeros(n, np.int64)
  read_c = np.zeros(n, np.int64)
  ext = np.ones(n, np.int64)
  coef = np.ones(n, np.int64)
  unroll = np.zeros(n, np.int64)
  for p, (i, j, k, enc) in enumerate(order):
    st = nest.stages[i]
    acc = nest.access[i] if nest.access else None
    if acc is None:
      raise ValueError(f"stage {st[rp.S_NAME]} has no bounds (replay with infer_bounds and "
                       "concrete split lengths)")
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
    axis, cf = acc[rp.A_LOOPS][j]
    if axis >= 0:
      out_c[p] = acc[rp.A_OUT_C][axis]
      read_c[p] = acc[rp.A_READ_C][axis]
    ext[p] = 1 if lp[rp.L_EXTENT] is None else lp[rp.L_EXTENT]
    coef[p] = cf
    unroll[p] = st[rp.S_UNROLL]
  return Plan(static, anc, inner, always), ext, coef, unroll, out_c, read_c


def _log2(x):
  return np.log2(x.astype(np.float64))


def fill(plan: Plan, ext, coef, unroll, out_c, read_c, max_tokens: int) -> np.ndarray:
  """Tokens of a batch of programs sharing ``plan``: the values are (B, L) ints (see
  :func:`plan_and_values`); returns (B, max_tokens, WIDTH) float16."""
  ext = np.asarray(ext, np.int64)
  b = ext.shape[0]

  def rep(x):
    return np.broadcast_to(x, (b,) + x.shape)
  return fill_arrays(rep(plan.static), rep(plan.anc), rep(plan.inner), rep(plan.always),
                     ext, coef, unroll, out_c, read_c, max_tokens)


def fill_arrays(static, anc, inner, always, ext, coef, unroll, out_c, read_c,
                max_tokens: int) -> np.ndarray:
  """:func:`fill` with a plan per program, stacked: (B, L, WIDTH), (B, L, L) twice, then (B, L)
  arrays. Padding loops (extent 1, not ``always``, no relations) make no token."""
  ext = np.asarray(ext, np.int64)
  b, n = ext.shape
  out = np.zeros((b, max_tokens, WIDTH), DTYPE)
  if n == 0:
    return out
  coef = np.asarray(coef, np.int64)
  unroll = np.asarray(unroll, np.int64)
  out_c = np.asarray(out_c, np.int64)
  read_c = np.asarray(read_c, np.int64)
  keep = (ext != 1) | always
  tok = np.array(static, np.float64)
  tok[:, :, C_DEPTH] = (keep[:, None, :] & anc).sum(-1)
  tok[:, :, C_LOG_EXT] = _log2(ext)
  tok[:, :, C_LOG_UNROLL] = _log2(1 + unroll)
  ext3 = ext[:, None, :]
  tok[:, :, C_LOG_OUTER] = _log2(np.where(anc, ext3, 1).prod(-1))
  tok[:, :, C_LOG_INNER] = _log2(np.where(inner, ext3, 1).prod(-1))
  tok[:, :, C_OUT_STRIDE] = _log2(1 + out_c * coef)
  tok[:, :, C_READ_STRIDE] = _log2(1 + read_c * coef)
  # Printed loops first, in order (stable sort), then crop.
  order = np.argsort(~keep, axis=1, kind="stable")[:, :max_tokens]
  rows = np.take_along_axis(tok, order[:, :, None], axis=1)
  rows *= np.take_along_axis(keep, order, axis=1)[:, :, None]
  m = rows.shape[1]
  out[:, :m] = rows.astype(DTYPE)
  return out


def loop_tokens(nest: rp.LoopNest, skeleton=None, max_tokens: int = DEFAULT_MAX_TOKENS
                ) -> np.ndarray:
  """(max_tokens, WIDTH) float16 tokens of a replayed nest; zero rows pad.

  ``skeleton`` is accepted for symmetry with the replay (the access patterns the tokens need
  are already on the nest, ``nest.access``).
  """
  del skeleton
  plan, *vals = plan_and_values(nest)
  return fill(plan, *(v[None] for v in vals), max_tokens)[0]


def loop_tokens_many(nests: Sequence[rp.LoopNest], skeleton=None,
                     max_tokens: int = DEFAULT_MAX_TOKENS) -> np.ndarray:
  """(len(nests), max_tokens, WIDTH) float16: :func:`loop_tokens` of each nest."""
  out = np.zeros((len(nests), max_tokens, WIDTH), DTYPE)
  for k, nest in enumerate(nests):
    out[k] = loop_tokens(nest, skeleton, max_tokens)
  return out


def model_input(steps: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """The model's input of step features and loop tokens: ``(N, L + T, E + W)`` float32.

  The two token kinds use disjoint columns, as the TVM store version did
  (``features.append_loop_features``): rows ``[:L]`` columns ``[:E]`` are the ``(N, L, E)``
  steps, rows ``[L:]`` columns ``[E:]`` the ``(N, T, W)`` tokens (float16 -> float32 is exact),
  zero elsewhere. The model's first Linear thus embeds each kind with its own weights, and
  padding rows of either kind stay all-zero. Datasets store the two compact arrays; this block
  is only ever made per batch (``tlp_jax.train.step.model_input`` is the same on device).
  """
  steps = np.asarray(steps)
  tokens = np.asarray(tokens)
  if steps.ndim != 3 or tokens.ndim != 3 or steps.shape[0] != tokens.shape[0]:
    raise ValueError(f"expected (N, L, E) steps and (N, T, W) tokens with the same N, got "
                     f"{steps.shape} and {tokens.shape}")
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


__all__ = ["LAYOUT_VERSION", "COLUMNS", "WIDTH", "DEFAULT_MAX_TOKENS", "Plan", "print_order",
           "plan_and_values", "fill", "fill_arrays", "loop_tokens", "loop_tokens_many",
           "model_input", "n_printed_loops"]
