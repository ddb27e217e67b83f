"""Issue-5 accuracy protocol: train each experiment with several seeds, top-k on hold-out networks.

Every experiment is a config (a ``configs/*.py`` module plus dotted overrides) trained with
``train_lib.train_and_evaluate`` -- the same code ``train.py`` runs -- once per seed, then scored
with ``eval_lib.select_split`` + ``metrics.top_k_scores`` on the test split (the hold-out networks)
of the target hardware. Reported: mean +- std over seeds of pooled (TLP) and mean (TenSet) top-1/5
and per-network top-1/5, plus the score of the seed ensemble (mean of the seeds' per-task
z-scored predictions).

Each run validates once, at the end (the final parameters do not depend on it; runs are 6-9x
faster than with per-epoch validation), unless ``--also_best`` also scores the best-validation
checkpoint, which is what ``eval.py`` loads by default. GPU kernels are made deterministic before
JAX starts (``tlp_jax.train.runtime``), so a rerun reproduces a row; ``--nondeterministic_gpu`` leaves
XLA's autotuning free.

Rounds 1-3 of docs/ACCURACY.md ran when ``configs/default.py`` trained one network; round 4 made
it an ensemble of five. To reproduce an earlier row, add ``--set model.ensemble_size=1``. Each
result records the model config it trained (``model_config``).

Usage (GPU recommended; ~2-7 s per run on an H100 for tenset-mini; 2x that for an ensemble):
  python bench/accuracy_sweep.py --data_dir DIR --experiments tlp_original,default \
      --seeds 0,1,2,3,4 --out bench/results/accuracy_sweep.json
"""
from __future__ import annotations

import argparse
import dataclasses
import ast
import importlib
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tlp_jax.evaluation import eval_lib  # noqa: E402
from data_pipelines import loader  # noqa: E402
from tlp_jax.core import metrics  # noqa: E402
from tlp_jax.train import runtime  # noqa: E402

KS = (1, 5)

# name -> (config module, dotted overrides, target hardware). Suspects from issue 5 are tested
# one at a time on top of the original recipe, then combined.
EXPERIMENTS = {
    # The original recipe on each hardware.
    "tlp_original": ("tlp_original", {}, "epyc-9004"),
    # One change at a time on top of the original.
    "orig+group_by_task": ("tlp_original", {"group_by_task": True}, "epyc-9004"),
    "orig+log1p": ("tlp_original", {"model.input_norm": "log1p"}, "epyc-9004"),
    "orig+padding_mask": ("tlp_original", {"model.padding_mask": True}, "epyc-9004"),
    "orig+mean_pool": ("tlp_original", {"model.pool": "mean_valid"}, "epyc-9004"),
    "orig+batch256": ("tlp_original", {"batch_size": 256}, "epyc-9004"),
    "orig+adamw_cosine": ("tlp_original", {"optimizer": "adamw", "schedule": "warmup_cosine",
                                           "warmup_epochs": 1.0}, "epyc-9004"),
    # Log-scale losses (this project's; see tlp_jax/train/losses.py).
    "orig+mse_log": ("tlp_original", {"loss": "mse_log"}, "epyc-9004"),
    "orig+pairwise_log": ("tlp_original", {"loss": "pairwise_log"}, "epyc-9004"),
    "orig+pairwise_log+group": ("tlp_original", {"loss": "pairwise_log", "group_by_task": True},
                                "epyc-9004"),
    "pwlog+group+log1p+cosine": ("tlp_original", {
        "loss": "pairwise_log", "group_by_task": True, "model.input_norm": "log1p",
        "optimizer": "adamw", "schedule": "warmup_cosine", "warmup_epochs": 1.0}, "epyc-9004"),
    "mselog+log1p+cosine": ("tlp_original", {
        "loss": "mse_log", "model.input_norm": "log1p", "optimizer": "adamw",
        "schedule": "warmup_cosine", "warmup_epochs": 1.0}, "epyc-9004"),
    # Combinations.
    "group+log1p": ("tlp_original", {"group_by_task": True, "model.input_norm": "log1p"},
                    "epyc-9004"),
    "group+log1p+cosine": ("default", {"group_by_task": True, "model.input_norm": "log1p"},
                           "epyc-9004"),
    "group+log1p+cosine+mask": ("default", {"group_by_task": True, "model.input_norm": "log1p",
                                            "model.padding_mask": True}, "epyc-9004"),
    "group+log1p+cosine+b256": ("default", {"group_by_task": True, "model.input_norm": "log1p",
                                            "batch_size": 256}, "epyc-9004"),
    # Task-grouped batches (train_lib batch_order="by_task") for the within-task losses.
    "pwlog+group+bytask": ("tlp_original", {"loss": "pairwise_log", "group_by_task": True,
                                            "batch_order": "by_task"}, "epyc-9004"),
    "lrank+group+bytask": ("tlp_original", {"group_by_task": True, "batch_order": "by_task"},
                           "epyc-9004"),
    "pwlog+group+bytask+log1p+cosine": ("tlp_original", {
        "loss": "pairwise_log", "group_by_task": True, "batch_order": "by_task",
        "model.input_norm": "log1p", "optimizer": "adamw", "schedule": "warmup_cosine",
        "warmup_epochs": 1.0}, "epyc-9004"),
    "pwlog+group+bytask+log1p+cosine+e150": ("tlp_original", {
        "loss": "pairwise_log", "group_by_task": True, "batch_order": "by_task",
        "model.input_norm": "log1p", "optimizer": "adamw", "schedule": "warmup_cosine",
        "warmup_epochs": 1.0, "num_epochs": 150}, "epyc-9004"),
    "pwlog+group+bytask+b256": ("tlp_original", {"loss": "pairwise_log", "group_by_task": True,
                                                 "batch_order": "by_task", "batch_size": 256},
                                "epyc-9004"),
    "pwlog+group+bytask+log1p+cosine+mask": ("tlp_original", {
        "loss": "pairwise_log", "group_by_task": True, "batch_order": "by_task",
        "model.input_norm": "log1p", "model.padding_mask": True, "optimizer": "adamw",
        "schedule": "warmup_cosine", "warmup_epochs": 1.0}, "epyc-9004"),
    # The shipped default (whatever configs/default.py says now).
    "default": ("default", {}, "epyc-9004"),
    # Round 2 on top of the default: other within-task losses, regularisation, more steps.
    "default+listwise_T1": ("default", {"loss": "listwise_log", "loss_temperature": 1.0},
                            "epyc-9004"),
    "default+listwise_T0.5": ("default", {"loss": "listwise_log", "loss_temperature": 0.5},
                              "epyc-9004"),
    "default+centered_mse_log": ("default", {"loss": "centered_mse_log"}, "epyc-9004"),
    "default+wd1e-2": ("default", {"weight_decay": 1e-2}, "epyc-9004"),
    "default+lr2e-3": ("default", {"learning_rate": 2e-3}, "epyc-9004"),
    "default+e150": ("default", {"num_epochs": 150}, "epyc-9004"),
    # Within-task ranking plus a whole-batch term (TLP's LambdaRank, ~100x the scale of the
    # normalised pairwise_log, or pairwise_log across tasks), to keep the original's top-5.
    "default+aux_lrank0.002": ("default", {"aux_loss": "lambdarank", "aux_loss_weight": 0.002},
                               "epyc-9004"),
    "default+aux_lrank0.01": ("default", {"aux_loss": "lambdarank", "aux_loss_weight": 0.01},
                              "epyc-9004"),
    "default+aux_pwlog0.3": ("default", {"aux_loss": "pairwise_log", "aux_loss_weight": 0.3},
                             "epyc-9004"),
    "default+aux_pwlog1": ("default", {"aux_loss": "pairwise_log", "aux_loss_weight": 1.0},
                           "epyc-9004"),
    # The "loop" feature version (configs/loopnest.py): needs --data_dir of a dataset built
    # with --loop_stores 10 (loop-nest store tokens appended to the step tokens).
    "loopnest": ("loopnest", {}, "epyc-9004"),
    "loopnest+padmask": ("loopnest", {"model.padding_mask": True}, "epyc-9004"),
    "loopnest+e100": ("loopnest", {"num_epochs": 100}, "epyc-9004"),
    "loopnest+aux_pwlog0.3": ("loopnest", {"aux_loss": "pairwise_log", "aux_loss_weight": 0.3},
                              "epyc-9004"),
    "loopnest_mtl@epyc": ("loopnest", {"hardware": ("epyc-9004", "xeon-emr-16c"),
                                       "dataset": "all"}, "epyc-9004"),
    "loopnest@xeon+e200": ("loopnest", {"hardware": ("xeon-emr-16c",),
                                        "dataset": "xeon-emr-16c", "num_epochs": 200},
                           "xeon-emr-16c"),
    # Ablation: the same model and data with the step tokens zeroed (store tokens only).
    "loopnest_stores_only": ("loopnest", {"_zero_steps": True}, "epyc-9004"),
    "loopnest_stores_only@xeon": ("loopnest", {"hardware": ("xeon-emr-16c",),
                                               "dataset": "xeon-emr-16c", "_zero_steps": True},
                                  "xeon-emr-16c"),
    "loopnest+padmask@xeon": ("loopnest", {"hardware": ("xeon-emr-16c",),
                                           "dataset": "xeon-emr-16c",
                                           "model.padding_mask": True}, "xeon-emr-16c"),
    "loopnest+padmask_mtl@xeon": ("loopnest", {"hardware": ("xeon-emr-16c", "epyc-9004"),
                                               "dataset": "all", "model.padding_mask": True},
                                  "xeon-emr-16c"),
    "loopnest+padmask_xeon10%_alone": ("loopnest", {
        "hardware": ("xeon-emr-16c",), "dataset": "all", "few_shot.fraction": 0.1,
        "model.padding_mask": True}, "xeon-emr-16c"),
    "loopnest+padmask_xeon10%+epyc_mtl": ("loopnest", {
        "hardware": ("xeon-emr-16c", "epyc-9004"), "dataset": "all", "few_shot.fraction": 0.1,
        "model.padding_mask": True}, "xeon-emr-16c"),
    "loopnest@xeon": ("loopnest", {"hardware": ("xeon-emr-16c",), "dataset": "xeon-emr-16c"},
                      "xeon-emr-16c"),
    "loopnest@xeon+e500": ("loopnest", {"hardware": ("xeon-emr-16c",),
                                        "dataset": "xeon-emr-16c", "num_epochs": 500},
                           "xeon-emr-16c"),
    "loopnest_mtl@xeon": ("loopnest", {"hardware": ("xeon-emr-16c", "epyc-9004"),
                                       "dataset": "all"}, "xeon-emr-16c"),
    "loopnest_xeon10%_alone": ("loopnest", {"hardware": ("xeon-emr-16c",), "dataset": "all",
                                            "few_shot.fraction": 0.1}, "xeon-emr-16c"),
    "loopnest_xeon10%+epyc_mtl": ("loopnest", {"hardware": ("xeon-emr-16c", "epyc-9004"),
                                               "dataset": "all", "few_shot.fraction": 0.1},
                                  "xeon-emr-16c"),
    # Ensembles (model.ensemble_size): members trained together, each on its own loss.
    "loopnest+ens5": ("loopnest", {"model.ensemble_size": 5}, "epyc-9004"),
    "loopnest+ens5@xeon": ("loopnest", {"hardware": ("xeon-emr-16c",),
                                        "dataset": "xeon-emr-16c", "model.ensemble_size": 5},
                           "xeon-emr-16c"),
    "loopnest+ens5_mtl@xeon": ("loopnest", {"hardware": ("xeon-emr-16c", "epyc-9004"),
                                            "dataset": "all", "model.ensemble_size": 5},
                               "xeon-emr-16c"),
    "loopnest+ens5_xeon10%_alone": ("loopnest", {
        "hardware": ("xeon-emr-16c",), "dataset": "all", "few_shot.fraction": 0.1,
        "model.ensemble_size": 5}, "xeon-emr-16c"),
    "loopnest+ens5_xeon10%+epyc_mtl": ("loopnest", {
        "hardware": ("xeon-emr-16c", "epyc-9004"), "dataset": "all", "few_shot.fraction": 0.1,
        "model.ensemble_size": 5}, "xeon-emr-16c"),
    # TLP's step tokens only, on a "loop" build (loop_tokens="off": the model reads the first
    # 25 x 22 of each example, the same values a TLP-only build has).
    "steps": ("default", {"loop_tokens": "off"}, "epyc-9004"),
    "steps+ens5": ("default", {"loop_tokens": "off", "model.ensemble_size": 5}, "epyc-9004"),
    "steps+ens5@xeon": ("default", {"hardware": ("xeon-emr-16c",), "dataset": "xeon-emr-16c",
                                    "loop_tokens": "off", "model.ensemble_size": 5},
                        "xeon-emr-16c"),
    "tlp_original@xeon": ("tlp_original", {"hardware": ("xeon-emr-16c",),
                                           "dataset": "xeon-emr-16c"}, "xeon-emr-16c"),
    "default@xeon": ("default", {"hardware": ("xeon-emr-16c",), "dataset": "xeon-emr-16c"},
                     "xeon-emr-16c"),
    # xeon has 1,430 training programs: 2 steps per epoch, 100 steps in 50 epochs. More steps:
    "default@xeon+e200": ("default", {"hardware": ("xeon-emr-16c",), "dataset": "xeon-emr-16c",
                                      "num_epochs": 200}, "xeon-emr-16c"),
    "default@xeon+e500": ("default", {"hardware": ("xeon-emr-16c",), "dataset": "xeon-emr-16c",
                                      "num_epochs": 500}, "xeon-emr-16c"),
    "default@xeon+e500+aux_lrank0.01": ("default", {
        "hardware": ("xeon-emr-16c",), "dataset": "xeon-emr-16c", "num_epochs": 500,
        "aux_loss": "lambdarank", "aux_loss_weight": 0.01}, "xeon-emr-16c"),
    "default@xeon+b256": ("default", {"hardware": ("xeon-emr-16c",), "dataset": "xeon-emr-16c",
                                      "batch_size": 256}, "xeon-emr-16c"),
    # MTL-TLP transfer: 10% of xeon's training labels, with vs without all of epyc's.
    "xeon10%_alone": ("default", {"hardware": ("xeon-emr-16c",), "dataset": "all",
                                  "few_shot.fraction": 0.1}, "xeon-emr-16c"),
    # The single-head arm has 141 rows (1 step per epoch): also given 10x the epochs.
    "xeon10%_alone+e500": ("default", {"hardware": ("xeon-emr-16c",), "dataset": "all",
                                       "few_shot.fraction": 0.1, "num_epochs": 500},
                           "xeon-emr-16c"),
    # All of xeon's labels plus all of epyc's (MTL-TLP without the few-shot cut).
    "xeon+epyc_mtl": ("mtl", {"hardware": ("xeon-emr-16c", "epyc-9004"), "dataset": "all"},
                      "xeon-emr-16c"),
    "xeon+epyc_mtl+e100": ("mtl", {"hardware": ("xeon-emr-16c", "epyc-9004"), "dataset": "all",
                                   "num_epochs": 100}, "xeon-emr-16c"),
    "xeon+epyc_mtl+e150": ("mtl", {"hardware": ("xeon-emr-16c", "epyc-9004"), "dataset": "all",
                                   "num_epochs": 150}, "xeon-emr-16c"),
    # Same with 10 epochs (90 steps over the joined rows): what fits a 2-core CPU run.
    "xeon10%+epyc_mtl_e10": ("mtl", {"hardware": ("xeon-emr-16c", "epyc-9004"), "dataset": "all",
                                     "few_shot.fraction": 0.1, "num_epochs": 10},
                             "xeon-emr-16c"),
    "xeon10%+epyc_mtl": ("mtl", {"hardware": ("xeon-emr-16c", "epyc-9004"), "dataset": "all",
                                 "few_shot.fraction": 0.1}, "xeon-emr-16c"),
}


def make_config(module: str, overrides: dict, data_dir: str, seed: int):
  """The experiment's ConfigDict for one seed."""
  config = importlib.import_module(f"configs.{module}").get_config()
  config.data_dir = data_dir
  if "dataset" not in overrides:
    config.dataset = config.hardware[0] if config.hardware else "all"
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *path, leaf = key.split(".")
      for p in path:
        node = node[p]
      node[leaf] = value
  config.seed = seed
  # The protocol scores the final parameters, which do not depend on when validation runs:
  # validate (and checkpoint) once, at the end, instead of after every short epoch.
  if "eval_every_epochs" not in overrides:
    config.eval_every_epochs = int(config.num_epochs)
  config.checkpoint_every_steps = 0
  config.log_every_steps = 10_000
  return config


def labelled_rows_only(arrays, config):
  """``arrays`` with the training rows the single-head few-shot run would keep, and no others.

  Applies train_lib's own few-shot selection (same function, mask columns and seed, so the kept
  labels are exactly those of the multi-head run with the same seed) and drops the rows left
  without a label: they carry no loss, only compute.
  """
  from tlp_jax.train import train_lib  # pylint: disable=g-import-not-at-top
  cols = train_lib.head_columns(list(arrays.hardware), list(config.hardware))
  split = train_lib.select_split(arrays.train, cols)
  mask = train_lib.few_shot_mask(split.mask, int(config.few_shot.num_labels),
                                 float(config.few_shot.fraction), int(config.seed))
  rows = np.flatnonzero(mask[:, 0])
  train = type(arrays.train)(**{f.name: getattr(arrays.train, f.name)[rows]
                                for f in dataclasses.fields(arrays.train)})
  train_mask = np.zeros_like(np.asarray(arrays.train.mask)[rows])
  train_mask[:, cols[0]] = True
  train = dataclasses.replace(train, mask=train_mask)
  return dataclasses.replace(arrays, train=train)


def without_step_tokens(arrays):
  """A "loop" dataset with its TLP step tokens zeroed: the model sees only the store tokens.

  The ablation that asks whether the gain of the loop version comes from the loop-nest vectors
  alone (the step tokens are the first ``L`` rows, ``L = crop[0] - loop_stores``).
  """
  from tlp_jax.train import train_lib  # pylint: disable=g-import-not-at-top
  loop_stores, _ = train_lib.loop_feature_shape(arrays)
  if not loop_stores:
    raise ValueError("_zero_steps needs a dataset built with --loop_stores")
  steps = int(arrays.crop[0]) - loop_stores
  splits = {}
  for name in ("train", "validation", "test"):
    split = getattr(arrays, name)
    feats = np.array(split.features)
    feats[:, :steps] = 0.0
    splits[name] = dataclasses.replace(split, features=feats)
  return dataclasses.replace(arrays, **splits)


def _zscore_per_task(pred: np.ndarray, task_index: np.ndarray) -> np.ndarray:
  out = np.empty_like(pred)
  for t in np.unique(task_index):
    sel = task_index == t
    p = pred[sel]
    out[sel] = (p - p.mean()) / (p.std() + 1e-12)
  return out


def _summary(values: list[float]) -> dict:
  a = np.asarray(values, dtype=np.float64)
  return {"mean": float(np.nanmean(a)), "std": float(np.nanstd(a)), "values": a.tolist()}


def _aggregate(per_seed: list[dict]) -> dict:
  """Mean +- std over seeds of the pooled (TLP) and mean (TenSet) top-k."""
  return {f"{agg_name}/top-{k}": _summary([s[agg_name][f"top-{k}"] for s in per_seed])
          for agg_name in ("pooled", "mean") for k in KS}


def run_experiment(name: str, data_dir: str, seeds: list[int], arrays_cache: dict,
                   save_preds_dir: str | None = None, also_best: bool = False) -> dict:
  """Trains ``name`` once per seed; returns per-seed and aggregate top-k.

  With ``also_best`` the run validates every epoch and the checkpoint with the lowest target
  validation loss (what ``eval.py`` loads by default) is scored too, as ``*_best``.
  """
  from tlp_jax.train import train_lib  # pylint: disable=g-import-not-at-top

  module, overrides, target = EXPERIMENTS[name]
  # Sweep-level options (not config fields) start with "_".
  zero_steps = bool(overrides.get("_zero_steps", False))
  overrides = {k: v for k, v in overrides.items() if not k.startswith("_")}
  per_seed, preds, wall, per_seed_best = [], [], [], []
  data = None
  for seed in seeds:
    config = make_config(module, overrides, data_dir, seed)
    if also_best:
      config.eval_every_epochs = 1
    if config.dataset not in arrays_cache:
      arrays_cache[config.dataset] = loader.load_arrays(data_dir, config.dataset)
    arrays = arrays_cache[config.dataset]
    if zero_steps:
      arrays = without_step_tokens(arrays)
    data = eval_lib.select_split(arrays, target, "test")
    if len(config.hardware) == 1 and config.few_shot.fraction < 1.0:
      arrays = labelled_rows_only(arrays, config)
      config.few_shot.fraction = 1.0
    with tempfile.TemporaryDirectory() as workdir:
      t0 = time.time()
      result = train_lib.train_and_evaluate(config, workdir, dataset=arrays)
      wall.append(time.time() - t0)
      head = list(result.hardware).index(target)
      predict = train_lib.make_predict_fn(result.model_config)
      if also_best:
        best_params, _, best_meta = train_lib.restore_for_export(workdir, "best")
        pred_best = predict(best_params, data.features)[:, head].astype(np.float64)
        best_scores = metrics.top_k_scores(pred_best, data.latency, data.task_index,
                                           data.networks, KS, len(data.task_keys)).to_dict()
        best_scores["epoch"] = best_meta.get("epoch")
        per_seed_best.append(best_scores)
    pred = predict(result.state.params, data.features)[:, head].astype(np.float64)
    preds.append(pred)
    scores = metrics.top_k_scores(pred, data.latency, data.task_index, data.networks, KS,
                                  len(data.task_keys))
    per_seed.append(scores.to_dict())
    if result.model_config.ensemble_size > 1:
      # The model averages its members' raw scores; compare with z-scoring each member within
      # each task first (what the offline seed ensembles below do).
      members = train_lib.make_predict_fn(result.model_config, per_member=True)(
          result.state.params, data.features)[:, :, head].astype(np.float64)
      zscored = np.mean([_zscore_per_task(members[:, m], data.task_index)
                         for m in range(members.shape[1])], axis=0)
      per_seed[-1]["members_zscore"] = metrics.top_k_scores(
          zscored, data.latency, data.task_index, data.networks, KS,
          len(data.task_keys)).to_dict()["pooled"]
      per_seed[-1]["members_alone"] = [metrics.top_k_scores(
          members[:, m], data.latency, data.task_index, data.networks, KS,
          len(data.task_keys)).to_dict()["pooled"] for m in range(members.shape[1])]
    logging.info("%s seed %d: pooled %s (%.1f s)", name, seed, scores.to_dict()["pooled"],
                 wall[-1])
  if save_preds_dir:
    os.makedirs(save_preds_dir, exist_ok=True)
    np.savez(os.path.join(save_preds_dir, re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".npz"),
             preds=np.stack(preds), latency=data.latency, task_index=data.task_index,
             rows=data.rows)
  ensemble = np.mean([_zscore_per_task(p, data.task_index) for p in preds], axis=0)
  ens = metrics.top_k_scores(ensemble, data.latency, data.task_index, data.networks, KS,
                             len(data.task_keys)).to_dict()
  rnd = metrics.random_top_k_scores(data.latency, data.task_index, data.networks, KS,
                                    len(data.task_keys)).to_dict()
  agg = _aggregate(per_seed)
  for net in per_seed[0]["per_network"]:
    for k in KS:
      agg[f"{net}/top-{k}"] = _summary([s["per_network"][net][f"top-{k}"] for s in per_seed])
  extra = {}
  if per_seed_best:
    extra["per_seed_best"] = per_seed_best
    extra["aggregate_best"] = _aggregate(per_seed_best)
  return {**extra, "config_module": f"configs/{module}.py", "overrides": {k: v for k, v in
                                                                        overrides.items()},
          "model_config": result.model_config.to_dict(),
          "target": target, "seeds": seeds, "aggregate": agg, "ensemble": ens,
          "random": rnd, "per_seed": per_seed, "train_wall_s": wall}


def format_table(results: dict) -> str:
  """Markdown table: experiment | pooled top-1 | pooled top-5 | mean top-1 | mean top-5 | ens."""
  lines = ["| experiment | target | pooled top-1 | pooled top-5 | mean top-1 | mean top-5 | "
           "ensemble pooled top-1/top-5 |", "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    a = r["aggregate"]

    def ms(key):
      return f"{a[key]['mean']:.3f} ± {a[key]['std']:.3f}"

    e = r["ensemble"]["pooled"]
    lines.append(f"| {name} | {r['target']} | {ms('pooled/top-1')} | {ms('pooled/top-5')} | "
                 f"{ms('mean/top-1')} | {ms('mean/top-5')} | "
                 f"{e['top-1']:.3f} / {e['top-5']:.3f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--experiments", default="tlp_original,default")
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--out", required=True)
  parser.add_argument("--save_preds", default=None,
                      help="folder for per-experiment test predictions (.npz, one row a seed)")
  parser.add_argument("--also_best", action="store_true",
                      help="validate every epoch and also score the best-validation checkpoint "
                      "(eval.py's default), reported as aggregate_best")
  parser.add_argument("--set", action="append", default=[],
                      help="extra override for every experiment, KEY=PYTHON_LITERAL "
                      "(smoke runs: --set num_epochs=2)")
  parser.add_argument("--nondeterministic_gpu", action="store_true",
                      help="leave XLA's GPU autotuning free (runs then differ between processes)")
  args = parser.parse_args()
  if not args.nondeterministic_gpu:
    runtime.enable_deterministic_gpu_ops()  # before JAX starts a backend
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top

  names = [n for n in args.experiments.split(",") if n]
  unknown = [n for n in names if n not in EXPERIMENTS]
  if unknown:
    raise SystemExit(f"unknown experiments {unknown}; known: {', '.join(EXPERIMENTS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  extra = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.set)}
  for name in names:
    EXPERIMENTS[name] = (EXPERIMENTS[name][0], {**EXPERIMENTS[name][1], **extra},
                         EXPERIMENTS[name][2])
  results = {}
  if os.path.exists(args.out):  # resume: keep finished experiments
    with open(args.out) as f:
      results = json.load(f).get("experiments", {})
  arrays_cache: dict = {}
  for name in names:
    if name in results and results[name]["seeds"] == seeds:
      continue
    results[name] = run_experiment(name, args.data_dir, seeds, arrays_cache, args.save_preds,
                                   args.also_best)
    payload = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
               "jax": jax.__version__, "host": platform.node(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "experiments": results}
    with open(args.out + ".tmp", "w") as f:
      json.dump(payload, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(format_table({name: results[name]}).splitlines()[-1], flush=True)
    if "aggregate_best" in results[name]:
      b = results[name]["aggregate_best"]
      print(f"  best-validation checkpoint: pooled top-1 {b['pooled/top-1']['mean']:.3f} ± "
            f"{b['pooled/top-1']['std']:.3f}, top-5 {b['pooled/top-5']['mean']:.3f} ± "
            f"{b['pooled/top-5']['std']:.3f}", flush=True)
  print(format_table(results))


if __name__ == "__main__":
  main()
