"""Tests of the starter-model loader (tlp_jax/core/pretrained.py), on a model made here: they
pass whether or not starter weights ship in tlp_jax/pretrained/."""

import pathlib

import numpy as np
import pytest

from tests.core.test_online import _programs, tiny_export
from tlp_jax.core import predictor as npred
from tlp_jax.core import pretrained

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def package_dir(tmp_path, monkeypatch):
  """tlp_jax/pretrained replaced by a folder holding one tiny model, 'tiny-cpu'."""
  np.savez(tmp_path / "tiny-cpu.npz", **tiny_export(("tiny-cpu",)))
  (tmp_path / "README.md").write_text("not a model")
  monkeypatch.setattr(pretrained, "package_dir", lambda: tmp_path)
  return tmp_path


def test_a_shipped_model_loads_by_name_and_by_spec(package_dir):
  assert pretrained.available() == ("tiny-cpu",)
  model = pretrained.load("tiny-cpu")
  want = npred.Predictor(tiny_export(("tiny-cpu",))).predict(_programs(5))
  np.testing.assert_array_equal(model.predict(_programs(5)), want)
  assert model.hardware == ("tiny-cpu",)
  assert pretrained.is_spec("pretrained:tiny-cpu") and not pretrained.is_spec("tiny-cpu.npz")
  np.testing.assert_array_equal(
    pretrained.load_spec("pretrained:tiny-cpu").predict(_programs(5)), want
  )
  # A path is a path.
  path = str(package_dir / "tiny-cpu.npz")
  np.testing.assert_array_equal(pretrained.load_spec(path).predict(_programs(5)), want)


@pytest.mark.parametrize("name", ["epyc", "../tiny-cpu", "tiny-cpu.npz", "README", ""])
def test_an_unknown_name_lists_the_available_ones(package_dir, name):
  with pytest.raises(
    pretrained.PretrainedError, match=r"unknown pretrained model .*available: tiny-cpu"
  ):
    pretrained.load(name)


def test_no_models_installed_says_so(tmp_path, monkeypatch):
  monkeypatch.setattr(pretrained, "package_dir", lambda: tmp_path)
  assert pretrained.available() == ()
  with pytest.raises(pretrained.PretrainedError, match="none are installed"):
    pretrained.load_spec("pretrained:epyc-9004")


def test_a_damaged_shipped_file_is_a_predictor_error(package_dir):
  (package_dir / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(npred.PredictorError, match="broken.npz"):
    pretrained.load("broken")


def test_the_real_package_folder_is_package_data():
  """The folder is an importable package and pyproject ships its .npz files."""
  assert pathlib.Path(str(pretrained.package_dir())) == REPO / "tlp_jax" / "pretrained"
  for name in pretrained.available():  # whatever ships must load
    assert pretrained.load(name).num_heads >= 1
  text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
  assert '\n"tlp_jax.pretrained" = ["*.npz"]\n' in text.split("[tool.setuptools.package-data]")[1]
