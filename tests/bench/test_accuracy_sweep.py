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
