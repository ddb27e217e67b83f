"""Tests of the dataset schema shared by the builder and the loader (data_pipelines/schema.py)."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from data_pipelines import loader, schema, tenset_tfds


def test_builder_and_loader_agree_with_the_schema():
  assert tenset_tfds.Tenset.name == schema.BUILDER_NAME
  assert str(tenset_tfds.Tenset.VERSION) == schema.VERSION
  assert tuple(f.name for f in dataclasses.fields(loader.SplitArrays)) == schema.FIELDS
  assert set(schema.ARRAY_NAMES) == set(schema.EXAMPLE_FIELDS)


def test_example_specs_and_shape():
  specs = schema.example_specs((25, 22), 2)
  assert tuple(specs) == schema.EXAMPLE_FIELDS
  assert specs[schema.FEATURES] == ((25, 22), np.float32)
  assert specs[schema.MASK] == ((2,), np.bool_)
  assert specs[schema.TASK_INDEX] == ((), np.int32)
  with_tokens = schema.example_specs((25, 22), 2, (40, 21))
  assert tuple(with_tokens) == schema.EXAMPLE_FIELDS + (schema.LOOP_TOKENS,)
  assert with_tokens[schema.LOOP_TOKENS] == ((40, 21), np.float16)
  assert schema.loop_token_shape({schema.LOOP_TOKENS_META: None}) is None
  assert schema.loop_token_shape({schema.LOOP_TOKENS_META: {"max_tokens": 40, "width": 21}}) == (
    40,
    21,
  )


def test_built_dataset_has_the_schema(built_sample_dataset, sample_arrays):
  ds_dir = schema.dataset_dir(built_sample_dataset, "all")
  assert loader.find_dataset_dir(built_sample_dataset, "all") == ds_dir
  for name in (schema.DATASET_INFO_FILE, schema.METADATA_FILE):
    assert os.path.isfile(os.path.join(ds_dir, name))
  arrays = sample_arrays("all")
  assert arrays.metadata["format"] == schema.METADATA_FORMAT
  specs = schema.example_specs(arrays.crop, len(arrays.hardware))
  for split in schema.SPLITS:
    assert schema.shard_files(ds_dir, split)
    s = arrays.split(split)
    for field, name in schema.ARRAY_NAMES.items():
      shape, dtype = specs[field]
      assert getattr(s, name).shape[1:] == shape and getattr(s, name).dtype == dtype


def test_loader_refuses_another_metadata_format(built_sample_dataset, tmp_path):
  src = schema.dataset_dir(built_sample_dataset, "xeon-emr-16c")
  dst = schema.dataset_dir(str(tmp_path), "xeon-emr-16c")
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns(loader.CACHE_DIR))
  path = os.path.join(dst, schema.METADATA_FILE)
  with open(path) as f:
    meta = json.load(f)
  meta["format"] = schema.METADATA_FORMAT + 1
  with open(path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(ValueError, match="metadata format"):
    loader.load_arrays(str(tmp_path), "xeon-emr-16c", use_cache=False)
