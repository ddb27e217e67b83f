"""What ``eval.py`` does but writing: find the data, load the model, return the top-k report.

One prediction path: every model is evaluated through the pure-NumPy predictor
(:class:`tlp_jax.core.predictor.Predictor`), loaded from an exported ``.npz`` or exported in
memory from a training workdir (:func:`load_predictor`), so a workdir is scored by exactly the
code that serves it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import loader, schema
from tlp_jax.core import metrics
from tlp_jax.core import predictor as npred
from tlp_jax.evaluation import topk
from tlp_jax.evaluation.data import EvalError, eval_data, hardware_index
from tlp_jax.train import checkpoints
from tlp_jax.train import export as train_export

WORKDIR_ROW = "TLP (workdir)"

# ---- models --------------------------------------------------------------------------------


def _export_workdir_in_memory(workdir: str, which: str) -> dict[str, np.ndarray]:
  """The export arrays of a training workdir's checkpoint ``which``, without writing a file.

  The one place this package reaches into the trainer.
  """
  try:
    params, model_config, meta = train_export.restore_for_export(workdir, which)
  except (FileNotFoundError, checkpoints.CheckpointError) as e:
    raise EvalError(str(e)) from None
  return train_export.export_params(params, model_config, **train_export.meta_kwargs(meta))


def load_predictor(
  model_path: str | None = None, workdir: str | None = None, which: str = "best"
) -> tuple[npred.Predictor, dict[str, Any]]:
  """The NumPy predictor of an exported ``.npz`` or of a training workdir, and a description.

  Args:
    model_path: exported ``.npz`` (exclusive with ``workdir``).
    workdir: training workdir, exported in memory.
    which: checkpoint of the workdir, "best" or "latest".

  Returns:
    ``(predictor, info)``: the predictor and a JSON-able dict.

  Raises:
    EvalError: not exactly one source, or it cannot be read.
  """
  if (model_path is None) == (workdir is None):
    raise EvalError("give exactly one of a model file and a workdir")
  if model_path is not None:
    if not os.path.exists(model_path):
      raise EvalError(f"{model_path}: no such model file")
    try:
      predictor = npred.Predictor.load(model_path)
    except npred.PredictorError as e:
      raise EvalError(str(e)) from None
    info = {"model_file": os.path.abspath(model_path)}
  else:
    predictor = npred.Predictor.from_arrays(_export_workdir_in_memory(workdir, which))
    info = {"workdir": os.path.abspath(workdir), "checkpoint": which}
  info.update(
    {
      "heads": list(predictor.hardware),
      "step": int(predictor.step),
      "vocab_version": predictor.vocab_version,
    }
  )
  return predictor, info


def predictor_fn(predictor: npred.Predictor, hw: str, arrays=None) -> Callable[..., np.ndarray]:
  """``features -> scores`` of the predictor's head ``hw``; for a model of loop tokens
  ``(features, loop_tokens) -> scores`` (its input is assembled per batch by the predictor).

  Raises:
    EvalError: the model has no head ``hw``, or (given the dataset ``arrays``) was trained on
      features of another platform or crop, or reads loop tokens the dataset lacks.
  """
  head = hardware_index(predictor.hardware, hw, what=f"the model's heads ({predictor.source})")
  tokens = predictor.reads_loop_tokens
  if arrays is not None:
    if predictor.platform != arrays.platform:
      raise EvalError(
        f"the model was trained on {predictor.platform} features, the dataset "
        f"has {arrays.platform} features"
      )
    crop = predictor.step_crop if tokens else tuple(predictor.crop)
    if tuple(crop) != tuple(arrays.crop):
      raise EvalError(
        f"the model expects features cropped to {tuple(crop)}, the dataset has {tuple(arrays.crop)}"
      )
    if tokens:
      _check_loop_tokens(predictor, arrays)
    if predictor.vocab_json != arrays.vocab_json:
      # Same platform and crop but another vocabulary (e.g. a dataset built with more records):
      # token ids of entries both know agree, new ones are unseen by the model.
      logging.warning(
        "the model's feature vocabulary (version %s) differs from the dataset's; "
        "steps unknown to the model get ids it never saw",
        predictor.vocab_version,
      )
  name = predictor.hardware[head]
  if tokens:
    return lambda x, loop_tokens: predictor.predict(x, hw=name, loop_tokens=loop_tokens)
  return lambda x: predictor.predict(x, hw=name)


def _check_loop_tokens(predictor: npred.Predictor, arrays) -> None:
  """The dataset has loop tokens of the model's layout, at least as many per program."""
  layout = (getattr(arrays, "metadata", None) or {}).get("loop_tokens")
  if not layout:
    raise EvalError(
      f"the model reads loop tokens; dataset "
      f"{getattr(arrays, 'config_name', '?')!r} has none (build it with them)"
    )
  have = (int(layout["layout_version"]), int(layout["max_tokens"]), int(layout["width"]))
  if (have[0], have[2]) != (predictor.loop_tokens_version, predictor.token_width) or (
    have[1] < predictor.max_tokens
  ):
    raise EvalError(
      f"the model reads {predictor.max_tokens} loop tokens of layout "
      f"{predictor.loop_tokens_version} ({predictor.token_width} columns); the "
      f"dataset has {have[1]} of layout {have[0]} ({have[2]} columns)"
    )


# ---- data ----------------------------------------------------------------------------------


def built_hardware(data_dir: str) -> dict[str, tuple[str, ...]]:
  """``{config name: hardware}`` of every dataset config built under ``data_dir``."""
  root = os.path.join(data_dir, schema.BUILDER_NAME)
  out = {}
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    try:
      ds_dir = loader.find_dataset_dir(data_dir, name)
      with open(os.path.join(ds_dir, "metadata.json"), "rb") as f:
        out[name] = tuple(json.load(f)["hardware"])
    except (loader.DatasetNotFoundError, OSError, KeyError, ValueError) as e:
      logging.warning("skipping dataset config %s: %s", name, e)
  return out


def resolve_config(data_dir: str, hw: str, dataset: str | None = None) -> str:
  """The dataset config to evaluate ``hw`` on: ``dataset`` if given, else the per-hardware
  config named ``hw``, else the first built config that has ``hw``.

  Raises:
    EvalError: nothing built in ``data_dir`` has ``hw`` (the message lists what is there).
  """
  if dataset is not None:
    return dataset
  configs = built_hardware(data_dir)
  if hw in configs and hw in configs[hw]:
    return hw
  for name, hardware in configs.items():
    if hw in hardware:
      return name
  have = sorted({h for hardware in configs.values() for h in hardware})
  raise EvalError(
    f"hardware {hw!r} is not in the datasets built in {data_dir}; available: "
    f"{', '.join(have) or 'none (build one with python -m data_pipelines.build)'}"
  )


# ---- the whole evaluation ------------------------------------------------------------------


def parse_ks(values: Sequence[str] | str) -> list[int]:
  """The k values of top-k from their text (``"1,5,10"`` or ``["1", "5"]``).

  Raises:
    EvalError: not a non-empty list of positive integers.
  """
  items = values.split(",") if isinstance(values, str) else list(values)
  try:
    ks = [int(str(k).strip()) for k in items]
  except ValueError:
    ks = []
  if not ks or min(ks) < 1:
    raise EvalError(
      f"--ks must be positive integers like 1,5,10,20, got {','.join(map(str, items))!r}"
    )
  return ks


def evaluate_model(
  *,
  hw: str,
  data_dir: str,
  dataset: str | None = None,
  workdir: str | None = None,
  model_path: str | None = None,
  which: str = "best",
  split: str = "test",
  ks: Sequence[int] = metrics.DEFAULT_KS,
  batch_size: int = 4096,
  extra_predictions: Mapping[str, np.ndarray] | None = None,
  workers: int = 0,
) -> dict:
  """Loads the data and the model (``model_path`` or ``workdir``), returns the top-k report.

  ``workers``: threads predicting at once (0 = one per core; the same scores for any number).

  The model row is named after the model file, or :data:`WORKDIR_ROW` for a workdir; see
  :func:`tlp_jax.evaluation.topk.topk_report` for the report and ``extra_predictions``.

  Raises:
    EvalError: a user error (no such hardware, dataset, head or model; bad ``ks`` or
      ``batch_size``; a model predicting non-finite scores).
  """
  if not ks or min(int(k) for k in ks) < 1:
    raise EvalError(f"ks must be positive integers, got {list(ks)}")
  if batch_size < 1:
    raise EvalError(f"batch_size must be >= 1, got {batch_size}")
  if workers < 0:
    raise EvalError(f"workers must be >= 0, got {workers}")
  config = resolve_config(data_dir, hw, dataset)
  try:
    arrays = loader.load_arrays(data_dir, config)
  except loader.DatasetNotFoundError as e:
    raise EvalError(str(e)) from None
  data = eval_data(arrays, hw, split)
  predictor, info = load_predictor(model_path, workdir, which)
  predict = predictor_fn(predictor, hw, arrays)
  name = os.path.splitext(os.path.basename(model_path))[0] if model_path else WORKDIR_ROW
  info.update({"dataset": config, "dataset_fingerprint": arrays.fingerprint})
  return topk.topk_report(
    data,
    predict,
    model_name=name,
    ks=ks,
    extra_predictions=extra_predictions,
    batch_size=batch_size,
    model_info=info,
    loop_tokens=predictor.reads_loop_tokens,
    workers=workers,
  )
