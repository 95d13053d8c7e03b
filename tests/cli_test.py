"""The scripts' shared helpers: one-line errors, atomic outputs, flags."""

import os
import tempfile
import types

import tensorflow as tf

from tf1hess import _cli
from tf1hess import _files


class ExitOnErrorTest(tf.test.TestCase):
  def _exit_message(self, error):
    with self.assertRaises(SystemExit) as raised:
      with _cli.exit_on_error("prog"):
        raise error
    return raised.exception.code

  def test_value_error_is_one_line(self):
    self.assertEqual(
      self._exit_message(ValueError("`xs` is bad.\nmore")),
      "prog: error: `xs` is bad.",
    )

  def test_graph_run_time_error_keeps_the_message_line(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32)
      check = tf.debugging.assert_positive(x, message="x must be positive")
      with tf.compat.v1.Session() as sess:
        with self.assertRaises(SystemExit) as raised:
          with _cli.exit_on_error("prog"):
            sess.run(check, {x: -1.0})
    message = raised.exception.code
    self.assertStartsWith(message, "prog: error: ")
    self.assertIn("x must be positive", message)
    self.assertNotIn("\n", message)

  def test_key_error_without_quotes(self):
    self.assertEqual(
      self._exit_message(KeyError("no key 'a'")), "prog: error: no key 'a'"
    )

  def test_other_errors_propagate(self):
    with self.assertRaises(ZeroDivisionError):
      with _cli.exit_on_error("prog"):
        raise ZeroDivisionError()


class AtomicOutputTest(tf.test.TestCase):
  def test_renames_on_success(self):
    path = os.path.join(self.get_temp_dir(), "out.txt")
    with _files.atomic_output(path) as tmp:
      self.assertNotEqual(tmp, path)
      with open(tmp, "w", encoding="utf-8") as f:
        f.write("done")
      self.assertFalse(os.path.exists(path))
    with open(path, encoding="utf-8") as f:
      self.assertEqual(f.read(), "done")
    self.assertEqual(os.stat(path).st_mode & 0o777, 0o666 & ~_umask())

  def test_leaves_nothing_on_failure(self):
    directory = tempfile.mkdtemp(dir=self.get_temp_dir())
    path = os.path.join(directory, "out.npy")
    with self.assertRaises(RuntimeError):
      with _files.atomic_output(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
          f.write(b"partial")
        raise RuntimeError("interrupted")
    self.assertEqual(os.listdir(directory), [])

  def test_stale_temporaries_of_a_killed_writer_are_removed(self):
    directory = tempfile.mkdtemp(dir=self.get_temp_dir())
    path = os.path.join(directory, "out[1].json")
    # What a writer killed inside `atomic_output` leaves behind: the real
    # temporary name, made by the same code.
    manager = _files.atomic_output(path, suffix=".json")
    stale = manager.__enter__()
    others = ["out[1].json", ".out[1].json.x.tmp.npy", ".other.json.x.tmp.json"]
    for name in others:
      with open(os.path.join(directory, name), "w", encoding="utf-8"):
        pass
    _files.remove_stale_temporaries(path, suffix=".json")
    self.assertFalse(os.path.exists(stale))
    self.assertCountEqual(os.listdir(directory), others)


class AtomicDirectoryTest(tf.test.TestCase):
  def test_renames_or_removes_a_directory(self):
    parent = tempfile.mkdtemp(dir=self.get_temp_dir())
    path = os.path.join(parent, "model")
    with self.assertRaises(RuntimeError):
      with _files.atomic_output(path, directory=True) as tmp:
        with open(os.path.join(tmp, "f"), "w", encoding="utf-8") as f:
          f.write("partial")
        raise RuntimeError("interrupted")
    self.assertEqual(os.listdir(parent), [])
    with _files.atomic_output(path, directory=True) as tmp:
      with open(os.path.join(tmp, "f"), "w", encoding="utf-8") as f:
        f.write("done")
    self.assertEqual(os.listdir(path), ["f"])
    self.assertEqual(os.stat(path).st_mode & 0o777, 0o777 & ~_umask())


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


class ModelFlagsTest(tf.test.TestCase):
  def test_defined_once(self):
    self.assertIs(_cli.define_model_flags(), _cli.define_model_flags())

  def test_ys_value_and_model_kwargs(self):
    def holder(value):
      return types.SimpleNamespace(value=value)

    values = dict(
      saved_model=None,
      graph="m.pb",
      meta_graph=None,
      checkpoint=None,
      tag="serve",
      xs="x:0",
      check_independence=False,
    )
    one = _cli.ModelFlags(
      ys=holder(["a:0"]), **{k: holder(v) for k, v in values.items()}
    )
    two = _cli.ModelFlags(
      ys=holder(["a:0", "b:0"]), **{k: holder(v) for k, v in values.items()}
    )
    self.assertEqual(one.ys_value(), "a:0")
    self.assertEqual(two.ys_value(), ["a:0", "b:0"])
    self.assertEqual(
      one.model_kwargs(),
      {
        "saved_model": None,
        "graph": "m.pb",
        "meta_graph": None,
        "checkpoint": None,
        "tag": "serve",
      },
    )


if __name__ == "__main__":
  tf.test.main()
