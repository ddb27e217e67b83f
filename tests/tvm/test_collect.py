"""Tests of the TenSet collection protocol (tlp_jax/tvm/collect.py).

The pure helpers run everywhere; the end-to-end collection needs TVM and is skipped without it.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from tlp_jax.core import network_info, records, tenset
from tlp_jax.tvm import collect, search_tasks

HAS_TVM = importlib.util.find_spec("tvm") is not None
needs_tvm = pytest.mark.skipif(not HAS_TVM, reason="TVM not installed (pip install -e '.[tvm]')")


@pytest.mark.parametrize(
  "flops,repeat",
  [
    (2416443392.0, 4),
    (3e9, 4),
    (2416443391.0, 6),
    (834928640.0, 6),
    (834928639.0, 8),
    (2097153.0, 8),
    (2097152.0, 10),
    (0.0, 10),
    (-1.0, 10),
  ],
)
def test_repeat_for_flops_follows_tenset(flops, repeat):
  assert collect.repeat_for_flops(flops) == repeat


def test_network_spec_parse_and_errors():
  spec = collect.NetworkSpec.parse("resnet_18:4:256")
  assert (spec.name, spec.batch_size, spec.input_size) == ("resnet_18", 4, 256)
  with pytest.raises(ValueError, match="NAME:BATCH:SIZE"):
    collect.NetworkSpec.parse("resnet_18@224")
  with pytest.raises(ValueError, match="available"):
    collect.NetworkSpec.parse("alexnet:1:224")


def test_task_seed_is_nonzero_and_stable():
  seeds = {collect.task_seed(s, f'["k{i}"]') for s in range(3) for i in range(50)}
  assert 0 not in seeds and len(seeds) == 150
  assert collect.task_seed(0, '["a"]') == collect.task_seed(0, '["a"]')


def test_default_hardware_name_is_folder_safe():
  name = collect.default_hardware_name()
  assert name and all(c.isalnum() or c == "-" for c in name) and name.endswith("c")


def test_measure_target_replaces_model():
  cfg = collect.CollectConfig(
    out_dir="x", networks=(), hardware="hw1", target="llvm -mcpu=znver4 -model=unknown"
  )
  assert collect.measure_target(cfg) == "llvm -mcpu=znver4 -model=hw1"


@needs_tvm
def test_collect_tiny_task_end_to_end_and_resume(tmp_path):
  """One tiny task (mlp's softmax), 2 programs: network info, records, then resume."""
  out = str(tmp_path / "tenset")
  cfg = collect.CollectConfig(
    out_dir=out,
    networks=(collect.NetworkSpec.parse("mlp:1:28"),),
    hardware="testhw",
    target="llvm",
    programs_per_task=2,
    start_idx=1,
    end_idx=2,
    seed=3,
    build_n_parallel=1,
  )
  old_umask = os.umask(0o027)
  try:
    summary = collect.collect(cfg, progress=False)
  finally:
    os.umask(old_umask)
  assert summary["tasks"] == 1 and summary["dumped_tasks"] == 1
  assert summary["measured_tasks"] == 1 and summary["measured_programs"] == 2
  # Collected files are data to share: the umask's mode, as open() gives (not mkstemp's 0600).
  modes = {
    os.path.relpath(os.path.join(root, n), out): os.stat(os.path.join(root, n)).st_mode & 0o777
    for root, _, names in os.walk(out)
    for n in names
  }
  assert len(modes) == 4 and set(modes.values()) == {0o640}, modes

  # Network info: our TenSet layout, readable by the dataset's reader.
  net = network_info.read_network_info(os.path.join(out, "network_info", "(mlp,[(1,28)]).json"))
  assert net.name == "mlp" and net.batch_size == 1 and net.input_size == 28
  assert len(net.tasks) >= 3 and all(t.weight >= 1 for t in net.tasks)

  # all_tasks.pkl (for TenSet's scripts) holds every task, not just the processed slice; it
  # loads with the baseline's restricted unpickler.
  pickled = search_tasks.load_search_tasks(os.path.join(out, "network_info", "all_tasks.pkl"))
  assert sorted(t.workload_key for t in pickled) == sorted(net.workload_keys)

  files = os.listdir(os.path.join(out, "measure_records", "testhw"))
  assert len(files) == 1
  path = os.path.join(out, "measure_records", "testhw", files[0])
  with open(path, encoding="utf-8") as f:
    recs = [json.loads(line) for line in f]
  assert len(recs) == 2
  wk = recs[0]["i"][0][0]
  assert files[0] == tenset.record_filename(wk)
  assert wk in net.workload_keys
  repeat = collect.repeat_for_flops(next(t.flop_ct for t in net.tasks if t.workload_key == wk))
  valid = [r for r in recs if r["r"][1] == 0]
  # Failed builds keep their error code, as in TenSet; this seed gives at least one success.
  assert valid
  for r in recs:
    assert r["v"] == "v0.6" and "-model=testhw" in r["i"][0][1]
    assert isinstance(r["r"][1], int)
  for r in valid:
    assert len(r["r"][0]) == repeat and all(c > 0 for c in r["r"][0])
  # The two programs are distinct, and the same ones that were dumped.
  with open(os.path.join(out, "to_measure_programs", files[0]), encoding="utf-8") as f:
    dumped = [json.loads(line)["i"][1][1] for line in f]
  assert [r["i"][1][1] for r in recs] == dumped and dumped[0] != dumped[1]

  # The produced file feeds the data pipeline unchanged.
  tf = records.read_task_file(path)
  assert tf.workload_key == wk and tf.hardware == "testhw"
  assert tf.features.shape[0] == len(valid)
  assert np.all(tf.scores > 0) and np.isclose(tf.scores.max(), 1)

  # Resume: finished tasks are not redone; a lost measure file is re-measured from the dump.
  mtime = os.path.getmtime(path)
  again = collect.collect(cfg, progress=False)
  assert again["already_dumped"] == 1 and again["already_measured"] == 1
  assert again["measured_tasks"] == 0 and os.path.getmtime(path) == mtime
  os.remove(path)
  third = collect.collect(cfg, progress=False)
  assert third["measured_tasks"] == 1 and third["already_dumped"] == 1
  with open(path, encoding="utf-8") as f:
    assert [json.loads(line)["i"][1][1] for line in f] == dumped
  # No staging files are left behind.
  for root, _, names in os.walk(out):
    assert not [n for n in names if n.startswith(".")], root


@needs_tvm
def test_sampling_is_deterministic_given_seed():
  spec = collect.NetworkSpec.parse("mlp:1:28")
  tasks, _ = collect.extract_network_tasks(spec, "llvm", None)
  task = tasks[0]
  a = [str(s) for s in collect.sample_programs(task, 6, seed=11)]
  b = [str(s) for s in collect.sample_programs(task, 6, seed=11)]
  assert a == b and len(set(a)) == len(a) == 6
