"""The training loop: ``train_and_evaluate(config, workdir)`` is the whole job behind ``train.py``.

* the dataset comes from ``data_pipelines.loader.load_arrays``; ``data`` selects the heads,
  masks few-shot labels, orders each epoch and lays batches out over the devices;
* each epoch runs ``ceil(N / batch)`` steps of ``step.train_step`` under ``pmap``, the last
  batch padded with masked rows (the losses ignore them), so every record is used once per
  epoch, as TLP's data loader does; the training arrays either live on every device
  (``data_placement="device"``, no host->device traffic per step), are gathered on the host
  per step (``"host"``), or the same host batches are gathered ahead by a grain pipeline
  (``"stream"``, ``stream.py``; its iterator state is checkpointed); all give identical batches;
  host and stream batches are put on the devices ``config.prefetch_to_device`` steps ahead of
  the step that reads them (``prefetch.py``), so no step waits for its own batch's copy;
  device placement runs ``config.steps_per_execution`` steps per call
  (``step.train_steps_resident``) wherever no log, checkpoint or epoch end falls inside them
  (``fits_multi_step``), so the host's per-call work does not hold a fast step back;
* validation (``validate``) every ``eval_every_epochs`` epochs and after the last: per-head loss
  summed over the validation batches (as TLP reports it) and the quick top-k of
  ``tlp_jax.core.metrics``;
* checkpoints (``checkpoints``): the latest every ``checkpoint_every_steps`` and at each
  validated epoch end, the best by target-head validation loss; a restarted run resumes exactly
  where its checkpoint was taken and ends with the same parameters as an unbroken run. A rerun
  must use the run's settings (``checkpoints.reconcile_train_config``); interrupted saves are
  removed and an unreadable latest checkpoint falls back to the newest readable one;
* the log: absl/logging lines are printed above the progress bar, never into it, and the run
  ends with a summary (best step and its validation metrics, where the checkpoints are, the
  commands that evaluate and export the model).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from data_pipelines import loader
from tlp_jax.core import metrics
from tlp_jax.train import checkpoints, data, init_from, optimizer, prefetch, runtime, stream
from tlp_jax.train import config as config_lib
from tlp_jax.train import model as model_lib
from tlp_jax.train import step as step_lib
from tlp_jax.train import writer as writer_lib


@dataclasses.dataclass
class TrainResult:
  """What ``train_and_evaluate`` returns: the final state (host) and last validation metrics."""

  state: step_lib.TrainState
  validation: dict[str, float]
  model_config: model_lib.TLPConfig
  hardware: tuple[str, ...]
  best_step: int | None = None  # the step of checkpoints/best (None: no validation data)
  best_validation: dict[str, float] | None = None  # its validation metrics


# What ``data_placement="auto"`` chooses when the training arrays do not fit on the device:
# on one H200 the trainer ran 192k samples/s streamed against 169k from the host (both with
# device prefetch; 195k device-resident), docs/TRAINING.md "Streamed input".
AUTO_OFF_DEVICE_PLACEMENT = "stream"
# ``config.prefetch_to_device`` > 0: whether the look-ahead is filled from a background thread
# (``prefetch.DevicePrefetch``) or inline in the training thread, per placement.
PREFETCH_IN_THREAD = {"host": True, "stream": True}


def _open_stream(
  config: config_lib.TrainConfig,
  train: data.HeadArrays,
  layout: data.BatchLayout,
  steps_per_epoch: int,
  total_steps: int,
  manager: Any,
  restored_meta: Mapping[str, Any] | None,
  start_step: int,
) -> tuple[Any, dict[str, Any]]:
  """The grain iterator of ``data_placement="stream"`` positioned at ``start_step``, and what the
  checkpoints record about its pipeline (``stream_first_step``, ``stream_workers``).

  Resuming, the iterator state saved with the checkpoint is restored into the pipeline it was
  saved from; a checkpoint without one (written by host or device placement, by another number
  of processes or of grain workers) starts a new pipeline at ``start_step``, which yields the
  same batches (``stream.next_batch`` checks every step either way).
  """

  def open_at(first_step: int) -> Any:
    return iter(
      stream.pipeline(
        train,
        layout,
        seed=config.seed,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        by_task=config.batch_order == "by_task",
        first_step=first_step,
        num_workers=config.stream.num_workers,
        read_threads=config.stream.read_threads,
        prefetch_batches=config.stream.prefetch_batches,
      )
    )

  workers = config.stream.num_workers
  if restored_meta is not None:
    first = restored_meta.get("stream_first_step")
    if first is None:
      why = "it was written without the streamed input"
    elif restored_meta.get("stream_workers") != workers:
      why = (
        f"it was written with {restored_meta.get('stream_workers')} grain worker(s), now {workers}"
      )
    else:
      iterator = open_at(int(first))
      try:
        why = checkpoints.restore_data_iterator(manager, start_step, iterator)
      except BaseException:
        iterator.close()  # stops the grain workers it started
        raise
      if why is None:
        logging.info("input stream: restored its iterator state at step %d", start_step)
        return iterator, {"stream_first_step": int(first), "stream_workers": workers}
      iterator.close()
    logging.info(
      "input stream: not restoring its iterator state from checkpoint %d (%s); starting it at "
      "that step",
      start_step,
      why,
    )
  return open_at(start_step), {"stream_first_step": start_step, "stream_workers": workers}


def _device_prefetch(
  config: config_lib.TrainConfig,
  placement: str,
  train: data.HeadArrays,
  layout: data.BatchLayout,
  steps_per_epoch: int,
  total_steps: int,
  start_step: int,
  devices: Sequence[Any],
  batches: Any,
) -> prefetch.DevicePrefetch | None:
  """Host or stream placement's batches of steps ``start_step..`` put on ``devices``
  ``config.prefetch_to_device`` steps ahead; None when that is 0 or the data is on the device.

  Host placement's batches come from ``stream.StepBatch``, the gather of the streamed path
  (host placement's own rows and layout, any step, across epochs); the stream's from its grain
  iterator ``batches``, whose state after each batch is kept for the checkpoints.
  """
  size = config.prefetch_to_device
  if size == 0 or placement not in PREFETCH_IN_THREAD:
    return None
  if placement == "stream":
    fetch, snapshot = (lambda step: stream.next_batch(batches, step)), batches.get_state
  else:
    step_batch = stream.StepBatch(
      train, layout, config.seed, steps_per_epoch, config.batch_order == "by_task"
    )
    fetch, snapshot = (lambda step: step_batch(step)[1:]), None
  return prefetch.DevicePrefetch(
    fetch,
    range(start_step, total_steps),
    devices,
    size,
    snapshot=snapshot,
    thread=PREFETCH_IN_THREAD[placement],
  )


def _close_input(feed: prefetch.DevicePrefetch | None, batches: Any) -> None:
  """Stops the device prefetch's thread, then the grain iterator's threads and worker processes,
  the second even when the first fails."""
  try:
    if feed is not None:
      feed.close()  # first: its thread may be reading the grain iterator
  finally:
    if batches is not None:
      batches.close()


@dataclasses.dataclass(frozen=True)
class ResidentSplit:
  """A validation split copied to every device, and its padded sequential order there."""

  arrays: tuple[Any, ...]
  order: Any
  valid: Any


def resident_split(
  split: data.HeadArrays, layout: data.BatchLayout, devices: Sequence[Any]
) -> ResidentSplit:
  """Copies ``split`` (in row order, padded to whole global batches) to every device."""
  arrays = data.replicate_to_devices(split.arrays, devices)
  order, valid = data.replicate_to_devices(_sequential_order(split.size, layout), devices)
  return ResidentSplit(arrays, order, valid)


def _sequential_order(size: int, layout: data.BatchLayout) -> tuple[np.ndarray, np.ndarray]:
  """Rows ``0..size-1`` in order, padded to whole global batches, and which entries are real."""
  steps = -(-size // layout.global_batch)
  order = np.zeros(steps * layout.global_batch, np.int32)
  order[:size] = np.arange(size, dtype=np.int32)
  return order, np.arange(order.size) < size


def validate(
  p_eval_step: Callable,
  params: Any,
  split: data.HeadArrays,
  layout: data.BatchLayout,
  hardware: Sequence[str],
  ks: Sequence[int],
  resident: ResidentSplit | None = None,
) -> dict[str, float]:
  """Validation: per-head loss summed over sequential batches (as TLP), and quick top-k.

  ``resident`` (the split on every device, ``resident_split``) with ``p_eval_step`` the pmapped
  ``step.eval_step_resident``: batches are gathered on device and dispatched without waiting,
  read back at the end. Otherwise each batch is gathered on the host (``step.eval_step``). The
  same batches either way, so the same results.
  """
  if split.size == 0:
    return {}
  steps = -(-split.size // layout.global_batch)
  outs = []
  if resident is None:
    order, valid = _sequential_order(split.size, layout)
    for s in range(steps):
      sl = layout.local_slice(s)
      batch = data.host_batch(split, order[sl], valid[sl], layout)
      outs.append(data.first_replica(p_eval_step(params, *batch)))
  else:
    for s in range(steps):
      index = np.full((layout.local_devices,), s, np.int32)
      outs.append(p_eval_step(params, resident.arrays, resident.order, resident.valid, index))
    outs = [data.first_replica(out) for out in outs]
  loss_sum = np.zeros(len(hardware), np.float64)
  preds = np.zeros((steps * layout.global_batch, len(hardware)), np.float32)
  for s, (p, per_head) in enumerate(outs):
    preds[s * layout.global_batch : (s + 1) * layout.global_batch] = p
    loss_sum += per_head.astype(np.float64)
  preds = preds[: split.size]
  out = {"val_loss": float(loss_sum.sum())}
  for h, name in enumerate(hardware):
    out[f"val_loss/{name}"] = float(loss_sum[h])
  top = metrics.quick_top_ks(preds, split.scores, split.task_index, ks=tuple(ks), mask=split.mask)
  for k, per_head in top.items():
    for h, name in enumerate(hardware):
      out[f"val_top{k}/{name}"] = float(per_head[h])
  return out


def tensorboard_tags(validation: Mapping[str, float]) -> dict[str, float]:
  """``validate``'s metrics under TensorBoard tags of the ``val/`` group: ``val_loss`` ->
  ``val/loss``, ``val_top1/epyc-9004`` -> ``val/top1/epyc-9004``, ``epoch`` -> ``val/epoch``."""
  return {"val/" + k.removeprefix("val_"): v for k, v in validation.items()}


@contextlib.contextmanager
def _logs_above_bar():
  """Prints every log record of the root logger's handlers above the tqdm bars, not into them.

  ``tqdm.contrib.logging.logging_redirect_tqdm`` only knows plain ``StreamHandler``s; absl's
  handler (which ``train.py``'s log goes through) is not one: it hands each record to its own
  stream handler. So each handler's ``handle`` runs inside ``tqdm.external_write_mode``, which
  clears the bars, lets the record print on a line of its own and redraws them.
  """
  handlers = list(logging.getLogger().handlers)

  def wrapped(handle):
    def handle_above_bar(record):
      with tqdm.tqdm.external_write_mode():
        return handle(record)

    return handle_above_bar

  for h in handlers:
    h.handle = wrapped(h.handle)
  try:
    yield
  finally:
    for h in handlers:
      del h.handle  # back to the class's method


def fits_multi_step(step: int, epoch_end: int, config: config_lib.TrainConfig) -> bool:
  """Whether ``config.steps_per_execution`` steps from ``step`` (the next step to run) may run
  in one call: none of the steps at which the loop logs, checkpoints or ends the epoch falls
  before the call's last step, so the run logs, saves and validates at the same steps as with
  single steps."""
  end = step + config.steps_per_execution  # the step count after the call
  if end > epoch_end:
    return False
  # The first multiple of each period after ``step`` must not come before ``end``.
  return all((step // every + 1) * every >= end for every in _call_periods(config))


def _call_periods(config: config_lib.TrainConfig) -> list[int]:
  """The step periods a multi-step call must not span: logs and step checkpoints."""
  periods = [config.log_every_steps]
  if config.checkpoint_every_steps > 0:
    periods.append(config.checkpoint_every_steps)
  return periods


def log_summary(result: TrainResult, workdir: str, config: config_lib.TrainConfig) -> None:
  """Logs how a run ended: the best checkpoint and its validation metrics, where the
  checkpoints are, and the commands that evaluate and export the model."""
  root = os.path.join(os.path.abspath(workdir), checkpoints.CHECKPOINT_DIR)
  metrics_text = lambda m: ", ".join(  # noqa: E731
    f"{k}={v:.4g}" for k, v in (m or {}).items() if k != "epoch" and isinstance(v, float)
  )
  step = int(result.state.step)
  if result.best_step is not None:
    best = result.best_validation or {}
    epoch = f" (epoch {best['epoch']})" if "epoch" in best else ""
    logging.info(
      "training done at step %d. Best checkpoint: step %d%s, %s: %s",
      step,
      result.best_step,
      epoch,
      os.path.join(root, checkpoints.BEST),
      metrics_text(best) or "metrics in its checkpoint",
    )
    which = "best"
  else:
    logging.info("training done at step %d (no validation data, so no best checkpoint)", step)
    which = "latest"
  logging.info(
    "latest checkpoint: %s; last validation: %s",
    os.path.join(root, checkpoints.LATEST),
    metrics_text(result.validation) or "none",
  )
  data_dir = config.data_dir or "DATA_DIR"
  dataset = "" if config.dataset == result.hardware[0] else f" --dataset {config.dataset}"
  logging.info(
    "next: evaluate on the hold-out networks with\n"
    "  python eval.py --workdir %s --checkpoint %s --hw %s --data_dir %s%s\n"
    "and export the model for the NumPy predictor / TVM with\n"
    "  python -m tlp_jax.train.export --workdir %s --which %s --out %s",
    workdir,
    which,
    result.hardware[0],
    data_dir,
    dataset,
    workdir,
    which,
    os.path.join(workdir, "model.npz"),
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict | config_lib.TrainConfig,
  workdir: str,
  *,
  dataset: Any | None = None,
  devices: Sequence[Any] | None = None,
  allow_changes: Sequence[str] = (),
) -> TrainResult:
  """Trains (or resumes training), validating every ``config.eval_every_epochs`` epochs and
  after the last; checkpoints into ``workdir``.

  Args:
    config: training config (see ``configs/default.py``), or its ``config.TrainConfig``.
    workdir: output directory: checkpoints, TensorBoard events, model/dataset metadata. If it
      holds checkpoints of the same run, training resumes from the latest one.
    dataset: a ``loader.DatasetArrays`` (or an object with the same fields); loaded
      from ``config.data_dir`` / ``config.dataset`` when None.
    devices: local devices to use (default: all).
    allow_changes: fields of ``config.OVERRIDABLE_FIELDS`` that may differ from the run already
      in ``workdir`` (e.g. ``num_epochs`` to extend it); the change is recorded there. Any other
      difference is refused (``checkpoints.reconcile_train_config``).

  Returns:
    The final state and validation metrics.

  Raises:
    config.ConfigError: the config does not fit the data (no ``data_dir``, unknown hardware,
      loop tokens required but absent, ...).
    loader.DatasetNotFoundError: nothing built at ``config.data_dir`` for ``config.dataset``.
    checkpoints.CheckpointError: the workdir holds another run, or no readable checkpoint.
  """
  if not isinstance(config, config_lib.TrainConfig):
    config = config_lib.from_config_dict(config)
  if (
    config.deterministic_gpu_ops
    and jax.default_backend() == "gpu"
    and not runtime.deterministic_gpu_ops_enabled()
  ):
    logging.warning(
      "config.deterministic_gpu_ops is set but XLA_FLAGS lacks %s, and JAX has "
      "started: this run is not reproducible across processes. Call "
      "tlp_jax.train.runtime.enable_deterministic_gpu_ops() before JAX starts "
      "(train.py does).",
      runtime.DETERMINISTIC_GPU_FLAG,
    )
  # Steps are traced inside this context, so it sets the precision of every float32 matmul of
  # the model and loss ("default" is TF32 on Ampere/Hopper GPUs; "highest" is true float32).
  with jax.default_matmul_precision(config.matmul_precision):
    return _train_and_evaluate(config, workdir, dataset, devices, tuple(allow_changes))


def load_dataset(config: config_lib.TrainConfig) -> Any:
  """``loader.load_arrays(config.data_dir, config.dataset)``, with a clear error when
  ``config.data_dir`` is empty or missing (the message says what to pass)."""
  if not config.data_dir:
    raise config_lib.ConfigError(
      "config.data_dir is empty: pass --config.data_dir=DATA_DIR, the --data_dir that "
      "python -m data_pipelines.build built the dataset into"
    )
  if not os.path.isdir(config.data_dir):
    raise config_lib.ConfigError(
      f"config.data_dir={config.data_dir!r} does not exist: pass the --data_dir that "
      "python -m data_pipelines.build built the dataset into, or build it there first"
    )
  return loader.load_arrays(config.data_dir, config.dataset)


def _train_and_evaluate(
  config: config_lib.TrainConfig,
  workdir: str,
  dataset: Any | None,
  devices: Sequence[Any] | None,
  allow_changes: tuple[str, ...] = (),
) -> TrainResult:
  """``train_and_evaluate`` under the configured matmul precision."""
  # pmap wants the *global* device list in multi-process runs (its default); an explicit
  # subset is for single-process use (tests, 1-device runs).
  pmap_devices = list(devices) if devices is not None else None
  devices = list(devices) if devices is not None else jax.local_devices()
  layout = data.BatchLayout.create(config.batch_size, devices)
  eval_layout = data.BatchLayout.create(config.eval_batch_size, devices)
  is_chief = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  if dataset is None:
    dataset = load_dataset(config)
  try:  # these check the config against the dataset: a mismatch is the user's to fix
    columns = data.head_columns(list(dataset.hardware), list(config.hardware))
    hardware = tuple(str(dataset.hardware[c]) for c in columns)
    loop_tokens = data.reads_loop_tokens(config.loop_tokens, dataset)
    if loop_tokens:
      dataset = data.crop_loop_tokens(dataset, config.max_loop_tokens)
    model_config = data.model_config_for(
      config.model,
      config.loop_tokens,
      dataset,
      num_hardware_heads=len(hardware),
      reads_tokens=loop_tokens,
    )
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e
  # Loop tokens are kept in their own (float16) array and assembled per batch.
  train = data.select_heads(dataset.train, columns, loop_tokens)
  val = data.select_heads(dataset.validation, columns, loop_tokens)
  if train.size == 0:
    raise ValueError(f"no training records with labels for hardware {list(hardware)}")
  train = dataclasses.replace(
    train,
    mask=data.few_shot_mask(
      train.mask, config.few_shot.num_labels, config.few_shot.fraction, config.seed
    ),
  )

  steps_per_epoch = -(-train.size // layout.global_batch)
  num_epochs = config.num_epochs
  total_steps = steps_per_epoch * num_epochs
  tx, schedule = optimizer.make_optimizer(
    config.optim, steps_per_epoch, total_steps, model_config.ensemble_size
  )
  tx = init_from.wrap_optimizer(tx, config.init_mode)
  # A source to start from is checked before the workdir is touched (init_from.py). A run
  # that has a checkpoint of its own resumes from it and never reads the source again, so a
  # fine-tuning run still resumes after its source was moved or deleted.
  latest_dir = os.path.join(workdir, checkpoints.CHECKPOINT_DIR, checkpoints.LATEST)
  has_own_checkpoint = any(
    checkpoints.TMP_MARKER not in e for e in checkpoints.step_entries(latest_dir)
  )
  source = None
  if config.init_from and not has_own_checkpoint:
    source = init_from.load_source(config.init_from)
    init_from.check_compatible(
      source, model_config, data.dataset_meta(dataset, hardware, loop_tokens)
    )

  # A workdir belongs to one run: refuse to mix runs (a different model or data would make
  # the checkpoints meaningless; different settings would resume into a hybrid). The training
  # config first: its message names every differing field with both values.
  # Recorded with the heads actually trained: an empty ``hardware`` (= the dataset's) and the
  # same heads named explicitly are one run, and workdirs recorded either way resume.
  recorded_config = dict(config.to_dict(), hardware=tuple(hardware))
  checkpoints.reconcile_train_config(workdir, recorded_config, allow_changes, write=False)
  checkpoints.check_or_write_json(
    os.path.join(workdir, checkpoints.MODEL_CONFIG_FILE),
    model_config.to_dict(),
    "model config",
    write=is_chief,
  )
  checkpoints.check_or_write_json(
    os.path.join(workdir, checkpoints.DATASET_META_FILE),
    data.dataset_meta(dataset, hardware, loop_tokens),
    "dataset",
    write=is_chief,
  )
  if is_chief and loop_tokens:
    checkpoints.copy_skeletons(getattr(dataset, "skeletons_path", None), workdir)
  run_identity = {
    "num_train": train.size,
    "global_batch": layout.global_batch,
    "steps_per_epoch": steps_per_epoch,
    "seed": config.seed,
  }

  state = step_lib.create_train_state(model_config, tx, config.seed)
  if is_chief:
    checkpoints.remove_interrupted_saves(workdir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("tlp_jax.loop.removed_interrupted_saves")
  latest_mgr, best_mgr = checkpoints.checkpoint_managers(workdir, config.checkpoints_to_keep)
  best_val = math.inf
  best_step: int | None = best_mgr.latest_step()
  best_validation: dict[str, Any] | None = None
  validation: dict[str, Any] = {}
  restored_meta: dict[str, Any] | None = None
  if latest_mgr.latest_step() is not None or checkpoints.step_entries(str(latest_mgr.directory)):
    state, meta = checkpoints.restore_newest_readable(latest_mgr, state, workdir, move=is_chief)
    restored_meta = meta
    mismatch = {k: (meta.get(k), v) for k, v in run_identity.items() if meta.get(k) != v}
    if mismatch:
      raise checkpoints.CheckpointError(
        f"checkpoint {latest_mgr.directory}/{int(state.step)} comes from an incompatible run "
        f"(checkpoint vs now: {mismatch}); use another workdir"
      )
    validation = dict(meta.get("validation") or {})
    best_val = meta.get("best_val_loss")
    best_val = math.inf if best_val is None else float(best_val)
    best_validation = meta.get("best_validation")
    logging.info(
      "resumed from %s at step %d (epoch %d, after %d of its %d steps)",
      latest_mgr.directory,
      int(state.step),
      meta["epoch"] + 1,  # 1-based, as the bar and the validation log count epochs
      meta["step_in_epoch"],
      steps_per_epoch,
    )
  elif source is not None:
    state = init_from.initial_state(source, state, tx, model_config, hardware)
  start_step = int(state.step)
  # Recorded once every guard has passed (the checkpoint's run identity too), so a refused run
  # leaves no trace.
  checkpoints.reconcile_train_config(workdir, recorded_config, allow_changes, write=is_chief)

  attention = model_lib.resolve_attention(
    config.attention_impl, model_config.dtype, cuda=data.has_cudnn_attention(devices[0])
  )
  model = model_lib.TLPModel(model_config, attention_impl=attention)
  logging.info("model: %s compute, attention %s", model_config.dtype, attention)
  step_kwargs = dict(model=model, tx=tx, loss_config=config.loss)
  placement = config.data_placement
  budget = None  # bytes the resident arrays may take; None = not limited (placement "device")
  if placement == "auto":
    budget = data.device_data_budget(config.device_data_max_bytes, devices)
    if jax.process_count() > 1:
      # Every process must choose the same placement (they compile one pmapped program with
      # cross-process collectives); "auto" reads each process's own free memory: take the least.
      from jax.experimental import multihost_utils

      budget = int(np.min(multihost_utils.process_allgather(np.int64(budget))))
    placement = "device" if train.nbytes <= budget else AUTO_OFF_DEVICE_PLACEMENT
    logging.info(
      "data placement auto: %s (training arrays %.2f GiB, device budget %.2f GiB)",
      placement,
      train.nbytes / 2**30,
      budget / 2**30,
    )
  # Device placement runs ``config.steps_per_execution`` steps per dispatch where no log,
  # checkpoint or epoch end falls inside them (``fits_multi_step``), single steps elsewhere.
  p_train_many = None
  if placement == "device":
    resident_kwargs = dict(
      steps_per_epoch=steps_per_epoch, global_batch=layout.global_batch, **step_kwargs
    )
    p_train = jax.pmap(
      functools.partial(step_lib.train_step_resident, **resident_kwargs),
      axis_name=data.AXIS,
      devices=pmap_devices,
      donate_argnums=(0,),
    )
    if config.steps_per_execution > 1:
      if any(p % config.steps_per_execution for p in _call_periods(config)):
        logging.warning(
          "config.steps_per_execution=%d does not divide log_every_steps=%d / "
          "checkpoint_every_steps=%d: the steps before each log or checkpoint run one per "
          "call, which gives back most of the gain",
          config.steps_per_execution,
          config.log_every_steps,
          config.checkpoint_every_steps,
        )
      p_train_many = jax.pmap(
        functools.partial(
          step_lib.train_steps_resident, num_steps=config.steps_per_execution, **resident_kwargs
        ),
        axis_name=data.AXIS,
        devices=pmap_devices,
        donate_argnums=(0,),
      )
    resident = data.replicate_to_devices(train.arrays, devices)
  else:  # host or stream: the same batches, gathered in this thread or by grain ahead of the step
    p_train = jax.pmap(
      functools.partial(step_lib.train_step, **step_kwargs),
      axis_name=data.AXIS,
      devices=pmap_devices,
      donate_argnums=(0,),
    )
  # Validation arrays go on the devices too when the training arrays do and both fit: each
  # validation then runs without host gathers (bench/README.md, "Validation on device").
  resident_val = None
  eval_kwargs = dict(model=model, loss_config=config.loss)
  if placement == "device" and val.size and (budget is None or train.nbytes + val.nbytes <= budget):
    resident_val = resident_split(val, eval_layout, devices)
    p_eval = jax.pmap(
      functools.partial(
        step_lib.eval_step_resident, global_batch=eval_layout.global_batch, **eval_kwargs
      ),
      axis_name=data.AXIS,
      devices=pmap_devices,
    )
  else:
    p_eval = jax.pmap(
      functools.partial(step_lib.eval_step, **eval_kwargs),
      axis_name=data.AXIS,
      devices=pmap_devices,
    )
  logging.info(
    "training %d records (%s), %d validation, heads %s, %d steps/epoch x %d epochs, "
    "batch %d on %d device(s), data on %s",
    train.size,
    model_config,
    val.size,
    hardware,
    steps_per_epoch,
    num_epochs,
    layout.global_batch,
    layout.num_devices,
    placement,
  )

  order_by_task = train.task_index if config.batch_order == "by_task" else None
  epoch_order_of = functools.partial(
    data.epoch_order,
    config.seed,
    n=train.size,
    steps_per_epoch=steps_per_epoch,
    global_batch=layout.global_batch,
    task_index=order_by_task,
  )
  # One thread computes the next epoch's order while this one trains (a pure function of the
  # seed and the epoch: the same orders as computed in turn).
  orders = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-order")
  upcoming: tuple[int, concurrent.futures.Future] | None = None
  # The grain iterator (stream placement) and the device prefetch (host, stream) hold threads
  # and worker processes: opened inside the try below, whose finally closes them.
  batches: Any = None
  feed: prefetch.DevicePrefetch | None = None
  saved_input: Any = None
  stream_meta: dict[str, Any] = {}
  writer = writer_lib.MetricWriter(workdir, enabled=is_chief)
  if start_step == 0:
    val_tags = [f"val/loss/{h}" for h in hardware]
    val_tags += [f"val/top{k}/{h}" for k in config.eval_top_k for h in hardware]
    writer.write_hparams(config.to_dict(), val_tags)
  rstate = data.replicate_to_devices(state, devices)

  def meta_for(step: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    epoch, in_epoch = divmod(step, steps_per_epoch)
    m = dict(
      run_identity,
      step=step,
      epoch=epoch,
      step_in_epoch=in_epoch,
      best_val_loss=best_val if math.isfinite(best_val) else None,
      best_validation=best_validation,
    )
    m.update(stream_meta)
    m.update(extra or {})
    return m

  def host_state() -> step_lib.TrainState:
    return data.first_replica(rstate)

  # The bar counts samples; its postfix names the 1-based epoch, as the log does.
  bar = tqdm.tqdm(
    total=total_steps * layout.global_batch,
    initial=start_step * layout.global_batch,
    unit="sample",
    unit_scale=True,
    dynamic_ncols=True,
    disable=not is_chief,
    desc="train",
  )
  pending: list[dict[str, jax.Array]] = []
  last_log_time, last_log_step = time.time(), start_step
  step = start_step
  logs_above_bar = _logs_above_bar() if is_chief else contextlib.nullcontext()
  try:
    if placement == "stream":
      batches, stream_meta = _open_stream(
        config, train, layout, steps_per_epoch, total_steps, latest_mgr, restored_meta, start_step
      )
    # Host and stream placement: the batches put on the devices ahead of their steps, or None.
    feed = _device_prefetch(
      config, placement, train, layout, steps_per_epoch, total_steps, start_step, devices, batches
    )
    # What a checkpoint saves of the input stream: what the training loop has taken of it.
    saved_input = feed if feed is not None and batches is not None else batches
    with logs_above_bar:
      for epoch in range(start_step // steps_per_epoch, num_epochs):
        epoch_start = time.perf_counter()
        if placement == "device" or (placement == "host" and feed is None):
          # The epoch's order, computed ahead during the previous epoch (the first one here):
          # at TenSet scale it takes ~1 s of host time that the device would otherwise wait.
          if upcoming is None or upcoming[0] != epoch:
            upcoming = (epoch, orders.submit(epoch_order_of, epoch))
          order, valid = upcoming[1].result()
          if epoch + 1 < num_epochs:
            upcoming = (epoch + 1, orders.submit(epoch_order_of, epoch + 1))
        if placement == "device":
          d_order, d_valid = data.replicate_to_devices((order, valid), devices)
        # Small datasets run many short epochs; validating and checkpointing each one can cost
        # more than the training steps (bench/README.md).
        validates = (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == num_epochs
        epoch_end = (epoch + 1) * steps_per_epoch
        while step < epoch_end:
          done = 1  # steps this call runs
          if p_train_many is not None and fits_multi_step(step, epoch_end, config):
            rstate, m = p_train_many(rstate, resident, d_order, d_valid)
            done = config.steps_per_execution
          elif placement == "device":
            rstate, m = p_train(rstate, resident, d_order, d_valid)
          elif feed is not None:
            rstate, m = p_train(rstate, *feed.next_batch(step))
          elif placement == "stream":
            rstate, m = p_train(rstate, *stream.next_batch(batches, step))
          else:
            sl = layout.local_slice(step - epoch * steps_per_epoch)
            rstate, m = p_train(rstate, *data.host_batch(train, order[sl], valid[sl], layout))
          step += done
          pending.append(m)
          bar.update(done * layout.global_batch)
          if step % config.log_every_steps == 0 or step == epoch_end:
            # Every step's metrics count once, whether it ran alone or in a multi-step call
            # (whose metrics carry one entry per step).
            got = [data.first_replica(p) for p in pending]
            now = time.time()
            per_head = np.concatenate(
              [np.reshape(g["loss_per_head"], (-1, len(hardware))) for g in got]
            )
            scalars = {
              "train/loss": float(np.mean(np.concatenate([np.ravel(g["loss"]) for g in got]))),
              "train/grad_norm": float(
                np.mean(np.concatenate([np.ravel(g["grad_norm"]) for g in got]))
              ),
              "train/learning_rate": float(schedule(step - 1)),
              "train/samples_per_sec": (step - last_log_step)
              * layout.global_batch
              / max(now - last_log_time, 1e-9),
              "train/epoch": epoch + 1,
            }
            for h, name in enumerate(hardware):
              scalars[f"train/loss/{name}"] = float(np.mean(per_head[:, h]))
            if not np.isfinite(scalars["train/loss"]):
              raise FloatingPointError(f"non-finite training loss at step {step}")
            writer.write_scalars(step, scalars)
            bar.set_postfix(epoch=epoch + 1, loss=f"{scalars['train/loss']:.4g}")
            pending.clear()
            last_log_time, last_log_step = now, step
          every = config.checkpoint_every_steps
          # A validated epoch's last step is saved below, with its validation metrics.
          if every > 0 and step % every == 0 and not (step == epoch_end and validates):
            checkpoints.save_checkpoint(latest_mgr, host_state(), meta_for(step), saved_input)

        if not validates:
          continue
        val_start = time.perf_counter()
        validation = validate(
          p_eval, rstate.params, val, eval_layout, hardware, config.eval_top_k, resident_val
        )
        val_end = time.perf_counter()
        validation["epoch"] = epoch + 1
        writer.write_scalars(step, tensorboard_tags(validation))
        hstate = host_state()
        target_loss = validation.get(f"val_loss/{hardware[0]}", math.nan)
        if val.size and math.isfinite(target_loss) and target_loss < best_val:
          best_val, best_step, best_validation = target_loss, step, dict(validation)
          checkpoints.save_checkpoint(best_mgr, hstate, meta_for(step, {"validation": validation}))
          # Orbax's multi-host barriers are named by step: let this save finish before the
          # latest manager saves the same step.
          best_mgr.wait_until_finished()
        checkpoints.save_checkpoint(
          latest_mgr, hstate, meta_for(step, {"validation": validation}), saved_input
        )
        # Where an epoch's wall time goes: the steps (and the order), the validation, and the
        # checkpoints (the state's copy to the host and the saves).
        now = time.perf_counter()
        writer.write_scalars(
          step,
          {
            "time/epoch_s": now - epoch_start,
            "time/validation_s": val_end - val_start,
            "time/checkpoint_s": now - val_end,
          },
        )
  finally:
    try:
      bar.close()
      latest_mgr.wait_until_finished()
      best_mgr.wait_until_finished()
      latest_mgr.close()
      best_mgr.close()
      writer.close()
    finally:
      orders.shutdown(wait=True, cancel_futures=True)
      _close_input(feed, batches)
  result = TrainResult(
    state=host_state(),
    validation=validation,
    model_config=model_config,
    hardware=hardware,
    best_step=best_step,
    best_validation=best_validation,
  )
  if is_chief:
    log_summary(result, workdir, config)
  return result
