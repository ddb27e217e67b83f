"""Writing output files atomically: a reader sees the previous file or the new one, never half.

Standard library only. Each file is written to a staging file next to it, created with mode
``0o666`` so the umask applies as it does for ``open`` (``tempfile.mkstemp`` would make it
``0600``), flushed to disk and then swapped in with ``os.replace``. :func:`replace_all` stages a
group of files (a report's JSON, Markdown and PNG) and swaps them in only once every one of
them has been written, so a failure leaves every previous file of the group in place.
:func:`write_path_atomically` is the same for writers that take a file name instead of a file
object (TVM's ``auto_scheduler.save_records``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from typing import IO, Any

# Staging files are "<name>.<STAGING_TAG>.<random>": hidden from globs of the final names.
STAGING_TAG = "staging"


def _staging_path(path: str) -> str:
  directory, name = os.path.split(os.path.abspath(path))
  return os.path.join(directory, f".{name}.{STAGING_TAG}.{secrets.token_hex(4)}")


def _create_staging(path: str) -> tuple[int, str]:
  """Creates an empty staging file of ``path`` (folders made as needed); returns (fd, path)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _staging_path(path)
  # 0o666: the umask applies, as for open(); O_EXCL: never another writer's staging file.
  return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def _write_staging(path: str, write: Callable[[IO[Any]], Any], binary: bool) -> str:
  """Writes a staging file of ``path`` with ``write(file)``; returns its path."""
  fd, tmp = _create_staging(path)
  try:
    with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    _remove_quietly(tmp)
    raise
  return tmp


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def write_atomically(path: str, write: Callable[[IO[Any]], Any], binary: bool = False) -> None:
  """Writes ``path`` with ``write(file)`` (text, UTF-8, unless ``binary``) and swaps it in.

  If ``write`` raises, ``path`` is untouched (the previous file, if any, stays) and no staging
  file is left behind.
  """
  os.replace(_write_staging(path, write, binary), path)


def write_path_atomically(path: str, write: Callable[[str], Any]) -> None:
  """Like :func:`write_atomically` for a writer that takes a file name: ``write(staging_path)``.

  The staging file exists (empty, with the umask's mode) when ``write`` is called; ``write``
  may open it by name any number of times (TVM's ``save_records`` appends to it). If ``write``
  raises, ``path`` is untouched and the staging file is removed.
  """
  fd, tmp = _create_staging(path)
  os.close(fd)
  try:
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    _remove_quietly(tmp)
    raise


def replace_all(writers: Mapping[str, tuple[Callable[[IO[Any]], Any], bool]]) -> None:
  """Writes a group of files ``{path: (write, binary)}``; swaps them in only if all succeed.

  On a failure while staging, no final file has been touched. The swaps themselves are one
  ``os.replace`` each (the group is not one atomic step, but each file always is whole).
  """
  staged: dict[str, str] = {}
  try:
    for path, (write, binary) in writers.items():
      staged[path] = _write_staging(path, write, binary)
  except BaseException:
    for tmp in staged.values():
      _remove_quietly(tmp)
    raise
  for path, tmp in staged.items():
    os.replace(tmp, path)
