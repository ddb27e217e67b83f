"""The training loop: ``train_and_evaluate(config, workdir)`` is the whole job behind ``train.py``.

* the dataset comes from ``data_pipelines.loader.load_arrays``; ``data`` selects the heads,
  masks few-shot labels, orders each epoch and lays batches out over the devices;
* each epoch runs ``ceil(N / batch)`` steps of ``step.train_step`` under ``pmap``, the last
  batch padded with masked rows (the losses ignore them), so every record is used once per
  epoch, as TLP's data loader does; the training arrays either live on every device
  (``data_placement="device"``, no host->device traffic per step) or are gathered on the host
  per step (``"host"``); both give identical batches;
* validation (``validate``) every ``eval_every_epochs`` epochs and after the last: per-head loss
  summed over the validation batches (as TLP reports it) and the quick top-k of
  ``tlp_jax.core.metrics``;
* checkpoints (``checkpoints``): the latest every ``checkpoint_every_steps`` and at each
  validated epoch end, the best by target-head validation loss; a restarted run resumes exactly
  where its checkpoint was taken and ends with the same parameters as an unbroken run.
"""

from __future__ import annotations

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
from tlp_jax.train import checkpoints, data, init_from, optimizer, runtime
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


def validate(
  p_eval_step: Callable,
  params: Any,
  split: data.HeadArrays,
  layout: data.BatchLayout,
  hardware: Sequence[str],
  ks: Sequence[int],
) -> dict[str, float]:
  """Validation: per-head loss summed over sequential batches (as TLP), and quick top-k."""
  if split.size == 0:
    return {}
  steps = -(-split.size // layout.global_batch)
  order = np.zeros(steps * layout.global_batch, np.int32)
  order[: split.size] = np.arange(split.size, dtype=np.int32)
  valid = np.arange(order.size) < split.size
  loss_sum = np.zeros(len(hardware), np.float64)
  preds = np.zeros((steps * layout.global_batch, len(hardware)), np.float32)
  for s in range(steps):
    sl = layout.local_slice(s)
    batch = data.host_batch(split, order[sl], valid[sl], layout)
    p, per_head = data.first_replica(p_eval_step(params, *batch))
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


def train_and_evaluate(
  config: ml_collections.ConfigDict | config_lib.TrainConfig,
  workdir: str,
  *,
  dataset: Any | None = None,
  devices: Sequence[Any] | None = None,
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

  Returns:
    The final state and validation metrics.
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
    return _train_and_evaluate(config, workdir, dataset, devices)


def _train_and_evaluate(
  config: config_lib.TrainConfig, workdir: str, dataset: Any | None, devices: Sequence[Any] | None
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
    dataset = loader.load_arrays(config.data_dir, config.dataset)
  columns = data.head_columns(list(dataset.hardware), list(config.hardware))
  hardware = tuple(str(dataset.hardware[c]) for c in columns)
  loop_tokens = data.reads_loop_tokens(config.loop_tokens, dataset)
  model_config = data.model_config_for(
    config.model, config.loop_tokens, dataset, num_hardware_heads=len(hardware)
  )
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
  # A source to start from is checked before the workdir is touched (init_from.py).
  source = None
  if config.init_from:
    source = init_from.load_source(config.init_from)
    init_from.check_compatible(
      source, model_config, data.dataset_meta(dataset, hardware, loop_tokens)
    )

  # A workdir belongs to one run: refuse to mix runs (a different model or data would make
  # the checkpoints meaningless).
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
  if is_chief:
    checkpoints.write_json(os.path.join(workdir, checkpoints.TRAIN_CONFIG_FILE), config.to_dict())
    if loop_tokens:
      checkpoints.copy_skeletons(getattr(dataset, "skeletons_path", None), workdir)
  run_identity = {
    "num_train": train.size,
    "global_batch": layout.global_batch,
    "steps_per_epoch": steps_per_epoch,
    "seed": config.seed,
  }

  state = step_lib.create_train_state(model_config, tx, config.seed)
  latest_mgr, best_mgr = checkpoints.checkpoint_managers(workdir, config.checkpoints_to_keep)
  best_val = math.inf
  validation: dict[str, Any] = {}
  if latest_mgr.latest_step() is not None or checkpoints.step_entries(str(latest_mgr.directory)):
    state, meta = checkpoints.restore_checkpoint(latest_mgr, state)
    mismatch = {k: (meta.get(k), v) for k, v in run_identity.items() if meta.get(k) != v}
    if mismatch:
      raise checkpoints.CheckpointError(
        f"checkpoint {latest_mgr.directory}/{int(state.step)} comes from an incompatible run "
        f"(checkpoint vs now: {mismatch}); use another workdir"
      )
    validation = dict(meta.get("validation") or {})
    best_val = meta.get("best_val_loss")
    best_val = math.inf if best_val is None else float(best_val)
    logging.info(
      "resumed from %s at step %d (epoch %d, step %d in epoch)",
      latest_mgr.directory,
      int(state.step),
      meta["epoch"],
      meta["step_in_epoch"],
    )
  elif source is not None:
    state = init_from.initial_state(source, state, tx, model_config, hardware)
  start_step = int(state.step)

  model = model_lib.TLPModel(model_config)
  step_kwargs = dict(model=model, tx=tx, loss_config=config.loss)
  placement = config.data_placement
  if placement == "auto":
    placement = "device" if train.nbytes <= config.device_data_max_bytes else "host"
  if placement == "device":
    p_train = jax.pmap(
      functools.partial(
        step_lib.train_step_resident,
        steps_per_epoch=steps_per_epoch,
        global_batch=layout.global_batch,
        **step_kwargs,
      ),
      axis_name=data.AXIS,
      devices=pmap_devices,
      donate_argnums=(0,),
    )
    resident = data.replicate_to_devices(train.arrays, devices)
  else:
    p_train = jax.pmap(
      functools.partial(step_lib.train_step, **step_kwargs),
      axis_name=data.AXIS,
      devices=pmap_devices,
      donate_argnums=(0,),
    )
  p_eval = jax.pmap(
    functools.partial(step_lib.eval_step, model=model, loss_config=config.loss),
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

  writer = writer_lib.MetricWriter(workdir, enabled=is_chief)
  if start_step == 0:
    writer.write_hparams(config.to_dict())
  rstate = data.replicate_to_devices(state, devices)

  def meta_for(step: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    epoch, in_epoch = divmod(step, steps_per_epoch)
    m = dict(
      run_identity,
      step=step,
      epoch=epoch,
      step_in_epoch=in_epoch,
      best_val_loss=best_val if math.isfinite(best_val) else None,
    )
    m.update(extra or {})
    return m

  def host_state() -> step_lib.TrainState:
    return data.first_replica(rstate)

  order_by_task = train.task_index if config.batch_order == "by_task" else None
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
  try:
    for epoch in range(start_step // steps_per_epoch, num_epochs):
      order, valid = data.epoch_order(
        config.seed, epoch, train.size, steps_per_epoch, layout.global_batch, order_by_task
      )
      if placement == "device":
        d_order, d_valid = data.replicate_to_devices((order, valid), devices)
      for in_epoch in range(step - epoch * steps_per_epoch, steps_per_epoch):
        if placement == "device":
          rstate, m = p_train(rstate, resident, d_order, d_valid)
        else:
          sl = layout.local_slice(in_epoch)
          rstate, m = p_train(rstate, *data.host_batch(train, order[sl], valid[sl], layout))
        step += 1
        pending.append(m)
        bar.update(layout.global_batch)
        if step % config.log_every_steps == 0 or in_epoch == steps_per_epoch - 1:
          got = [data.first_replica(p) for p in pending]
          now = time.time()
          scalars = {
            "train_loss": float(np.mean([g["loss"] for g in got])),
            "grad_norm": float(np.mean([g["grad_norm"] for g in got])),
            "learning_rate": float(schedule(step - 1)),
            "samples_per_sec": (step - last_log_step)
            * layout.global_batch
            / max(now - last_log_time, 1e-9),
          }
          for h, name in enumerate(hardware):
            scalars[f"train_loss/{name}"] = float(np.mean([g["loss_per_head"][h] for g in got]))
          if not np.isfinite(scalars["train_loss"]):
            raise FloatingPointError(f"non-finite training loss at step {step}")
          writer.write_scalars(step, scalars)
          bar.set_postfix(loss=f"{scalars['train_loss']:.4g}", epoch=epoch)
          pending.clear()
          last_log_time, last_log_step = now, step
        every = config.checkpoint_every_steps
        if every > 0 and step % every == 0 and in_epoch != steps_per_epoch - 1:
          checkpoints.save_checkpoint(latest_mgr, host_state(), meta_for(step))

      # Small datasets run many short epochs; validating and checkpointing each one can cost
      # more than the training steps (bench/README.md).
      if (epoch + 1) % config.eval_every_epochs != 0 and epoch + 1 != num_epochs:
        continue
      validation = validate(p_eval, rstate.params, val, eval_layout, hardware, config.eval_top_k)
      validation["epoch"] = epoch + 1
      writer.write_scalars(step, validation)
      hstate = host_state()
      target_loss = validation.get(f"val_loss/{hardware[0]}", math.nan)
      if val.size and math.isfinite(target_loss) and target_loss < best_val:
        best_val = target_loss
        checkpoints.save_checkpoint(best_mgr, hstate, meta_for(step, {"validation": validation}))
        # Orbax's multi-host barriers are named by step: let this save finish before the
        # latest manager saves the same step.
        best_mgr.wait_until_finished()
      checkpoints.save_checkpoint(latest_mgr, hstate, meta_for(step, {"validation": validation}))
  finally:
    bar.close()
    latest_mgr.wait_until_finished()
    best_mgr.wait_until_finished()
    latest_mgr.close()
    best_mgr.close()
    writer.close()
  return TrainResult(
    state=host_state(), validation=validation, model_config=model_config, hardware=hardware
  )
