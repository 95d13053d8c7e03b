"""Tests of tf1hess._files: outputs written whole or not at all.

Every write is checked by what is left in a fresh directory: the final file
(or directory) with its new content on success; on failure or interruption
the old content, or nothing, and never a temporary.
"""

import os
import tempfile
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tf1hess import _files


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _write(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


class _DirTestCase(tf.test.TestCase, parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp(dir=self.get_temp_dir())

  def path(self, name):
    return os.path.join(self.dir, name)


class AtomicOutputTest(_DirTestCase):
  def test_renames_on_success(self):
    path = self.path("out.txt")
    with _files.atomic_output(path) as tmp:
      self.assertNotEqual(tmp, path)
      self.assertEqual(os.path.dirname(tmp), self.dir)
      _write(tmp, "done")
      self.assertFalse(os.path.exists(path))
    self.assertEqual(_read(path), "done")
    self.assertEqual(os.listdir(self.dir), ["out.txt"])
    self.assertEqual(os.stat(path).st_mode & 0o777, 0o666 & ~_umask())

  def test_replaces_an_existing_file_only_when_complete(self):
    path = self.path("out.txt")
    _write(path, "old")
    with _files.atomic_output(path) as tmp:
      _write(tmp, "new")
      self.assertEqual(_read(path), "old")
    self.assertEqual(_read(path), "new")
    self.assertEqual(os.listdir(self.dir), ["out.txt"])

  @parameterized.named_parameters(
    ("error", RuntimeError), ("interrupt", KeyboardInterrupt)
  )
  def test_leaves_nothing_on_failure(self, exception):
    with self.assertRaises(exception):
      with _files.atomic_output(self.path("out.npy"), suffix=".npy") as tmp:
        _write(tmp, "partial")
        raise exception("interrupted")
    self.assertEqual(os.listdir(self.dir), [])

  @parameterized.named_parameters(
    ("error", RuntimeError), ("interrupt", KeyboardInterrupt)
  )
  def test_failure_keeps_the_old_file(self, exception):
    path = self.path("out.txt")
    _write(path, "old")
    with self.assertRaises(exception):
      with _files.atomic_output(path) as tmp:
        _write(tmp, "partial")
        raise exception("interrupted")
    self.assertEqual(_read(path), "old")
    self.assertEqual(os.listdir(self.dir), ["out.txt"])

  def test_suffix_ends_the_temporary_name(self):
    # `np.save` appends ".npy" to a name that does not end with it.
    x = np.arange(6.0).reshape(2, 3)
    path = self.path("x.npy")
    with _files.atomic_output(path, suffix=".npy") as tmp:
      self.assertEndsWith(tmp, ".npy")
      np.save(tmp, x)
    self.assertAllEqual(np.load(path), x)
    self.assertEqual(os.listdir(self.dir), ["x.npy"])

  def test_stale_temporaries_of_a_killed_writer_are_removed(self):
    path = self.path("out[1].json")
    # What a writer killed inside `atomic_output` leaves behind: the real
    # temporary name, made by the same code.
    manager = _files.atomic_output(path, suffix=".json")
    stale = manager.__enter__()
    others = ["out[1].json", ".out[1].json.x.tmp.npy", ".other.json.x.tmp.json"]
    for name in others:
      _write(self.path(name), "")
    _files.remove_stale_temporaries(path, suffix=".json")
    self.assertFalse(os.path.exists(stale))
    self.assertCountEqual(os.listdir(self.dir), others)

  def test_nothing_stale_is_nothing_to_do(self):
    _write(self.path("out.txt"), "kept")
    _files.remove_stale_temporaries(self.path("out.txt"))
    self.assertEqual(os.listdir(self.dir), ["out.txt"])


class AtomicDirectoryTest(_DirTestCase):
  def test_renames_or_removes_a_directory(self):
    path = self.path("model")
    with self.assertRaises(RuntimeError):
      with _files.atomic_output(path, directory=True) as tmp:
        _write(os.path.join(tmp, "f"), "partial")
        raise RuntimeError("interrupted")
    self.assertEqual(os.listdir(self.dir), [])
    with _files.atomic_output(path, directory=True) as tmp:
      _write(os.path.join(tmp, "f"), "done")
    self.assertEqual(os.listdir(path), ["f"])
    self.assertEqual(os.listdir(self.dir), ["model"])
    self.assertEqual(os.stat(path).st_mode & 0o777, 0o777 & ~_umask())

  def _old(self, kind):
    """Puts an old output of `kind` at `model`; returns what must survive."""
    path = self.path("model")
    if kind == "full_directory":
      os.mkdir(path)
      _write(os.path.join(path, "old"), "old")
    elif kind == "empty_directory":
      os.mkdir(path)
    elif kind == "file":
      _write(path, "old")
    else:  # A link to a directory elsewhere, which must stay whole.
      target = tempfile.mkdtemp(dir=self.get_temp_dir())
      _write(os.path.join(target, "old"), "old")
      os.symlink(target, path)
      return target
    return None

  @parameterized.named_parameters(
    ("full_directory", "full_directory"),
    ("empty_directory", "empty_directory"),
    ("file", "file"),
    ("link", "link"),
  )
  def test_replaces_what_is_there(self, kind):
    target = self._old(kind)
    path = self.path("model")
    with _files.atomic_output(path, directory=True) as tmp:
      _write(os.path.join(tmp, "new"), "new")
    self.assertFalse(os.path.islink(path))
    self.assertEqual(os.listdir(path), ["new"])
    self.assertEqual(os.listdir(self.dir), ["model"])
    if target is not None:
      self.assertEqual(os.listdir(target), ["old"])

  def test_failure_keeps_the_old_directory(self):
    self._old("full_directory")
    path = self.path("model")
    with self.assertRaises(KeyboardInterrupt):
      with _files.atomic_output(path, directory=True) as tmp:
        _write(os.path.join(tmp, "new"), "partial")
        raise KeyboardInterrupt
    self.assertEqual(os.listdir(path), ["old"])
    self.assertEqual(os.listdir(self.dir), ["model"])

  def test_stale_directories_of_a_killed_writer_are_removed(self):
    path = self.path("model")
    self._old("full_directory")
    # Killed after the new directory took the old one's place, before the
    # old one (moved aside) was removed.
    with mock.patch.object(
      _files.shutil, "rmtree", side_effect=KeyboardInterrupt
    ):
      with self.assertRaises(KeyboardInterrupt):
        with _files.atomic_output(path, directory=True) as tmp:
          _write(os.path.join(tmp, "new"), "new")
    # And killed while writing the next one.
    manager = _files.atomic_output(path, directory=True)
    _write(os.path.join(manager.__enter__(), "next"), "partial")
    self.assertLen(os.listdir(self.dir), 3)
    _files.remove_stale_temporaries(path)
    self.assertEqual(os.listdir(self.dir), ["model"])
    self.assertEqual(os.listdir(path), ["new"])


if __name__ == "__main__":
  tf.test.main()
