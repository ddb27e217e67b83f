"""All-or-nothing dataset builds in a ``--data_dir`` (no TFDS, no JAX).

A build writes every config into a staging folder ``DATA_DIR/staging_XXXX/`` and only when all of
them are complete swaps them into ``DATA_DIR/tenset/CONFIG/VERSION`` (:class:`StagedBuild`), so a
failed or killed build leaves the previous datasets as they were, and the configs of one build
appear together:

1. build into ``staging_XXXX/tenset/CONFIG/VERSION`` (TFDS's own ``incomplete.*`` folders are in
   there too);
2. write ``staging_XXXX/COMPLETE`` (atomically; it lists the configs to swap in);
3. per config: move the existing ``VERSION`` folder to ``staging_XXXX/replaced/``, move the new
   one in (two renames on one file system);
4. delete the staging folder.

A build killed before step 2 leaves a staging folder without ``COMPLETE``: the next build deletes
it. One killed during step 3 leaves one with ``COMPLETE``: the next build first finishes its swap
(rolls forward), so the configs of that build end up together. Either way nothing of the old
datasets is lost before the new ones are complete. Leftovers of TFDS's in-place builds (the
``incomplete.*`` folders and files of earlier versions of this project) are deleted too.

Only one build runs in a ``data_dir`` at a time (:func:`build_lock`, an ``flock`` on
``DATA_DIR/.build.lock``); the leftovers are only touched under that lock, so a running build's
staging folder is never deleted by another.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from absl import logging

from data_pipelines import schema

STAGING_PREFIX = "staging_"
COMPLETE_FILE = "COMPLETE"
REPLACED_DIR = "replaced"
LOCK_FILE = ".build.lock"
# TFDS's temporary names (tensorflow_datasets.core.constants.INCOMPLETE_PREFIX).
TFDS_INCOMPLETE_PREFIX = "incomplete."


def umask_mode() -> int:
  """The mode ``open()`` gives a new file under the current umask (``0o666 & ~umask``);
  files made with ``mkstemp`` (0600) get it too."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


class BuildDirError(RuntimeError):
  """The data dir cannot be built into (another build holds it; the message says which)."""


@contextlib.contextmanager
def build_lock(data_dir: str) -> Iterator[None]:
  """Holds the exclusive build lock of ``data_dir`` (created if needed).

  Raises:
    BuildDirError: another process is building into ``data_dir``, or it is no directory.
  """
  if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
    raise BuildDirError(f"{data_dir}: exists and is not a directory (data_dir must be a folder)")
  os.makedirs(data_dir, exist_ok=True)
  path = os.path.join(data_dir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise BuildDirError(
          f"{data_dir}: another build is running in this data_dir (it holds {path})"
        ) from None
      raise
    yield
  finally:
    os.close(fd)  # releases the lock


def _read_complete(staging: str) -> list[str] | None:
  """The config names a staging folder's ``COMPLETE`` lists, or None (no or unreadable file)."""
  try:
    with open(os.path.join(staging, COMPLETE_FILE), "rb") as f:
      names = json.loads(f.read())["configs"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
    return None
  return names


def _swap_in(staging: str, data_dir: str, config_names: Sequence[str]) -> list[str]:
  """Moves every staged ``tenset/CONFIG/VERSION`` of ``config_names`` into ``data_dir``.

  Idempotent: a config already moved (killed half-way, rolled forward later) is skipped.
  Returns the dataset folders now in place.
  """
  moved = []
  for name in config_names:
    src_config = schema.config_dir(staging, name)
    if not os.path.isdir(src_config):
      continue  # moved by an earlier, interrupted swap
    dst_config = schema.config_dir(data_dir, name)
    os.makedirs(dst_config, exist_ok=True)
    for version in sorted(os.listdir(src_config)):
      src = os.path.join(src_config, version)
      if version.startswith(TFDS_INCOMPLETE_PREFIX) or not os.path.isdir(src):
        continue
      dst = os.path.join(dst_config, version)
      if os.path.lexists(dst):
        parked = os.path.join(staging, REPLACED_DIR, name)
        os.makedirs(parked, exist_ok=True)
        os.replace(dst, os.path.join(parked, version))
      os.replace(src, dst)
      moved.append(dst)
    shutil.rmtree(src_config, ignore_errors=True)
  return moved


def clean_leftovers(data_dir: str) -> list[str]:
  """Finishes or deletes what killed builds left in ``data_dir``; call under :func:`build_lock`.

  A staging folder whose build was complete is swapped in first (see the module docstring);
  any other staging folder, and TFDS ``incomplete.*`` folders or files next to or inside the
  config folders, are deleted. Returns the paths removed or rolled forward (also logged).
  """
  if not os.path.isdir(data_dir):
    return []
  done = []
  for name in sorted(os.listdir(data_dir)):
    path = os.path.join(data_dir, name)
    if not (name.startswith(STAGING_PREFIX) and os.path.isdir(path)):
      continue
    configs = _read_complete(path)
    if configs is not None:
      moved = _swap_in(path, data_dir, configs)
      logging.warning(
        "%s: a complete build was interrupted while being swapped in; finished it (%s)",
        path,
        ", ".join(moved) or "nothing left to move",
      )
    else:
      logging.warning("%s: deleting the staging folder of an interrupted build", path)
    shutil.rmtree(path, ignore_errors=True)
    done.append(path)
  root = os.path.join(data_dir, schema.BUILDER_NAME)
  if os.path.isdir(root):
    for config in sorted(os.listdir(root)):
      config_dir = os.path.join(root, config)
      candidates = [config_dir]
      if os.path.isdir(config_dir):
        candidates += [os.path.join(config_dir, v) for v in sorted(os.listdir(config_dir))]
      for parent in candidates:
        if not os.path.isdir(parent):
          continue
        for entry in sorted(os.listdir(parent)):
          if not entry.startswith(TFDS_INCOMPLETE_PREFIX):
            continue
          path = os.path.join(parent, entry)
          logging.warning("%s: deleting an incomplete TFDS leftover", path)
          if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
          else:
            os.remove(path)
          done.append(path)
  return done


class StagedBuild:
  """One all-or-nothing build into ``data_dir`` (see the module docstring).

  Use as a context manager; build into :attr:`out_dir` (a TFDS ``data_dir``), keep scratch files
  in :attr:`work_dir`, call :meth:`commit` with the config names when all are built. Leaving the
  block without a commit (an error) deletes the staging folder and leaves ``data_dir`` as it was.
  """

  def __init__(self, data_dir: str):
    self.data_dir = data_dir
    self.staging: str | None = None
    self._lock = None

  @property
  def out_dir(self) -> str:
    """The TFDS ``data_dir`` the configs are built into (inside the staging folder)."""
    return self.staging

  @property
  def work_dir(self) -> str:
    """Scratch space of the build (deleted with the staging folder)."""
    return os.path.join(self.staging, "work")

  def __enter__(self) -> StagedBuild:
    self._lock = build_lock(self.data_dir)
    self._lock.__enter__()
    try:
      clean_leftovers(self.data_dir)
      self.staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.data_dir)
      os.makedirs(self.work_dir)
    except BaseException:
      self._lock.__exit__(None, None, None)
      raise
    return self

  def commit(self, config_names: Sequence[str]) -> list[str]:
    """Swaps the built configs into ``data_dir``; returns the dataset folders now in place."""
    tmp = os.path.join(self.staging, COMPLETE_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump({"configs": list(config_names)}, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(self.staging, COMPLETE_FILE))
    return _swap_in(self.staging, self.data_dir, config_names)

  def __exit__(self, *exc) -> None:
    try:
      if self.staging is not None:
        shutil.rmtree(self.staging, ignore_errors=True)
    finally:
      self._lock.__exit__(None, None, None)
