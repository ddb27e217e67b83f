"""TLP primitive features: one vector per schedule primitive (step) of an Ansor program.

This follows the original TLP extractor (``scripts/tlp_make_dataset.py``) exactly for every
record it can handle, and extends it where the original would assert:

* A step ``st`` becomes ``one_hot(st[0])`` followed by its fields: ints (bools are ints)
  are appended, lists are flattened, strings become token ids (the auto-unroll pragma value,
  the cache-write scope, the cache-read scope). The vector is zero-padded to the platform's
  full width (llvm 40, cuda 49) and cropped to the crop width; the sequence is padded with
  zero vectors to the full length (llvm 54, cuda 69) and cropped to the crop length.
* The step kinds and string tokens live in a versioned :class:`Vocabulary` whose first
  entries are the original TLP tables. A growing vocabulary appends entries the original
  tables lack (a new unroll value gets the next id after the table's maximum); a ``frozen``
  one (an exported model) maps them to 0 and counts them.
* The one-hot block is ``max(11, number of kinds)`` wide. With the 11 original kinds (the
  original tables were built from TenSet; every kind in tenset-mini's llvm records is in them)
  every vector is bit-identical to the original. **Consequence**: a 12th kind widens the
  one-hot block, which shifts every later column of *every* step by one (and pushes one more
  argument column out of the crop), so features are only consistent when all of them were
  made with the same number of kinds, and a model only accepts features of the layout it was
  trained on. :attr:`Featurizer.layout` tells the current layout; the featurizer drops its
  cached rows and logs a warning when it changes; the record reader re-reads a file during
  which it changed; a frozen vocabulary (prediction time) never changes it.
* Never a crash on content: float fields are appended (and counted), unsupported values
  (None, dicts) become 0 and are counted, over-wide steps and over-long sequences are cropped
  and counted. Counters are plain ``collections.Counter`` objects with the ``STAT_*`` keys.

This module imports only NumPy and the standard library, so the predictor can featurize
inside a tuner process.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np

__all__ = [
  "PLATFORMS",
  "FULL_SHAPE",
  "DEFAULT_CROP",
  "ONE_HOT_MIN_WIDTH",
  "ORIGINAL_KINDS",
  "ORIGINAL_UNROLL",
  "CHW_SCOPES",
  "CHR_SCOPES",
  "VOCAB_FORMAT",
  "VOCAB_VERSION",
  "Vocabulary",
  "Featurizer",
  "StepRow",
  "featurize",
  "platform_of_target",
  "canonical_steps_json",
  "program_key",
  "original_tlp_features",
]

PLATFORMS = ("llvm", "cuda")

# (full sequence length, full step width) of the original extractor, per platform.
FULL_SHAPE: Mapping[str, tuple[int, int]] = {"llvm": (54, 40), "cuda": (69, 49)}
# (crop sequence length, crop step width): the original's defaults.
DEFAULT_CROP: Mapping[str, tuple[int, int]] = {"llvm": (25, 22), "cuda": (40, 20)}
ONE_HOT_MIN_WIDTH = 11

# Kind order of the original ``tlp_make_dataset_str_to_idx_<platform>.pkl`` tables
# (index i in the tuple = one-hot position i = the original's 1-based id i + 1).
ORIGINAL_KINDS: Mapping[str, tuple[str, ...]] = {
  "llvm": ("CI", "RE", "AN", "RF", "CHW", "SP", "CR", "CA", "FU", "FSP", "PR"),
  "cuda": ("AN", "CHR", "CHW", "CI", "CA", "FFSP", "SP", "FU", "RE", "PR", "FSP"),
}
ORIGINAL_UNROLL: Mapping[str, Mapping[int, int]] = {
  "llvm": {16: 1, 0: 2, 512: 3, 64: 4},
  "cuda": {0: 1, 16: 2, 64: 3, 1024: 4, 512: 5},
}
CHW_SCOPES: Mapping[str, int] = {"local": 1, "shared": 2, "global": 3}
CHR_SCOPES: Mapping[str, int] = {"shared": 1}

UNROLL_PREFIX = "auto_unroll_max_step"
UNROLL_NAMESPACE = "unroll"

VOCAB_FORMAT = "tlp_jax.vocabulary"
VOCAB_VERSION = 1

# Counter keys. "Event" keys are counted each time a step shows them; the others once.
STAT_RECORDS = "records"
STAT_STEPS = "steps"
STAT_STEPS_OVER_WIDTH = "steps_over_full_width"
STAT_RECORDS_OVER_LENGTH = "records_over_full_length"
STAT_FLOAT_VALUES = "float_values"
STAT_IRREGULAR_LIST_ITEMS = "irregular_list_items"
STAT_UNSUPPORTED_VALUES = "unsupported_values"
STAT_OUT_OF_RANGE_VALUES = "out_of_range_values"
STAT_BAD_STEPS = "bad_steps"
STAT_UNKNOWN_KINDS = "unknown_kinds"
STAT_UNKNOWN_TOKENS = "unknown_tokens"
STAT_NEW_KINDS = "new_kinds"
STAT_NEW_TOKENS = "new_tokens"
STAT_LAYOUT_CHANGES = "layout_changes"

_F32_MAX = float(np.finfo(np.float32).max)


def _finite_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise ValueError(f"non-finite number {text}")
  return value


def _reject_constant(name: str) -> Any:
  raise ValueError(f"non-finite constant {name}")


def json_loads_strict(data: bytes) -> Any:
  """``orjson.loads`` without orjson, with its guarantees: strict UTF-8 (``json.loads`` of
  bytes would accept surrogates) and never a NaN or an infinity."""
  return json.loads(
    data.decode("utf-8"), parse_float=_finite_float, parse_constant=_reject_constant
  )


try:  # orjson is a project dependency; json keeps the readers working without it.
  import orjson

  json_loads = orjson.loads
except ImportError:  # pragma: no cover - exercised only without orjson
  json_loads = json_loads_strict

# A step text (after its leading '["') in TVM's exact layout with only ints of at most 18
# digits (no "-0"), int lists and strings of [A-Za-z0-9_$.]: see featurize_step_texts.
_INT = rb"(?:0|-?[1-9][0-9]{0,17})"
_SIMPLE_STEP = re.compile(
  rb'[A-Za-z_]+"(?:, (?:%s|\[(?:%s(?:, %s)*)?\]|"[A-Za-z0-9_$.]*"))*' % (_INT, _INT, _INT)
)


def _check_platform(platform: str) -> str:
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; expected one of {PLATFORMS}")
  return platform


def platform_of_target(target: str) -> str:
  """Returns the TLP platform ("llvm" or "cuda") of a TVM target string.

  The target kind is the first word (``"llvm -keys=cpu -mcpu=znver4"`` -> ``"llvm"``);
  ``llvm`` and ``c`` are CPU targets, ``cuda`` and ``nvptx`` GPU targets. TVM's JSON form
  (``{"kind": "cuda", ...}``) is accepted too. Raises ValueError for any other kind.
  """
  if not isinstance(target, str):
    raise ValueError(f"target must be a string, got {type(target).__name__}")
  text = target.strip()
  kind = ""
  if text.startswith("{"):
    try:
      kind = str(json.loads(text).get("kind", ""))
    except (ValueError, AttributeError):
      kind = ""
  elif text:
    kind = text.split()[0]
  if kind in ("llvm", "c"):
    return "llvm"
  if kind in ("cuda", "nvptx"):
    return "cuda"
  raise ValueError(f"cannot tell the TLP platform of target {target!r} (kind {kind!r})")


def token_namespace(kind: str, text: str) -> str:
  """Which token table a string field of a step of ``kind`` is looked up in.

  The original looks up the auto-unroll pragma of PR steps, the scope of CHW steps and the
  scope of CHR steps; every other string (which the original asserts on) gets a table
  named after its step kind.
  """
  if kind == "PR" and UNROLL_PREFIX in text:
    return UNROLL_NAMESPACE
  return kind


class Vocabulary:
  """Step kinds and string tokens: the original TLP tables first, new entries appended.

  Ids are 1-based (0 means "unknown", used only by frozen vocabularies). A kind's one-hot
  position is ``id - 1``. Serialised with :meth:`to_json` next to datasets and exported
  models, so the exact table a model was trained with travels with it.
  """

  def __init__(
    self,
    platform: str,
    kinds: Sequence[str],
    tokens: Mapping[str, Mapping[str, int]],
    frozen: bool = False,
  ):
    self.platform = _check_platform(platform)
    self.kinds: list[str] = list(kinds)
    self._kind_ids = {k: i + 1 for i, k in enumerate(self.kinds)}
    if len(self._kind_ids) != len(self.kinds):
      raise ValueError(f"duplicate step kinds in vocabulary: {self.kinds}")
    self.tokens: dict[str, dict[str, int]] = {ns: dict(t) for ns, t in tokens.items()}
    for ns, table in self.tokens.items():
      ids = list(table.values())
      if any(type(i) is not int or i < 1 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"token table {ns!r} must map to distinct positive ints: {table}")
    self.frozen = bool(frozen)
    self._logged_unknown: set[tuple[str, str]] = set()

  @classmethod
  def original(cls, platform: str) -> Vocabulary:
    """The original TLP tables of ``platform`` (growing, not frozen)."""
    _check_platform(platform)
    unroll = {f"{UNROLL_PREFIX}${v}": i for v, i in ORIGINAL_UNROLL[platform].items()}
    return cls(
      platform,
      ORIGINAL_KINDS[platform],
      {UNROLL_NAMESPACE: unroll, "CHW": dict(CHW_SCOPES), "CHR": dict(CHR_SCOPES)},
    )

  @property
  def one_hot_width(self) -> int:
    """Width of the one-hot kind block: ``max(11, number of kinds)``."""
    return max(ONE_HOT_MIN_WIDTH, len(self.kinds))

  def copy(self, frozen: bool | None = None) -> Vocabulary:
    """An independent copy, optionally with a different ``frozen`` flag."""
    return Vocabulary(
      self.platform, self.kinds, self.tokens, self.frozen if frozen is None else frozen
    )

  def freeze(self) -> Vocabulary:
    """A frozen copy: it never grows; unknown entries map to 0 and are counted."""
    return self.copy(frozen=True)

  def kind_id(self, kind: str, stats: MutableMapping[str, int]) -> int:
    """Id of a step kind; appends it when new (or returns 0 when frozen)."""
    kid = self._kind_ids.get(kind)
    if kid is not None:
      return kid
    if self.frozen:
      stats[STAT_UNKNOWN_KINDS] += 1
      self._log_unknown("kind", kind)
      return 0
    self.kinds.append(kind)
    kid = self._kind_ids[kind] = len(self.kinds)
    stats[STAT_NEW_KINDS] += 1
    logging.info("vocabulary (%s): new step kind %r -> id %d", self.platform, kind, kid)
    return kid

  def token_id(self, namespace: str, text: str, stats: MutableMapping[str, int]) -> int:
    """Id of a string token in a table; appends it when new (or returns 0 when frozen)."""
    table = self.tokens.get(namespace)
    tid = None if table is None else table.get(text)
    if tid is not None:
      return tid
    if self.frozen:
      stats[STAT_UNKNOWN_TOKENS] += 1
      self._log_unknown(namespace, text)
      return 0
    if table is None:
      table = self.tokens[namespace] = {}
    # "Next integer after the table's max" keeps the original ids and gives new ones a
    # deterministic value (the order of first appearance).
    tid = table[text] = max(table.values(), default=0) + 1
    stats[STAT_NEW_TOKENS] += 1
    logging.info(
      "vocabulary (%s): new token %r in table %r -> id %d", self.platform, text, namespace, tid
    )
    return tid

  def _log_unknown(self, what: str, text: str) -> None:
    if (what, text) not in self._logged_unknown:
      self._logged_unknown.add((what, text))
      logging.warning(
        "frozen vocabulary (%s): unknown %s %r mapped to 0 (counted; logged once)",
        self.platform,
        what,
        text,
      )

  def to_dict(self) -> dict[str, Any]:
    """Plain-data form (what :meth:`to_json` writes)."""
    return {
      "format": VOCAB_FORMAT,
      "version": VOCAB_VERSION,
      "platform": self.platform,
      "frozen": self.frozen,
      "one_hot_width": self.one_hot_width,
      "kinds": list(self.kinds),
      "tokens": {ns: dict(t) for ns, t in sorted(self.tokens.items())},
    }

  def to_json(self) -> str:
    """Versioned JSON text (deterministic: sorted tables, kinds in id order)."""
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], frozen: bool | None = None) -> Vocabulary:
    """Inverse of :meth:`to_dict`; ``frozen`` overrides the stored flag."""
    if not isinstance(data, Mapping) or data.get("format") != VOCAB_FORMAT:
      raise ValueError(f"not a {VOCAB_FORMAT} document")
    if data.get("version") != VOCAB_VERSION:
      raise ValueError(
        f"unsupported vocabulary version {data.get('version')!r} "
        f"(this code reads version {VOCAB_VERSION})"
      )
    kinds, tokens = data.get("kinds"), data.get("tokens")
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
      raise ValueError("vocabulary 'kinds' must be a list of strings")
    if not isinstance(tokens, Mapping) or not all(
      isinstance(t, Mapping) and all(isinstance(k, str) for k in t) for t in tokens.values()
    ):
      raise ValueError("vocabulary 'tokens' must map table names to {string: id}")
    vocab = cls(
      data.get("platform"),
      kinds,
      tokens,
      bool(data.get("frozen", False)) if frozen is None else frozen,
    )
    width = data.get("one_hot_width")
    if width is not None and width != vocab.one_hot_width:
      raise ValueError(f"vocabulary one_hot_width {width} does not match its {len(kinds)} kinds")
    return vocab

  @classmethod
  def from_json(cls, text: str | bytes, frozen: bool | None = None) -> Vocabulary:
    """Inverse of :meth:`to_json`; ``frozen`` overrides the stored flag."""
    try:
      data = json.loads(text)
    except ValueError as e:
      raise ValueError(f"vocabulary JSON does not parse: {e}") from e
    return cls.from_dict(data, frozen=frozen)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Vocabulary):
      return NotImplemented
    return self.to_dict() == other.to_dict()

  def __repr__(self) -> str:
    return (
      f"Vocabulary({self.platform!r}, kinds={len(self.kinds)}, "
      f"tokens={ {ns: len(t) for ns, t in self.tokens.items()} }, "
      f"frozen={self.frozen})"
    )


_CANONICAL_ENCODER = json.JSONEncoder(ensure_ascii=False)


def canonical_steps_json(steps: Sequence[Any]) -> bytes:
  """Canonical text of a step list: ``json.dumps(steps, ensure_ascii=False)``, UTF-8.

  Independent of how the input was formatted, so the same program read from two files
  (two hardware) gives the same bytes. The stdlib's default separators (``", "``) are also
  what TVM writes, which lets the record reader use TVM's text as is for plain steps.
  """
  return _CANONICAL_ENCODER.encode(steps).encode("utf-8", "surrogatepass")


def program_key(canonical: bytes) -> int:
  """Stable 64-bit key of a program: BLAKE2b-64 of its canonical JSON, little-endian."""
  return int.from_bytes(hashlib.blake2b(canonical, digest_size=8).digest(), "little")


@dataclasses.dataclass
class StepRow:
  """One step's feature row (what :meth:`Featurizer.step_row` returns)."""

  row: bytes  # float32, crop width
  canonical: bytes  # canonical JSON of the step
  events: bool  # counted something per occurrence: must not be served from cache


class Featurizer:
  """Reusable TLP featurizer for one platform, crop and vocabulary.

  ``featurize`` is the per-step reference path; ``featurize_many`` and
  ``featurize_step_texts`` serve step rows from a cache (steps repeat a lot across
  records) and give the same bytes. Counters accumulate in ``stats`` unless a ``stats``
  Counter is passed. ``cache_size`` bounds the cached step rows (about 250 bytes each); a
  full cache is emptied, which changes speed only, never output.
  """

  def __init__(
    self,
    platform: str = "llvm",
    crop: tuple[int, int] | None = None,
    vocab: Vocabulary | None = None,
    cache_size: int = 1 << 18,
  ):
    self.platform = _check_platform(platform)
    self.full_length, self.full_width = FULL_SHAPE[platform]
    crop = DEFAULT_CROP[platform] if crop is None else tuple(crop)
    if len(crop) != 2 or not all(isinstance(c, (int, np.integer)) and c > 0 for c in crop):
      raise ValueError(f"crop must be two positive ints (length, width), got {crop!r}")
    self.crop: tuple[int, int] = (int(crop[0]), int(crop[1]))
    self._vocab = Vocabulary.original(platform) if vocab is None else vocab
    if self._vocab.platform != platform:
      raise ValueError(f"vocabulary is for {self._vocab.platform!r}, featurizer for {platform!r}")
    self.stats: collections.Counter = collections.Counter()
    self.cache_size = int(cache_size)
    # Rows kept in the cache were made under this one-hot width; a new kind invalidates them.
    self._layout = self._vocab.one_hot_width
    self._kinds = self._vocab.kinds  # grows in place: a cheap check that the layout held
    self._num_kinds = len(self._kinds)
    self._value_width = min(self.full_width, self.crop[1])
    self._row_bytes = 4 * self.crop[1]
    self._zero_record = bytes(self._row_bytes * self.crop[0])
    self._zero_values = [0] * self.crop[1]
    self._max_rows = min(self.full_length, self.crop[0])
    # Step text -> row for steps in TVM's simple layout, (row, canonical) for the others.
    self._text_rows: dict[bytes, bytes] = {}
    self._text_other: dict[bytes, tuple[bytes, bytes]] = {}
    self._key_rows: dict[bytes, bytes] = {}
    self._get_text_row = self._text_rows.__getitem__  # the caches are only ever cleared
    self._scratch: collections.Counter = collections.Counter()

  @property
  def vocab(self) -> Vocabulary:
    """The vocabulary (may be shared with other featurizers; fixed for this one)."""
    return self._vocab

  @property
  def shape(self) -> tuple[int, int]:
    """(length, width) of one featurized record."""
    return self.crop

  @property
  def layout(self) -> int:
    """One-hot width of the features this featurizer produces now (11 = original)."""
    return self._vocab.one_hot_width

  # ---- reference per-step path ---------------------------------------------------------

  def _append(
    self, vec: list, kind: str, value: Any, stats: MutableMapping[str, int], in_list: bool
  ) -> bool:
    """Appends one field's values to ``vec``; True if a per-occurrence event was counted."""
    if isinstance(value, (int, np.integer, np.bool_)):  # bools are ints, as in the original
      vec.append(int(value))
      return False
    if isinstance(value, str):
      ns = token_namespace(kind, value)
      tid = self._vocab.token_id(ns, value, stats)
      vec.append(tid)
      if in_list:
        stats[STAT_IRREGULAR_LIST_ITEMS] += 1
      return tid == 0 or in_list
    if isinstance(value, (list, tuple)):
      events = False
      if in_list:
        stats[STAT_IRREGULAR_LIST_ITEMS] += 1
        events = True
      for item in value:
        if type(item) is int:
          vec.append(item)
        else:
          events |= self._append(vec, kind, item, stats, True)
      return events
    if isinstance(value, (float, np.floating)):
      stats[STAT_FLOAT_VALUES] += 1
      vec.append(float(value))
      return True
    stats[STAT_UNSUPPORTED_VALUES] += 1
    vec.append(0)
    return True

  def _row_values(
    self, vec: list, stats: MutableMapping[str, int], ints_only: bool
  ) -> tuple[bytes, bool]:
    events = False
    if len(vec) > self.full_width:
      stats[STAT_STEPS_OVER_WIDTH] += 1
      events = True
    values = vec[: self._value_width]
    if ints_only and -_F32_MAX <= min(values) and max(values) <= _F32_MAX:
      # Plain ints: array('f') rounds each value exactly like NumPy's float32 cast.
      values.extend(self._zero_values[len(values) :])
      return array.array("f", values).tobytes(), events
    try:
      arr = np.array(values, dtype=np.float64)
    except OverflowError:  # ints beyond float64
      arr = np.array([_to_float(v) for v in values], dtype=np.float64)
    in_range = np.abs(arr) <= _F32_MAX  # False for NaN too
    if not in_range.all():
      stats[STAT_OUT_OF_RANGE_VALUES] += int((~in_range).sum())
      arr = np.where(np.isnan(arr), 0.0, np.clip(arr, -_F32_MAX, _F32_MAX))
      events = True
    row = np.zeros(self.crop[1], dtype=np.float32)
    row[: len(values)] = arr
    return row.tobytes(), events

  def step_row(self, step: Any, stats: MutableMapping[str, int] | None = None) -> StepRow:
    """Feature row (float32 bytes, crop width) of one step, computed from scratch."""
    stats = self.stats if stats is None else stats
    row, events = self._step_row(step, stats)
    return StepRow(row, _canonical_or_repr(step), events)

  def _step_row(self, step: Any, stats: MutableMapping[str, int]) -> tuple[bytes, bool]:
    if not isinstance(step, (list, tuple)) or not step or not isinstance(step[0], str):
      stats[STAT_BAD_STEPS] += 1
      return bytes(self._row_bytes), True
    kind = step[0]
    kid = self._vocab.kind_id(kind, stats)
    events = kid == 0
    num_kinds = len(self._kinds)  # the one-hot width, max(11, kinds), inlined: hot path
    vec: list = [0] * (num_kinds if num_kinds > ONE_HOT_MIN_WIDTH else ONE_HOT_MIN_WIDTH)
    if kid:
      vec[kid - 1] = 1
    append = vec.append
    for value in itertools.islice(step, 1, None):
      if type(value) is int:
        append(value)
      elif type(value) is list and all(type(v) is int for v in value):
        vec.extend(value)
      else:
        # Strings become int token ids; everything that is not an int counts an event.
        events |= self._append(vec, kind, value, stats, False)
    row, row_events = self._row_values(vec, stats, not events)
    return row, events or row_events

  def _simple_step_row(self, step: list, stats: MutableMapping[str, int]) -> tuple[bytes, bool]:
    """:meth:`_step_row` for a step in TVM's simple layout (see ``_SIMPLE_STEP``): only
    ints below 2**63, int lists and ASCII strings, so no type dispatch or range check."""
    vocab = self._vocab
    kind = step[0]
    kid = vocab.kind_id(kind, stats)
    events = kid == 0
    num_kinds = len(self._kinds)
    vec: list = [0] * (num_kinds if num_kinds > ONE_HOT_MIN_WIDTH else ONE_HOT_MIN_WIDTH)
    if kid:
      vec[kid - 1] = 1
    for value in itertools.islice(step, 1, None):
      t = type(value)
      if t is int:
        vec.append(value)
      elif t is list:
        vec.extend(value)
      else:
        tid = vocab.token_id(token_namespace(kind, value), value, stats)
        vec.append(tid)
        events |= tid == 0
    if len(vec) > self.full_width:
      stats[STAT_STEPS_OVER_WIDTH] += 1
      events = True
    values = vec[: self._value_width]
    values.extend(self._zero_values[len(values) :])
    return array.array("f", values).tobytes(), events

  def _assemble(
    self, rows: Iterable[bytes], n_steps: int, stats: MutableMapping[str, int]
  ) -> bytes:
    stats[STAT_RECORDS] += 1
    stats[STAT_STEPS] += n_steps
    if n_steps > self.full_length:
      stats[STAT_RECORDS_OVER_LENGTH] += 1
    body = b"".join(itertools.islice(rows, self._max_rows))
    return body + self._zero_record[len(body) :]

  def featurize(
    self, steps: Sequence[Any], stats: MutableMapping[str, int] | None = None
  ) -> np.ndarray:
    """Features ``(crop_length, crop_width)`` float32 of one step list (reference path)."""
    if not isinstance(steps, (list, tuple)):
      raise TypeError(f"steps must be a list of steps, got {type(steps).__name__}")
    stats = self.stats if stats is None else stats
    while True:
      layout = self._vocab.one_hot_width
      scratch: collections.Counter = collections.Counter()
      rows = [self.step_row(st, scratch).row for st in steps]
      if self._vocab.one_hot_width == layout:
        break
      # A new kind widened the one-hot block mid-record: the earlier rows are stale.
      # Only the vocabulary additions of the first attempt are kept.
      self._note_layout_change(stats, scratch)
    stats.update(scratch)
    data = self._assemble(iter(rows), len(steps), stats)
    self._check_layout(stats)
    return np.frombuffer(data, dtype=np.float32).reshape(self.crop).copy()

  # ---- cached paths --------------------------------------------------------------------

  def _note_layout_change(
    self, stats: MutableMapping[str, int], scratch: collections.Counter
  ) -> None:
    for key in (STAT_NEW_KINDS, STAT_NEW_TOKENS):
      if scratch[key]:
        stats[key] += scratch[key]

  def _check_layout(self, stats: MutableMapping[str, int]) -> bool:
    """Drops cached rows when the one-hot width changed; True if it did."""
    self._num_kinds = len(self._kinds)
    width = self._vocab.one_hot_width
    if width == self._layout:
      return False
    logging.warning(
      "one-hot width grew from %d to %d (vocabulary now has %d kinds): "
      "features made before with this featurizer have a different layout",
      self._layout,
      width,
      len(self._vocab.kinds),
    )
    stats[STAT_LAYOUT_CHANGES] += 1
    self._layout = width
    self.clear_cache()
    return True

  def clear_cache(self) -> None:
    """Forgets all cached step rows."""
    self._text_rows.clear()
    self._text_other.clear()
    self._key_rows.clear()

  def _make_room(self) -> None:
    # Emptying the whole cache when full keeps memory bounded on all of TenSet and the
    # output independent of the policy (cached rows equal recomputed ones).
    if len(self._text_rows) + len(self._text_other) + len(self._key_rows) >= self.cache_size:
      self.clear_cache()

  def featurize_many(
    self, list_of_steps: Sequence[Sequence[Any]], stats: MutableMapping[str, int] | None = None
  ) -> np.ndarray:
    """Features ``(N, crop_length, crop_width)`` float32; same values as :meth:`featurize`."""
    stats = self.stats if stats is None else stats
    self._check_layout(stats)  # the vocabulary may be shared and have grown elsewhere
    while True:
      layout = self._vocab.one_hot_width
      scratch: collections.Counter = collections.Counter()
      parts = [self._record_bytes(steps, scratch) for steps in list_of_steps]
      if self._vocab.one_hot_width == layout:
        break
      self._check_layout(stats)
      self._note_layout_change(stats, scratch)
    stats.update(scratch)
    out = np.frombuffer(b"".join(parts), dtype=np.float32)
    return out.reshape((len(parts),) + self.crop).copy()

  def featurize_many_texts(
    self, steps_texts: Sequence[bytes], stats: MutableMapping[str, int] | None = None
  ) -> np.ndarray:
    """Features ``(N, crop_length, crop_width)`` float32 of step lists given as TVM's record
    text (each as :meth:`featurize_step_texts` takes it: the list without its outer brackets);
    the same values and counts as :meth:`featurize_many` of the parsed lists, served from the
    text row cache where a text is in TVM's layout and parsed (stdlib json) where not.

    Raises:
      ValueError: a text that is not a JSON list of steps.
    """
    stats = self.stats if stats is None else stats
    self._check_layout(stats)  # the vocabulary may be shared and have grown elsewhere
    while True:
      layout = self._vocab.one_hot_width
      scratch: collections.Counter = collections.Counter()
      parts = []
      for text in steps_texts:
        out = self.featurize_step_texts(text, scratch)
        if out is not None:
          parts.append(out[0])
          continue
        try:  # strict UTF-8, as the text path decodes
          steps = json.loads((b"[" + text + b"]").decode("utf-8"))
        except (ValueError, RecursionError) as e:
          raise ValueError(f"not a list of steps: {text[:80]!r}...: {e}") from None
        parts.append(self._record_bytes(steps, scratch))
      if self._vocab.one_hot_width == layout:
        break
      # One layout change per redone batch, as featurize_many counts: the text path notices
      # each new kind itself (counted in scratch, which is dropped), the parsed one does not.
      if not self._check_layout(stats) and scratch[STAT_LAYOUT_CHANGES]:
        stats[STAT_LAYOUT_CHANGES] += 1
      self._note_layout_change(stats, scratch)
    stats.update(scratch)
    out = np.frombuffer(b"".join(parts), dtype=np.float32)
    return out.reshape((len(parts),) + self.crop).copy()

  def featurize_to_bytes(
    self, steps: Sequence[Any], stats: MutableMapping[str, int] | None = None, cached: bool = True
  ) -> bytes:
    """One record's features as raw float32 bytes (C order, ``crop`` shape).

    No retry when a new kind widens the one-hot block mid-record: callers that batch
    records compare :attr:`layout` before and after and redo the batch if it changed.
    ``cached=False`` is the reference path (every step computed from scratch).
    """
    stats = self.stats if stats is None else stats
    if cached:
      self._check_layout(stats)  # the vocabulary may be shared and have grown elsewhere
      data = self._record_bytes(steps, stats)
    else:
      if not isinstance(steps, (list, tuple)):
        raise TypeError(f"steps must be a list of steps, got {type(steps).__name__}")
      rows = [self.step_row(st, stats).row for st in steps]
      data = self._assemble(iter(rows), len(steps), stats)
    self._check_layout(stats)
    return data

  def _record_bytes(self, steps: Sequence[Any], stats: MutableMapping[str, int]) -> bytes:
    if not isinstance(steps, (list, tuple)):
      raise TypeError(f"steps must be a list of steps, got {type(steps).__name__}")
    cache = self._key_rows
    rows = []
    for st in steps:
      try:
        # JSON keeps ints, bools and floats apart (1, true, 1.0), so it is an exact key.
        key = canonical_steps_json(st)
      except (TypeError, ValueError):
        key = None
      row = cache.get(key) if key is not None else None
      if row is None:
        r = self.step_row(st, stats)
        row = r.row
        if key is not None and not r.events:
          self._make_room()
          cache[key] = row
      rows.append(row)
    return self._assemble(iter(rows), len(steps), stats)

  def featurize_step_texts(
    self, steps_text: bytes, stats: MutableMapping[str, int]
  ) -> tuple[bytes, bytes] | None:
    """Fast path for TVM's record text: features and canonical JSON of one program.

    ``steps_text`` is the text of a step list without its outer brackets, as TVM writes
    it: ``b'["FU", 1, [5, 6]], ["AN", 3, 3, 2]'`` (``b""`` for no steps). Returns
    ``(features bytes, canonical steps JSON)``, or None when the text is not such a list
    of well-formed steps (then the caller parses the whole line): it is split on
    ``'], ["'`` and every piece must parse as exactly one step, which also proves the split
    (a split inside a step leaves pieces with unbalanced brackets). Rows are cached by text.
    """
    if not steps_text:
      pieces = []
    elif steps_text[:2] == b'["' and steps_text[-1:] == b"]":
      pieces = steps_text[2:-1].split(b'], ["')
    else:
      return None
    if len(self._kinds) != self._num_kinds:  # a shared vocabulary grew elsewhere
      self._check_layout(stats)
    simple = self._text_rows
    m = self._max_rows
    try:
      if len(pieces) <= m:
        body = b"".join(map(self._get_text_row, pieces))
      else:
        body = b"".join(map(simple.__getitem__, pieces[:m]))
        if not all(map(simple.__contains__, pieces[m:])):
          raise KeyError
    except KeyError:
      if not self._fill_text_cache(pieces, stats):
        return None
      if not all(map(simple.__contains__, pieces)):
        # Some steps are not in TVM's simple layout or count events on every use.
        return self._step_texts_slow(pieces, stats)
      body = b"".join(map(simple.__getitem__, pieces[:m]))
    stats[STAT_RECORDS] += 1
    stats[STAT_STEPS] += len(pieces)
    if len(pieces) > self.full_length:
      stats[STAT_RECORDS_OVER_LENGTH] += 1
    # Every piece is in TVM's simple layout (see _SIMPLE_STEP), which is the canonical
    # JSON already.
    return body + self._zero_record[len(body) :], b"[" + steps_text + b"]"

  def step_texts_valid(self, steps_text: bytes) -> bool:
    """Whether ``steps_text`` (as for :meth:`featurize_step_texts`) is a list of
    well-formed steps; checks without featurizing (so the vocabulary never grows)."""
    if not steps_text:
      return True
    if steps_text[:2] != b'["' or steps_text[-1:] != b"]":
      return False
    for piece in steps_text[2:-1].split(b'], ["'):
      if (
        piece in self._text_rows
        or piece in self._text_other
        or _SIMPLE_STEP.fullmatch(piece) is not None
      ):  # the pattern is valid JSON
        continue
      try:
        json.loads((b'["' + piece + b"]").decode("utf-8"))
      except (ValueError, RecursionError):
        return False
    return True

  def _fill_text_cache(self, pieces: list[bytes], stats: MutableMapping[str, int]) -> bool:
    """Parses and caches the rows of the pieces not cached yet; False if one does not parse.

    All pieces are parsed before any row is computed, so a record that turns out malformed
    never adds to the vocabulary (the full parse would not featurize it either). Only the
    vocabulary additions are counted here: pieces with per-use events are not cached and
    get counted when their record is assembled.
    """
    simple, other = self._text_rows, self._text_other
    while True:
      todo = []
      for piece in pieces:
        if piece in simple or piece in other:
          continue
        text = b'["' + piece + b"]"
        if _SIMPLE_STEP.fullmatch(piece) is not None:
          # ASCII ints (< 2**63), int lists and plain strings, ", "-separated: the
          # text is the canonical JSON, and orjson parses it to the same objects as
          # json.
          try:
            todo.append((piece, json_loads(text), None))
          except ValueError:  # pragma: no cover - the pattern admits valid JSON only
            return False
        else:
          try:
            # Strict UTF-8 first: json.loads(bytes) would let encoded surrogates
            # through, which the whole-line path rejects.
            step = json.loads(text.decode("utf-8"))
          except (ValueError, RecursionError):
            return False
          todo.append((piece, step, canonical_steps_json(step)))
      num_kinds = len(self._kinds)
      scratch = self._scratch
      scratch.clear()
      for piece, step, canonical in todo:
        if canonical is None:
          row, events = self._simple_step_row(step, scratch)
        else:
          row, events = self._step_row(step, scratch)
        if not events:
          self._make_room()
          if canonical is None:
            simple[piece] = row
          else:
            other[piece] = (row, canonical)
      if scratch:
        self._note_layout_change(stats, scratch)
      # No new kind: the layout held. A new kind that widened the one-hot block emptied
      # the cache (_check_layout): fill it again in the new layout.
      if len(self._kinds) == num_kinds or not self._check_layout(stats):
        return True

  def _step_texts_slow(
    self, pieces: list[bytes], stats: MutableMapping[str, int]
  ) -> tuple[bytes, bytes]:
    """Assembles a record with uncached pieces (steps that count events on every use).

    Called after :meth:`_fill_text_cache`: every piece parses and every kind is in the
    vocabulary already, so the layout cannot change here.
    """
    simple, other = self._text_rows, self._text_other
    rows = []
    canons = []
    for piece in pieces:
      row = simple.get(piece)
      if row is not None:
        rows.append(row)
        canons.append(b'["' + piece + b"]")
        continue
      hit = other.get(piece)
      if hit is not None:
        rows.append(hit[0])
        canons.append(hit[1])
        continue
      text = b'["' + piece + b"]"
      if _SIMPLE_STEP.fullmatch(piece) is not None:
        rows.append(self._simple_step_row(json_loads(text), stats)[0])
        canons.append(text)
        continue
      step = json.loads(text.decode("utf-8"))
      canonical = canonical_steps_json(step)
      rows.append(self._step_row(step, stats)[0])
      canons.append(canonical)
    body = self._assemble(iter(rows), len(pieces), stats)
    return body, b"[" + b", ".join(canons) + b"]"


def _to_float(value: Any) -> float:
  try:
    return float(value)
  except OverflowError:
    return math.inf if value > 0 else -math.inf


def _canonical_or_repr(value: Any) -> bytes:
  try:
    return canonical_steps_json(value)
  except (TypeError, ValueError):
    return repr(value).encode("utf-8", "backslashreplace")


def featurize(
  steps: Sequence[Any],
  platform: str = "llvm",
  crop: tuple[int, int] | None = None,
  vocab: Vocabulary | None = None,
  stats: MutableMapping[str, int] | None = None,
) -> np.ndarray:
  """TLP features of one program's step list: float32 ``crop`` (default llvm (25, 22),
  cuda (40, 20)).

  ``vocab`` defaults to a fresh copy of the original tables (so nothing global grows);
  pass a shared :class:`Vocabulary` to keep additions, or a frozen one to forbid them.
  Counters are added to ``stats`` when given.
  """
  featurizer = Featurizer(platform, crop=crop, vocab=vocab)
  out = featurizer.featurize(steps)
  if stats is not None:
    for key, value in featurizer.stats.items():
      stats[key] = stats.get(key, 0) + value
  return out


def original_tlp_features(
  steps: Sequence[Any], platform: str = "llvm", crop: tuple[int, int] | None = None
) -> list[list[int]]:
  """A faithful re-implementation of the original per-step loop, kept as the reference.

  Same tables, same order of operations, same failures: raises ValueError where the
  original asserts (or raises KeyError on an unknown kind or unroll value). Returns the
  nested Python lists the original stores. Used by the tests and the throughput benchmark.
  """
  full_len, full_width = FULL_SHAPE[_check_platform(platform)]
  crop_len, crop_width = DEFAULT_CROP[platform] if crop is None else crop
  kind_index = {k: i for i, k in enumerate(ORIGINAL_KINDS[platform])}
  unroll = {f"{UNROLL_PREFIX}${v}": i for v, i in ORIGINAL_UNROLL[platform].items()}
  step_vecs = []
  for st in steps:
    vec = [0] * 11
    vec[kind_index[st[0]]] = 1
    for it in st[1:]:
      if isinstance(it, int):
        vec.append(it)
      elif isinstance(it, list):
        for ii in it:
          if not isinstance(ii, int):
            raise ValueError(f"non-int list element {ii!r} in step {st!r}")
          vec.append(ii)
      elif isinstance(it, str):
        if st[0] == "PR" and UNROLL_PREFIX in it:
          vec.append(unroll[it])
        elif st[0] == "CHW":
          vec.append(CHW_SCOPES[it])
        elif st[0] == "CHR" and it == "shared":
          vec.append(1)
        else:
          raise ValueError(f"unexpected string {it!r} in step {st!r}")
      else:
        raise ValueError(f"unexpected field {it!r} in step {st!r}")
    if len(vec) > full_width:
      raise ValueError(f"step wider than {full_width}: {st!r}")
    vec.extend([0] * (full_width - len(vec)))
    step_vecs.append(vec[:crop_width])
  if len(step_vecs) > full_len:
    raise ValueError(f"more than {full_len} steps")
  step_vecs.extend([0] * crop_width for _ in range(full_len - len(step_vecs)))
  return step_vecs[:crop_len]
