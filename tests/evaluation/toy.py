"""Hand-made dataset arrays for the evaluation tests (tests/core/test_metrics.py's programs)."""

import types

import numpy as np


def read_feature0(x):
  """The toy "model": feature 0 of the first step carries the prediction."""
  return x[:, 0, 0]


def toy_arrays():
  """Two hardware, three tasks, a test split of 9 programs (one invalid on hw 'b')."""
  # Same programs as test_metrics: task 0 latency [1, 2, 4], task 1 [3, 6], task 2 [5,10,20,8].
  task = np.array([0, 1, 2, 0, 2, 1, 0, 2, 2], np.int32)
  lat = np.array([1.0, 3.0, 5.0, 2.0, 10.0, 6.0, 4.0, 20.0, 8.0])
  min_cost = np.array([[1.0, 2.0], [3.0, 1.0], [5.0, 1.0]])
  scores = np.stack([min_cost[task, 0] / lat, np.linspace(1, 0.2, 9)], 1).astype(np.float32)
  mask = np.ones((9, 2), bool)
  mask[4, 1] = False
  # Feature 0 carries the "prediction" read_feature0 reads back.
  pred = np.array([0.1, 0.2, 0.3, 0.9, 0.1, 0.8, 0.5, 0.9, 0.2], np.float32)
  features = np.zeros((9, 2, 3), np.float32)
  features[:, 0, 0] = pred
  test = types.SimpleNamespace(features=features, scores=scores, mask=mask, task_index=task)
  empty = types.SimpleNamespace(
    features=np.zeros((0, 2, 3), np.float32),
    scores=np.zeros((0, 2), np.float32),
    mask=np.zeros((0, 2), bool),
    task_index=np.zeros(0, np.int32),
  )
  nets = [
    types.SimpleNamespace(label="A", task_indices=np.array([0, 1]), weights=np.array([2, 1])),
    types.SimpleNamespace(label="B", task_indices=np.array([1, 2]), weights=np.array([3, 1])),
  ]
  tasks = types.SimpleNamespace(workload_keys=["w0", "w1", "w2"], min_cost=min_cost)
  return types.SimpleNamespace(
    train=empty, validation=empty, test=test, hardware=("a", "b"), tasks=tasks, networks=nets
  )
