"""Network info parsing, hold-out specs/defaults and the 90/10 split."""

import json
import os

import numpy as np
import pytest

from tlp_jax.core import network_info as ni


def _write(folder, name, content):
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, name)
  with open(path, "w") as f:
    f.write(content if isinstance(content, str) else json.dumps(content))
  return path


def _net(name, batch, size, keys):
  return {
    "network": name,
    "batch_size": batch,
    "input_size": size,
    "tasks": [
      {"workload_key": k, "weight": i + 1, "flop_ct": 10.0 * (i + 1), "desc": k}
      for i, k in enumerate(keys)
    ],
  }


def test_sample_network_info(sample_tenset_dir):
  nets = ni.load_network_infos(sample_tenset_dir)
  assert len(nets) == 13
  by_label = {n.label: n for n in nets}
  r50 = by_label["resnet_50 (1,224)"]
  assert len(r50.tasks) == 29 and sum(t.weight for t in r50.tasks) == 57
  assert all(t.workload_key.startswith('["') for t in r50.tasks)
  # TVM writes flop_ct = -1 where it cannot count (global_avg_pool2d here); kept as read.
  assert sorted(t.flop_ct for t in r50.tasks)[:2] == [-1.0, 4000.0]
  assert ni.default_holdout(nets) == ni.TENSET_MINI_HOLDOUT
  held = ni.select_holdout(nets, ni.default_holdout(nets))
  assert [n.label for n in held] == ["bert_base (1,128)", "mobilenet (1,240)", "resnet_50 (1,224)"]
  assert len(ni.holdout_workload_keys(held)) == 59


def test_parse_errors_name_file_and_reason(tmp_path):
  folder = str(tmp_path / "network_info")
  bad_weight = _write(
    folder,
    "(a,[(1,8)]).json",
    _net("a", 1, 8, ["k"]) | {"tasks": [{"workload_key": "k", "weight": 0, "flop_ct": 1.0}]},
  )
  with pytest.raises(ni.NetworkInfoError, match=r"\(a,\[\(1,8\)\]\)\.json: tasks\[0\]\.weight"):
    ni.read_network_info(bad_weight)
  broken = _write(folder, "(b,[(1,8)]).json", '{"network": "b",\n "tasks": [}')
  with pytest.raises(ni.NetworkInfoError, match=r"invalid JSON at line 2"):
    ni.read_network_info(broken)
  mislabelled = _write(folder, "(c,[(1,8)]).json", _net("c", 1, 16, ["k"]))
  with pytest.raises(ni.NetworkInfoError, match="disagrees"):
    ni.read_network_info(mislabelled)
  dup = _write(folder, "(d,[(1,8)]).json", _net("d", 1, 8, ["k", "k"]))
  with pytest.raises(ni.NetworkInfoError, match="listed twice"):
    ni.read_network_info(dup)


def _bad_files(folder):
  """(path, expected message) of files that must each give one NetworkInfoError."""
  os.makedirs(folder, exist_ok=True)
  non_utf8 = os.path.join(folder, "(u,[(1,8)]).json")
  with open(non_utf8, "wb") as f:
    f.write(b'{"network": "u\xff\xfe", "batch_size": 1}')
  deep = _write(folder, "(n,[(1,8)]).json", "[" * 100_000 + "]" * 100_000)
  a_dir = os.path.join(folder, "(dir,[(1,8)]).json")
  os.makedirs(a_dir)
  empty = _write(folder, "(e,[(1,8)]).json", _net("e", 1, 8, []))
  return [
    (non_utf8, r"\(u,\[\(1,8\)\]\)\.json: not UTF-8 text \(byte 14"),
    (deep, r"\(n,\[\(1,8\)\]\)\.json: JSON nested too deeply"),
    (a_dir, r"\(dir,\[\(1,8\)\]\)\.json: is a directory"),
    (empty, r"\(e,\[\(1,8\)\]\)\.json: 'tasks' is empty"),
  ]


def test_unreadable_files_and_empty_networks_are_one_line_errors(tmp_path):
  for path, message in _bad_files(str(tmp_path / "network_info")):
    with pytest.raises(ni.NetworkInfoError, match=message) as e:
      ni.read_network_info(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", range(4))
def test_bad_file_fails_the_whole_folder(tmp_path, sample_tenset_dir, case):
  # Each case alone in an otherwise good folder: load_network_infos (what the build reads)
  # must refuse it, never skip it (an emptied hold-out network would move its tasks to train).
  src = os.path.join(sample_tenset_dir, "network_info")
  folder = tmp_path / "network_info"
  folder.mkdir()
  for name in os.listdir(src):
    if name.endswith(".json"):
      os.symlink(os.path.join(src, name), folder / name)
  path, message = _bad_files(str(tmp_path / "bad"))[case]
  os.rename(path, folder / os.path.basename(path))
  with pytest.raises(ni.NetworkInfoError, match=message):
    ni.load_network_infos(str(tmp_path))


def test_pickles_only_gives_instructions(tmp_path):
  _write(str(tmp_path / "network_info"), "((resnet_50,[(1,3,224,224)]),llvm).task.pkl", "x")
  with pytest.raises(
    ni.NetworkInfoError, match="tlp_jax.tvm.search_tasks convert --tenset_dir .* --allow_pickle"
  ):
    ni.load_network_infos(str(tmp_path))


def test_holdout_specs_and_defaults(tmp_path):
  folder = str(tmp_path / "network_info")
  for name, batch, size in [
    ("resnet_50", 1, 224),
    ("resnet_50", 4, 224),
    ("mobilenet", 1, 224),
    ("mobilenet", 1, 240),
    ("bert_base", 1, 128),
  ]:
    _write(
      folder,
      f"({name},[({batch},{size})]).json",
      _net(name, batch, size, [f"{name}-{batch}-{size}-{i}" for i in range(2)]),
    )
  nets = ni.load_network_infos(str(tmp_path))
  assert ni.default_holdout(nets) == ni.TENSET_MINI_HOLDOUT
  # No size: every input size, batch 1 only.
  assert [n.label for n in ni.select_holdout(nets, "mobilenet")] == [
    "mobilenet (1,224)",
    "mobilenet (1,240)",
  ]
  assert [n.label for n in ni.select_holdout(nets, ["resnet_50"])] == ["resnet_50 (1,224)"]
  with pytest.raises(ni.NetworkInfoError, match=r"vgg@224 .*Available: bert_base@128"):
    ni.select_holdout(nets, "vgg@224")
  with pytest.raises(ni.NetworkInfoError, match="bad hold-out spec"):
    ni.parse_holdout("resnet@x")
  # TenSet's default wins once all of its networks exist.
  for name, size in [("mobilenet_v2", 224), ("resnext_50", 224), ("bert_tiny", 128)]:
    _write(folder, f"({name},[(1,{size})]).json", _net(name, 1, size, [f"{name}-k"]))
  assert ni.default_holdout(ni.load_network_infos(str(tmp_path))) == ni.TENSET_HOLDOUT


def test_no_default_fits(tmp_path):
  _write(str(tmp_path / "network_info"), "(a,[(1,8)]).json", _net("a", 1, 8, ["k"]))
  with pytest.raises(ni.NetworkInfoError, match="pass one explicitly"):
    ni.default_holdout(ni.load_network_infos(str(tmp_path)))


def test_train_validation_split_exact_and_seeded():
  train, val = ni.train_validation_split(1000, seed=3)
  assert train.size == 900 and val.size == 100
  assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
  again = ni.train_validation_split(1000, seed=3)
  assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
  other = ni.train_validation_split(1000, seed=4)
  assert not np.array_equal(val, other[1])


def test_json_file_name_round_trip(tmp_path):
  net = ni.NetworkInfo("bert_base", 1, 128, (ni.NetworkTask("k", 2, 5.0, "d"),), target="cuda")
  path = _write(str(tmp_path / "network_info"), ni.json_file_name(net), net.to_json_dict())
  assert os.path.basename(path) == "((bert_base,[(1,128)]),cuda).json"
  back = ni.read_network_info(path)
  assert (back.name, back.batch_size, back.input_size, back.target) == ("bert_base", 1, 128, "cuda")
  assert back.tasks == net.tasks


def test_split_by_task_keeps_tasks_whole():
  record_task = np.repeat(np.arange(20) * 3, np.arange(1, 21))  # 20 tasks, ids not 0..19
  train, val = ni.train_validation_split_by_task(record_task, seed=0)
  assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(record_task.size))
  assert not set(record_task[train]) & set(record_task[val])
  assert len(set(record_task[val])) == 2  # 10% of 20 tasks
  # Seeded: same seed same split, another seed another one.
  assert np.array_equal(val, ni.train_validation_split_by_task(record_task, seed=0)[1])
  assert not np.array_equal(val, ni.train_validation_split_by_task(record_task, seed=1)[1])


def test_skeleton_file_is_not_a_network(sample_tenset_dir):
  assert os.path.isfile(os.path.join(sample_tenset_dir, "network_info", "skeletons.json"))
  assert all(
    not n.path.endswith("skeletons.json") for n in ni.load_network_infos(sample_tenset_dir)
  )
