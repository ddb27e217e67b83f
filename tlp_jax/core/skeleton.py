"""Per-task loop-nest skeletons: what replaying a record's steps needs to know about its task.

A record holds only a workload key and a list of transform steps. To turn the steps into the
final loop nest without TVM (:mod:`tlp_jax.core.replay`) we need, once per task, the ComputeDAG's
initial stages in order (placeholders and compute ops, their iterators) and, for bound
inference, how each compute stage indexes the stages it reads. That is a *skeleton*; it is
extracted with TVM once per task (:mod:`tlp_jax.tvm.skeleton_extract`) and stored as JSON.

Format ``tlp-jax-loopnest-skeleton``, version 1 (one object per task)::

  {"format": "tlp-jax-loopnest-skeleton", "version": 1, "workload_key": "...",
   "stages": [
     {"name": "p0", "type": "placeholder", "shape": [4, 1024]},
     {"name": "T_dense", "type": "compute", "shape": [4, 1000],
      "iters": [["i", "s", 4], ["j", "s", 1000], ["k", "r", 1024]],
      "reads": [[0, [[1, 0, 0, 0], [0, 0, 1, 0]]], [1, [[0, 1, 0, 0], [0, 0, 1, 0]]]],
      "output": true, "const_matrix": false, "num_outputs": 1}]}

``iters`` are the op's spatial axes then its reduce axes (``s``/``r``), with their extents.
``reads`` lists every distinct tensor access in the body as ``[producer stage index, index]``,
one index entry per producer dimension, each one of:

* a list of ``len(iters) + 1`` ints: an affine index, coefficients over the consumer's iterators
  then the constant;
* ``{"e": TREE}``: a non-affine index TVM's bound inference still evaluates (floordiv/floormod by
  constants, min/max). ``TREE`` is an int, ``["v", i]`` (iterator ``i``), or
  ``[op, a, b]`` with op one of ``+ - * // % min max``;
* ``null``: opaque (e.g. an index that loads another tensor); bound inference then assumes the
  producer's whole dimension, as TVM does for an unbounded index.

A *collection* file maps workload keys to skeletons::

  {"format": "tlp-jax-loopnest-skeletons", "version": 1, "skeletons": {KEY: SKELETON, ...},
   "failed": {KEY: "why TVM's DAG could not be described", ...}}

(``failed`` is optional: tasks the extractor could not describe, listed so that a build can
count their records as skipped instead of reporting the skeleton missing.) A TenSet dir keeps
its collection at ``network_info/skeletons.json`` (:func:`tenset_skeletons_path`), written once
with TVM by ``python -m tlp_jax.tvm.skeleton_extract --tenset_dir DIR``.

NumPy/stdlib only: never imports TVM or JAX.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from tlp_jax.core import atomic_file, tenset

FORMAT = "tlp-jax-loopnest-skeleton"
COLLECTION_FORMAT = "tlp-jax-loopnest-skeletons"
VERSION = 1
# Where a TenSet dir keeps its skeletons (next to its network info).
TENSET_SKELETONS_FILE = os.path.join(tenset.NETWORK_INFO_DIR, "skeletons.json")
EXTRACT_COMMAND = "python -m tlp_jax.tvm.skeleton_extract --tenset_dir"

PLACEHOLDER = "placeholder"
COMPUTE = "compute"
SPATIAL = "s"
REDUCE = "r"
_TREE_OPS = frozenset({"+", "-", "*", "//", "%", "min", "max"})


class SkeletonError(ValueError):
  """A skeleton (or a collection file) is malformed; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Read:
  """One tensor access of a compute stage: producer stage index and one index per dimension."""

  producer: int
  index: tuple  # per producer dim: tuple of ints (affine), ("e", tree) or None (opaque)


@dataclasses.dataclass(frozen=True)
class StageSkeleton:
  """One stage of the initial ComputeDAG."""

  name: str
  type: str  # PLACEHOLDER or COMPUTE
  shape: tuple  # output shape
  iters: tuple = ()  # ((name, "s"|"r", extent), ...) spatial then reduce
  reads: tuple = ()  # (Read, ...)
  output: bool = False  # read by no other stage (TVM then keeps its full domain)
  const_matrix: bool = False  # TVM replaces it by a constant when it is inlined
  num_outputs: int = 1

  @property
  def n_spatial(self) -> int:
    return sum(1 for it in self.iters if it[1] == SPATIAL)


@dataclasses.dataclass(frozen=True)
class Skeleton:
  """A task's skeleton: its initial stages in ComputeDAG order."""

  workload_key: str
  stages: tuple

  def to_dict(self) -> dict:
    """JSON-ready dict (see the module docstring for the format)."""
    out = []
    for s in self.stages:
      d: dict[str, Any] = {"name": s.name, "type": s.type, "shape": list(s.shape)}
      if s.type == COMPUTE:
        d["iters"] = [[n, k, e] for n, k, e in s.iters]
        d["reads"] = [[r.producer, [_index_to_json(x) for x in r.index]] for r in s.reads]
        d["output"] = s.output
        d["const_matrix"] = s.const_matrix
        d["num_outputs"] = s.num_outputs
      out.append(d)
    return {"format": FORMAT, "version": VERSION, "workload_key": self.workload_key, "stages": out}

  def to_json(self) -> str:
    """Compact JSON text of :meth:`to_dict`."""
    return json.dumps(self.to_dict(), separators=(",", ":"))

  @classmethod
  def from_dict(cls, d: Mapping, where: str = "<skeleton>") -> Skeleton:
    """Validates and builds a skeleton; :class:`SkeletonError` names ``where`` and the field."""
    if not isinstance(d, Mapping):
      raise SkeletonError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if d.get("format") != FORMAT:
      raise SkeletonError(f"{where}: format is {d.get('format')!r}, expected {FORMAT!r}")
    if d.get("version") != VERSION:
      raise SkeletonError(
        f"{where}: version {d.get('version')!r} is not supported "
        f"(this code reads version {VERSION})"
      )
    key = d.get("workload_key")
    if not isinstance(key, str):
      raise SkeletonError(f"{where}: workload_key must be a string")
    raw = d.get("stages")
    if not isinstance(raw, list) or not raw:
      raise SkeletonError(f"{where}: stages must be a non-empty list")
    stages = []
    for i, s in enumerate(raw):
      stages.append(_stage_from_dict(s, len(raw), f"{where}: stages[{i}]"))
    for i, s in enumerate(stages):
      for j, r in enumerate(s.reads):
        if r.producer == i:
          raise SkeletonError(f"{where}: stages[{i}].reads[{j}] reads its own stage")
        p = stages[r.producer]
        if len(r.index) != len(p.shape):
          raise SkeletonError(
            f"{where}: stages[{i}].reads[{j}] has {len(r.index)} indices but stage "
            f"{r.producer} ({p.name}) has {len(p.shape)} dimensions"
          )
    return cls(key, tuple(stages))

  @classmethod
  def from_json(cls, text: str, where: str = "<skeleton>") -> Skeleton:
    """Parses :meth:`to_json` output (strictly validated)."""
    try:
      d = json.loads(text)
    except ValueError as e:
      raise SkeletonError(f"{where}: not valid JSON ({e})") from e
    return cls.from_dict(d, where)


def _index_to_json(x):
  if x is None:
    return None
  if isinstance(x, tuple) and x and x[0] == "e":
    return {"e": _tree_to_json(x[1])}
  return list(x)


def _tree_to_json(t):
  if isinstance(t, int):
    return t
  if t[0] == "v":
    return ["v", t[1]]
  return [t[0], _tree_to_json(t[1]), _tree_to_json(t[2])]


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _tree_from_json(t, n_iters: int, where: str):
  if _is_int(t):
    return t
  if not isinstance(t, list) or not t:
    raise SkeletonError(f"{where}: bad index expression node {t!r}")
  if t[0] == "v":
    if len(t) != 2 or not _is_int(t[1]) or not 0 <= t[1] < n_iters:
      raise SkeletonError(f"{where}: bad iterator reference {t!r} ({n_iters} iterators)")
    return ("v", t[1])
  if t[0] not in _TREE_OPS or len(t) != 3:
    raise SkeletonError(f"{where}: unknown index expression node {t!r}")
  return (t[0], _tree_from_json(t[1], n_iters, where), _tree_from_json(t[2], n_iters, where))


def _stage_from_dict(s, n_stages: int, where: str) -> StageSkeleton:
  if not isinstance(s, Mapping):
    raise SkeletonError(f"{where}: expected an object")
  name, typ, shape = s.get("name"), s.get("type"), s.get("shape")
  if not isinstance(name, str) or not name:
    raise SkeletonError(f"{where}: name must be a non-empty string")
  if typ not in (PLACEHOLDER, COMPUTE):
    raise SkeletonError(
      f"{where} ({name}): type must be {PLACEHOLDER!r} or {COMPUTE!r}, got {typ!r}"
    )
  if not isinstance(shape, list) or not all(_is_int(e) and e >= 0 for e in shape):
    raise SkeletonError(f"{where} ({name}): shape must be a list of non-negative ints")
  if typ == PLACEHOLDER:
    return StageSkeleton(name, typ, tuple(shape))
  iters = s.get("iters")
  if not isinstance(iters, list):
    raise SkeletonError(f"{where} ({name}): iters must be a list")
  its = []
  for j, it in enumerate(iters):
    if (
      not isinstance(it, list)
      or len(it) != 3
      or not isinstance(it[0], str)
      or it[1] not in (SPATIAL, REDUCE)
      or not _is_int(it[2])
      or it[2] < 0
    ):
      raise SkeletonError(f"{where} ({name}): iters[{j}] must be [name, 's'|'r', extent>=0]")
    its.append((it[0], it[1], it[2]))
  kinds = [k for _, k, _ in its]
  if kinds != sorted(kinds, key=lambda k: k == REDUCE):
    raise SkeletonError(f"{where} ({name}): spatial iterators must come before reduce ones")
  n_sp = kinds.count(SPATIAL)
  if n_sp != len(shape) or [e for _, k, e in its if k == SPATIAL] != list(shape):
    raise SkeletonError(
      f"{where} ({name}): spatial iterator extents {its[:n_sp]} do not match shape {shape}"
    )
  reads = s.get("reads")
  if not isinstance(reads, list):
    raise SkeletonError(f"{where} ({name}): reads must be a list")
  rs = []
  for j, r in enumerate(reads):
    w = f"{where} ({name}): reads[{j}]"
    if (
      not isinstance(r, list)
      or len(r) != 2
      or not _is_int(r[0])
      or not 0 <= r[0] < n_stages
      or not isinstance(r[1], list)
    ):
      raise SkeletonError(f"{w}: must be [producer stage index < {n_stages}, [index, ...]]")
    idx = []
    for x in r[1]:
      if x is None:
        idx.append(None)
      elif isinstance(x, dict):
        if set(x) != {"e"}:
          raise SkeletonError(f"{w}: a non-affine index must be {{'e': tree}}, got {x!r}")
        idx.append(("e", _tree_from_json(x["e"], len(its), w)))
      elif isinstance(x, list) and len(x) == len(its) + 1 and all(_is_int(c) for c in x):
        idx.append(tuple(x))
      else:
        raise SkeletonError(
          f"{w}: index {x!r} is neither affine ({len(its) + 1} ints), {{'e': tree}} nor null"
        )
    rs.append(Read(r[0], tuple(idx)))
  for field, typ_ in (("output", bool), ("const_matrix", bool), ("num_outputs", int)):
    if not isinstance(s.get(field), typ_):
      raise SkeletonError(f"{where} ({name}): {field} must be a {typ_.__name__}")
  if s["num_outputs"] < 1:
    raise SkeletonError(f"{where} ({name}): num_outputs must be >= 1")
  return StageSkeleton(
    name, typ, tuple(shape), tuple(its), tuple(rs), s["output"], s["const_matrix"], s["num_outputs"]
  )


def tenset_skeletons_path(tenset_dir: str) -> str:
  """``TENSET/network_info/skeletons.json``: the default place of a TenSet dir's skeletons."""
  return os.path.join(tenset_dir, TENSET_SKELETONS_FILE)


def save_collection(
  path: str, skeletons: Mapping[str, Skeleton], failed: Mapping[str, str] | None = None
) -> None:
  """Writes ``{workload_key: skeleton}`` (and the optional ``failed`` map ``{workload_key:
  reason}``) to ``path`` atomically (:mod:`tlp_jax.core.atomic_file`)."""
  for k, s in skeletons.items():
    if k != s.workload_key:
      raise SkeletonError(f"{path}: key {k!r} holds the skeleton of {s.workload_key!r}")
  doc = {
    "format": COLLECTION_FORMAT,
    "version": VERSION,
    "skeletons": {k: skeletons[k].to_dict() for k in sorted(skeletons)},
  }
  if failed:
    doc["failed"] = {k: str(failed[k]) for k in sorted(failed)}
  # Shared data (kept with datasets): the umask's mode, as any file written with open().
  atomic_file.write_atomically(path, lambda f: json.dump(doc, f, separators=(",", ":")))


def load_collection(path: str) -> dict[str, Skeleton]:
  """Reads a :func:`save_collection` file; every skeleton is validated."""
  return _validate_collection(path, _read_collection(path))


def load_failed(path: str) -> dict[str, str]:
  """The ``failed`` map of a collection file (``{}`` when it has none)."""
  doc = _read_collection(path)
  failed = doc.get("failed", {})
  if not isinstance(failed, dict) or not all(isinstance(v, str) for v in failed.values()):
    raise SkeletonError(f"{path}: failed must map workload keys to reasons")
  return dict(failed)


def _read_collection(path: str) -> dict:
  try:
    with open(path) as f:
      doc = json.load(f)
  except OSError as e:
    raise SkeletonError(f"{path}: cannot read ({e})") from e
  except ValueError as e:
    raise SkeletonError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(doc, dict):
    raise SkeletonError(f"{path}: not a {COLLECTION_FORMAT!r} file")
  return doc


def _validate_collection(path: str, doc: dict) -> dict[str, Skeleton]:
  if doc.get("format") != COLLECTION_FORMAT:
    raise SkeletonError(f"{path}: not a {COLLECTION_FORMAT!r} file")
  if doc.get("version") != VERSION:
    raise SkeletonError(
      f"{path}: version {doc.get('version')!r} is not supported (this code reads version {VERSION})"
    )
  sk = doc.get("skeletons")
  if not isinstance(sk, dict):
    raise SkeletonError(f"{path}: skeletons must be an object")
  out = {}
  for k, v in sk.items():
    s = Skeleton.from_dict(v, f"{path}: skeletons[{k!r}]")
    if s.workload_key != k:
      raise SkeletonError(f"{path}: skeletons[{k!r}] has workload_key {s.workload_key!r}")
    out[k] = s
  return out


def affine_index(n_iters: int, coeffs: Mapping[int, int], const: int) -> tuple:
  """An affine index entry: ``coeffs`` maps iterator positions to coefficients."""
  out = [0] * (n_iters + 1)
  for i, c in coeffs.items():
    out[i] = c
  out[n_iters] = const
  return tuple(out)


def collection_size_stats(skeletons: Mapping[str, Skeleton]) -> dict:
  """Bytes of compact JSON per skeleton: mean, max, total (for reports)."""
  sizes = [len(s.to_json()) for s in skeletons.values()]
  if not sizes:
    return {"tasks": 0}
  return {
    "tasks": len(sizes),
    "mean_bytes": sum(sizes) / len(sizes),
    "max_bytes": max(sizes),
    "total_bytes": sum(sizes),
  }


__all__ = [
  "FORMAT",
  "COLLECTION_FORMAT",
  "VERSION",
  "TENSET_SKELETONS_FILE",
  "EXTRACT_COMMAND",
  "Read",
  "StageSkeleton",
  "Skeleton",
  "SkeletonError",
  "tenset_skeletons_path",
  "save_collection",
  "load_collection",
  "load_failed",
  "affine_index",
  "collection_size_stats",
]
