"""Tests of the TenSet layout (tlp_jax/core/tenset.py)."""

import os

import pytest

from tlp_jax.core import records, tenset


def test_record_filename_is_tensets_clean_name():
  wk = '["01a9e95783ea35e27c2cf5bba3555a81", [1, 128, 8, 8, 16], [1, 128, 1, 1, 16]]'
  assert tenset.record_filename(wk) == (
    "([01a9e95783ea35e27c2cf5bba3555a81,[1,128,8,8,16],[1,128,1,1,16]],llvm).json"
  )
  assert tenset.record_filename(wk, "cuda").endswith(",cuda).json")


def test_record_filename_matches_every_sample_file(sample_tenset_dir):
  for hw in tenset.hardware_folders(sample_tenset_dir):
    for path in tenset.task_files(sample_tenset_dir, hw):
      first = records.first_record(path)
      assert tenset.record_filename(first.workload_key, "llvm") == os.path.basename(path)


def test_hardware_folders_and_task_files(sample_tenset_dir, tmp_path):
  assert tenset.hardware_folders(sample_tenset_dir) == ["epyc-9004", "xeon-emr-16c"]
  folder = tmp_path / "measure_records" / "hw"
  folder.mkdir(parents=True)
  for name in ("b.json", "a.json", ".tmp-c.json", "notes.txt"):
    (folder / name).write_text("")
  # Sorted, records only: no hidden temporaries of an interrupted collection.
  assert tenset.task_files(str(tmp_path), "hw") == [str(folder / "a.json"), str(folder / "b.json")]
  with pytest.raises(tenset.TensetLayoutError, match="available: hw"):
    tenset.task_files(str(tmp_path), "nope")


def test_missing_layout_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no measure_records folder"):
    tenset.hardware_folders(str(tmp_path))
  (tmp_path / "measure_records").mkdir()
  with pytest.raises(tenset.TensetLayoutError, match="no hardware folders"):
    tenset.hardware_folders(str(tmp_path))


def test_paths():
  assert tenset.measure_records_dir("/t", "hw") == os.path.join("/t", "measure_records", "hw")
  assert tenset.all_tasks_path("/t") == os.path.join("/t", "network_info", "all_tasks.pkl")
