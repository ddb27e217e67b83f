"""TenSet / Ansor measure-record reader with TLP labels (no TVM, no JAX).

A measure-record file holds one JSON object per line (Ansor's ``v0.6`` format)::

    {"i": [[WORKLOAD_KEY, TARGET, HW_PARAMS, ...], [[], STEPS]],
     "r": [COSTS, ERROR_CODE, ALL_COST, TIMESTAMP], "v": "v0.6"}

:func:`read_task_file` reads one such file (one task of one hardware) and labels it exactly as
TLP does: a program's cost is the mean of its measured costs, its score is
``min_cost_of_task / cost`` in (0, 1]. Unlike the original, failed measurements (error code,
missing, zero, negative, inf or NaN costs) are excluded from the labels and counted by reason;
malformed lines are skipped and counted with file and line number. Nothing in a file is fatal.

Speed: every line is first tried on a fast path specialised to TVM's exact text layout (the
line must start with the same bytes as the file's first good record up to its steps, each step
text is looked up in the featurizer's row cache, only the result part goes through orjson).
Whatever that path cannot prove equal to a full parse falls back to one, so both paths give
the same output (``fast=False`` reads with the full parse only; the tests compare them).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tlp_jax.core import features as features_lib

# A module attribute (not a direct call of features_lib.json_loads) so tests can swap the parser.
_loads_fast = features_lib.json_loads

__all__ = [
  "ReadStats",
  "TaskFile",
  "Record",
  "read_task_file",
  "iter_records",
  "first_record",
  "read_lines",
  "lines_at",
  "mean_costs",
  "hardware_of_target",
  "RECORD_VERSION",
  "MALFORMED_REASONS",
  "FAILED_REASONS",
]

RECORD_VERSION = "v0.6"
MAX_EXAMPLES = 20

# Why a line was skipped (malformed) ...
BLANK_LINE = "blank_line"
NOT_UTF8 = "not_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
WRONG_VERSION = "wrong_version"
BAD_INPUT = "bad_input"  # "i" is not [[key, target, ...], [_, steps, ...], ...]
BAD_STEPS = "bad_steps"  # steps not a list of [kind: str, ...] lists
BAD_RESULT = "bad_result"  # "r" is not [costs: list of numbers | null, error: int, ...]
WORKLOAD_MISMATCH = "workload_mismatch"
TARGET_MISMATCH = "target_mismatch"
UNKNOWN_TARGET = "unknown_target"  # no featurizer given and the target's platform is unknown
# The file's target names (``-model=``) another hardware than the one it is read as.
OTHER_HARDWARE = "other_hardware"
MALFORMED_REASONS = (
  BLANK_LINE,
  NOT_UTF8,
  INVALID_JSON,
  NOT_AN_OBJECT,
  WRONG_VERSION,
  BAD_INPUT,
  BAD_STEPS,
  BAD_RESULT,
  WORKLOAD_MISMATCH,
  TARGET_MISMATCH,
  UNKNOWN_TARGET,
  OTHER_HARDWARE,
)
# ... and why a well-formed record gets no label (failed measurement).
ERROR_CODE = "error_code"
NO_COSTS = "no_costs"
NONFINITE_COST = "nonfinite_cost"
NONPOSITIVE_COST = "nonpositive_cost"
# A cost float32 cannot hold as a normal number (e.g. 1e-320 s): the dataset stores costs and
# scores as float32, and one such minimum would underflow every other score of its task to 0.
COST_OUT_OF_RANGE = "cost_out_of_range"
# Labelled across files (tenset_tfds): a score min_cost / cost below float32's range. Cannot
# happen for costs in range unless they span over 45 orders of magnitude; counted, not hidden.
SCORE_UNDERFLOW = "score_underflow"
FAILED_REASONS = (
  ERROR_CODE,
  NO_COSTS,
  NONFINITE_COST,
  NONPOSITIVE_COST,
  COST_OUT_OF_RANGE,
  SCORE_UNDERFLOW,
)
# The costs a label may use: float32's normal range, seconds.
MIN_COST = float(np.finfo(np.float32).tiny)
MAX_COST = float(np.finfo(np.float32).max)

_MODEL_RE = re.compile(r"(?:^|\s)-model=(\S+)")
_STEPS_MARKER = b"], [[], ["
_RESULT_SEP = b']]], "r": '
_TAIL = b', "v": "v0.6"}'
_PROBE_TAIL = b']]], "r": [[1.0], 0, 0, 0], "v": "v0.6"}'


@dataclasses.dataclass
class ReadStats:
  """What happened to the lines of one or more files; merge with ``+``.

  ``lines == kept + sum(failed.values()) + sum(malformed.values())`` always holds.
  ``examples`` keeps the first ``MAX_EXAMPLES`` (file, line, reason) of skipped lines.
  ``features`` are the featurizer's counters for the kept records (see ``features.STAT_*``);
  ``fast_path_lines`` says how many lines the fast path took (diagnostics only).
  """

  files: int = 0
  lines: int = 0
  kept: int = 0
  failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  malformed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: list = dataclasses.field(default_factory=list)
  features: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  fast_path_lines: int = 0

  @property
  def num_failed(self) -> int:
    """Well-formed records whose measurement failed."""
    return sum(self.failed.values())

  @property
  def num_malformed(self) -> int:
    """Lines skipped as malformed."""
    return sum(self.malformed.values())

  def __add__(self, other: ReadStats) -> ReadStats:
    if not isinstance(other, ReadStats):
      return NotImplemented
    return ReadStats(
      files=self.files + other.files,
      lines=self.lines + other.lines,
      kept=self.kept + other.kept,
      failed=self.failed + other.failed,
      malformed=self.malformed + other.malformed,
      examples=(self.examples + other.examples)[:MAX_EXAMPLES],
      features=self.features + other.features,
      fast_path_lines=self.fast_path_lines + other.fast_path_lines,
    )

  def __radd__(self, other: Any) -> ReadStats:
    if other == 0:  # lets sum() start from 0
      return self
    return NotImplemented

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON-able dict."""
    return {
      "files": self.files,
      "lines": self.lines,
      "kept": self.kept,
      "failed": {k: v for k, v in sorted(self.failed.items()) if v},
      "malformed": {k: v for k, v in sorted(self.malformed.items()) if v},
      "examples": [list(e) for e in self.examples],
      "features": {k: v for k, v in sorted(self.features.items()) if v},
      "fast_path_lines": self.fast_path_lines,
    }

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> ReadStats:
    """Inverse of :meth:`to_dict`."""
    return cls(
      files=int(data["files"]),
      lines=int(data["lines"]),
      kept=int(data["kept"]),
      failed=collections.Counter(data["failed"]),
      malformed=collections.Counter(data["malformed"]),
      examples=[tuple(e) for e in data["examples"]],
      features=collections.Counter(data.get("features", {})),
      fast_path_lines=int(data.get("fast_path_lines", 0)),
    )

  def summary(self) -> str:
    """Human-readable multi-line summary."""
    out = [
      f"{self.files} files, {self.lines} lines: {self.kept} kept, "
      f"{self.num_failed} failed measurements, {self.num_malformed} malformed lines"
    ]
    if self.failed:
      out.append("  failed: " + ", ".join(f"{k}={v}" for k, v in sorted(self.failed.items())))
    if self.malformed:
      out.append("  malformed: " + ", ".join(f"{k}={v}" for k, v in sorted(self.malformed.items())))
    for path, line, reason in self.examples:
      out.append(f"    {path}:{line}: {reason}")
    notable = {
      k: v
      for k, v in self.features.items()
      if k not in (features_lib.STAT_RECORDS, features_lib.STAT_STEPS) and v
    }
    if notable:
      out.append("  features: " + ", ".join(f"{k}={v}" for k, v in sorted(notable.items())))
    return "\n".join(out)


@dataclasses.dataclass
class TaskFile:
  """The labelled records of one measure-record file (only valid measurements).

  ``costs`` (float64, seconds) are the mean measured costs, ``scores = min_cost / costs``
  (float64), ``program_keys`` (uint64) hash the canonical step list
  (``features.canonical_steps_json``), ``line_numbers`` are 1-based. ``workload_key``,
  ``target`` and ``platform`` are None when the file has no well-formed record. ``layout``
  is the featurizer's one-hot width the features were made with (11 = original TLP).
  """

  path: str
  workload_key: str | None
  target: str | None
  hardware: str
  platform: str | None
  features: np.ndarray
  costs: np.ndarray
  scores: np.ndarray
  min_cost: float
  program_keys: np.ndarray
  line_numbers: np.ndarray
  stats: ReadStats
  layout: int

  def __len__(self) -> int:
    return int(self.costs.shape[0])


def hardware_of_target(target: str) -> str | None:
  """The ``-model=`` value of a TVM target string (TenSet's hardware name), or None."""
  m = _MODEL_RE.search(target)
  return m.group(1) if m else None


class _Malformed(Exception):
  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _check_record(rec: Any) -> tuple[str, str, list, list | None, int]:
  """Shape/type checks of a parsed line; returns (key, target, steps, costs, error_code)."""
  if not isinstance(rec, dict):
    raise _Malformed(NOT_AN_OBJECT)
  if rec.get("v") != RECORD_VERSION:
    raise _Malformed(WRONG_VERSION)
  inp = rec.get("i")
  if not (
    isinstance(inp, list)
    and len(inp) >= 2
    and isinstance(inp[0], list)
    and len(inp[0]) >= 2
    and isinstance(inp[0][0], str)
    and isinstance(inp[0][1], str)
    and isinstance(inp[1], list)
    and len(inp[1]) >= 2
  ):
    raise _Malformed(BAD_INPUT)
  steps = inp[1][1]
  if not (
    isinstance(steps, list)
    and all(isinstance(st, list) and st and isinstance(st[0], str) for st in steps)
  ):
    raise _Malformed(BAD_STEPS)
  costs, error_code = _check_result(rec.get("r"))
  return inp[0][0], inp[0][1], steps, costs, error_code


def _parse_line(line: bytes) -> tuple[str, str, list, list | None, int]:
  """Full parse (stdlib json) of one line: the reference semantics of every reader here.

  Returns (workload key, target, steps, costs, error code); raises ``_Malformed``.
  """
  text = line.strip(b" \t\r\n")
  if not text:
    raise _Malformed(BLANK_LINE)
  try:
    rec = json.loads(text.decode("utf-8"))
  except UnicodeDecodeError:
    raise _Malformed(NOT_UTF8) from None
  except (ValueError, RecursionError):
    raise _Malformed(INVALID_JSON) from None
  return _check_record(rec)


def _check_result(res: Any) -> tuple[list | None, int]:
  """Shape/type checks of a record's "r"; returns (costs, error_code)."""
  if not (isinstance(res, list) and len(res) >= 2 and type(res[1]) is int):
    raise _Malformed(BAD_RESULT)
  costs = res[0]
  if costs is not None and not (
    isinstance(costs, list) and all(type(c) is float or type(c) is int for c in costs)
  ):
    raise _Malformed(BAD_RESULT)
  return costs, res[1]


def _failure(costs: list | None, error_code: int) -> tuple[str | None, list[float]]:
  """(reason, float costs): reason None means a valid measurement."""
  if error_code != 0:
    return ERROR_CODE, []
  if not costs:
    return NO_COSTS, []
  values = []
  for c in costs:
    try:
      values.append(float(c))
    except OverflowError:  # an int beyond float64
      values.append(math.inf)
  if not all(math.isfinite(v) for v in values):
    return NONFINITE_COST, []
  if not all(v > 0.0 for v in values):
    return NONPOSITIVE_COST, []
  if not all(MIN_COST <= v <= MAX_COST for v in values):
    return COST_OUT_OF_RANGE, []
  return None, values


def count_malformed(stats: ReadStats, path: str, lineno: int, reason: str) -> None:
  """Counts a skipped line in ``stats`` (with the first ``MAX_EXAMPLES`` as examples)."""
  stats.malformed[reason] += 1
  if len(stats.examples) < MAX_EXAMPLES:
    stats.examples.append((path, lineno, reason))


def mean_costs(costs: Sequence[Sequence[float]]) -> np.ndarray:
  """TLP's cost label of each record: ``np.mean`` of its measured costs (float64 seconds).

  Bit-identical to the original's per-record ``np.mean``.

  Rows of equal length are reduced together; a contiguous last-axis sum uses the same
  pairwise summation as the 1-D sum, and padding would change its grouping, so no padding.
  """
  if not costs:
    return np.zeros(0, dtype=np.float64)
  if len(set(map(len, costs))) == 1:  # one repeat count per task: the usual case
    values = np.array(costs, dtype=np.float64)
    # What np.mean does (sum, then true division by the count), without its overhead.
    return np.add.reduce(values, axis=1) / values.shape[1]
  out = np.empty(len(costs), dtype=np.float64)
  by_len: dict[int, list[int]] = collections.defaultdict(list)
  for i, c in enumerate(costs):
    by_len[len(c)].append(i)
  for idx in by_len.values():
    out[idx] = np.array([costs[i] for i in idx], dtype=np.float64).mean(axis=1)
  return out


class _FileReader:
  """One pass over the lines of one file (see :func:`read_task_file`)."""

  def __init__(self, path: str, hardware: str | None, featurizer, fast: bool):
    self.path = path
    self.hardware_arg = hardware
    self.featurizer = featurizer
    self.fast = fast
    self.stats = ReadStats(files=1)
    self.fstats: collections.Counter = collections.Counter()
    self.key: str | None = None
    self.target: str | None = None
    self.platform: str | None = None
    self.unknown_platform = False
    self.other_hardware: str | None = None
    self.start_layout = None if featurizer is None else featurizer.layout
    self.head: bytes | None = None
    self.feature_parts: list[bytes] = []
    self.digests: list[bytes] = []
    self.costs: list[list[float]] = []
    self.line_numbers: list[int] = []

  def _skip(self, lineno: int, reason: str) -> None:
    count_malformed(self.stats, self.path, lineno, reason)

  def _first_record(self, line: bytes, rec: dict, key: str, target: str) -> None:
    self.key, self.target = key, target
    model = hardware_of_target(target)
    if self.hardware_arg is not None and model is not None and model != self.hardware_arg:
      # Measured on another machine: labelling it as this hardware would be silently wrong.
      self.other_hardware = model
      logging.warning(
        "%s: target %r names hardware %s, not %s; its records are skipped as %s",
        self.path,
        target,
        model,
        self.hardware_arg,
        OTHER_HARDWARE,
      )
      return
    try:
      self.platform = features_lib.platform_of_target(target)
    except ValueError:
      self.platform = None
    if self.featurizer is None:
      if self.platform is None:
        self.unknown_platform = True
        logging.warning(
          "%s: unknown platform of target %r and no featurizer given; "
          "its records are counted as %s",
          self.path,
          target,
          UNKNOWN_TARGET,
        )
      else:
        self.featurizer = features_lib.Featurizer(self.platform)
        self.start_layout = self.featurizer.layout
    elif self.platform is not None and self.platform != self.featurizer.platform:
      logging.warning(
        "%s: target %r is %s but the featurizer is %s",
        self.path,
        target,
        self.platform,
        self.featurizer.platform,
      )
    if self.platform is None and self.featurizer is not None:
      self.platform = self.featurizer.platform
    if self.fast and self.featurizer is not None and not self.unknown_platform:
      self.head = self._fast_head(line, rec)

  @staticmethod
  def _fast_head(line: bytes, rec: dict) -> bytes | None:
    """Text of the first record up to its steps, if re-parsing it proves the split."""
    line = line.strip(b" \t\r\n")
    at = line.find(_STEPS_MARKER)
    if at < 0:
      return None
    head = line[: at + len(_STEPS_MARKER)]
    try:
      probe = _loads_fast(head + _PROBE_TAIL)  # only a check: any strict parser will do
      ok = (
        isinstance(probe, dict)
        and probe.get("i") == [rec["i"][0], [[], []]]
        and probe.get("r") == [[1.0], 0, 0, 0]
        and probe.get("v") == RECORD_VERSION
      )
    except (ValueError, RecursionError):
      ok = False
    return head if ok else None

  def _keep(self, lineno: int, features: bytes, canonical: bytes, costs: list[float]) -> None:
    self.feature_parts.append(features)
    self.digests.append(hashlib.blake2b(canonical, digest_size=8).digest())
    self.costs.append(costs)
    self.line_numbers.append(lineno)

  def _establish(self, line: bytes) -> None:
    """Takes the file's workload key, target (and fast-path head) from ``line`` if it is
    a well-formed record; counts nothing (the line is then read normally)."""
    text = line.strip(b" \t\r\n")
    try:
      # orjson first (fast): a record it finds well-formed, json does too, with the same
      # strings; it can only reject more (out-of-range ints become floats), so json
      # decides whenever orjson's answer is no.
      rec = _loads_fast(text)
      key, target, *_ = _check_record(rec)
    except (ValueError, RecursionError, _Malformed):
      try:
        rec = json.loads(text.decode("utf-8"))
        key, target, *_ = _check_record(rec)
      except (ValueError, RecursionError, _Malformed):
        return
    self._first_record(line, rec, key, target)

  def _slow_line(self, lineno: int, line: bytes) -> None:
    """Full parse (stdlib json) of one line: the reference semantics."""
    try:
      key, target, steps, costs, error_code = _parse_line(line)
    except _Malformed as e:
      return self._skip(lineno, e.reason)
    # run() took the file's key and target from the first well-formed line (_establish).
    if key != self.key:
      return self._skip(lineno, WORKLOAD_MISMATCH)
    elif target != self.target:
      return self._skip(lineno, TARGET_MISMATCH)
    if self.other_hardware is not None:
      return self._skip(lineno, OTHER_HARDWARE)
    if self.unknown_platform:
      return self._skip(lineno, UNKNOWN_TARGET)
    reason, values = _failure(costs, error_code)
    if reason is not None:
      self.stats.failed[reason] += 1
      return None
    if self.fast:
      features = self.featurizer.featurize_to_bytes(steps, self.fstats, cached=True)
    else:
      features = self.featurizer.featurize_to_bytes(steps, self.fstats, cached=False)
    self._keep(lineno, features, features_lib.canonical_steps_json(steps), values)
    return None

  def _fast_failure(self, res: Any, steps_text: bytes) -> bool:
    """Counts a failed measurement read on the fast path; False: take the full parse."""
    try:
      costs, error_code = _check_result(res)
    except _Malformed:
      return False  # orjson and json may disagree on out-of-range ints: let json decide
    reason, _ = _failure(costs, error_code)
    if reason is None or not self.featurizer.step_texts_valid(steps_text):
      return False
    self.stats.failed[reason] += 1
    return True

  def run(self, lines: Sequence[bytes]) -> None:
    """Reads all lines, fast path first where possible."""
    head = None
    hlen = 0
    sep, tail, tlen, seplen = _RESULT_SEP, _TAIL, len(_TAIL), len(_RESULT_SEP)
    loads = _loads_fast
    blake2b = hashlib.blake2b
    fstats = self.fstats
    parts, digests, costs, numbers = (
      self.feature_parts,
      self.digests,
      self.costs,
      self.line_numbers,
    )
    fast_lines = 0
    min_cost, max_cost = MIN_COST, MAX_COST
    for lineno, line in enumerate(lines, 1):
      if head is None and self.key is None:
        self._establish(line)
        if self.head is not None:
          head, hlen = self.head, len(self.head)
          texts = self.featurizer.featurize_step_texts
      if head is not None and line.startswith(head) and line.endswith(tail):
        k = line.find(sep, hlen)
        if k >= 0:
          try:
            res = loads(line[k + seplen : -tlen])
          except ValueError:
            res = None
          # orjson never yields inf/nan, and min() raises TypeError unless all costs
          # are numbers, so this is a valid measurement (bools, which compare like
          # ints, exact 1.0 costs and costs out of float32's range go to the full parse).
          try:
            ok = (
              type(res) is list
              and len(res) >= 2
              and type(res[1]) is int
              and res[1] == 0
              and type(res[0]) is list
              and res[0]
              and min(res[0]) >= min_cost
              and max(res[0]) <= max_cost
              and True not in res[0]
            )
          except TypeError:
            ok = False
          if ok:
            out = texts(line[hlen:k], fstats)
            if out is not None:
              parts.append(out[0])
              digests.append(blake2b(out[1], digest_size=8).digest())
              costs.append(res[0])
              numbers.append(lineno)
              fast_lines += 1
              continue
          elif res is not None and self._fast_failure(res, line[hlen:k]):
            fast_lines += 1
            continue
      self._slow_line(lineno, line)
    self.stats.lines = len(lines)
    self.stats.kept = len(self.costs)
    self.stats.fast_path_lines = fast_lines


def read_task_file(
  path: str | os.PathLike,
  hardware: str | None = None,
  featurizer: features_lib.Featurizer | None = None,
  *,
  fast: bool = True,
) -> TaskFile:
  """Reads, labels and featurizes one TenSet measure-record file.

  Args:
    path: a ``measure_records/<hardware>/(...).json`` file.
    hardware: the hardware the file is read as. When given, a file whose target names another
      one (``-model=``) is not labelled: its records are counted as ``other_hardware``
      (TenSet names each folder after its targets' ``-model=``). Also the name used when the
      target has no ``-model=``; default: the file's folder name (and no such check).
    featurizer: shared featurizer (and vocabulary); default: a new one for the target's
      platform with the original tables.
    fast: use the text fast path (same output; False = full parse of every line).

  Returns:
    A :class:`TaskFile` with the records that have a valid measurement.
  """
  path = os.fspath(path)
  lines = read_lines(path)
  reader = _FileReader(path, hardware, featurizer, fast)
  reader.run(lines)
  if reader.featurizer is not None and reader.featurizer.layout != reader.start_layout:
    # A new step kind widened the one-hot block while reading: features made before it
    # have the old layout, so read the file again (the vocabulary is now settled for it).
    logging.info("%s: feature layout changed while reading; reading it again", path)
    first = reader.fstats
    reader = _FileReader(path, hardware, reader.featurizer, fast)
    for key in (
      features_lib.STAT_NEW_KINDS,
      features_lib.STAT_NEW_TOKENS,
      features_lib.STAT_LAYOUT_CHANGES,
    ):
      if first[key]:
        reader.fstats[key] += first[key]
    reader.run(lines)
  return _task_file(reader, path, hardware)


def _task_file(reader: _FileReader, path: str, hardware: str | None) -> TaskFile:
  fz = reader.featurizer
  crop = fz.crop if fz is not None else (0, 0)
  n = len(reader.costs)
  features = np.frombuffer(b"".join(reader.feature_parts), dtype=np.float32)
  features = (
    features.reshape((n,) + tuple(crop)).copy() if n else np.zeros((0,) + tuple(crop), np.float32)
  )
  costs = mean_costs(reader.costs)
  min_cost = float(costs.min()) if n else math.nan
  scores = min_cost / costs
  keys = np.frombuffer(b"".join(reader.digests), dtype="<u8").astype(np.uint64)
  hw = hardware_of_target(reader.target) if reader.target is not None else None
  if hw is None:
    hw = hardware if hardware is not None else os.path.basename(os.path.dirname(path))
  reader.stats.features = reader.fstats
  if fz is not None:
    fz.stats.update(reader.fstats)
  return TaskFile(
    path=path,
    workload_key=reader.key,
    target=reader.target,
    hardware=hw,
    platform=reader.platform,
    features=features,
    costs=costs,
    scores=scores,
    min_cost=min_cost,
    program_keys=keys,
    line_numbers=np.asarray(reader.line_numbers, dtype=np.int64),
    stats=reader.stats,
    layout=fz.layout if fz is not None else 0,
  )


# ---------------------------------------------------------------------------------------------
# Lower-level access for readers that need the records themselves (raw lines, step lists):
# the XGBoost baseline, the loop-nest features, the demo. Same checks and labels as above.


def read_lines(path: str | os.PathLike) -> list[bytes]:
  """The lines of a record file as every reader here numbers them (1-based = index + 1)."""
  with open(path, "rb") as f:
    data = f.read()
  if b"\r\n" in data:
    # CRLF files: the "\r" can only be whitespace after a record (a raw "\r" inside a JSON
    # string is invalid anyway), and dropping it keeps such lines on the fast path.
    data = data.replace(b"\r\n", b"\n")
  lines = data.split(b"\n")
  if lines and not lines[-1]:
    lines.pop()  # the newline ending the last line
  return lines


def lines_at(path: str | os.PathLike, line_numbers: Sequence[int]) -> list[bytes]:
  """The given 1-based lines of a record file (e.g. :attr:`TaskFile.line_numbers`).

  Raises:
    IndexError: a line number beyond the end of the file.
  """
  lines = read_lines(path)
  out = []
  for n in line_numbers:
    if not 1 <= int(n) <= len(lines):
      raise IndexError(
        f"{os.fspath(path)}: line {int(n)} beyond the end of the file ({len(lines)} lines)"
      )
    out.append(lines[int(n) - 1])
  return out


@dataclasses.dataclass(frozen=True)
class Record:
  """One well-formed record of a file.

  ``failure`` is None for a valid measurement (then ``costs`` are its float costs, whose
  :func:`mean_costs` is the label), else the reason in :data:`FAILED_REASONS` (``costs``
  empty). ``line`` is the raw line, ``line_number`` 1-based.
  """

  line_number: int
  line: bytes
  workload_key: str
  target: str
  steps: list
  costs: list
  failure: str | None

  @property
  def program_key(self) -> int:
    """``features.program_key`` of the record's canonical step list (the dataset's join key)."""
    return features_lib.program_key(features_lib.canonical_steps_json(self.steps))


def iter_records(path: str | os.PathLike, stats: ReadStats | None = None) -> Iterator[Record]:
  """Every well-formed record of one file, valid or failed, in line order.

  The checks are :func:`read_task_file`'s (full parse): malformed lines, and records of
  another workload or target than the file's first well-formed record, are skipped and
  counted in ``stats``, as are the kept and failed records. Unlike :func:`read_task_file`,
  nothing is featurized, so a target of unknown platform is no reason to skip.
  """
  path = os.fspath(path)
  lines = read_lines(path)
  if stats is None:
    stats = ReadStats()
  stats.files += 1
  stats.lines += len(lines)
  key = target = None
  for lineno, line in enumerate(lines, 1):
    try:
      rec_key, rec_target, steps, costs, error_code = _parse_line(line)
    except _Malformed as e:
      count_malformed(stats, path, lineno, e.reason)
      continue
    if key is None:
      key, target = rec_key, rec_target
    if rec_key != key:
      count_malformed(stats, path, lineno, WORKLOAD_MISMATCH)
      continue
    if rec_target != target:
      count_malformed(stats, path, lineno, TARGET_MISMATCH)
      continue
    reason, values = _failure(costs, error_code)
    if reason is None:
      stats.kept += 1
    else:
      stats.failed[reason] += 1
    yield Record(lineno, line, rec_key, rec_target, steps, values, reason)


def first_record(path: str | os.PathLike) -> Record | None:
  """The first well-formed record of a file (it names the file's task and target), or None.

  Reads only up to that record, so it is cheap on large files.
  """
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      try:
        key, target, steps, costs, error_code = _parse_line(line)
      except _Malformed:
        continue
      reason, values = _failure(costs, error_code)
      return Record(lineno, line.rstrip(b"\r\n"), key, target, steps, values, reason)
  return None
