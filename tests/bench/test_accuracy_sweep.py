"""Tests of bench/accuracy_sweep.py's data handling (training itself is the trainer's tests)."""

import math

import numpy as np
import pytest

from bench import accuracy_sweep


@pytest.mark.parametrize("seed", [0, 1])
def test_few_shot_alone_arm_keeps_only_real_target_labels(sample_arrays, seed):
  arrays = sample_arrays("all")
  xeon = list(arrays.hardware).index(accuracy_sweep.XEON)
  module, overrides, target = accuracy_sweep.EXPERIMENTS["xeon10%_alone"]
  config = accuracy_sweep.make_config(module, overrides, "unused", seed, also_best=False)
  assert accuracy_sweep.few_shot_alone(config)
  reduced, config = accuracy_sweep.labelled_rows_only(arrays, config)
  assert config.few_shot.fraction == 1.0 and target == accuracy_sweep.XEON
  labelled = np.flatnonzero(np.asarray(arrays.train.mask)[:, xeon])
  assert reduced.train.features.shape[0] == math.floor(0.1 * labelled.size)
  # Every kept row is a program measured on the target, with its own features and score (an
  # earlier version indexed the full arrays with positions among the labelled rows).
  scores_of = {}
  for r in labelled:
    key = np.asarray(arrays.train.features[r]).tobytes()
    scores_of.setdefault(key, set()).add(float(arrays.train.scores[r, xeon]))
  for i in range(reduced.train.features.shape[0]):
    score = float(reduced.train.scores[i, xeon])
    assert score > 0 and score in scores_of[np.asarray(reduced.train.features[i]).tobytes()]
  mask = reduced.train.mask
  assert mask[:, xeon].all() and mask.sum() == mask.shape[0]
  assert reduced.test is arrays.test and reduced.validation is arrays.validation


def test_finetune_arm_starts_each_seed_from_that_seed_of_its_source(
  built_sample_dataset, monkeypatch, tmp_path
):
  """A fine-tuning arm at learning rate 0 predicts exactly what its seed's source model does."""
  from tlp_jax.train import export

  tiny = {
    "model.encoder_dims": (16, 16, 32, 32),
    "model.attention_heads": 4,
    "model.res_blocks": 1,
    "model.decoder_dims": (32, 16, 1),
    "batch_size": 64,
    "num_epochs": 1,
  }
  experiments = {
    "src": ("default", {**tiny, "dataset": "all", "hardware": (accuracy_sweep.EPYC,)}, "x"),
    "arm": (
      "default",
      {
        **tiny,
        **accuracy_sweep._XEON_FEW_SHOT,
        "init_from": accuracy_sweep.SOURCE_PREFIX + "src",
        "optim.learning_rate": 0.0,
      },
      accuracy_sweep.XEON,
    ),
  }
  monkeypatch.setattr(accuracy_sweep, "EXPERIMENTS", experiments)
  cache: dict = {}
  sources = accuracy_sweep.Sources(built_sample_dataset, cache)
  try:
    out = accuracy_sweep.run_experiment(
      "arm", built_sample_dataset, [0, 1], cache, str(tmp_path), sources=sources
    )
    assert out["source"] == "src"
    preds = np.load(tmp_path / "arm.npz")["preds"]
    test = accuracy_sweep.eval_data(cache["all"], accuracy_sweep.XEON, "test")
    for i, seed in enumerate((0, 1)):
      params, model_config, _ = export.restore_for_export(sources.workdir("src", seed))
      x = accuracy_sweep.loop_tokens_lib.model_input(test.features, test.loop_tokens)
      want = export.make_predict_fn(model_config)(params, x)[:, 0]
      np.testing.assert_allclose(preds[i], want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(preds[0], preds[1])  # two seeds, two sources
  finally:
    sources.close()


@pytest.mark.parametrize(
  "name, dataset",
  [
    ("default", "epyc-9004"),
    ("xeon", "xeon-emr-16c"),  # the heads come from an override
    ("mtl", "all"),  # several heads: the module's joined dataset
    ("xeon10%_alone", "all"),  # an explicit dataset wins
  ],
)
def test_each_experiment_reads_the_dataset_of_its_heads(name, dataset):
  module, overrides, _ = accuracy_sweep.EXPERIMENTS[name]
  config = accuracy_sweep.make_config(module, overrides, "unused", 0, also_best=False)
  assert config.dataset == dataset
