"""Accuracy protocol: train an experiment with several seeds, top-k on validation and hold-out.

An experiment is a config (a ``configs/*.py`` module plus dotted overrides) and a target
hardware. Each seed is trained with ``tlp_jax.train.loop.train_and_evaluate`` -- the code behind
``train.py`` -- on a built dataset, and its final parameters are scored with the evaluator
(``tlp_jax.evaluation.topk.topk_report``, the code behind ``eval.py``) on

* the validation split: the unweighted top-k over its tasks (``task_mean``; the validation
  programs belong to training tasks, not to the hold-out networks);
* the test split (the hold-out networks): pooled (TLP) and mean (TenSet) top-k and per network.

Reported: mean +- std over seeds, the per-seed values, the score of the seed ensemble (mean of
the seeds' per-task z-scored predictions), the random-ranking expectation, and the device. The
history of earlier experiments (and the commits that ran them) is in docs/ACCURACY.md.

Each run validates once, at the end (the final parameters do not depend on it), unless
``--also_best`` also scores the best-validation checkpoint, which is what ``eval.py`` loads by
default. GPU kernels are made deterministic before JAX starts (``tlp_jax.train.runtime``), so a
rerun reproduces a row; ``--nondeterministic_gpu`` leaves XLA's autotuning free.

Fine-tuning arms (``init_from`` = ``@EXPERIMENT``) start each seed from the final model of the
same seed of another experiment (the source), trained first in a temporary workdir and kept for
the sweep: e.g. ``xeon10%_finetune_all`` fine-tunes ``epyc_source`` (the default recipe on the
joined ``all`` config's epyc-9004 labels, so its train/validation/test tasks are those of the
xeon arms) on 10% of xeon-emr-16c's labels (docs/TRAINING.md, "Fine-tuning").

Usage (GPU recommended; a few seconds per run on an H100 for tenset-mini):
  python -m bench.accuracy_sweep --data_dir DIR --experiments tlp_original,default \
      --seeds 0,1,2,3,4 --out bench/results/accuracy_sweep.json
The ``steps`` experiment (step tokens only) differs from ``default`` only on a dataset built
with loop tokens (the default build when the TenSet dir has its skeletons;
``python -m data_pipelines.build ... --loop_tokens on`` requires them).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import re
import shutil
import tempfile

import numpy as np

from bench import common
from data_pipelines import loader
from tlp_jax.core import loop_tokens as loop_tokens_lib
from tlp_jax.core import metrics
from tlp_jax.evaluation import topk
from tlp_jax.evaluation.data import EvalData, eval_data
from tlp_jax.train import config as config_lib
from tlp_jax.train import data as train_data
from tlp_jax.train import export, loop, runtime

KS = (1, 5)
XEON, EPYC = "xeon-emr-16c", "epyc-9004"
_XEON_FEW_SHOT = {"hardware": (XEON,), "dataset": "all", "few_shot.fraction": 0.1}
# An override ``init_from="@NAME"``: start each seed from experiment NAME's model of that seed.
SOURCE_PREFIX = "@"
_FROM_EPYC = {**_XEON_FEW_SHOT, "init_from": SOURCE_PREFIX + "epyc_source"}

# name -> (config module, dotted overrides, target hardware).
EXPERIMENTS = {
  # The shipped default and the original TLP recipe.
  "default": ("default", {}, EPYC),
  "tlp_original": ("tlp_original", {}, EPYC),
  # The default with float32 compute (TF32 matmuls on a GPU) and with bfloat16 compute.
  "default_tf32": ("default", {"model.dtype": "float32"}, EPYC),
  "default_bf16": ("default", {"model.dtype": "bfloat16"}, EPYC),
  # The default reading all 40 loop tokens a build stores (the default until it read 39, 25 +
  # 39 = 64 tokens; bench/README.md, "64 tokens", where this arm ran as "default" against a
  # "default_t39" arm).
  "default_t40": ("default", {"max_loop_tokens": 0}, EPYC),
  # The default with TLP's 256-wide trunk (the default until the 128-wide trunk won on
  # validation; bench/README.md, "A 128-wide trunk", where this arm ran as "default" against a
  # "trunk128" arm).
  "default_w256": (
    "default",
    {"model.encoder_dims": (64, 128, 256, 256), "model.decoder_dims": (256, 128, 64, 1)},
    EPYC,
  ),
  # The default as an ensemble of five networks (the default before issue 15's validation).
  "default_ens5": ("default", {"model.ensemble_size": 5}, EPYC),
  # MTL-TLP: all of xeon's labels plus all of epyc's, xeon the target.
  "mtl": ("mtl", {}, XEON),
  # TLP's step tokens only on a loop-nest build (the model reads the step crop, as TLP).
  "steps": ("default", {"loop_tokens": "off"}, EPYC),
  # Few-shot transfer (MTL-TLP): 10% of xeon's training labels alone vs with all of epyc's.
  "xeon10%_alone": ("default", _XEON_FEW_SHOT, XEON),
  "xeon10%+epyc_mtl": ("mtl", {**_XEON_FEW_SHOT, "hardware": (XEON, EPYC)}, XEON),
  # xeon alone, all of its labels (the twin of the xeon starter model, docs/MODELS.md).
  "xeon": ("default", {"hardware": (XEON,)}, XEON),
  # Fine-tuning (tlp_jax/train/init_from.py) from the epyc-9004 model: the source is the default
  # recipe on the joined config's epyc labels (same split as the xeon arms).
  "epyc_source": ("default", {"dataset": "all", "hardware": (EPYC,)}, EPYC),
  "xeon10%_finetune_all": ("default", {**_FROM_EPYC, "init_mode": "all"}, XEON),
  "xeon10%_finetune_heads": ("default", {**_FROM_EPYC, "init_mode": "heads"}, XEON),
  # The epyc model's own head on xeon (one step at learning rate 0: no training).
  "xeon10%_epyc_zero_shot": (
    "default",
    {**_FROM_EPYC, "num_epochs": 1, "optim.learning_rate": 0.0},
    XEON,
  ),
}


# ---- config: every config field the sweep reads or writes is in this section ---------------


def make_config(module: str, overrides: dict, data_dir: str, seed: int, also_best: bool):
  """The experiment's ConfigDict for one seed."""
  config = importlib.import_module(f"configs.{module}").get_config()
  config.data_dir = data_dir
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *path, leaf = key.split(".")
      for p in path:
        node = node[p]
      node[leaf] = value
  # One head reads its hardware's own config unless told otherwise; several heads (MTL) keep
  # the module's joined dataset, and no heads (= the dataset's hardware) keep the module's
  # dataset. Decided after the overrides, which may change the heads.
  if "dataset" not in overrides and len(config.hardware) == 1:
    config.dataset = config.hardware[0]
  config.seed = seed
  # The protocol scores the final parameters, which do not depend on when validation runs:
  # validate (and checkpoint) once, at the end, instead of after every short epoch -- unless
  # the best-validation checkpoint is scored too.
  if also_best:
    config.eval_every_epochs = 1
  elif "eval_every_epochs" not in overrides:
    config.eval_every_epochs = int(config.num_epochs)
  config.checkpoint_every_steps = 0
  config.log_every_steps = 10_000
  return config


def few_shot_alone(config) -> bool:
  """A single-head run that keeps only part of its labels (the "alone" arm of a transfer)."""
  return len(config.hardware) == 1 and config.few_shot.fraction < 1.0


def labelled_rows_only(arrays, config):
  """``arrays`` reduced to the training rows the single-head few-shot run keeps a label for,
  and ``config`` without the few-shot cut.

  The kept labels are the trainer's own few-shot choice (``few_shot_mask`` with the same seed on
  the target's labelled rows in order), so they are exactly those of the multi-head run with the
  same seed. The rows left without a label are dropped: the single-head arm then trains on its
  labelled rows only, as a run on the small dataset would.
  """
  target = list(arrays.hardware).index(config.hardware[0])
  labelled = np.flatnonzero(np.asarray(arrays.train.mask)[:, target])
  kept = train_data.few_shot_mask(
    np.asarray(arrays.train.mask)[labelled][:, [target]],
    int(config.few_shot.num_labels),
    float(config.few_shot.fraction),
    int(config.seed),
  )
  rows = labelled[kept[:, 0]]
  train = type(arrays.train)(
    **{f.name: getattr(arrays.train, f.name)[rows] for f in dataclasses.fields(arrays.train)}
  )
  train_mask = np.zeros_like(np.asarray(arrays.train.mask)[rows])
  train_mask[:, target] = True
  config.few_shot.fraction = 1.0
  return dataclasses.replace(arrays, train=dataclasses.replace(train, mask=train_mask)), config


# ---- the protocol ----------------------------------------------------------------------------


def _zscore_per_task(pred: np.ndarray, task_index: np.ndarray) -> np.ndarray:
  out = np.empty_like(pred)
  for t in np.unique(task_index):
    sel = task_index == t
    p = pred[sel]
    out[sel] = (p - p.mean()) / (p.std() + 1e-12)
  return out


def _summary(values: list) -> dict:
  a = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
  return {"mean": float(np.nanmean(a)), "std": float(np.nanstd(a)), "values": a.tolist()}


def _aggregate(per_seed: list[dict]) -> dict:
  """Mean +- std over seeds of the test pooled (TLP) / mean (TenSet) / per-network top-k and
  the validation all-task top-k."""
  out = {
    f"{agg}/top-{k}": _summary([s["test"][agg][f"top-{k}"] for s in per_seed])
    for agg in ("pooled", "mean")
    for k in KS
  }
  for net in per_seed[0]["test"]["per_network"]:
    for k in KS:
      out[f"{net}/top-{k}"] = _summary(
        [s["test"]["per_network"][net][f"top-{k}"] for s in per_seed]
      )
  for k in KS:
    out[f"validation/top-{k}"] = _summary(
      [s["validation"]["task_mean"][f"top-{k}"] for s in per_seed]
    )
  return out


def _scores(params, predict, head: int, data: EvalData, tokens: bool) -> tuple[dict, np.ndarray]:
  """The model's report row on ``data`` and its predictions (float64, valid programs).

  ``tokens``: the model reads the dataset's loop tokens, assembled with the steps per batch.
  """
  batches = []

  def fn(x, t=None):
    # topk_report predicts the valid programs once, in order: keep the batches.
    x = x if t is None else loop_tokens_lib.model_input(x, t)
    p = np.asarray(predict(params, x)[:, head], np.float64)
    batches.append(p)
    return p

  row = topk.topk_report(data, fn, model_name="model", ks=KS, loop_tokens=tokens)["rows"]["model"]
  return row, np.concatenate(batches)


class Sources:
  """The fine-tuning sources of a sweep: experiment ``name``'s model of ``seed``, trained once
  into a temporary workdir that lives as long as this object (``close``)."""

  def __init__(self, data_dir: str, arrays_cache: dict):
    self._root = tempfile.mkdtemp(prefix="sweep_sources_")
    self._data_dir = data_dir
    self._arrays_cache = arrays_cache
    self._workdirs: dict[tuple[str, int], str] = {}
    self.train_wall_s: dict[str, list[float]] = {}

  def workdir(self, name: str, seed: int) -> str:
    """The workdir of ``name``'s final model of ``seed`` (trained on first use)."""
    key = (name, seed)
    if key not in self._workdirs:
      module, overrides, _ = EXPERIMENTS[name]
      if str(overrides.get("init_from", "")).startswith(SOURCE_PREFIX):
        raise SystemExit(f"source experiment {name} is itself a fine-tuning arm")
      config = make_config(module, overrides, self._data_dir, seed, False)
      arrays = _arrays(self._arrays_cache, self._data_dir, config.dataset)
      workdir = os.path.join(self._root, f"{name}_{seed}")
      wall: dict = {}
      with common.timed(wall, "train"):
        loop.train_and_evaluate(config, workdir, dataset=arrays)
      self.train_wall_s.setdefault(name, []).append(wall["train"])
      self._workdirs[key] = workdir
    return self._workdirs[key]

  def close(self) -> None:
    shutil.rmtree(self._root, ignore_errors=True)


def _arrays(arrays_cache: dict, data_dir: str, dataset: str):
  if dataset not in arrays_cache:
    arrays_cache[dataset] = loader.load_arrays(data_dir, dataset)
  return arrays_cache[dataset]


def run_seed(config, arrays, target: str, splits: dict[str, EvalData], also_best: bool) -> dict:
  """Trains one seed in a temporary workdir; its validation and test rows (and test preds)."""
  with tempfile.TemporaryDirectory() as workdir:
    wall: dict = {}
    with common.timed(wall, "train"):
      result = loop.train_and_evaluate(config, workdir, dataset=arrays)
    head = list(result.hardware).index(target)
    predict = export.make_predict_fn(result.model_config, 4096)
    typed = config_lib.from_config_dict(config)
    tokens = (
      train_data.reads_loop_tokens(typed.loop_tokens, arrays)
      and train_data.loop_token_shape(arrays)[0] > 0
    )
    out = {"train_wall_s": wall["train"], "model_config": result.model_config.to_dict()}
    for name, data in splits.items():
      out[name], pred = _scores(result.state.params, predict, head, data, tokens)
      if name == "test":
        out["test_pred"] = pred
    if also_best:
      params, _, meta = export.restore_for_export(workdir, "best")
      out["best"] = {
        name: _scores(params, predict, head, data, tokens)[0] for name, data in splits.items()
      }
      out["best"]["epoch"] = meta.get("epoch")
  return out


def run_experiment(
  name: str,
  data_dir: str,
  seeds: list[int],
  arrays_cache: dict,
  save_preds_dir: str | None = None,
  also_best: bool = False,
  sources: Sources | None = None,
) -> dict:
  """Trains ``name`` once per seed; returns per-seed and aggregate top-k.

  ``sources``: where a fine-tuning arm (``init_from="@SOURCE"``) gets its source models.
  """
  module, overrides, target = EXPERIMENTS[name]
  source = str(overrides.get("init_from", ""))
  source = source[len(SOURCE_PREFIX) :] if source.startswith(SOURCE_PREFIX) else None
  per_seed = []
  for seed in seeds:
    config = make_config(module, overrides, data_dir, seed, also_best)
    if source is not None:
      config.init_from = sources.workdir(source, seed)
    arrays = _arrays(arrays_cache, data_dir, config.dataset)
    splits = {s: eval_data(arrays, target, s) for s in ("validation", "test")}
    if few_shot_alone(config):
      arrays, config = labelled_rows_only(arrays, config)
    per_seed.append(run_seed(config, arrays, target, splits, also_best))
    logging.info(
      "%s seed %d: test pooled %s, validation %s (%.1f s)",
      name,
      seed,
      per_seed[-1]["test"]["pooled"],
      per_seed[-1]["validation"]["task_mean"],
      per_seed[-1]["train_wall_s"],
    )
  test = splits["test"]
  preds = [s.pop("test_pred") for s in per_seed]
  if save_preds_dir:
    os.makedirs(save_preds_dir, exist_ok=True)
    np.savez(
      os.path.join(save_preds_dir, re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".npz"),
      preds=np.stack(preds),
      latency=test.latency,
      task_index=test.task_index,
      rows=test.rows,
    )
  args = (test.latency, test.task_index, test.networks, KS, len(test.task_keys))
  ensemble = np.mean([_zscore_per_task(p, test.task_index) for p in preds], axis=0)
  out = {
    "config_module": f"configs/{module}.py",
    "overrides": dict(overrides),
    "source": source,
    "model_config": per_seed[0].pop("model_config"),
    "target": target,
    "seeds": seeds,
    "aggregate": _aggregate(per_seed),
    "ensemble": metrics.top_k_scores(ensemble, *args).to_dict(),
    "random": metrics.random_top_k_scores(*args).to_dict(),
    "per_seed": [{k: v for k, v in s.items() if k in ("validation", "test")} for s in per_seed],
    "train_wall_s": [s["train_wall_s"] for s in per_seed],
  }
  if also_best:
    out["per_seed_best"] = [s["best"] for s in per_seed]
    out["aggregate_best"] = _aggregate(out["per_seed_best"])
  return out


def format_table(results: dict) -> str:
  """Markdown table, one row per experiment: mean ± std over seeds, and the seed ensemble."""

  def ms(a, key):
    return f"{a[key]['mean']:.3f} ± {a[key]['std']:.3f}"

  rows = []
  for name, r in results.items():
    a, e = r["aggregate"], r["ensemble"]["pooled"]
    rows.append(
      [
        name,
        r["target"],
        ms(a, "validation/top-1"),
        ms(a, "pooled/top-1"),
        ms(a, "pooled/top-5"),
        ms(a, "mean/top-1"),
        ms(a, "mean/top-5"),
        f"{e['top-1']:.3f} / {e['top-5']:.3f}",
      ]
    )
  return common.markdown_table(
    [
      "experiment",
      "target",
      "validation top-1",
      "pooled top-1",
      "pooled top-5",
      "mean top-1",
      "mean top-5",
      "ensemble pooled top-1/top-5",
    ],
    rows,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument(
    "--experiments",
    default="tlp_original,default",
    help="comma-separated, of: " + ", ".join(EXPERIMENTS).replace("%", "%%"),
  )
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--out", required=True)
  parser.add_argument(
    "--save_preds",
    default=None,
    help="folder for per-experiment test predictions (.npz, one row a seed)",
  )
  parser.add_argument(
    "--also_best",
    action="store_true",
    help="validate every epoch and also score the best-validation checkpoint "
    "(eval.py's default), reported as aggregate_best",
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    help="extra override for every experiment, KEY=PYTHON_LITERAL (smoke runs: --set num_epochs=2)",
  )
  parser.add_argument(
    "--nondeterministic_gpu",
    action="store_true",
    help="leave XLA's GPU autotuning free (runs then differ between processes)",
  )
  args = parser.parse_args()
  if not args.nondeterministic_gpu:
    runtime.enable_deterministic_gpu_ops()  # before JAX starts a backend
  common.log_to_stderr()

  names = [n for n in args.experiments.split(",") if n]
  unknown = [n for n in names if n not in EXPERIMENTS]
  if unknown:
    raise SystemExit(f"unknown experiments {unknown}; known: {', '.join(EXPERIMENTS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  extra = common.parse_overrides(args.set)
  # Every experiment, sources of fine-tuning arms included, gets the extra overrides.
  for name, (module, overrides, target) in list(EXPERIMENTS.items()):
    EXPERIMENTS[name] = (module, {**overrides, **extra}, target)
  results = {}
  if os.path.exists(args.out):  # resume: keep finished experiments
    with open(args.out) as f:
      results = json.load(f).get("experiments", {})
  arrays_cache: dict = {}
  sources = Sources(args.data_dir, arrays_cache)
  try:
    for name in names:
      if name in results and results[name]["seeds"] == seeds:
        continue
      results[name] = run_experiment(
        name, args.data_dir, seeds, arrays_cache, args.save_preds, args.also_best, sources
      )
      if results[name]["source"]:
        results[name]["source_train_wall_s"] = sources.train_wall_s.get(results[name]["source"])
      common.write_json(args.out, {**common.device_info(), "experiments": results}, announce=False)
      print(format_table({name: results[name]}).splitlines()[-1], flush=True)
  finally:
    sources.close()
  print(format_table(results))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
