"""bench.common: results files written whole (umask mode); command-line overrides parsed once."""

import json
import os

import numpy as np
import pytest

from bench import common


def test_write_json_writes_whole_files_or_keeps_the_previous_one(tmp_path, capsys):
  path = str(tmp_path / "results" / "run.json")
  old = os.umask(0o027)
  try:
    common.write_json(path, {"loss": np.float32(0.5), "steps": np.arange(2)})
  finally:
    os.umask(old)
  assert json.load(open(path)) == {"loss": 0.5, "steps": [0, 1]}
  assert os.stat(path).st_mode & 0o777 == 0o640
  assert capsys.readouterr().out == f"wrote {path}\n"
  circular = {"variant": "b"}
  circular["self"] = circular
  with pytest.raises(ValueError, match="Circular reference"):
    common.write_json(path, circular, announce=False)  # fails half-way through the file
  assert json.load(open(path)) == {"loss": 0.5, "steps": [0, 1]}
  assert os.listdir(tmp_path / "results") == ["run.json"]


def test_parse_overrides_reads_python_literals_and_refuses_malformed_items():
  got = common.parse_overrides(["num_epochs=2", "model.decoder_dims=(64,1)", "name='x=y'"])
  assert got == {"num_epochs": 2, "model.decoder_dims": (64, 1), "name": "x=y"}
  for bad in ("num_epochs", "=3", "lr=abc("):
    with pytest.raises(SystemExit, match="bad override"):
      common.parse_overrides([bad])
