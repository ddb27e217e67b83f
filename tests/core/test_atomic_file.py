"""tlp_jax.core.atomic_file: whole files or the previous ones, with the umask's mode."""

import os

import pytest

from tlp_jax.core import atomic_file


def test_write_atomically_uses_the_umask_and_replaces_whole(tmp_path):
  path = str(tmp_path / "a" / "out.txt")
  old = os.umask(0o002)
  try:
    atomic_file.write_atomically(path, lambda f: f.write("one"))
  finally:
    os.umask(old)
  assert open(path).read() == "one" and os.stat(path).st_mode & 0o777 == 0o664

  def fails(f):
    f.write("half of tw")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    atomic_file.write_atomically(path, fails)
  assert open(path).read() == "one"
  assert os.listdir(tmp_path / "a") == ["out.txt"]
  atomic_file.write_atomically(path, lambda f: f.write(b"\x00two"), binary=True)
  assert open(path, "rb").read() == b"\x00two"


def test_replace_all_swaps_in_nothing_unless_every_file_is_written(tmp_path):
  a, b = str(tmp_path / "a.json"), str(tmp_path / "b.md")
  atomic_file.replace_all(
    {a: (lambda f: f.write("A1"), False), b: (lambda f: f.write("B1"), False)}
  )

  def fails(f):
    raise RuntimeError("render failed")

  with pytest.raises(RuntimeError):
    atomic_file.replace_all({a: (lambda f: f.write("A2"), False), b: (fails, False)})
  assert (open(a).read(), open(b).read()) == ("A1", "B1")
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.md"]


def test_write_path_atomically_hands_the_writer_a_file_name(tmp_path):
  path = str(tmp_path / "d" / "records.json")

  def append_twice(name):  # as TVM's save_records does: opens the file by name, appends
    for line in ("a\n", "b\n"):
      with open(name, "a") as f:
        f.write(line)

  old = os.umask(0o027)
  try:
    atomic_file.write_path_atomically(path, append_twice)
  finally:
    os.umask(old)
  assert open(path).read() == "a\nb\n" and os.stat(path).st_mode & 0o777 == 0o640

  def fails(name):
    with open(name, "a") as f:
      f.write("half")
    raise RuntimeError("measure failed")

  with pytest.raises(RuntimeError, match="measure failed"):
    atomic_file.write_path_atomically(path, fails)
  assert open(path).read() == "a\nb\n"
  assert os.listdir(tmp_path / "d") == ["records.json"]
