"""Starter models shipped inside the package (``tlp_jax/pretrained/<name>.npz``), by name.

A user who has not trained anything can tune with one of them::

    from tlp_jax.core import pretrained
    pretrained.available()                      # e.g. ('epyc-9004', 'mtl', 'xeon-emr-16c')
    model = pretrained.load("epyc-9004")        # a tlp_jax.core.predictor.Predictor

The files are package data (``pyproject.toml``), found with ``importlib.resources``, so they
work offline right after ``pip install``. A model *spec* is what the command line takes:
``pretrained:NAME`` or a path to an exported ``.npz`` (``load_spec``). NumPy only.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import pathlib
import re
from typing import TYPE_CHECKING

from tlp_jax.core import predictor as npred

if TYPE_CHECKING:
  from importlib.resources.abc import Traversable

PACKAGE = "tlp_jax.pretrained"
SPEC_PREFIX = "pretrained:"
SUFFIX = ".npz"
# A name is a file stem inside the package folder: no separators, no "..".
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PretrainedError(ValueError):
  """An unknown or unreadable starter model."""


def package_dir() -> Traversable:
  """The folder of the shipped ``.npz`` files (tests point this elsewhere)."""
  return importlib.resources.files(PACKAGE)


def available() -> tuple[str, ...]:
  """Names of the shipped starter models, sorted (empty if none ship)."""
  return tuple(
    sorted(
      entry.name[: -len(SUFFIX)]
      for entry in package_dir().iterdir()
      if entry.name.endswith(SUFFIX) and entry.is_file()
    )
  )


def _entry(name: str) -> Traversable:
  names = available()
  if not _NAME.match(name) or name not in names:
    shipped = ", ".join(names) if names else "none are installed"
    raise PretrainedError(f"unknown pretrained model {name!r}; available: {shipped}")
  return package_dir() / (name + SUFFIX)


def as_path(name: str) -> contextlib.AbstractContextManager[pathlib.Path]:
  """A context manager giving the starter model ``name``'s file as a real path (for readers
  that take a path, e.g. fine-tuning's ``init_from``).

  Raises:
    PretrainedError: ``name`` is not one of :func:`available` (the message lists them).
  """
  return importlib.resources.as_file(_entry(name))


def load(name: str) -> npred.Predictor:
  """The starter model ``name`` as a NumPy ``Predictor``.

  Raises:
    PretrainedError: ``name`` is not one of :func:`available` (the message lists them).
    tlp_jax.core.predictor.PredictorError: the shipped file is damaged.
  """
  # as_file gives a real path even when the package sits in a zip.
  with importlib.resources.as_file(_entry(name)) as path:
    return npred.Predictor.load(path)


def is_spec(spec: str) -> bool:
  """Whether ``spec`` names a starter model (``pretrained:NAME``)."""
  return isinstance(spec, str) and spec.startswith(SPEC_PREFIX)


def load_spec(spec: str | os.PathLike) -> npred.Predictor:
  """A model from ``pretrained:NAME`` or an exported ``.npz`` path.

  Raises:
    PretrainedError: an unknown starter name.
    FileNotFoundError, tlp_jax.core.predictor.PredictorError: a missing or bad file.
  """
  if isinstance(spec, str) and is_spec(spec):
    return load(spec[len(SPEC_PREFIX) :])
  return npred.Predictor.load(spec)
