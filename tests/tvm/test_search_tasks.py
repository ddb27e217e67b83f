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
  with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system"):
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
