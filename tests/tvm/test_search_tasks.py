"""Tests of TenSet's SearchTask pickles (tlp_jax/tvm/search_tasks.py)."""

import importlib.util
import os
import pickle

import pytest

from tlp_jax.core import network_info, tenset
from tlp_jax.tvm import search_tasks

HAS_TVM = importlib.util.find_spec("tvm") is not None
needs_tvm = pytest.mark.skipif(not HAS_TVM, reason="TVM not installed (pip install -e '.[tvm]')")


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


@needs_tvm
def test_restricted_unpickler_refuses_foreign_globals(tmp_path):
  path = tmp_path / "all_tasks.pkl"
  path.write_bytes(pickle.dumps([_Evil()]))
  with pytest.raises(
    search_tasks.SearchTaskFileError, match=r"all_tasks.pkl: .*refusing to load posix.system"
  ):
    search_tasks.load_search_tasks(str(path))


@needs_tvm
def test_sample_tasks_load_and_register(sample_tenset_dir):
  tasks = search_tasks.load_search_tasks(tenset.all_tasks_path(sample_tenset_dir))
  assert tasks and len({t.workload_key for t in tasks}) == len(tasks)
  assert search_tasks.register_tenset_tasks(sample_tenset_dir) == len(tasks)


def test_missing_tasks_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="all_tasks.pkl"):
    search_tasks.register_tenset_tasks(str(tmp_path))


def test_conversion_needs_the_explicit_opt_in(tmp_path):
  (tmp_path / "network_info").mkdir()
  with pytest.raises(network_info.NetworkInfoError, match="allow_pickle"):
    search_tasks.convert_pickles(str(tmp_path), allow_pickle=False)


@needs_tvm
def test_convert_a_network_pickle(tmp_path, sample_tenset_dir):
  """A TenSet-style ``(tasks, weights)`` pickle converts to the JSON network info."""
  tasks = search_tasks.load_search_tasks(tenset.all_tasks_path(sample_tenset_dir))[:3]
  folder = tmp_path / "network_info"
  folder.mkdir()
  with open(folder / "((toy,[(1,3,32,32)]),llvm -mcpu=x).task.pkl", "wb") as f:
    pickle.dump((tasks + tasks[:1], [2, 1, 1, 3]), f)
  written = search_tasks.convert_pickles(str(tmp_path), allow_pickle=True)
  assert [os.path.basename(p) for p in written] == ["(toy,[(1,32)]).json"]
  net = network_info.read_network_info(written[0])
  assert (net.name, net.batch_size, net.input_size, net.target) == ("toy", 1, 32, "llvm")
  # The repeated workload's occurrences add up.
  assert [t.weight for t in net.tasks] == [5, 1, 1]
  assert [t.workload_key for t in net.tasks] == [t.workload_key for t in tasks]


@needs_tvm
def test_a_failed_conversion_keeps_the_previous_json(tmp_path, sample_tenset_dir, monkeypatch):
  tasks = search_tasks.load_search_tasks(tenset.all_tasks_path(sample_tenset_dir))[:2]
  folder = tmp_path / "network_info"
  folder.mkdir()
  pkl = "((toy,[(1,3,32,32)]),llvm).task.pkl"
  with open(folder / pkl, "wb") as f:
    pickle.dump((tasks, [1, 1]), f)
  (previous,) = search_tasks.convert_pickles(str(tmp_path), allow_pickle=True)
  with open(previous) as f:
    before = f.read()
  # JSON encoding fails half-way through the file (an unserializable last field).
  to_json_dict = network_info.NetworkInfo.to_json_dict
  monkeypatch.setattr(
    network_info.NetworkInfo, "to_json_dict", lambda self: {**to_json_dict(self), "z": object()}
  )
  with pytest.raises(TypeError, match="not JSON serializable"):
    search_tasks.convert_pickles(str(tmp_path), allow_pickle=True, overwrite=True)
  with open(previous) as f:
    assert f.read() == before
  assert sorted(os.listdir(folder)) == sorted([os.path.basename(previous), pkl])


def _bad_pickles(folder, sample_tenset_dir):
  """{case: bytes or None (a directory)} of files no SearchTask reader may accept."""
  with open(tenset.all_tasks_path(sample_tenset_dir), "rb") as f:
    real = f.read()
  return {
    "garbage": b"garbage, not a pickle",
    "truncated": real[: len(real) // 2],
    "empty": b"",
    "evil": pickle.dumps([_Evil()]),
    "directory": None,
  }


def _place(path, content):
  if content is None:
    os.makedirs(path)
  else:
    with open(path, "wb") as f:
      f.write(content)


@needs_tvm
@pytest.mark.parametrize("case", ["garbage", "truncated", "empty", "evil", "directory"])
def test_bad_pickles_are_one_error_naming_the_file(tmp_path, sample_tenset_dir, case):
  content = _bad_pickles(tmp_path, sample_tenset_dir)[case]
  path = str(tmp_path / "all_tasks.pkl")
  _place(path, content)
  with pytest.raises(search_tasks.SearchTaskFileError, match=r"all_tasks\.pkl: ") as e:
    search_tasks.load_search_tasks(path)
  assert "\n" not in str(e.value)
  net = str(tmp_path / "((toy,[(1,3,32,32)]),llvm).task.pkl")
  _place(net, content)
  with pytest.raises(search_tasks.SearchTaskFileError, match=r"llvm\)\.task\.pkl: "):
    search_tasks.network_info_from_pickle(net)


@needs_tvm
def test_not_a_list_and_empty_network_pickles(tmp_path):
  path = tmp_path / "all_tasks.pkl"
  path.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(search_tasks.SearchTaskFileError, match="expected a pickled list"):
    search_tasks.load_search_tasks(str(path))
  net = tmp_path / "((toy,[(1,3,32,32)]),llvm).task.pkl"
  net.write_bytes(pickle.dumps(([], [])))
  # An empty network would empty a hold-out network once converted: refused here.
  with pytest.raises(network_info.NetworkInfoError, match="no tasks"):
    search_tasks.network_info_from_pickle(str(net))


@needs_tvm
def test_cli_bad_network_pickle_is_one_line(tmp_path, sample_tenset_dir, run_python):
  folder = tmp_path / "network_info"
  folder.mkdir()
  content = _bad_pickles(tmp_path, sample_tenset_dir)["truncated"]
  _place(str(folder / "((toy,[(1,3,32,32)]),llvm).task.pkl"), content)
  proc = run_python(
    "-m", "tlp_jax.tvm.search_tasks", "convert", "--tenset_dir", str(tmp_path), "--allow_pickle"
  )
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert "llvm).task.pkl: not a readable TVM SearchTask pickle" in lines[0]
