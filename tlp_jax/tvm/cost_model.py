"""TLP as a cost model inside TVM's auto-scheduler (Ansor), backed by the pure-NumPy predictor.

Ansor asks its cost model to score batches of candidate schedules (``State`` objects) in every
round of its evolutionary search. ``TLPCostModel.predict`` turns each state into the *same*
transform-step list a measure record stores under ``["i"][1][1]`` (it serialises a
``MeasureInput`` with TVM's own record writer and reads the steps back), featurises the lists
with the exported model's frozen vocabulary and runs the NumPy predictor. Because the tuner and
the training data share one serialisation, there is no second feature path that could drift.

TVM is optional for the project: this module imports without it; constructing the cost model (or
calling the helpers below) without TVM raises an ``ImportError`` naming the extra to install.

A model of replayed loop tokens (export format 5, the default feature version) also reads each
state's loop tokens. They are made without TVM per state: the task's skeleton is extracted once
(``tlp_jax.tvm.skeleton_extract``, cached by workload key), then every state's step list is
replayed over it in NumPy/Python (``Predictor.loop_tokens_of``, with ``replay_cache``'s per-task
templates), so no native code runs per state and nothing per state can abort the tuner. A state
whose replay fails (never seen on the sample or tenset-mini) gets the lowest score of its batch
and a warning, instead of an exception inside TVM's callback.

``update`` is a no-op by default (``update="none"``), as in the original TLP integration (its
``TLPModel.update`` does nothing): the model is trained offline on TenSet-style records. With
``update="online"`` every ``update(inputs, results)`` refits the last decoder layer on the
measurements of this tuning run, ranked within each task (``tlp_jax.core.online``: NumPy,
deterministic, bounded per round); it can never raise into the tuner.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from tlp_jax.core import features, online, pretrained
from tlp_jax.core import predictor as npred
from tlp_jax.tvm import skeleton_extract, tvm_import


def _python_based_model() -> type:
  """Ansor's ``PythonBasedModel``, or ``object`` without TVM (the module still imports; making
  a cost model then raises ``tvm_import``'s ImportError)."""
  try:
    tvm_import.require_tvm()
  except ImportError:
    return object
  from tvm.auto_scheduler.cost_model.cost_model import PythonBasedModel

  return PythonBasedModel


@functools.lru_cache(maxsize=1)
def _measure_api() -> tuple[Callable, Callable]:
  """TVM's ``MeasureInput`` and its record serialiser, imported once (the tuner's hot path)."""
  tvm_import.require_tvm()
  from tvm.auto_scheduler import measure

  # TVM's record writer has no public per-input entry point; this FFI function is the one
  # save_records calls.
  return measure.MeasureInput, measure._ffi_api.SerializeMeasureInput


def state_steps_json(task, state) -> bytes:
  """Serialises one state exactly as a measure record's ``"i"`` field (JSON bytes).

  ``MeasureInput`` -> TVM's record serialiser is the code path that writes records during
  measurement, so ``orjson.loads(result)[1][1]`` is the record's step list verbatim.
  """
  make_input, serialize = _measure_api()
  return serialize(make_input(task, state)).encode()


def _usable_cores() -> int:
  """Cores this process may run on (its affinity where the OS reports one)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


_STATE_START = b", [[], ["  # a serialised state: [stages (empty), [steps]]


def steps_text_head(key: bytes) -> bytes | None:
  """The text of a serialised input (``state_steps_json``) before its step list: ``[<task>,
  [[], [``, the same for every state of the task, so ``key[len(head):-3]`` is the step list's
  text without brackets (``features.Featurizer.featurize_step_texts``). Checked by parsing both
  parts against the whole; None when no cut passes."""
  try:
    whole = orjson.loads(key)
  except orjson.JSONDecodeError:
    return None
  if not key.endswith(b"]]]"):
    return None
  pos = key.find(_STATE_START)
  while pos >= 0:
    head = key[: pos + len(_STATE_START)]
    try:
      if (
        orjson.loads(key[:pos] + b", [[], []]]") == [whole[0], [[], []]]
        and orjson.loads(b"[" + key[len(head) : -3] + b"]") == whole[1][1]
      ):
        return head
    except (orjson.JSONDecodeError, IndexError, TypeError):
      pass
    pos = key.find(_STATE_START, pos + 1)
  return None


def states_to_steps(task, states: Sequence[Any]) -> list[list]:
  """Transform-step lists (record format, ``["i"][1][1]``) of ``states`` of ``task``."""
  return [orjson.loads(state_steps_json(task, s))[1][1] for s in states]


def _identity(raw: np.ndarray) -> np.ndarray:
  return raw


def _softplus(raw: np.ndarray) -> np.ndarray:
  # Monotone, so rankings are unchanged, and strictly positive: Ansor's evolutionary search picks
  # parents with probability proportional to max(score, 0), which an unbounded ranking score
  # (LambdaRank) can make all-zero. Per-call normalisation is avoided on purpose: Ansor keeps
  # scores from different predict() calls in one heap, so the transform must be call-independent.
  return np.logaddexp(0.0, raw)


# Original TLP returns the raw network output ("identity"); the default is "softplus" (see
# _softplus: identity can make Ansor's roulette weights all zero or NaN), applied to the raw
# score relative to a per-task anchor (TLPCostModel._anchor) so that float32 keeps the ranking.
SCORE_TRANSFORMS: Mapping[str, Callable[[np.ndarray], np.ndarray]] = {
  "identity": _identity,
  "softplus": _softplus,
}
ANCHORED_TRANSFORMS = frozenset({"softplus"})


@dataclasses.dataclass(frozen=True)
class CostModelConfig:
  """Options of ``TLPCostModel``.

  Attributes:
    hardware: predictor head to use (a hardware name of the exported model); None = first head.
    score_transform: key of ``SCORE_TRANSFORMS``; "softplus" (default) keeps Ansor's roulette
      weights positive, applied to the raw score minus a per-task anchor so that scores far from
      0 keep their order in float32 (``TLPCostModel._anchor``); "identity" is the original TLP
      behaviour.
    batch_size: states featurised and predicted per chunk (bounds peak memory).
    threads: threads of the NumPy network (``Predictor.predict(threads=...)``), each over chunks
      of ``predict_chunk`` programs with a one-thread BLAS; 0 = one per core this process may
      run on. NumPy releases the GIL in its matmuls and elementwise loops, so they run in
      parallel while Ansor waits for the scores.
    predict_chunk: programs per chunk of the network. Fixed apart from ``threads``, so the
      scores are the same whatever the thread count.
    cache_size: predictions memoised by serialised steps (Ansor re-scores the same states across
      evolution iterations); 0 disables the cache. Predictions are deterministic, so caching
      never changes a score (with online updates the cache holds embeddings, and scores are
      recomputed from them with the current last layer).
    update: a key of ``UPDATE_MODES``: "none" (the original: ``update`` does nothing) or
      "online" (``update`` refits the last decoder layer on the run's measurements).
    online_config: options of the online refit (``tlp_jax.core.online.OnlineConfig``).
  """

  hardware: str | None = None
  score_transform: str = "softplus"
  batch_size: int = 4096
  threads: int = 0
  predict_chunk: int = 128
  cache_size: int = 200_000
  update: str = "none"
  online_config: online.OnlineConfig = online.OnlineConfig()


# "none": TLP's original (the model is frozen); "online": refit the last layer every update().
UPDATE_MODES = ("none", "online")


@dataclasses.dataclass
class UpdateCall:
  """One ``update`` call with ``update="online"``: what it added and what the refit used."""

  measurements: int  # results given
  added: int  # valid measurements added to the buffer
  failed: int  # measurements with an error (left out, counted here)
  buffer: int  # valid measurements of this run so far
  pairs: int  # within-task pairs the refit used
  seconds: float
  error: str = ""  # an exception caught (the previous last layer is kept)


@dataclasses.dataclass
class PredictCall:
  """Timing of one ``predict`` call (one Ansor search-round step)."""

  workload_key: str
  num_states: int
  num_cached: int
  serialize_s: float
  predict_s: float
  num_failed: int = 0  # states whose loop-token replay failed (scored lowest)

  @property
  def total_s(self) -> float:
    return self.serialize_s + self.predict_s


class TLPCostModel(_python_based_model()):
  """Ansor ``PythonBasedModel`` scoring states with an exported TLP model (higher = faster).

  Args:
    predictor: an exported model's path (``.npz``, loaded here so a bad file fails before
      tuning starts), ``"pretrained:NAME"`` (a starter model of the package,
      ``tlp_jax.core.pretrained``), or a ``tlp_jax.core.predictor.Predictor`` (anything with
      ``platform`` and ``predict_steps(list_of_step_lists, hw=None) -> (N,)``; online updates
      need a real ``Predictor``).
    config: ``CostModelConfig``.
    **overrides: fields of ``config`` to replace, e.g. ``TLPCostModel(path, update="online")``.

  Raises:
    ImportError: TVM is not installed.
    FileNotFoundError, tlp_jax.core.predictor.PredictorError,
    tlp_jax.core.pretrained.PretrainedError: the model file or name is missing or bad.
    ValueError, TypeError: a bad config.
  """

  def __init__(self, predictor, config: CostModelConfig = CostModelConfig(), **overrides):
    tvm_import.require_tvm()
    if overrides:
      config = dataclasses.replace(config, **overrides)
    if isinstance(predictor, (str, os.PathLike)):
      predictor = pretrained.load_spec(predictor)
    if not callable(getattr(predictor, "predict_steps", None)):
      raise TypeError(f"expected a model path or a Predictor, got {type(predictor).__name__}")
    if config.score_transform not in SCORE_TRANSFORMS:
      raise ValueError(
        f"unknown score_transform {config.score_transform!r}; "
        f"choose one of {sorted(SCORE_TRANSFORMS)}"
      )
    for name, low in (("threads", 0), ("predict_chunk", 1)):
      value = getattr(config, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if config.update not in UPDATE_MODES:
      raise ValueError(f"unknown update {config.update!r}; choose one of {list(UPDATE_MODES)}")
    self._online = config.update == "online"
    if self._online and not isinstance(predictor, npred.Predictor):
      raise TypeError(
        "update='online' refits the last layer of a tlp_jax.core.predictor.Predictor, "
        f"got {type(predictor).__name__}"
      )
    hardware = getattr(predictor, "hardware", None)
    if (
      config.hardware is not None
      and hardware is not None
      and (config.hardware not in list(hardware))
    ):
      raise ValueError(
        f"the exported model has no head for hardware {config.hardware!r}; it has {list(hardware)}"
      )
    self._loop_tokens = bool(getattr(predictor, "reads_loop_tokens", False))
    super().__init__()
    self.predictor = predictor
    self.config = config
    self._transform = SCORE_TRANSFORMS[config.score_transform]
    self._shift = config.score_transform in ANCHORED_TRANSFORMS
    self._anchors: dict[str, float] = {}  # workload key -> raw score anchor (_anchor)
    self._cache: dict[bytes, float] = {}
    self._skeletons: dict[str, Any] = {}  # workload key -> skeleton, extracted once per task
    # workload key -> the serialised inputs' text before the step list (None: not found).
    self._heads: dict[str, bytes | None] = {}
    # Worker threads of the network: config.threads, or one per core this process may use.
    self.threads = config.threads or _usable_cores()
    # Step features straight from the serialised text (the records' fast path) and the network
    # on threads, when the predictor is this project's; any other (duck-typed) predictor is
    # called as before this existed.
    self._texts = isinstance(predictor, npred.Predictor)
    # Tasks scored without loop tokens because no skeleton could be had (warned once each).
    self.tasks_without_skeleton: set[str] = set()
    self.calls: list[PredictCall] = []
    self.updates: list[UpdateCall] = []
    if self._online:
      # score = phi . (w + dw) + c; dw is refit by update() on the measurements of this run.
      self._w, self._c = predictor.last_layer(config.hardware)
      self._dw = np.zeros_like(self._w)
      self._buffer: dict[str, list] = {"phi": [], "group": [], "cost": []}
      self._measured: set[bytes] = set()  # (task, steps) already in the buffer

  @classmethod
  def from_npz(
    cls, path: str, config: CostModelConfig = CostModelConfig(), **overrides
  ) -> TLPCostModel:
    """Loads an exported ``.npz`` model with ``npred.Predictor.load``."""
    return cls(npred.Predictor.load(path), config, **overrides)

  @classmethod
  def pretrained(
    cls, name: str, config: CostModelConfig = CostModelConfig(), **overrides
  ) -> TLPCostModel:
    """A starter model shipped with the package (``tlp_jax.core.pretrained.available()``);
    an unknown name raises ``PretrainedError`` listing them."""
    return cls(pretrained.load(name), config, **overrides)

  def update(self, inputs, results):
    """``update="none"``: nothing, as in the original TLP integration. ``"online"``: adds the
    valid measurements to this run's buffer and refits the last layer on all of them, ranked
    within each task (``tlp_jax.core.online.fit``). Never raises into the tuner: an error is
    logged, counted in ``updates``, and the previous last layer kept."""
    if not self._online:
      return
    t0 = time.perf_counter()
    call = UpdateCall(len(inputs), 0, 0, 0, 0, 0.0)
    try:
      self._add_measurements(inputs, results, call)
      buf = self._buffer
      if call.added:
        phi = np.concatenate(buf["phi"])
        dw, stats = online.fit(
          phi,
          phi @ self._w,
          np.concatenate(buf["group"]),
          np.concatenate(buf["cost"]),
          self.config.online_config,
        )
        self._dw = dw
        self._anchors.clear()  # the last layer changed: re-anchor each task at its next call
        call.pairs = stats.pairs
      call.buffer = int(sum(len(g) for g in buf["group"]))
    except Exception as e:  # never into TVM's callback
      call.error = f"{type(e).__name__}: {e}"
      logging.warning("online update failed (%s); the model keeps its last layer", call.error)
    call.seconds = time.perf_counter() - t0
    self.updates.append(call)

  def _add_measurements(self, inputs, results, call: UpdateCall) -> None:
    """Embeddings and mean costs of the valid, new measurements, appended per task."""
    _, serialize = _measure_api()
    by_task: dict[str, tuple[Any, list[bytes], list[float]]] = {}
    for inp, res in zip(inputs, results):
      costs = [float(c) for c in res.costs]
      if int(res.error_no) != 0 or not costs or not np.isfinite(np.mean(costs)):
        call.failed += 1
        continue
      key = serialize(inp).encode()
      if key in self._measured:
        continue
      self._measured.add(key)
      task = inp.task
      entry = by_task.setdefault(task.workload_key, (task, [], []))
      entry[1].append(key)
      entry[2].append(float(np.mean(costs)))
    for wkey, (task, keys, costs) in by_task.items():
      phi, failed = self._embed(task, [orjson.loads(k)[1][1] for k in keys], keys)
      ok = np.ones(len(keys), bool)
      ok[failed] = False
      call.failed += int((~ok).sum())
      self._buffer["phi"].append(phi[ok])
      self._buffer["group"].append(np.full(int(ok.sum()), wkey, dtype=object))
      self._buffer["cost"].append(np.asarray(costs)[ok])
      call.added += int(ok.sum())

  def _embed(self, task, steps: list, keys: list[bytes]) -> tuple[np.ndarray, list[int]]:
    """``Predictor.embed`` of one task's step lists (``keys``: their serialised inputs), and the
    indices whose replay failed."""
    failed: list[int] = []
    tokens = None
    if self._loop_tokens:
      tokens, failed = self._loop_tokens_of(task, steps)
    phi = self.predictor.embed(
      self._step_features(task, keys, steps),
      hw=self.config.hardware,
      loop_tokens=tokens,
      batch_size=self.config.predict_chunk,
      threads=self.threads,
    )
    return phi, failed

  def skeleton(self, task):
    """The task's skeleton, extracted with TVM on the first call for its workload key (the only
    TVM work per task besides serialising states). If extraction fails, the model's embedded
    skeleton of the key is used; without one the error names the task."""
    key = task.workload_key
    skel = self._skeletons.get(key)
    if skel is None:
      try:
        skel = skeleton_extract.skeleton_from_task(task)
      except Exception as e:  # any failure: fall back to the embedded one
        skel = getattr(self.predictor, "skeletons", {}).get(key)
        if skel is None:
          raise ValueError(
            f"cannot extract the loop-nest skeleton of task {key} "
            f"({type(e).__name__}: {e}) and the model embeds none for it"
          ) from e
        logging.warning(
          "skeleton extraction failed for %s (%s); using the model's embedded skeleton", key, e
        )
      self._skeletons[key] = skel
    return skel

  def _loop_tokens_of(self, task, steps: list) -> tuple[np.ndarray, list[int]]:
    """Loop tokens of one task's step lists and the indices whose replay failed (zero tokens).

    A batch is replayed at once; if that fails, program by program, so one program the replay
    cannot follow costs only its own score. A task whose skeleton cannot be had at all (TVM's
    extraction failed and the model embeds none) is scored on its step tokens alone, with empty
    loop tokens, and a warning: a tuning run must never die in this callback.
    """
    shape = (len(steps), self.predictor.max_tokens, self.predictor.token_width)
    if task.workload_key in self.tasks_without_skeleton:
      return np.zeros(shape, np.float16), []  # extraction failed before: do not retry it
    try:
      skel = self.skeleton(task)
    except ValueError as e:
      if task.workload_key not in self.tasks_without_skeleton:
        self.tasks_without_skeleton.add(task.workload_key)
        logging.warning("%s; its states are scored without loop tokens", e)
      return np.zeros(shape, np.float16), []
    try:
      return self.predictor.loop_tokens_of(steps, skeleton=skel), []
    except Exception:  # isolate the failing program(s) below
      pass
    tokens = np.zeros(
      (len(steps), self.predictor.max_tokens, self.predictor.token_width), np.float16
    )
    failed = []
    for i, st in enumerate(steps):
      try:
        tokens[i] = self.predictor.loop_tokens_of([st], skeleton=skel)[0]
      except Exception as e:  # never raise into the tuner
        failed.append(i)
        logging.warning(
          "loop-token replay failed for a state of %s (%s: %s); it gets the batch's lowest score",
          task.workload_key,
          type(e).__name__,
          e,
        )
    return tokens, failed

  def _step_features(self, task, keys: list[bytes], steps: list) -> np.ndarray:
    """TLP step features of one task's states: from their serialised text (``keys``, the step
    list's text cut out after the task's head) where that is exact, else from ``steps``."""
    wk = task.workload_key
    if wk not in self._heads:
      self._heads[wk] = steps_text_head(keys[0]) if keys else None
    head = self._heads[wk]
    if head is not None and all(k.startswith(head) and k.endswith(b"]]]") for k in keys):
      return self.predictor.featurize_texts([k[len(head) : -3] for k in keys])
    return self.predictor.featurize_steps(steps)

  def _check_platform(self, task) -> None:
    task_platform = features.platform_of_target(str(task.target))
    model_platform = getattr(self.predictor, "platform", task_platform)
    if str(model_platform) != task_platform:
      raise ValueError(
        f"the exported model is for platform {model_platform!r} but the task "
        f"targets {task.target} ({task_platform!r})"
      )

  def predict(self, task, states):
    """Scores ``states`` of ``task``: float32 array, higher = predicted faster."""
    if not self.calls or self.calls[-1].workload_key != task.workload_key:
      self._check_platform(task)
    t0 = time.perf_counter()
    keys = [state_steps_json(task, s) for s in states]
    t1 = time.perf_counter()
    # Raw network scores first (float64), then one transform of all of them: the transform may
    # depend on the task's anchor (_anchor), which the first call of a task sets from them.
    raw = np.empty(len(keys), dtype=np.float64)
    todo = [i for i, k in enumerate(keys) if k not in self._cache]
    embeddings: dict[int, np.ndarray] = {}  # online: the embeddings computed in this call
    for i, k in enumerate(keys):
      if k in self._cache:
        raw[i] = self._cached_raw(self._cache[k])
    # A failed state's score is the call's lowest: it depends on the call, so it is not cached.
    failed_states: list[int] = []
    for start in range(0, len(todo), self.config.batch_size):
      chunk = todo[start : start + self.config.batch_size]
      steps = [orjson.loads(keys[i])[1][1] for i in chunk]
      failed: list[int] = []
      if self._online:
        phi, failed = self._embed(task, steps, [keys[i] for i in chunk])
        for j, i in enumerate(chunk):
          embeddings[i] = phi[j]
        out = phi.astype(np.float64) @ (self._w + self._dw) + self._c
      elif self._texts or self._loop_tokens:
        tokens = None
        if self._loop_tokens:
          tokens, failed = self._loop_tokens_of(task, steps)
        if self._texts:
          out = self.predictor.predict(
            self._step_features(task, [keys[i] for i in chunk], steps),
            hw=self.config.hardware,
            loop_tokens=tokens,
            batch_size=self.config.predict_chunk,
            threads=self.threads,
          )
        else:
          out = self.predictor.predict(
            self.predictor.featurize_steps(steps), hw=self.config.hardware, loop_tokens=tokens
          )
      else:
        out = self.predictor.predict_steps(steps, hw=self.config.hardware)
      raw[chunk] = np.asarray(out, dtype=np.float64).reshape(len(chunk))
      failed_states.extend(chunk[j] for j in failed)
    ok = np.ones(len(keys), bool)
    ok[failed_states] = False
    if failed_states:
      raw[~ok] = raw[ok].min() if ok.any() else 0.0
    anchor = self._anchor(task.workload_key, raw[ok])
    scores = self._transform(raw - anchor).astype(np.float32)
    if self.config.cache_size > 0:
      if len(self._cache) + len(todo) > self.config.cache_size:
        self._cache.clear()  # Cheap bound on memory; a miss only costs a re-prediction.
      for i in todo:
        if ok[i]:
          self._cache[keys[i]] = embeddings[i] if self._online else float(raw[i])
    t2 = time.perf_counter()
    self.calls.append(
      PredictCall(
        task.workload_key, len(keys), len(keys) - len(todo), t1 - t0, t2 - t1, len(failed_states)
      )
    )
    logging.debug(
      "TLPCostModel.predict: %d states (%d cached) in %.3f s",
      len(keys),
      len(keys) - len(todo),
      t2 - t0,
    )
    return scores

  def _anchor(self, workload_key: str, raw: np.ndarray) -> float:
    """The raw score a task's scores are taken relative to before a shift-sensitive transform.

    A ranking model's scores have an arbitrary offset (the loss only sees differences): one
    model scores every program of a task near -196. ``softplus(-196)`` is ~1e-85, 0 in float32,
    the dtype Ansor keeps scores in: every state would tie and the search would pick at random
    by position. So ``softplus`` is applied to ``raw - anchor``, the anchor being the median raw
    score of the task's first call (kept for the task, so that scores of different calls, which
    Ansor compares, stay on one scale; reset when ``update`` changes the model). Transforms that
    are the original's raw output ("identity") use no anchor."""
    if not self._shift:
      return 0.0
    if workload_key not in self._anchors:
      self._anchors[workload_key] = float(np.median(raw)) if raw.size else 0.0
    return self._anchors[workload_key]

  def _cached_raw(self, entry) -> float:
    """A cached entry's raw score: the score itself, or (online) from its embedding and the
    current last layer, so an update re-scores every cached state."""
    if not self._online:
      return entry
    return float(entry.astype(np.float64) @ (self._w + self._dw) + self._c)

  def timing_summary(self) -> dict:
    """Totals over all ``predict`` calls so far (for benchmarks)."""
    n = len(self.calls)
    return {
      "predict_calls": n,
      "states_scored": int(sum(c.num_states for c in self.calls)),
      "states_cached": int(sum(c.num_cached for c in self.calls)),
      "states_failed": int(sum(c.num_failed for c in self.calls)),
      "serialize_s": float(sum(c.serialize_s for c in self.calls)),
      "predict_s": float(sum(c.predict_s for c in self.calls)),
      "mean_call_s": float(sum(c.total_s for c in self.calls) / n) if n else 0.0,
      "update_calls": len(self.updates),
      "update_s": float(sum(u.seconds for u in self.updates)),
      "update_errors": int(sum(bool(u.error) for u in self.updates)),
      "measurements_used": self.updates[-1].buffer if self.updates else 0,
    }
