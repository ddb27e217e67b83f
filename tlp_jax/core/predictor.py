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

import collections
import concurrent.futures
import contextlib
import json
import math
import os
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
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


# The process-wide one-thread BLAS limit of threaded predictions: threadpoolctl, its controller
# (made once), and the limit held while any threaded call runs (counted, so that overlapping
# calls from different threads neither lift it early nor leave it behind).
_BLAS: dict[str, Any] = {"module": None, "controller": None, "users": 0, "limit": None}
_BLAS_LOCK = threading.Lock()


def _claim_blas(threadpoolctl: Any) -> None:
  """Lets this thread set the BLAS's thread count. threadpoolctl (>= 3.6) lets only one thread
  at a time set a pthreads OpenBLAS's process-wide count and silently ignores the others; the
  thread that applies or restores the limit here may not be the one that did before."""
  controller = getattr(threadpoolctl, "OpenBLASController", None)
  clear = getattr(controller, "clear_controlling_thread", None)
  if clear is not None:
    clear(force=True)


@contextlib.contextmanager
def _one_blas_thread():
  """The process's BLAS limited to one thread for the block (threadpoolctl); the limits found
  on entry are restored when the last overlapping block exits."""
  with _BLAS_LOCK:
    if _BLAS["controller"] is None:
      try:
        import threadpoolctl  # optional: only threaded predictions need it
      except ImportError:  # pragma: no cover - a dependency of tlp_jax
        raise PredictorError(
          "predict(threads=...) needs threadpoolctl (pip install threadpoolctl)"
        ) from None
      # Made once: it lists the loaded native libraries (~2 ms); a limit then costs ~10 us.
      _BLAS["module"], _BLAS["controller"] = threadpoolctl, threadpoolctl.ThreadpoolController()
    if _BLAS["users"] == 0:
      _claim_blas(_BLAS["module"])
      _BLAS["limit"] = _BLAS["controller"].limit(limits=1, user_api="blas")
    _BLAS["users"] += 1
  try:
    yield
  finally:
    with _BLAS_LOCK:
      _BLAS["users"] -= 1
      if _BLAS["users"] == 0:
        _claim_blas(_BLAS["module"])
        _BLAS["limit"].restore_original_limits()
        _BLAS["limit"] = None
        _claim_blas(_BLAS["module"])  # and let go of it: any thread may set it again


def _check_threads(threads: int | None) -> None:
  if threads is None:
    return
  if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
    raise PredictorError(f"threads must be None or an integer >= 1, got {threads!r}")


def _run_chunks(fn: Callable[[Any], None], items: Iterator[Any], threads: int | None) -> None:
  """``fn`` on every item: in order on this thread (``threads`` None, the BLAS's own threads), or
  on ``threads`` worker threads with a one-thread BLAS. NumPy releases the GIL in its matmuls and
  elementwise loops, so chunks of programs run in parallel; and since every chunk then computes
  with one BLAS thread, the results are the same for every thread count (a multi-threaded BLAS
  splits a matmul by its thread count, which moves the last bits). At most ``2 * threads``
  chunks are assembled at a time, so memory stays bounded by the chunk size. Worker threads do
  not inherit the caller's ``np.errstate``."""
  with contextlib.nullcontext() if threads is None else _one_blas_thread():
    if threads is None or threads == 1:
      for item in items:
        fn(item)
      return
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    pending: collections.deque = collections.deque()
    try:
      for item in items:
        if len(pending) >= 2 * threads:
          pending.popleft().result()  # re-raises a chunk's exception here
        pending.append(pool.submit(fn, item))
      while pending:
        pending.popleft().result()
    finally:
      pool.shutdown(wait=True, cancel_futures=True)


# Weight dtypes an export may store (``--weights_dtype``); the predictor computes in float32.
WEIGHT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# Bytes one compressed byte of a deflated member can expand to: deflate's own limit is about
# 1032, so a member claiming more is forged (a "zip bomb"), refused before it is read.
_MAX_DEFLATE_RATIO = 1100


class _NpzMembers(Mapping):
  """The arrays of an open ``.npz`` archive, read lazily and never unpickled.

  Every member's ``.npy`` header is parsed up front without reading its data, and each must
  declare exactly the bytes the member holds, so a small file cannot make the predictor
  allocate a huge array: the weights' declared shapes and dtypes are checked against the model
  config (``Predictor._param``) before any weight is read.
  """

  def __init__(self, zf: zipfile.ZipFile, path: str, file_size: int):
    self._zf, self._path = zf, path
    self._infos: dict[str, zipfile.ZipInfo] = {}
    self._headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    self._cache: dict[str, np.ndarray] = {}
    for info in zf.infolist():
      if not info.filename.endswith(".npy") or info.filename[:-4] in self._infos:
        raise PredictorError(f"{path}: member {info.filename!r} is not one .npy array")
      key = info.filename[:-4]
      stored = info.compress_type == zipfile.ZIP_STORED
      if (
        info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
        or info.compress_size > file_size
        or (stored and info.file_size != info.compress_size)
        or info.file_size > _MAX_DEFLATE_RATIO * max(info.compress_size, 1)
      ):
        raise PredictorError(
          f"{path}: member {key!r} claims {info.file_size} bytes from {info.compress_size} "
          f"(compression {info.compress_type}) in a {file_size}-byte file: a damaged or forged "
          "archive"
        )
      self._infos[key] = info
      self._headers[key] = self._read_header(key, info)

  def _read_header(self, key: str, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype]:
    try:
      with self._zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
          shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
          shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
          raise ValueError(f"unsupported .npy version {version}")
        header_bytes = f.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      raise PredictorError(
        f"{self._path}: member {key!r} has no readable .npy header ({e})"
      ) from None
    if dtype.hasobject:
      raise PredictorError(
        f"{self._path}: member {key!r} holds Python objects ({dtype}); model exports hold only "
        "numbers and strings, and this predictor never unpickles"
      )
    declared = math.prod(shape) * dtype.itemsize
    if header_bytes + declared != info.file_size:
      raise PredictorError(
        f"{self._path}: member {key!r} declares a {dtype} array of shape {shape} "
        f"({declared} bytes) but holds {info.file_size - header_bytes} bytes"
      )
    return tuple(int(d) for d in shape), dtype

  def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of member ``key`` as its header declares them (no data read)."""
    return self._headers[key]

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._cache:
      info = self._infos[key]  # KeyError for a missing member, as a dict
      try:
        with self._zf.open(info) as f:
          self._cache[key] = np.lib.format.read_array(f, allow_pickle=False)
      except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise PredictorError(f"{self._path}: member {key!r} is not readable ({e})") from None
    return self._cache[key]

  def __contains__(self, key: object) -> bool:
    return key in self._infos  # Mapping's default would read the member

  def __iter__(self):
    return iter(self._infos)

  def __len__(self) -> int:
    return len(self._infos)


def _meta(arrays: Mapping[str, Any], key: str, source: str, kind: str, ndim: int = 0) -> np.ndarray:
  """Meta array ``key`` checked to be a ``kind`` (``"str"`` / ``"int"``) array of ``ndim``."""
  a = arrays[key]
  if isinstance(arrays, _NpzMembers):
    shape, dtype = arrays.header(key)  # checked before reading the data
  else:
    a = np.asarray(a)
    shape, dtype = a.shape, a.dtype
  if len(shape) != ndim or dtype.kind not in ("U" if kind == "str" else "iu"):
    what = {"str": "a string", "int": "an integer"}[kind]
    raise PredictorError(
      f"{source}: {key} must be {what} {('scalar', 'vector')[ndim]}, got {dtype} of shape {shape}"
    )
  return np.asarray(arrays[key])


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


def _check_finite_rows(x: np.ndarray, what: str) -> None:
  """Raises naming the programs (rows of ``x``) that hold a NaN or an infinity: the model's
  score of such a program would be NaN, silently ranked."""
  if x.dtype.kind != "f" or np.isfinite(x).all():
    return
  bad = np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))
  shown = ", ".join(str(int(i)) for i in bad[:10]) + (", ..." if bad.size > 10 else "")
  raise PredictorError(f"{what} of {bad.size} programs hold NaN or inf values (rows {shown})")


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
    version = int(_meta(arrays, META_FORMAT_VERSION, source, "int"))
    if version < 1:
      raise PredictorError(f"{source}: {META_FORMAT_VERSION} must be >= 1, got {version}")
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
      cfg = json.loads(_as_str(_meta(arrays, META_MODEL_CONFIG, source, "str")))
    except json.JSONDecodeError as e:
      raise PredictorError(f"{source}: {META_MODEL_CONFIG} is not JSON: {e}") from None
    if not isinstance(cfg, dict):
      raise PredictorError(f"{source}: {META_MODEL_CONFIG} is not a JSON object")
    self.config: dict[str, Any] = cfg
    self.hardware: tuple[str, ...] = tuple(
      str(h) for h in _meta(arrays, META_HARDWARE, source, "str", ndim=1)
    )
    self.platform: str = _as_str(_meta(arrays, META_PLATFORM, source, "str"))
    self.crop: tuple[int, int] = tuple(int(c) for c in _meta(arrays, META_CROP, source, "int", 1))
    if len(self.crop) != 2 or min(self.crop) < 1:
      raise PredictorError(f"{source}: {META_CROP} must be 2 positive sizes, got {self.crop}")
    self.vocab_json: str = _as_str(_meta(arrays, META_VOCAB_JSON, source, "str"))
    self.vocab_version: str = _as_str(_meta(arrays, META_VOCAB_VERSION, source, "str"))
    self.step: int = int(_meta(arrays, META_STEP, source, "int"))
    # Replayed loop tokens (0 = none): (max_tokens, token_width) of layout loop_tokens_version.
    tokens = {
      key: int(_meta(arrays, key, source, "int")) if key in arrays else 0
      for key in (META_LOOP_TOKENS_VERSION, META_LOOP_TOKENS_MAX, META_LOOP_TOKENS_WIDTH)
    }
    self.loop_tokens_version: int = tokens[META_LOOP_TOKENS_VERSION]
    self.max_tokens: int = tokens[META_LOOP_TOKENS_MAX]
    self.token_width: int = tokens[META_LOOP_TOKENS_WIDTH]
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
      _as_str(_meta(arrays, META_SKELETONS_JSON, source, "str"))
      if META_SKELETONS_JSON in arrays
      else None
    )
    self.skeletons: dict[str, Any] = self._parse_skeletons()
    self._template_caches: dict[str, tuple[Any, Any]] = {}
    self._featurizer = None
    self._load_weights(arrays, cfg)

  # ---- construction ---------------------------------------------------------------------------

  @classmethod
  def load(cls, path: str | os.PathLike) -> Predictor:
    """Loads an exported ``.npz`` (never unpickles).

    Every array's ``.npy`` header is read and checked (declared size against the bytes held;
    the weights' shapes and dtypes against the model config) before any data is read, so a
    damaged or forged file is a :class:`PredictorError` naming it, never a huge allocation.
    Weights stored as float16 are upcast to float32.

    Raises:
      FileNotFoundError: no file ``path``.
      PredictorError: anything else wrong with the file.
    """
    path = os.fspath(path)
    try:
      zf = zipfile.ZipFile(path)
    except FileNotFoundError:
      raise
    # Not a zip, a truncated or corrupt one.
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      raise PredictorError(f"{path}: not a readable .npz model export ({e})") from None
    with zf:
      return cls(_NpzMembers(zf, path, os.path.getsize(path)), source=path)

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
    """Parameter ``name`` of every member: ``(members, *shape)`` float32.

    Its stored shape and dtype (float32 or float16) are checked first, from the ``.npy``
    header when ``arrays`` is a file, so a wrong one is never read or allocated.
    """
    prefix = PARAMS_PREFIX + (MEMBERS_PREFIX if self.ensemble_size > 1 else "")
    key = prefix + name
    if key not in arrays:
      raise PredictorError(f"{self.source}: missing parameter {key}")
    if key in self._params_read:  # read once for all the ensemble's members
      return self._params_read[key]
    if isinstance(arrays, _NpzMembers):
      have, dtype = arrays.header(key)
    else:
      have, dtype = np.shape(arrays[key]), np.asarray(arrays[key]).dtype
    want = ((self.ensemble_size,) if self.ensemble_size > 1 else ()) + tuple(shape)
    if tuple(have) != want:
      raise PredictorError(
        f"{self.source}: parameter {key} has shape {tuple(have)}, the model config implies {want}"
      )
    if dtype not in WEIGHT_DTYPES:
      raise PredictorError(
        f"{self.source}: parameter {key} is {dtype}; weights must be float32 or float16"
      )
    a = np.asarray(arrays[key], dtype=np.float32)
    if not np.all(np.isfinite(a)):
      raise PredictorError(
        f"{self.source}: parameter {key} has {int((~np.isfinite(a)).sum())} non-finite values"
      )
    a = a if self.ensemble_size > 1 else a[None]
    self._params_read[key] = a
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
    sizes = {
      "feature_dim": [self.feature_dim],
      "seq_len": [self.seq_len],
      "encoder_dims": enc_dims,
      "decoder_dims": dec_dims,
      "attention_heads": [self.attention_heads],
      "num_hardware_heads": [num_heads],
    }
    for field, values in sizes.items():
      if not values or min(values) < 1:
        raise PredictorError(
          f"{self.source}: bad {META_MODEL_CONFIG}: {field} must be positive, got "
          f"{cfg.get(field)!r}"
        )
    if res_blocks < 0 or dec_dims[-1] != 1 or enc_dims[-1] % self.attention_heads:
      raise PredictorError(
        f"{self.source}: bad {META_MODEL_CONFIG}: needs res_blocks >= 0 (got {res_blocks}), "
        f"decoder_dims ending in 1 (got {dec_dims}) and the hidden size {enc_dims[-1]} "
        f"divisible by attention_heads {self.attention_heads}"
      )
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
    self._params_read: dict[str, np.ndarray] = {}
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
    unused = sorted(k for k in arrays if k.startswith(PARAMS_PREFIX) and k not in self._params_read)
    self._params_read = {}
    if unused:
      raise PredictorError(
        f"{self.source}: {len(unused)} parameters the model config does not describe, e.g. "
        f"{unused[:3]}"
      )

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
    threads: int | None = None,
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
      threads: None = one chunk after another on this thread, with the BLAS's own threads;
        ``n >= 1`` = chunks on ``n`` worker threads, each with a one-thread BLAS: the scores
        are then the same for every ``n`` (not bit-equal to None's on a multi-core BLAS).

    Returns:
      float32 scores.

    Raises:
      PredictorError: bad shapes, an unknown head, ``batch_size < 1``, ``threads < 1``, or a
        non-finite input value (the message lists the programs, rows of ``features``, that
        hold one).
    """
    heads = np.arange(self.num_heads) if hw == ALL_HEADS else np.array([self.head_index(hw)])
    _check_threads(threads)
    n, chunks = self._model_input_chunks(features, loop_tokens, batch_size)
    out = np.empty((n, len(heads)), np.float32)

    def one(item: tuple[int, np.ndarray]) -> None:
      start, chunk = item
      out[start : start + len(chunk)] = self._forward(chunk, heads)

    _run_chunks(one, chunks, threads)
    return out if hw == ALL_HEADS else out[:, 0]

  def _model_input_chunks(
    self, features: np.ndarray, loop_tokens: np.ndarray | None, batch_size: int
  ) -> tuple[int, Iterator[tuple[int, np.ndarray]]]:
    """Checks ``predict``'s inputs (shapes, finiteness, ``batch_size``) before any work, then
    returns the program count and ``(start, model input chunk)`` pairs of at most
    ``batch_size`` programs, the loop tokens assembled per chunk."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
      raise PredictorError(f"batch_size must be an integer, got {batch_size!r}")
    if batch_size < 1:
      raise PredictorError(f"batch_size must be >= 1, got {batch_size}")
    x = np.asarray(features)
    length, width = self.step_crop if self.reads_loop_tokens else (self.seq_len, self.feature_dim)
    if x.ndim != 3 or x.shape[1] < length or x.shape[2] < width:
      raise PredictorError(
        f"features must be (batch, >={length} steps, >={width} values), got shape {x.shape}"
      )
    x = x[:, :length, :width]
    _check_finite_rows(x, "features")
    tokens = self._check_tokens(loop_tokens, x.shape[0])
    if tokens is not None:
      _check_finite_rows(tokens, "loop_tokens")

    def chunks():
      for start in range(0, x.shape[0], batch_size):
        chunk = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
        if tokens is not None:
          chunk = _loop_tokens.model_input(chunk, tokens[start : start + batch_size])
        yield start, chunk

    return x.shape[0], chunks()

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

  def featurize_texts(self, steps_texts: Sequence[bytes]) -> np.ndarray:
    """:meth:`featurize_steps` of step lists given as TVM's record text, each without its
    outer brackets (``b'["SP", 2, 0, 4, [4, 1, 1], 1], ["AN", 2, 9, 2]'``): the same values,
    served from a cache of step texts instead of parsing and re-encoding every step."""
    try:
      return self._get_featurizer().featurize_many_texts(list(steps_texts))
    except ValueError as e:
      raise PredictorError(str(e)) from None

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

  def embed(
    self,
    features: np.ndarray,
    hw: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loop_tokens: np.ndarray | None = None,
    threads: int | None = None,
  ) -> np.ndarray:
    """``(B, members * d)`` float32 program embeddings: the inputs of head ``hw``'s last
    (linear) decoder layer, summed over each program's rows, members side by side over the
    member count. With ``w, c = last_layer(hw)``, ``embed(...) @ w + c == predict(...)`` up to
    float rounding; online updates refit ``w`` on them (``tlp_jax.core.online``). Arguments
    as :meth:`predict`."""
    if hw == ALL_HEADS:
      raise PredictorError("embed is per head: pass one hardware name or None")
    head = np.array([self.head_index(hw)])
    _check_threads(threads)
    n, chunks = self._model_input_chunks(features, loop_tokens, batch_size)
    dim = sum(m.decoder[-1][0].shape[1] for m in self._members)
    out = np.empty((n, dim), np.float32)

    def one(item: tuple[int, np.ndarray]) -> None:
      start, chunk = item
      out[start : start + len(chunk)] = self._forward(chunk, head, embed=True)

    _run_chunks(one, chunks, threads)
    return out

  def last_layer(self, hw: str | None = None) -> tuple[np.ndarray, float]:
    """``(w, c)`` of head ``hw``'s last decoder layer over :meth:`embed`'s columns: ``w`` the
    members' kernels side by side (float64, ``(members * d,)``), ``c`` the score offset (the
    bias counted once per input row, averaged over members)."""
    head = self.head_index(hw)
    rows = self.crop[0] if self.reads_loop_tokens else self.seq_len
    w = np.concatenate([m.decoder[-1][0][head, :, 0] for m in self._members]).astype(np.float64)
    c = float(np.mean([m.decoder[-1][1][head, 0] for m in self._members])) * rows
    return w, c

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

  def _forward(self, x: np.ndarray, heads: np.ndarray, embed: bool = False) -> np.ndarray:
    """(B, L, E) float32 -> (B, len(heads)); the row dedup is explained in the module doc.
    ``embed``: (B, members * d) inputs of the last decoder layer instead (see ``embed``)."""
    unique_rows, inverse, groups = self._pack(x)
    ys = [  # an ensemble scores with the mean of its members
      self._rows_forward(weights, unique_rows, inverse, groups, heads, embed)
      for weights in self._members
    ]
    y = np.concatenate(ys, axis=-1) if embed else sum(ys[1:], ys[0])
    if len(self._members) > 1:
      y /= np.float32(len(self._members))
    out = np.zeros((x.shape[0], y.shape[-1]), np.float32)
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
    embed: bool = False,
  ) -> np.ndarray:
    """One member's per-row decoder outputs ``(R, len(heads))`` of the packed rows (``embed``:
    the inputs of its last decoder layer, ``(R, d)``)."""
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
    return self._decode(w, h, heads, embed)

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

  def _decode(
    self, w: _MemberWeights, h: np.ndarray, heads: np.ndarray, embed: bool = False
  ) -> np.ndarray:
    """Per-row decoder outputs of the selected heads: (R, D) -> (R, len(heads)); ``embed``
    (one head): the inputs of its last layer (R, d)."""
    if embed:
      layers = w.decoder[:-1]
      y = h[None]
      for i, (kernel, bias) in enumerate(layers):
        if i:
          np.maximum(y, 0, out=y)
        y = np.matmul(y, kernel[heads]) + bias[heads][:, None, :]
      return np.maximum(y[0], 0) if layers else y[0]
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
