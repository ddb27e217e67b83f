"""Pure-NumPy TLP predictor over an exported ``.npz`` model (see ``tlp_jax.train.export``).

Imports only NumPy and the standard library, so it runs inside a tuner process without JAX. The
file can be copied on its own next to the ``.npz``; only ``predict_steps`` (which featurizes raw
schedule steps) needs ``tlp_jax.core.features`` (and, for a model of loop tokens, the replay:
``tlp_jax.core.skeleton`` / ``replay`` / ``replay_cache`` / ``loop_tokens``), and says so when
they are missing.

    predictor = Predictor.load("model.npz")
    scores = predictor.predict(features)               # (B,) from the first head
    scores = predictor.predict(features, hw="all")     # (B, H)
    scores = predictor.predict_steps(list_of_steps, hw="epyc-9004")
    # A model of loop tokens (format 5): steps of a task whose skeleton the export embeds,
    scores = predictor.predict_steps(list_of_steps, workload_key=key)
    # or precomputed (N, L, E) step features and (N, T, W) loop tokens.
    scores = predictor.predict(steps, loop_tokens=tokens)

Computation (exact, up to float rounding order). The model has no positional encoding, so
its output depends only on the *multiset* of step rows of a program:

* all padding (all-zero) rows of a program are identical at every layer, so each program
  keeps one of them, counted with its multiplicity: ``log(count)`` is added to that key's
  attention logit and the decoder sum weights it by ``count`` (~25% of rows on TenSet);
* everything before the attention mixing (input norm, encoder, q/k/v projection) is per row,
  and steps repeat heavily across programs (about 1 distinct row in 5 in a batch of TenSet
  programs), so those layers run once per distinct row of the batch;
* programs are grouped by their number of real steps so attention runs as batched matmuls per
  group; the layers after it run as one matmul over the packed rows of the whole batch.

Errors are ``PredictorError`` (a ``ValueError``) with the file and the reason.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

try:  # Optional: only predict_steps featurizes; the rest works with this file alone.
  from tlp_jax.core import features as _features
  from tlp_jax.core import loop_tokens as _loop_tokens
  from tlp_jax.core import replay_cache as _replay_cache
  from tlp_jax.core import skeleton as _skeleton
except ImportError:  # pragma: no cover - exercised by copying the file out of the package
  _features = _loop_tokens = _replay_cache = _skeleton = None

# ---- export format (single source of truth; tlp_jax.train.export writes it) ----------------
FORMAT_NAME = "tlp-jax-model"
# Versions: 1 = a TLP model; 2 = a model of the TVM store feature version (removed: refused, see
# STORE_FORMAT_VERSION); 3 = an ensemble (parameters under params/members/ with a leading member
# axis; scores are the members' mean); 4 = today's model config keys (``num_hardware_heads``; the
# options removed after commit 4fe3f70 are gone, see ``upgrade_model_config``); 5 = models of
# replayed loop tokens (meta/loop_tokens_version, meta/loop_tokens_max, meta/loop_tokens_width and
# the tasks' skeletons, meta/skeletons_json). Versions 1-3 exported the lowest version that could
# describe the model; every export is now the current version, which older predictors refuse by
# version. This predictor reads all five except the store models.
FORMAT_VERSION = 5
# The TVM per-store feature version (its own meta keys, any format version from 2 on) lost to
# the replayed loop tokens on validation and was removed; its models are refused with the
# commits that still serve them.
STORE_FORMAT_VERSION = 2
STORE_MODEL_COMMITS = "4fe3f70 (format_version <= 3) or 5c84946 (any format_version)"
ENSEMBLE_FORMAT_VERSION = 3
LOOP_TOKENS_FORMAT_VERSION = 5
MEMBERS_PREFIX = "members/"
PARAMS_PREFIX = "params/"
META_FORMAT = "meta/format"
META_FORMAT_VERSION = "meta/format_version"
META_MODEL_CONFIG = "meta/model_config"
META_HARDWARE = "meta/hardware"
META_PLATFORM = "meta/platform"
META_CROP = "meta/crop"
META_VOCAB_JSON = "meta/vocab_json"
META_VOCAB_VERSION = "meta/vocab_version"
META_STEP = "meta/step"
# Replayed loop tokens (format 5): the model input is (L + T, E + W), the (L, E) step features
# and the (T, W) tokens of layout version meta/loop_tokens_version in disjoint columns
# (tlp_jax.core.loop_tokens.model_input); meta/skeletons_json is the skeleton collection
# (tlp_jax.core.skeleton, "tlp-jax-loopnest-skeletons") of the training tasks, possibly empty.
META_LOOP_TOKENS_VERSION = "meta/loop_tokens_version"
META_LOOP_TOKENS_MAX = "meta/loop_tokens_max"
META_LOOP_TOKENS_WIDTH = "meta/loop_tokens_width"
META_SKELETONS_JSON = "meta/skeletons_json"
REQUIRED_META = (
  META_FORMAT,
  META_FORMAT_VERSION,
  META_MODEL_CONFIG,
  META_HARDWARE,
  META_PLATFORM,
  META_CROP,
  META_VOCAB_JSON,
  META_VOCAB_VERSION,
  META_STEP,
)
# Every meta key this predictor understands; any other describes an input it cannot build.
KNOWN_META = frozenset(
  REQUIRED_META
  + (META_LOOP_TOKENS_VERSION, META_LOOP_TOKENS_MAX, META_LOOP_TOKENS_WIDTH, META_SKELETONS_JSON)
)

ALL_HEADS = "all"
# Programs per internal chunk: ~10k packed rows, whose activations stay in the L3 cache.
DEFAULT_BATCH_SIZE = 512


class PredictorError(ValueError):
  """Bad model file or bad predictor input."""


# ---- model config keys of earlier format versions ------------------------------------------------

# Keys renamed by format version 4: old name -> today's.
_RENAMED_MODEL_KEYS = {"num_heads": "num_hardware_heads"}
# Model options removed after commit 4fe3f70 (docs/ACCURACY.md, "Removed options"), each with the
# value that behaves as today's model. An old config that set another value describes a model
# this code cannot compute.
_REMOVED_MODEL_OPTIONS = {"padding_mask": False, "pool": "sum", "input_norm_columns": None}


def upgrade_model_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Today's model config fields of a stored model config of any format version.

  Renames the keys of format versions 1-3 and drops their removed options when they hold the
  value that remains; raises ``ValueError`` naming an option set to a removed value.
  """
  out = {}
  for key, value in cfg.items():
    if key in _REMOVED_MODEL_OPTIONS:
      if value != _REMOVED_MODEL_OPTIONS[key]:
        raise ValueError(
          f"model option {key}={value!r} was removed (last in commit 4fe3f70, "
          "docs/ACCURACY.md); this version computes only "
          f"{key}={_REMOVED_MODEL_OPTIONS[key]!r}"
        )
      continue
    out[_RENAMED_MODEL_KEYS.get(key, key)] = value
  return out


# ---- model input of the "loop" feature version -----------------------------------------------


def input_shape(step_crop: Sequence[int], loop_shape: Sequence[int]) -> tuple[int, int]:
  """``(L + T, E + W)``: the model input of ``(L, E)`` step features and ``T`` replayed loop
  tokens of width ``W`` (``loop_tokens.model_input``; ``(0, 0)`` = TLP features only)."""
  return (int(step_crop[0]) + int(loop_shape[0]), int(step_crop[1]) + int(loop_shape[1]))


def step_crop_of(crop: Sequence[int], loop_shape: Sequence[int]) -> tuple[int, int]:
  """The step-feature crop ``(L, E)`` of a model input ``crop`` (inverse of ``input_shape``)."""
  return (int(crop[0]) - int(loop_shape[0]), int(crop[1]) - int(loop_shape[1]))


# ---- NumPy mirror of tlp_jax.train.model.INPUT_NORMS ------------------------------------------


def _signed_log1p(x: np.ndarray) -> np.ndarray:
  return np.sign(x) * np.log1p(np.abs(x))


INPUT_NORMS: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {
  "none": None,
  "log1p": _signed_log1p,
}


def _as_str(a: np.ndarray) -> str:
  return str(np.asarray(a).reshape(()).item())


class Predictor:
  """TLP cost model evaluated with NumPy from an exported parameter dict."""

  def __init__(self, arrays: Mapping[str, np.ndarray], source: str = "<memory>"):
    """Builds a predictor from export arrays (``tlp_jax.train.export.export_params``'s output)."""
    self.source = source
    missing = [k for k in (META_FORMAT, META_FORMAT_VERSION) if k not in arrays]
    if missing or _as_str(arrays[META_FORMAT]) != FORMAT_NAME:
      raise PredictorError(
        f"{source}: not a tlp-jax model export (no {META_FORMAT} = {FORMAT_NAME!r})"
      )
    version = int(np.asarray(arrays[META_FORMAT_VERSION]).reshape(()))
    if version > FORMAT_VERSION:
      raise PredictorError(
        f"{source}: format_version {version} is newer than this predictor "
        f"supports ({FORMAT_VERSION}); update tlp_jax"
      )
    unknown = sorted(k for k in arrays if k.startswith("meta/") and k not in KNOWN_META)
    if version == STORE_FORMAT_VERSION or unknown:
      raise PredictorError(
        f"{source}: a model of the TVM store feature version (format_version {version}, meta "
        f"keys {unknown}), which was removed from tlp_jax (docs/ACCURACY.md); serve it with "
        f"tlp_jax at commit {STORE_MODEL_COMMITS}, or retrain on loop tokens"
      )
    missing = [k for k in REQUIRED_META if k not in arrays]
    if missing:
      raise PredictorError(f"{source}: export lacks {missing}")
    self.format_version = version
    try:
      cfg = json.loads(_as_str(arrays[META_MODEL_CONFIG]))
    except json.JSONDecodeError as e:
      raise PredictorError(f"{source}: {META_MODEL_CONFIG} is not JSON: {e}") from None
    self.config: dict[str, Any] = cfg
    self.hardware: tuple[str, ...] = tuple(str(h) for h in np.asarray(arrays[META_HARDWARE]))
    self.platform: str = _as_str(arrays[META_PLATFORM])
    self.crop: tuple[int, int] = tuple(int(c) for c in np.asarray(arrays[META_CROP]))
    self.vocab_json: str = _as_str(arrays[META_VOCAB_JSON])
    self.vocab_version: str = _as_str(arrays[META_VOCAB_VERSION])
    self.step: int = int(np.asarray(arrays[META_STEP]).reshape(()))
    # Replayed loop tokens (0 = none): (max_tokens, token_width) of layout loop_tokens_version.
    self.loop_tokens_version: int = int(
      np.asarray(arrays.get(META_LOOP_TOKENS_VERSION, 0)).reshape(())
    )
    self.max_tokens: int = int(np.asarray(arrays.get(META_LOOP_TOKENS_MAX, 0)).reshape(()))
    self.token_width: int = int(np.asarray(arrays.get(META_LOOP_TOKENS_WIDTH, 0)).reshape(()))
    if self.loop_tokens_version or self.max_tokens:
      if (
        version < LOOP_TOKENS_FORMAT_VERSION
        or not 0 < self.max_tokens < self.crop[0]
        or not 0 < self.token_width < self.crop[1]
      ):
        raise PredictorError(
          f"{source}: loop tokens ({self.max_tokens} of {self.token_width}, layout "
          f"{self.loop_tokens_version}) do not fit in the crop {self.crop} or need "
          f"format_version >= {LOOP_TOKENS_FORMAT_VERSION} (got {version})"
        )
      if _loop_tokens is not None and (
        self.loop_tokens_version != _loop_tokens.LAYOUT_VERSION
        or self.token_width != _loop_tokens.WIDTH
      ):
        raise PredictorError(
          f"{source}: loop tokens of layout version {self.loop_tokens_version} "
          f"({self.token_width} columns); this code makes version "
          f"{_loop_tokens.LAYOUT_VERSION} ({_loop_tokens.WIDTH} columns)"
        )
    self.skeletons_json: str | None = (
      _as_str(arrays[META_SKELETONS_JSON]) if META_SKELETONS_JSON in arrays else None
    )
    self.skeletons: dict[str, Any] = self._parse_skeletons()
    self._template_caches: dict[str, tuple[Any, Any]] = {}
    self._featurizer = None
    self._load_weights(arrays, cfg)

  # ---- construction ---------------------------------------------------------------------------

  @classmethod
  def load(cls, path: str | os.PathLike) -> Predictor:
    """Loads an exported ``.npz`` (never unpickles)."""
    path = os.fspath(path)
    try:
      with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
      raise
    # Not a zip, a truncated or corrupt one, a damaged member, object arrays.
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      raise PredictorError(f"{path}: not a readable .npz model export ({e})") from None
    return cls(arrays, source=path)

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Predictor:
    """Builds a predictor from an in-memory export dict."""
    return cls(arrays)

  def _parse_skeletons(self) -> dict[str, Any]:
    """``{workload key: Skeleton}`` of the embedded collection ({} without one), validated here
    so a bad file fails at load, not in the middle of tuning."""
    if not self.skeletons_json:
      return {}
    if _skeleton is None:  # pragma: no cover - copied out of the package
      return {}
    where = f"{self.source}: {META_SKELETONS_JSON}"
    try:
      doc = json.loads(self.skeletons_json)
    except json.JSONDecodeError as e:
      raise PredictorError(f"{where} is not JSON: {e}") from None
    if (
      not isinstance(doc, dict)
      or doc.get("format") != _skeleton.COLLECTION_FORMAT
      or doc.get("version") != _skeleton.VERSION
      or not isinstance(doc.get("skeletons"), dict)
    ):
      raise PredictorError(
        f"{where}: not a {_skeleton.COLLECTION_FORMAT!r} document of version {_skeleton.VERSION}"
      )
    try:
      return {
        k: _skeleton.Skeleton.from_dict(v, f"{where}[{k!r}]") for k, v in doc["skeletons"].items()
      }
    except _skeleton.SkeletonError as e:
      raise PredictorError(str(e)) from None

  def _param(self, arrays, name, shape):
    """Parameter ``name`` of every member: ``(members, *shape)``."""
    prefix = PARAMS_PREFIX + (MEMBERS_PREFIX if self.ensemble_size > 1 else "")
    key = prefix + name
    if key not in arrays:
      raise PredictorError(f"{self.source}: missing parameter {key}")
    a = np.asarray(arrays[key], dtype=np.float32)
    if self.ensemble_size == 1:
      a = a[None]
    want = (self.ensemble_size,) + tuple(shape)
    if a.shape != want:
      raise PredictorError(
        f"{self.source}: parameter {key} has shape {a.shape}, the model "
        f"config implies {want if self.ensemble_size > 1 else tuple(shape)}"
      )
    return a

  def _load_weights(self, arrays, cfg):
    try:
      cfg = upgrade_model_config(cfg)
      self.feature_dim = int(cfg["feature_dim"])
      self.seq_len = int(cfg["seq_len"])
      enc_dims = [int(d) for d in cfg["encoder_dims"]]
      dec_dims = [int(d) for d in cfg["decoder_dims"]]
      self.attention_heads = int(cfg["attention_heads"])
      res_blocks = int(cfg["res_blocks"])
      num_heads = int(cfg["num_hardware_heads"])
      norm = cfg["input_norm"]
      self.ensemble_size = int(cfg.get("ensemble_size", 1))
    except (KeyError, TypeError, ValueError) as e:
      raise PredictorError(f"{self.source}: bad {META_MODEL_CONFIG}: {e}") from None
    if norm not in INPUT_NORMS:
      raise PredictorError(
        f"{self.source}: input_norm {norm!r} unknown to this predictor "
        f"(known: {sorted(INPUT_NORMS)})"
      )
    if self.ensemble_size < 1 or (
      self.ensemble_size > 1 and self.format_version < ENSEMBLE_FORMAT_VERSION
    ):
      raise PredictorError(
        f"{self.source}: ensemble_size {self.ensemble_size} needs "
        f"format_version >= {ENSEMBLE_FORMAT_VERSION} "
        f"(got {self.format_version})"
      )
    if len(self.hardware) != num_heads:
      raise PredictorError(
        f"{self.source}: {num_heads} heads but {len(self.hardware)} hardware "
        f"names {list(self.hardware)}"
      )
    self._norm = INPUT_NORMS[norm]

    self.hidden_dim = enc_dims[-1]
    self._members = [
      _MemberWeights.build(
        self._param,
        arrays,
        m,
        self.feature_dim,
        enc_dims,
        dec_dims,
        res_blocks,
        num_heads,
        self.attention_heads,
      )
      for m in range(self.ensemble_size)
    ]

  # ---- public API ------------------------------------------------------------------------------

  @property
  def num_heads(self) -> int:
    return len(self.hardware)

  def head_index(self, hw: str | None) -> int:
    """Index of hardware head ``hw`` (None = the first head)."""
    if hw is None:
      return 0
    try:
      return self.hardware.index(hw)
    except ValueError:
      raise PredictorError(
        f"unknown hardware head {hw!r}; this model has: {', '.join(self.hardware)}"
      ) from None

  @property
  def reads_loop_tokens(self) -> bool:
    """Whether the model reads replayed loop tokens (format 5) next to the step features."""
    return self.max_tokens > 0

  def predict(
    self,
    features: np.ndarray,
    hw: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loop_tokens: np.ndarray | None = None,
  ) -> np.ndarray:
    """Scores of programs (higher = faster), as the Flax model computes them.

    Args:
      features: ``(B, L, E)`` TLP features; L/E larger than the model's are cropped as the
        model does. For a model of loop tokens, the step features only (``step_crop``).
      hw: None = first head -> ``(B,)``; a hardware name -> that head ``(B,)``;
        ``"all"`` -> ``(B, H)``.
      batch_size: programs per internal chunk (bounds memory).
      loop_tokens: ``(B, T, W)`` loop tokens of the same programs (``T >= max_tokens`` is cropped,
        as the tokens are outermost first); required by, and only by, a model of loop tokens.
        The model input is assembled per chunk (``loop_tokens.model_input``).

    Returns:
      float32 scores.
    """
    heads = np.arange(self.num_heads) if hw == ALL_HEADS else np.array([self.head_index(hw)])
    x = np.asarray(features)
    length, width = self.step_crop if self.reads_loop_tokens else (self.seq_len, self.feature_dim)
    if x.ndim != 3 or x.shape[1] < length or x.shape[2] < width:
      raise PredictorError(
        f"features must be (batch, >={length} steps, >={width} values), got shape {x.shape}"
      )
    x = x[:, :length, :width]
    tokens = self._check_tokens(loop_tokens, x.shape[0])
    out = np.empty((x.shape[0], len(heads)), np.float32)
    for start in range(0, x.shape[0], batch_size):
      chunk = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
      if tokens is not None:
        chunk = _loop_tokens.model_input(chunk, tokens[start : start + batch_size])
      out[start : start + len(chunk)] = self._forward(chunk, heads)
    return out if hw == ALL_HEADS else out[:, 0]

  def _check_tokens(self, loop_tokens: np.ndarray | None, n: int) -> np.ndarray | None:
    """The ``(n, max_tokens, token_width)`` tokens ``predict`` reads, or None (no token model)."""
    if not self.reads_loop_tokens:
      if loop_tokens is not None:
        raise PredictorError("this model reads no loop tokens; got loop_tokens")
      return None
    if loop_tokens is None:
      raise PredictorError(
        f"this model also reads {self.max_tokens} loop tokens of {self.token_width} values per "
        "program: pass loop_tokens (see loop_tokens_of), or use predict_steps"
      )
    if _loop_tokens is None:  # pragma: no cover - copied out of the package
      raise PredictorError(
        "a model of loop tokens needs tlp_jax.core.loop_tokens (install tlp_jax)"
      )
    tokens = np.asarray(loop_tokens)
    if (
      tokens.ndim != 3
      or tokens.shape[0] != n
      or tokens.shape[1] < self.max_tokens
      or tokens.shape[2] != self.token_width
    ):
      raise PredictorError(
        f"loop_tokens must be ({n}, >={self.max_tokens}, {self.token_width}), "
        f"got shape {tokens.shape}"
      )
    return tokens[:, : self.max_tokens]

  @property
  def step_crop(self) -> tuple[int, int]:
    """``(L, E)`` of the TLP step features (``crop`` less the loop-nest tokens, if any)."""
    if self.reads_loop_tokens:
      return step_crop_of(self.crop, (self.max_tokens, self.token_width))
    return self.crop

  def featurize_steps(self, steps_list: Sequence[Sequence[Any]]) -> np.ndarray:
    """``(N, *step_crop)`` float32 TLP step features of raw record step lists, with the
    export's frozen vocabulary (``steps_list``: as in measure records, ``["i"][1][1]``). For a
    model of loop tokens these are the step part of its input; the tokens come from
    :meth:`loop_tokens_of`."""
    return self._get_featurizer().featurize_many(list(steps_list))

  def skeleton_for(self, workload_key: str | None = None, skeleton: Any = None) -> Any:
    """The skeleton that replays programs of a task: ``skeleton`` when given (a
    ``tlp_jax.core.skeleton.Skeleton``, its dict or JSON text), else the embedded one of
    ``workload_key``."""
    if _skeleton is None:
      raise PredictorError(
        "featurizing loop tokens needs tlp_jax.core.skeleton / replay / "
        "replay_cache / loop_tokens (install tlp_jax)"
      )
    if skeleton is not None:
      try:
        if isinstance(skeleton, str):
          return _skeleton.Skeleton.from_json(skeleton)
        if not isinstance(skeleton, _skeleton.Skeleton):
          return _skeleton.Skeleton.from_dict(skeleton)
      except _skeleton.SkeletonError as e:
        raise PredictorError(f"bad skeleton: {e}") from None
      return skeleton
    if workload_key is None:
      raise PredictorError(
        "a model of loop tokens replays each program over its task's "
        "skeleton: pass workload_key= (a task whose skeleton the model "
        "embeds) or skeleton= (tlp_jax.tvm.skeleton_extract, with TVM)"
      )
    found = self.skeletons.get(workload_key)
    if found is None:
      raise PredictorError(
        f"{self.source}: no embedded skeleton for workload key {workload_key!r} (the model "
        f"embeds {len(self.skeletons)}); extract it with TVM "
        "(tlp_jax.tvm.skeleton_extract.skeleton_from_task) and pass skeleton="
      )
    return found

  def loop_tokens_of(
    self, steps_list: Sequence[Sequence[Any]], workload_key: str | None = None, skeleton: Any = None
  ) -> np.ndarray:
    """``(N, max_tokens, token_width)`` float16 loop tokens of one task's programs.

    Each step list is replayed over the task's skeleton (:meth:`skeleton_for`); a per-task
    template cache (``replay_cache``) makes the programs of a recurring template cheap, with
    the same tokens as a full replay.
    """
    if not self.reads_loop_tokens:
      raise PredictorError("this model reads no loop tokens")
    skel = self.skeleton_for(workload_key, skeleton)
    held = self._template_caches.get(skel.workload_key)
    if held is None or (held[0] is not skel and held[0] != skel):
      held = self._template_caches[skel.workload_key] = (skel, _replay_cache.TemplateCache())
    return _replay_cache.featurize_many(held[0], list(steps_list), held[1], self.max_tokens)

  def predict_steps(
    self,
    steps_list: Sequence[Sequence[Any]],
    hw: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workload_key: str | None = None,
    skeleton: Any = None,
  ) -> np.ndarray:
    """Featurizes raw schedule step lists (as in measure records) and predicts them.

    ``workload_key`` / ``skeleton``: the programs' task, for a model of loop tokens (the steps
    are replayed over its skeleton, :meth:`loop_tokens_of`; no TVM needed); all the programs of
    one call belong to that task.
    """
    if len(steps_list) == 0:
      return np.zeros((0, self.num_heads) if hw == ALL_HEADS else (0,), np.float32)
    tokens = None
    if self.reads_loop_tokens:
      tokens = self.loop_tokens_of(steps_list, workload_key, skeleton)
    elif workload_key is not None or skeleton is not None:
      raise PredictorError(
        "this model reads no loop tokens; workload_key / skeleton are for models of loop tokens"
      )
    return self.predict(
      self.featurize_steps(steps_list), hw=hw, batch_size=batch_size, loop_tokens=tokens
    )

  # ---- internals -------------------------------------------------------------------------------

  def _get_featurizer(self):
    if self._featurizer is None:
      if _features is None:
        raise PredictorError(
          "predict_steps needs tlp_jax.core.features (install tlp_jax or put "
          "tlp_jax/core/features.py on the path); predict(features) works without"
        )
      # Frozen: steps unknown to the training vocabulary map to 0 (and are counted in the
      # featurizer's stats) instead of growing the table and shifting the feature layout.
      vocab = _features.Vocabulary.from_json(self.vocab_json, frozen=True)
      self._featurizer = _features.Featurizer(self.platform, crop=self.step_crop, vocab=vocab)
    return self._featurizer

  def _forward(self, x: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """(B, L, E) float32 -> (B, len(heads)); the row dedup is explained in the module doc."""
    unique_rows, inverse, groups = self._pack(x)
    y = None
    for weights in self._members:  # an ensemble scores with the mean of its members
      y_member = self._rows_forward(weights, unique_rows, inverse, groups, heads)
      y = y_member if y is None else y + y_member
    if len(self._members) > 1:
      y /= np.float32(len(self._members))
    out = np.zeros((x.shape[0], len(heads)), np.float32)
    r = 0
    for idx, m, _, weights in groups:
      rows = len(idx) * m
      out[idx] = np.einsum("pmh,m->ph", y[r : r + rows].reshape(len(idx), m, -1), weights)
      r += rows
    return out

  def _pack(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """The rows :meth:`_forward` computes: (distinct rows (U, E), packed row -> distinct row
    (R,), groups of programs with the same number of rows: (program indices, rows per
    program m, key log-counts (m,), sum weights (m,)))."""
    _, seq, width = x.shape
    valid = np.any(x != 0, axis=-1)
    n_valid = valid.sum(axis=1)
    # Real rows first (stable), padding (all-zero) rows after: row n of a program with n real
    # rows is then a padding row.
    order = np.argsort(~valid, axis=1, kind="stable")
    xs = np.take_along_axis(x, order[:, :, None], axis=1)

    groups = []
    packed = []
    for n in np.unique(n_valid):
      n = int(n)
      pads = seq - n
      m = n + int(pads > 0)
      idx = np.nonzero(n_valid == n)[0]
      key_bias = np.zeros((m,), np.float32)
      counts = np.ones((m,), np.float32)
      if pads:
        key_bias[-1] = math.log(pads)
        counts[-1] = pads
      groups.append((idx, m, key_bias, counts))
      packed.append(xs[idx, :m].reshape(-1, width))

    rows_in = np.concatenate(packed, axis=0)
    # Steps repeat heavily across programs (about 1 distinct row in 5 in a batch of TenSet
    # programs), and everything before the attention mixing is per row: run the input norm,
    # encoder and q/k/v projection once per distinct row. Byte-exact rows, so exact.
    void = np.dtype((np.void, rows_in.dtype.itemsize * width))
    _, first, inverse = np.unique(
      np.ascontiguousarray(rows_in).view(void).ravel(), return_index=True, return_inverse=True
    )
    return rows_in[first], inverse.ravel(), groups

  def forward_cost(self, x: np.ndarray, num_heads: int = 1) -> dict[str, float]:
    """What :meth:`predict` computes for the (B, L, E) model input ``x`` (for a model of loop
    tokens: ``loop_tokens.model_input``), counted from the same row dedup and grouping:
    programs, packed rows (real rows + one padding row per program), distinct rows, and the
    multiply-adds of the matmuls (all ensemble members; elementwise work not counted): per
    distinct row the encoder and q/k/v projection, per packed row the attention output
    projection, residual blocks and the decoder of ``num_heads`` heads, per program the
    attention mixing (2 m^2 D for m rows)."""
    x = np.asarray(x, np.float32)
    unique_rows, inverse, groups = self._pack(x)
    w = self._members[0]
    dims = [self.feature_dim] + [k.shape[1] for k, _ in w.encoder]
    d = dims[-1]
    pre = sum(a * b for a, b in zip(dims[:-1], dims[1:])) + d * w.qkv_w.shape[1]
    dec = [d] + [k.shape[-1] for k, _ in w.decoder]
    post = d * d * (1 + len(w.res)) + num_heads * sum(a * b for a, b in zip(dec[:-1], dec[1:]))
    mixing = sum(len(idx) * 2 * m * m * d for idx, m, _, _ in groups)
    members = len(self._members)
    macs = members * (len(unique_rows) * pre + len(inverse) * post + mixing)
    return {
      "programs": float(x.shape[0]),
      "packed_rows": float(len(inverse)),
      "unique_rows": float(len(unique_rows)),
      "macs": float(macs),
      "flops": 2.0 * macs,
    }

  def _rows_forward(
    self,
    w: _MemberWeights,
    unique_rows: np.ndarray,
    inverse: np.ndarray,
    groups: list,
    heads: np.ndarray,
  ) -> np.ndarray:
    """One member's per-row decoder outputs ``(R, len(heads))`` of the packed rows."""
    h_u = self._encode(w, unique_rows)
    qkv_u = h_u @ w.qkv_w
    qkv_u += w.qkv_b
    h = h_u[inverse]
    qkv = qkv_u[inverse]
    ctx = np.empty_like(h)
    r = 0
    for idx, m, key_bias, _ in groups:
      rows = len(idx) * m
      ctx[r : r + rows] = self._attend(qkv[r : r + rows], len(idx), m, key_bias)
      r += rows
    h = self._trunk_rows_post(w, h, ctx)
    return self._decode(w, h, heads)

  def _encode(self, w: _MemberWeights, h: np.ndarray) -> np.ndarray:
    """Input norm + encoder over rows (R, E) -> (R, D)."""
    if self._norm is not None:
      h = self._norm(h).astype(np.float32, copy=False)
    for kernel, bias in w.encoder:
      h = h @ kernel
      h += bias
      np.maximum(h, 0, out=h)
    return h

  def _attend(self, qkv: np.ndarray, p: int, m: int, key_bias: np.ndarray) -> np.ndarray:
    """Attention mixing of p programs with m rows each: qkv (p*m, 3D) -> context (p*m, D)."""
    nh = self.attention_heads
    dh = self.hidden_dim // nh
    qkv = qkv.reshape(p, m, 3, nh, dh)
    q = qkv[:, :, 0].transpose(0, 2, 1, 3)  # (p, nh, m, dh)
    k = qkv[:, :, 1].transpose(0, 2, 3, 1)  # (p, nh, dh, m)
    v = qkv[:, :, 2].transpose(0, 2, 1, 3)  # (p, nh, m, dh)
    logits = np.matmul(q, k)
    logits += key_bias  # log multiplicity of each (deduplicated) key
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    ctx = np.matmul(logits, v)  # (p, nh, m, dh)
    return ctx.transpose(0, 2, 1, 3).reshape(p * m, self.hidden_dim)

  def _trunk_rows_post(self, w: _MemberWeights, h: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """Attention out-projection + residual, then the residual blocks."""
    a = ctx @ w.out_w
    a += w.out_b
    a += h
    h = a
    for kernel, bias in w.res:
      t = h @ kernel
      t += bias
      np.maximum(t, 0, out=t)
      t += h
      h = t
    return h

  def _decode(self, w: _MemberWeights, h: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """Per-row decoder outputs of the selected heads: (R, D) -> (R, len(heads))."""
    num_all = self.num_heads
    d0 = w.decoder[0][0].shape[-1]
    if len(heads) == num_all:
      y = h @ w.dec0_w
      y += w.dec0_b
      y = y.reshape(-1, num_all, d0).transpose(1, 0, 2)  # (H, R, d0)
    else:
      w0, b0 = w.decoder[0]
      y = np.matmul(h[None], w0[heads]) + b0[heads][:, None, :]
    for kernel, bias in w.decoder[1:]:
      np.maximum(y, 0, out=y)
      y = np.matmul(y, kernel[heads])
      y += bias[heads][:, None, :]
    return y[..., 0].T


class _MemberWeights:
  """One network's weights, laid out for ``Predictor._forward`` (one per ensemble member)."""

  def __init__(self, encoder, qkv_w, qkv_b, out_w, out_b, res, decoder):
    self.encoder, self.res, self.decoder = encoder, res, decoder
    self.qkv_w, self.qkv_b, self.out_w, self.out_b = qkv_w, qkv_b, out_w, out_b
    # First decoder layer of all heads as one (dim, H*d0) matmul.
    w0, b0 = decoder[0]
    self.dec0_w = np.ascontiguousarray(w0.transpose(1, 0, 2).reshape(w0.shape[1], -1))
    self.dec0_b = b0.reshape(-1)

  @classmethod
  def build(
    cls,
    param: Callable[..., np.ndarray],
    arrays: Mapping[str, np.ndarray],
    member: int,
    feature_dim: int,
    enc_dims: Sequence[int],
    dec_dims: Sequence[int],
    res_blocks: int,
    num_heads: int,
    attention_heads: int,
  ) -> _MemberWeights:
    """Member ``member``'s weights; ``param(arrays, name, shape)`` reads all members'."""

    def get(name, shape):
      return np.ascontiguousarray(param(arrays, name, shape)[member])

    fan_in = feature_dim
    encoder = []
    for i, d in enumerate(enc_dims):
      encoder.append((get(f"encoder_{i}/kernel", (fan_in, d)), get(f"encoder_{i}/bias", (d,))))
      fan_in = d
    dim = enc_dims[-1]
    att = {
      n: (get(f"attention/{n}/kernel", (dim, dim)), get(f"attention/{n}/bias", (dim,)))
      for n in ("query", "key", "value", "out")
    }
    # One fused in-projection matmul instead of three; the 1/sqrt(head_dim) scale is folded
    # into the query weights.
    scale = np.float32(1.0 / math.sqrt(dim // attention_heads))
    qkv_w = np.ascontiguousarray(
      np.concatenate([att["query"][0] * scale, att["key"][0], att["value"][0]], axis=1)
    )
    qkv_b = np.concatenate([att["query"][1] * scale, att["key"][1], att["value"][1]])
    res = [
      (get(f"res_block_{i}/kernel", (dim, dim)), get(f"res_block_{i}/bias", (dim,)))
      for i in range(res_blocks)
    ]
    decoder = []
    fan_in = dim
    for i, d in enumerate(dec_dims):
      decoder.append(
        (
          get(f"heads/dense_{i}/kernel", (num_heads, fan_in, d)),
          get(f"heads/dense_{i}/bias", (num_heads, d)),
        )
      )
      fan_in = d
    return cls(encoder, qkv_w, qkv_b, att["out"][0], att["out"][1], res, decoder)
