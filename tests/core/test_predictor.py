"""Predictor.load on damaged files: one clear PredictorError naming the file, never a raw error."""

import numpy as np
import pytest

from tlp_jax.core import predictor as npred


def test_a_truncated_npz_is_a_predictor_error(tmp_path):
  path = tmp_path / "model.npz"
  np.savez(path, a=np.arange(10_000, dtype=np.float32), b=np.ones((100, 100), np.float32))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(npred.PredictorError, match="model.npz: not a readable .npz"):
    npred.Predictor.load(path)


def test_a_file_that_is_no_zip_is_a_predictor_error(tmp_path):
  path = tmp_path / "model.npz"
  path.write_bytes(b"PK\x03\x04 not really a zip archive")
  with pytest.raises(npred.PredictorError, match="model.npz"):
    npred.Predictor.load(path)
