"""Tests of tf1hess.streaming: readers, outputs, resume, bounded memory.

References: analytic Hessians and gradients of a tanh MLP (testing_utils),
the numpy arrays the input files were written from, and an uninterrupted
run for the bytes of resumed runs.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
from tf1hess import cluster
from tf1hess import legacy
from tf1hess import streaming

_K = 3
_WEIGHTS = testing_utils.mlp_weights(_K, hidden=5, seed=1)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mlp_graph_def(
  dtype=tf.float32, feature_shape=(_K,), weights=_WEIGHTS, batch=None
):
  """Frozen graph of `y = w2 . tanh(x w1 + b1)` on `x:0`, output `y:0`.

  `batch`: the static batch dimension of `x:0`, `None` (default) or an int.
  """
  k = int(np.prod(feature_shape))
  with tf.Graph().as_default() as graph:
    x = tf.compat.v1.placeholder(dtype, (batch,) + feature_shape, name="x")
    flat = tf.reshape(x, [-1, k])
    tf.identity(testing_utils.tanh_mlp(flat, *weights), name="y")
  return graph.as_graph_def()


def _example(values, key="x", kind="float"):
  if kind == "float":
    feature = tf.train.Feature(float_list=tf.train.FloatList(value=values))
  else:
    feature = tf.train.Feature(
      int64_list=tf.train.Int64List(value=[int(v) for v in values])
    )
  return tf.train.Example(
    features=tf.train.Features(feature={key: feature})
  ).SerializeToString()


def write_input(directory, x, kind):
  """Writes the samples `x` (N, K) in format `kind`; returns (path, key)."""
  if kind == "npy":
    path = os.path.join(directory, "x.npy")
    np.save(path, x)
    return path, None
  if kind == "npz_stored":
    path = os.path.join(directory, "x.npz")
    np.savez(path, other=np.zeros(2), samples=x)
    return path, "samples"
  if kind == "npz_compressed":
    path = os.path.join(directory, "x.npz")
    np.savez_compressed(path, x)
    return path, None
  if kind in ("csv", "csv_header"):
    path = os.path.join(directory, "x.csv")
    with open(path, "w", encoding="utf-8") as f:
      # With a header, the fields also end in a non-breaking space, as
      # spreadsheets of some locales write them.
      comma = ",\u00a0" if kind == "csv_header" else ", "
      if kind == "csv_header":
        f.write(",".join(f"f{i}" for i in range(x.shape[1])) + "\n\n")
      for row in np.asarray(x, np.float64):
        f.write(comma.join(repr(float(v)) for v in row) + "\n")
    return path, None
  if kind == "csv_pandas":
    # pandas' `DataFrame(x).to_csv(path, index=False)`: the column numbers.
    path = os.path.join(directory, "x.csv")
    with open(path, "w", encoding="utf-8") as f:
      f.write(",".join(str(i) for i in range(x.shape[1])) + "\n")
      for row in np.asarray(x, np.float64):
        f.write(",".join(repr(float(v)) for v in row) + "\n")
    return path, None
  if kind == "csv_spreadsheet":
    # A spreadsheet's "CSV UTF-8": a byte-order mark, every field quoted.
    path = os.path.join(directory, "x.csv")
    with open(path, "w", encoding="utf-8-sig") as f:
      for row in np.asarray(x, np.float64):
        f.write(",".join(f'"{float(v)!r}"' for v in row) + "\r\n")
    return path, None
  if kind in ("tfrecord", "tfrecord_gzip"):
    gzip = kind == "tfrecord_gzip"
    path = os.path.join(directory, "x.tfrecord" + (".gz" if gzip else ""))
    options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
    with tf.io.TFRecordWriter(path, options) as writer:
      for row in x:
        writer.write(_example(row))
    return path, None
  raise ValueError(kind)


_FORMATS = (
  "npy",
  "npz_stored",
  "npz_compressed",
  "csv",
  "csv_header",
  "csv_pandas",
  "csv_spreadsheet",
  "tfrecord",
  "tfrecord_gzip",
)


def _samples(n, k=_K, seed=0):
  return np.random.default_rng(seed).normal(size=(n, k)).astype(np.float32)


# `compute_hessians`' strategy arguments, as they reach `add_hessian_ops`.
_DEFAULT_STRATEGY = {
  "method": "auto",
  "chunk_size": None,
  "parallel_iterations": None,
}

_STRATEGIES = (
  ("auto", {}),
  ("auto_chunk_2", {"chunk_size": 2}),
  ("forward", {"method": "forward"}),
  ("pfor", {"method": "pfor"}),
  ("pfor_chunk_2", {"method": "pfor", "chunk_size": 2}),
  ("while_loop", {"method": "while_loop", "parallel_iterations": 2}),
)

# The settings of the progress file of the version before strategies could
# be chosen; a resumed run must still match their fingerprint.
_SETTINGS_BEFORE_STRATEGIES = (
  "graph_sha256",
  "xs",
  "ys",
  "input",
  "input_bytes",
  "input_mtime_ns",
  "input_key",
  "num_samples",
  "feature_shape",
  "batch_size",
  "dtype",
  "gradients_output",
  "max_file_bytes",
  "check_independence",
)


def _assert_analytic(test, x, gradients=True):
  """`h.npy` (and `g.npy`) of `test.dir` hold the MLP's values at `x`."""
  test.assertAllClose(
    np.load(test.path("h.npy")),
    testing_utils.tanh_mlp_hessians(x, *_WEIGHTS),
    atol=1e-5,
    rtol=1e-4,
  )
  if gradients:
    test.assertAllClose(
      np.load(test.path("g.npy")),
      testing_utils.tanh_mlp_gradients(x, *_WEIGHTS),
      atol=1e-5,
      rtol=1e-4,
    )


@contextlib.contextmanager
def _strategies_used():
  """Yields the list of strategies `add_hessian_ops` is called with."""
  used = []
  original = legacy.add_hessian_ops

  def spy(*args, **kwargs):
    used.append(kwargs["plan"].record())
    return original(*args, **kwargs)

  with mock.patch.object(legacy, "add_hessian_ops", spy):
    yield used


class StreamingTest(testing_utils.TempDirTestCase, parameterized.TestCase):
  @parameterized.named_parameters((kind, kind) for kind in _FORMATS)
  def test_formats_match_analytic_hessians(self, kind):
    x = _samples(11)
    path, key = write_input(self.dir, x, kind)
    summary = streaming.compute_hessians(
      mlp_graph_def(),
      "x:0",
      "y:0",
      path,
      self.path("h.npy"),
      input_key=key,
      batch_size=4,
      gradients_output=self.path("g.npy"),
    )
    hessians = np.load(self.path("h.npy"))
    self.assertEqual(hessians.shape, (11, _K, _K))
    self.assertEqual(hessians.dtype, np.float32)
    _assert_analytic(self, x)
    self.assertEqual(summary.num_batches, 3)
    self.assertEqual(summary.computed_batches, 3)
    self.assertEqual(summary.output_files, (self.path("h.npy"),))
    self.assertEqual(summary.gradients_files, (self.path("g.npy"),))
    self.assertNotIn("h.npy.partial", self.files())
    self.assertNotIn("h.npy.progress.json", self.files())

  @parameterized.named_parameters((kind, kind) for kind in _FORMATS)
  def test_reader_skips_batches_and_bounds_them(self, kind):
    x = _samples(10)
    path, key = write_input(self.dir, x, kind)
    reader = streaming.open_input(path, key)
    self.assertEqual(reader.num_samples, 10)
    self.assertEqual(reader.feature_shape, (_K,))
    got = list(reader.batches(3, first_batch=1, wanted=lambda i: i != 2))
    self.assertEqual([i for i, _ in got], [1, 3])
    self.assertAllEqual(got[0][1].astype(np.float32), x[3:6])
    self.assertAllEqual(got[1][1].astype(np.float32), x[9:10])
    sizes = [b.shape[0] for _, b in reader.batches(4)]
    self.assertEqual(sizes, [4, 4, 2])

  @parameterized.named_parameters(("npy", "npy"), ("csv", "csv"))
  def test_samples_reshaped_to_xs(self, kind):
    x = _samples(5, k=6)
    weights = testing_utils.mlp_weights(6, hidden=4, seed=2)
    data = x.reshape(5, 2, 3) if kind == "npy" else x
    path, _ = write_input(self.dir, data, kind)
    streaming.compute_hessians(
      mlp_graph_def(feature_shape=(2, 3), weights=weights),
      "x:0",
      "y:0",
      path,
      self.path("h.npy"),
      batch_size=2,
    )
    self.assertAllClose(
      np.load(self.path("h.npy")),
      testing_utils.tanh_mlp_hessians(x, *weights),
      atol=1e-5,
      rtol=1e-4,
    )

  def test_error_of_a_batch_names_it(self):
    x = _samples(14)
    x[9, 1] = np.nan
    path, _ = write_input(self.dir, x, "npy")
    with self.assertRaisesRegex(
      tf.errors.InvalidArgumentError, testing_utils.NAN_IN_BATCH_2
    ):
      streaming.compute_hessians(
        testing_utils.checking_mlp_graph_def(_WEIGHTS),
        "x:0",
        "y:0",
        path,
        self.path("h.npy"),
        batch_size=4,
      )

  def test_float64_model_and_list_of_ys(self):
    x = np.random.default_rng(3).normal(size=(7, _K))
    path, _ = write_input(self.dir, x, "npy")
    streaming.compute_hessians(
      mlp_graph_def(tf.float64),
      "x:0",
      ["y:0", "y:0"],
      path,
      self.path("h.npy"),
      batch_size=3,
    )
    hessians = np.load(self.path("h.npy"))
    self.assertEqual(hessians.dtype, np.float64)
    self.assertAllClose(
      hessians, 2 * testing_utils.tanh_mlp_hessians(x, *_WEIGHTS), atol=1e-12
    )

  @parameterized.named_parameters(
    ("float64", "float64"), ("float16", "float16")
  )
  def test_output_dtype(self, dtype):
    path, _ = write_input(self.dir, _samples(6), "npy")
    args = (mlp_graph_def(), "x:0", "y:0", path)
    streaming.compute_hessians(*args, self.path("a.npy"), batch_size=4)
    streaming.compute_hessians(
      *args, self.path("b.npy"), batch_size=4, dtype=dtype
    )
    written = np.load(self.path("b.npy"))
    self.assertEqual(written.dtype, np.dtype(dtype))
    self.assertAllEqual(written, np.load(self.path("a.npy")).astype(dtype))

  def test_sharded_output(self):
    x = _samples(11)
    path, _ = write_input(self.dir, x, "npy")
    args = (mlp_graph_def(), "x:0", "y:0", path)
    streaming.compute_hessians(*args, self.path("one.npy"), batch_size=2)
    shutil.copy(self.path("one.npy"), self.path("h.npy"))  # Out of date.
    # A Hessian row is 9 float32 = 36 bytes: two batches of 2 rows per file.
    summary = streaming.compute_hessians(
      *args,
      self.path("h.npy"),
      batch_size=2,
      max_file_bytes=144,
      gradients_output=self.path("g.npy"),
      overwrite=True,
    )
    names = [f"h-{i:05d}-of-00003.npy" for i in range(3)]
    self.assertEqual(summary.output_files, tuple(map(self.path, names)))
    self.assertEqual(
      streaming.output_files(self.path("h.npy")), list(map(self.path, names))
    )
    self.assertNotIn("h.npy", self.files())
    self.assertEqual([np.load(self.path(n)).shape[0] for n in names], [4, 4, 3])
    self.assertAllEqual(
      np.concatenate([np.load(self.path(n)) for n in names]),
      np.load(self.path("one.npy")),
    )
    # 12-byte gradient rows: all 11 fit one file.
    self.assertEqual(summary.gradients_files, (self.path("g.npy"),))
    self.assertEqual(streaming.output_files(self.path("none.npy")), [])
    # An unsharded run over the shards replaces them all.
    with self.assertRaisesRegex(
      FileExistsError, r"`output` exists: .*h-00000-of-00003\.npy; pass "
    ):
      streaming.compute_hessians(*args, self.path("h.npy"), batch_size=2)
    streaming.compute_hessians(
      *args, self.path("h.npy"), batch_size=2, overwrite=True
    )
    self.assertCountEqual(self.files(), ["x.npy", "one.npy", "h.npy", "g.npy"])
    self.assertEqual(
      streaming.output_files(self.path("h.npy")), [self.path("h.npy")]
    )

  @parameterized.named_parameters(
    ("batches_of_b", 12, 4), ("one_batch_of_b", 4, 256)
  )
  def test_fixed_batch_dimension(self, n, batch_size):
    # `xs` of shape (4, K) takes every batch when each holds 4 samples.
    x = _samples(n)
    path, _ = write_input(self.dir, x, "npy")
    summary = streaming.compute_hessians(
      mlp_graph_def(batch=4),
      "x:0",
      "y:0",
      path,
      self.path("h.npy"),
      batch_size=batch_size,
      gradients_output=self.path("g.npy"),
    )
    self.assertEqual(summary.num_batches, n // min(batch_size, n))
    _assert_analytic(self, x)

  def test_sharded_relative_output_is_kept(self):
    # `finish` took the shards it had just written under a relative
    # `output` for stale ones, and removed them.
    x = _samples(11)
    write_input(self.dir, x, "npy")
    cwd = os.getcwd()
    os.chdir(self.dir)
    self.addCleanup(os.chdir, cwd)
    args = (mlp_graph_def(), "x:0", "y:0", "x.npy")
    streaming.compute_hessians(*args, "h.npy", batch_size=2)  # Out of date.
    # Rows of 36 (Hessian) and 12 (gradient) bytes: a file holds one batch
    # of 2 Hessians, two batches of gradients.
    summary = streaming.compute_hessians(
      *args,
      "h.npy",
      batch_size=2,
      max_file_bytes=48,
      gradients_output="g.npy",
      overwrite=True,
    )
    hessian_names = [f"h-{i:05d}-of-00006.npy" for i in range(6)]
    gradient_names = [f"g-{i:05d}-of-00003.npy" for i in range(3)]
    self.assertCountEqual(
      self.files(), ["x.npy"] + hessian_names + gradient_names
    )
    self.assertEqual(
      summary.output_files, tuple(map(os.path.abspath, hessian_names))
    )
    self.assertEqual(
      summary.gradients_files, tuple(map(os.path.abspath, gradient_names))
    )
    self.assertEqual(streaming.output_files("h.npy"), hessian_names)
    self.assertEqual(streaming.output_files("g.npy"), gradient_names)
    self.assertAllClose(
      np.concatenate([np.load(f) for f in hessian_names]),
      testing_utils.tanh_mlp_hessians(x, *_WEIGHTS),
      atol=1e-5,
      rtol=1e-4,
    )
    self.assertAllClose(
      np.concatenate([np.load(f) for f in gradient_names]),
      testing_utils.tanh_mlp_gradients(x, *_WEIGHTS),
      atol=1e-5,
      rtol=1e-4,
    )
    # An unsharded run over the shards replaces them all.
    streaming.compute_hessians(*args, "h.npy", batch_size=2, overwrite=True)
    self.assertCountEqual(self.files(), ["x.npy", "h.npy"] + gradient_names)
    self.assertEqual(streaming.output_files("h.npy"), ["h.npy"])

  @parameterized.named_parameters(*_STRATEGIES)
  def test_strategies_match_analytic_hessians(self, strategy):
    x = _samples(7)
    path, _ = write_input(self.dir, x, "npy")
    with _strategies_used() as used:
      streaming.compute_hessians(
        mlp_graph_def(),
        "x:0",
        "y:0",
        path,
        self.path("h.npy"),
        batch_size=3,
        gradients_output=self.path("g.npy"),
        **strategy,
      )
    self.assertEqual(used, [dict(_DEFAULT_STRATEGY, **strategy)])
    _assert_analytic(self, x)

  def _interrupted_run(self, x, strategy=None, **kwargs):
    """Writes `ref.npy` whole and `h.npy` stopped after 2 batches of 2.

    `strategy` (`compute_hessians`' keyword arguments) applies to both runs,
    `kwargs` to the stopped one only.
    """
    strategy = strategy or {}
    path, _ = write_input(self.dir, x, "npy")
    args = (mlp_graph_def(), "x:0", "y:0", path)
    streaming.compute_hessians(
      *args,
      self.path("ref.npy"),
      batch_size=2,
      gradients_output=self.path("ref_g.npy"),
      **strategy,
    )
    with (
      testing_utils.interrupt_after(streaming.engine.Engine, 2),
      self.assertRaises(KeyboardInterrupt),
    ):
      streaming.compute_hessians(
        *args,
        self.path("h.npy"),
        batch_size=2,
        gradients_output=self.path("g.npy"),
        **strategy,
        **kwargs,
      )
    return args

  def _same_bytes(self, a, b):
    with open(self.path(a), "rb") as fa, open(self.path(b), "rb") as fb:
      self.assertEqual(fa.read(), fb.read())

  @parameterized.named_parameters(
    ("auto", {}),
    ("pfor_chunk_2", {"method": "pfor", "chunk_size": 2}),
    ("while_loop", {"method": "while_loop"}),
  )
  def test_resume_after_interrupt(self, strategy):
    x = _samples(9)
    args = self._interrupted_run(x, strategy)
    self.assertNotIn("h.npy", self.files())
    self.assertNotIn("g.npy", self.files())
    self.assertIn("h.npy.partial", self.files())
    self.assertIn("g.npy.partial", self.files())
    with open(self.path("h.npy.progress.json"), encoding="utf-8") as f:
      self.assertEqual(json.load(f)["completed"], [[0, 2]])
    self._resume_and_check(
      args, x, strategy, dict(_DEFAULT_STRATEGY, **strategy)
    )
    self._same_bytes("g.npy", "ref_g.npy")
    self.assertCountEqual(
      self.files(), ["x.npy", "ref.npy", "ref_g.npy", "h.npy", "g.npy"]
    )

  def test_ctrl_c_during_a_session_run_stops_after_it(self):
    # TensorFlow hashes the fed tensors in C++ (`flatten_dict_items`); a
    # KeyboardInterrupt raised there crashed the process. Ctrl-C in a run is
    # raised once the run returns, and the batches before it are kept.
    path, _ = write_input(self.dir, _samples(9), "npy")
    original = tf.compat.v1.Session.run
    runs = []

    def run(session, fetches, feed_dict=None, **kwargs):
      if feed_dict and len(runs) == 2:
        signal.raise_signal(signal.SIGINT)
      values = original(session, fetches, feed_dict, **kwargs)
      runs.append(feed_dict is not None)
      return values

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    self.addCleanup(signal.signal, signal.SIGINT, previous)
    with (
      mock.patch.object(tf.compat.v1.Session, "run", run),
      self.assertRaises(KeyboardInterrupt),
    ):
      streaming.compute_hessians(
        mlp_graph_def(), "x:0", "y:0", path, self.path("h.npy"), batch_size=2
      )
    self.assertEqual(runs, [True, True, True])
    self.assertEqual(self._progress_file()["completed"], [[0, 2]])
    self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)

  def _progress_file(self):
    with open(self.path("h.npy.progress.json"), encoding="utf-8") as f:
      return json.load(f)

  def _edit_progress_file(self, **settings):
    """Sets `settings` in the progress file, with their fingerprint."""
    state = self._progress_file()
    state["settings"].update(settings)
    state["fingerprint"] = _fingerprint(state["settings"])
    _write(self.path("h.npy.progress.json"), json.dumps(state))

  def _resume_and_check(self, args, x, strategy, earlier):
    """Resumes `h.npy` with `strategy`; checks the result and the warning.

    The 2 batches done are kept as they were (the bytes of `ref.npy`), the
    other 3 computed with `strategy`; when it differs from `earlier`, the
    strategy that computed them, the run warns naming both.
    """
    with self.assertLogs("absl", "INFO") as logs:
      summary = streaming.compute_hessians(
        *args,
        self.path("h.npy"),
        batch_size=2,
        gradients_output=self.path("g.npy"),
        **strategy,
      )
    self.assertEqual(summary.resumed_batches, 2)
    self.assertEqual(summary.computed_batches, 3)
    warnings = [m for m in logs.output if m.startswith("WARNING")]
    current = dict(_DEFAULT_STRATEGY, **strategy)
    if current == earlier:
      self.assertEqual(warnings, [])
      self._same_bytes("h.npy", "ref.npy")
    else:
      self.assertLen(warnings, 1)
      self.assertIn(f"with method={current['method']!r}", warnings[0])
      self.assertIn(
        f"earlier runs of it used method={earlier['method']!r}, chunk_size="
        f"{earlier['chunk_size']!r}",
        warnings[0],
      )
    hessians = np.load(self.path("h.npy"))
    self.assertAllEqual(hessians[:4], np.load(self.path("ref.npy"))[:4])
    _assert_analytic(self, x)

  @parameterized.named_parameters(
    ("same", {"method": "while_loop"}),
    ("pfor_chunk_2", {"method": "pfor", "chunk_size": 2}),
    ("forward", {"method": "forward"}),
  )
  def test_resume_with_another_strategy(self, strategy):
    x = _samples(9)
    earlier = dict(_DEFAULT_STRATEGY, method="while_loop")
    args = self._interrupted_run(x, {"method": "while_loop"})
    self.assertEqual(self._progress_file()["strategies"], [earlier])
    self._resume_and_check(args, x, strategy, earlier)

  @parameterized.named_parameters(
    ("same", {}), ("while_loop", {"method": "while_loop"})
  )
  def test_progress_file_without_strategies_resumes(self, strategy):
    """A run stopped by the version before strategies is resumed.

    Its progress file is this version's without "strategies", and its
    fingerprint the SHA-256 of the settings' sorted JSON; its batches were
    computed with the defaults, the only strategy of that version.
    """
    x = _samples(9)
    args = self._interrupted_run(x)
    state = self._progress_file()
    self.assertCountEqual(
      state["settings"],
      _SETTINGS_BEFORE_STRATEGIES + streaming.writer.Manifest.ADDED_SETTINGS,
    )
    settings = {k: state["settings"][k] for k in _SETTINGS_BEFORE_STRATEGIES}
    old = {
      "format": "tf1hess.streaming/1",
      "fingerprint": _fingerprint(settings),
      "settings": settings,
      "num_batches": 5,
      "completed": [[0, 2]],
      "partial_files": [self.path("g.npy.partial"), self.path("h.npy.partial")],
    }
    _write(self.path("h.npy.progress.json"), json.dumps(old))
    self._resume_and_check(args, x, strategy, _DEFAULT_STRATEGY)

  def test_tensors_named_by_op_or_in_full_resume(self):
    """ "x" and "x:0" name one tensor: a run stopped with one resumes with
    the other."""
    x = _samples(9)
    graph_def, _, _, path = self._interrupted_run(x)
    self.assertEqual(
      [self._progress_file()["settings"][k] for k in ("xs", "ys")],
      ["x:0", "y:0"],
    )
    self._resume_and_check(
      (graph_def, "x", "y", path), x, {}, _DEFAULT_STRATEGY
    )

  def test_progress_file_with_names_as_typed_resumes(self):
    """The version before recorded the names as typed ("x" for "x:0")."""
    x = _samples(9)
    args = self._interrupted_run(x)
    self._edit_progress_file(xs="x", ys="y")
    self._resume_and_check(args, x, {}, _DEFAULT_STRATEGY)

  def test_progress_file_with_names_of_another_type_is_refused(self):
    """A hand-edited progress file: its `xs` is no name."""
    args = self._interrupted_run(_samples(9))
    self._edit_progress_file(xs=7)
    with self.assertRaisesRegex(
      ValueError, r"unfinished run with other settings \(xs differ"
    ):
      streaming.compute_hessians(
        *args,
        self.path("h.npy"),
        batch_size=2,
        gradients_output=self.path("g.npy"),
      )

  def test_noresume_starts_over(self):
    args = self._interrupted_run(_samples(9))
    summary = streaming.compute_hessians(
      *args,
      self.path("h.npy"),
      batch_size=2,
      gradients_output=self.path("g.npy"),
      resume=False,
    )
    self.assertEqual(summary.resumed_batches, 0)
    self.assertEqual(summary.computed_batches, 5)
    self._same_bytes("h.npy", "ref.npy")

  def test_noresume_removes_the_old_partial_files(self):
    args = self._interrupted_run(_samples(9))
    streaming.compute_hessians(
      *args, self.path("h.npy"), batch_size=2, max_file_bytes=72, resume=False
    )
    self.assertCountEqual(
      self.files(),
      ["x.npy", "ref.npy", "ref_g.npy"]
      + [f"h-{i:05d}-of-00005.npy" for i in range(5)],
    )

  def test_other_settings_are_refused(self):
    args = self._interrupted_run(_samples(9))
    with self.assertRaisesRegex(
      ValueError,
      r"`output` has an unfinished run with other settings "
      r"\(batch_size, gradients_output differ",
    ):
      streaming.compute_hessians(*args, self.path("h.npy"), batch_size=3)
    with open(self.path("h.npy.progress.json"), encoding="utf-8") as f:
      self.assertEqual(json.load(f)["completed"], [[0, 2]])

  @parameterized.parameters(100, 500_000)  # All of it; 64 blocks of 6 MB.
  def test_input_replaced_with_the_same_size_and_time_is_refused(self, n):
    """Another input of the same size, given the old one's modification
    time (`cp -p`): its bytes differ (all of them read up to 4 MiB, 64
    blocks of a larger file)."""
    x = _samples(n)
    path, _ = write_input(self.dir, x, "npy")
    args = (mlp_graph_def(), "x:0", "y:0", path, self.path("h.npy"))
    with (
      testing_utils.interrupt_after(streaming.engine.Engine, 1),
      self.assertRaises(KeyboardInterrupt),
    ):
      streaming.compute_hessians(*args, batch_size=n // 4)
    stat = os.stat(path)
    self.assertEqual(stat.st_size > 64 * 65536, n > 100)
    np.save(path, _samples(n, seed=1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    self.assertEqual(os.path.getsize(path), stat.st_size)
    with self.assertRaisesRegex(
      ValueError,
      r"unfinished run with other settings \(input_sample_sha256 differ",
    ):
      streaming.compute_hessians(*args, batch_size=n // 4)

  def test_restart_after_rename_only_cleans_up(self):
    path, _ = write_input(self.dir, _samples(5), "npy")
    args = (mlp_graph_def(), "x:0", "y:0", path, self.path("h.npy"))
    with mock.patch.object(
      streaming.writer.Manifest, "remove", side_effect=KeyboardInterrupt
    ):
      with self.assertRaises(KeyboardInterrupt):
        streaming.compute_hessians(*args, batch_size=2)
    self.assertCountEqual(
      self.files(),
      ["x.npy", "h.npy", "h.npy.progress.json", "h.npy.checksums"],
    )
    with open(self.path("h.npy"), "rb") as f:
      first = f.read()
    summary = streaming.compute_hessians(*args, batch_size=2)
    self.assertEqual(summary.computed_batches, 0)
    self.assertEqual(summary.resumed_batches, 3)
    self.assertCountEqual(self.files(), ["x.npy", "h.npy"])
    with open(self.path("h.npy"), "rb") as f:
      self.assertEqual(f.read(), first)

  def test_failure_before_any_batch_leaves_nothing(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
      coupled = x - tf.reduce_mean(x, axis=0)  # Couples the samples.
      tf.identity(tf.reduce_sum(tf.tanh(coupled) ** 3, axis=1), name="y")
    path, _ = write_input(self.dir, _samples(6), "npy")
    with self.assertRaisesRegex(
      tf.errors.InvalidArgumentError, "are not independent"
    ):
      streaming.compute_hessians(
        graph.as_graph_def(),
        "x:0",
        "y:0",
        path,
        self.path("h.npy"),
        batch_size=3,
        check_independence=True,
      )
    self.assertEqual(self.files(), ["x.npy"])

  def test_progress_is_logged(self):
    path, _ = write_input(self.dir, _samples(6), "npy")
    with self.assertLogs("absl", "INFO") as logs:
      streaming.compute_hessians(
        mlp_graph_def(),
        "x:0",
        "y:0",
        path,
        self.path("h.npy"),
        batch_size=2,
        progress_interval=0.0,
      )
    progress = [m for m in logs.output if "samples/s" in m]
    self.assertLen(progress, 3)
    self.assertRegex(
      progress[-1], r"6/6 samples \(100\.0%\), batch 3/3, .* samples/s, ETA"
    )

  @parameterized.parameters(("h", "output"), ("g", "gradients_output"))
  def test_locked_output_is_refused(self, name, arg):
    args = self._interrupted_run(_samples(9))
    before = {file: self._read(file) for file in self.files()}
    with open(self.path(f"{name}.npy.lock"), "wb") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      for resume in (True, False):
        with self.assertRaisesRegex(
          ValueError,
          rf"^`{arg}` is being written by another run \(.*{name}\.npy\.lock",
        ):
          streaming.compute_hessians(
            *args,
            self.path("h.npy"),
            batch_size=2,
            gradients_output=self.path("g.npy"),
            resume=resume,
          )
      self.assertEqual(
        {file: self._read(file) for file in self.files()},
        dict(before, **{f"{name}.npy.lock": b""}),
      )

  def _read(self, name):
    with open(self.path(name), "rb") as f:
      return f.read()

  def test_lost_partial_file_is_refused(self):
    args = self._interrupted_run(_samples(9))
    os.remove(self.path("g.npy.partial"))
    with self.assertRaisesRegex(
      ValueError, r"its partial file .*g\.npy\.partial is gone"
    ):
      streaming.compute_hessians(
        *args,
        self.path("h.npy"),
        batch_size=2,
        gradients_output=self.path("g.npy"),
      )

  def test_changed_partial_file_is_refused(self):
    args = self._interrupted_run(_samples(9))
    np.save(self.path("other.npy"), np.zeros((9, 2, 2), np.float32))
    os.replace(self.path("other.npy"), self.path("h.npy.partial"))
    with self.assertRaisesRegex(
      ValueError, r"partial file .*h\.npy\.partial holds float32 \(9, 2, 2\)"
    ):
      streaming.compute_hessians(
        *args,
        self.path("h.npy"),
        batch_size=2,
        gradients_output=self.path("g.npy"),
      )

  @parameterized.named_parameters(
    ("unreadable", "{", r"progress file .* is unreadable"),
    ("foreign", '{"format": "x"}', r"is not a tf1hess progress file"),
  )
  def test_bad_progress_file_is_refused(self, text, regex):
    path, _ = write_input(self.dir, _samples(3), "npy")
    with open(self.path("h.npy.progress.json"), "w", encoding="utf-8") as f:
      f.write(text)
    with self.assertRaisesRegex(ValueError, regex):
      streaming.compute_hessians(
        mlp_graph_def(), "x:0", "y:0", path, self.path("h.npy")
      )

  def test_manifest_records_the_strategies_that_ran(self):
    a, b, c = ({"method": m} for m in ("auto", "pfor", "while_loop"))
    manifest = streaming.writer.Manifest(self.path("h.npy"), {}, a)
    self.assertEqual(manifest.add_strategies({"strategies": [b, a]}, c), [b])
    self.assertEqual(manifest.strategies, [b, a])
    fresh = streaming.writer.Manifest(self.path("h.npy"), {}, b)
    self.assertEqual(fresh.add_strategies({}, c), [c])
    self.assertEqual(fresh.strategies, [c, b])
    fresh.save(3, streaming.writer.Intervals([[0, 1]]))
    with open(self.path("h.npy.progress.json"), encoding="utf-8") as f:
      self.assertEqual(json.load(f)["strategies"], [c, b])

  def test_intervals(self):
    done = streaming.writer.Intervals()
    for i in (3, 0, 1, 5, 4, 1):
      done.add(i)
    self.assertEqual(done.ranges, [[0, 2], [3, 6]])
    self.assertLen(done, 5)
    self.assertEqual(done.first_missing(), 2)
    self.assertIn(4, done)
    self.assertNotIn(2, done)
    self.assertEqual(streaming.writer.Intervals([[2, 4]]).first_missing(), 0)


class ClusterStrategyTest(
  testing_utils.TempDirTestCase, parameterized.TestCase
):
  """The strategy reaches the Hessian ops of every worker's replica.

  Two workers of one cluster served in this process, as `scripts/worker.py`
  serves one (tests/cluster_test.py runs those).
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.hosts = [f"127.0.0.1:{testing_utils.free_port()}" for _ in range(2)]
    spec = cluster.cluster_spec(cls.hosts)
    cls.servers = [
      tf.distribute.Server(spec, job_name=cluster.JOB_NAME, task_index=i)
      for i in range(len(cls.hosts))
    ]

  @parameterized.named_parameters(
    ("forward", {"method": "forward"}),
    ("pfor_chunk_2", {"method": "pfor", "chunk_size": 2}),
    ("while_loop", {"method": "while_loop", "parallel_iterations": 1}),
  )
  def test_workers_build_the_strategy(self, strategy):
    x = _samples(10)
    path, _ = write_input(self.dir, x, "npy")
    args = (mlp_graph_def(), "x:0", "y:0", path)
    with _strategies_used() as used:
      streaming.compute_hessians(
        *args,
        self.path("h.npy"),
        batch_size=2,
        worker_hosts=self.hosts,
        **strategy,
      )
    # The model is built once on the client (checked, never run), then once
    # per worker.
    self.assertEqual(used, [dict(_DEFAULT_STRATEGY, **strategy)] * 3)
    streaming.compute_hessians(
      *args, self.path("ref.npy"), batch_size=2, **strategy
    )
    with (
      open(self.path("h.npy"), "rb") as a,
      open(self.path("ref.npy"), "rb") as b,
    ):
      self.assertEqual(a.read(), b.read())
    _assert_analytic(self, x, gradients=False)


def _fingerprint(settings):
  """A progress file's fingerprint of its `settings`."""
  return hashlib.sha256(
    json.dumps(settings, sort_keys=True).encode()
  ).hexdigest()


def _write(path, data):
  with open(path, "w", encoding="utf-8") as f:
    f.write(data)


def _write_records(path, records):
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)


def _truncated_npz(path):
  """A compressed .npz whose member promises 10 rows and holds 5."""
  header = np.lib.format.header_data_from_array_1_0(np.zeros((10, 3)))
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
    with archive.open("x.npy", "w") as f:
      np.lib.format.write_array_header_1_0(f, header)
      f.write(np.zeros((5, 3)).tobytes())
  return path


# name, setup(dir) -> kwargs overrides, exception, message regex.
_BAD_INPUTS = (
  (
    "missing_input",
    lambda d: {"input": os.path.join(d, "nope.npy")},
    FileNotFoundError,
    r"`input` does not exist: .*nope\.npy",
  ),
  (
    "input_directory",
    lambda d: {"input": d},
    ValueError,
    r"`input` must be a file; saw the directory",
  ),
  (
    "unknown_format",
    lambda d: {"input": _touch(os.path.join(d, "x.txt"))},
    ValueError,
    r"`input` must be a \.npy, \.npz, \.csv or \.tfrecord file",
  ),
  (
    "integer_npy",
    lambda d: {"input": _save(d, np.ones((4, _K), np.int32))},
    TypeError,
    r"`input` must hold floating-point values .*; saw dtype int32",
  ),
  (
    "empty_npy",
    lambda d: {"input": _save(d, np.ones((0, _K), np.float32))},
    ValueError,
    r"`input` holds no samples: .* has N = 0",
  ),
  (
    "rank_1_npy",
    lambda d: {"input": _save(d, np.ones((4,), np.float32))},
    ValueError,
    r"`input` must have rank >= 2 \(samples, features...\); saw shape \(4,\)",
  ),
  (
    "fortran_npy",
    lambda d: {"input": _save(d, np.asfortranarray(np.ones((4, _K))))},
    ValueError,
    r"`input` must be stored in C \(row-major\) order",
  ),
  (
    # One sample, but not one row: its features are stored transposed.
    "fortran_npy_of_one_sample",
    lambda d: {"input": _save(d, np.asfortranarray(np.ones((1, 2, _K))))},
    ValueError,
    r"`input` must be stored in C \(row-major\) order",
  ),
  (
    "not_npy",
    lambda d: {"input": _touch(os.path.join(d, "x.npy"), "hello")},
    ValueError,
    r"`input` must be a \.npy array file; .* is not",
  ),
  (
    "width",
    lambda d: {"input": _save(d, np.ones((4, 4), np.float32))},
    ValueError,
    r"`input` samples must match `xs` x:0, which takes 3 features per "
    r"sample \(shape \(None, 3\)\); saw 4 features per sample",
  ),
  (
    # As many values, in another layout (channels first for channels last).
    "axes_of_another_shape",
    lambda d: {
      "graph_def": mlp_graph_def(
        feature_shape=(2, 3), weights=testing_utils.mlp_weights(6, 4, 2)
      ),
      "input": _save(d, np.ones((4, 3, 2), np.float32)),
    },
    ValueError,
    r"`input` samples must have the shape of `xs` x:0 \(2, 3\), or be flat "
    r"rows of its 6 values; saw samples of shape \(3, 2\) in .*x\.npy",
  ),
  (
    "csv_not_a_number",
    lambda d: {"input": _touch(os.path.join(d, "x.csv"), "1,2,3\n\n4,abc,6\n")},
    TypeError,
    r"`input` must hold floating-point numbers only; .*x\.csv line 3 field 2 "
    r"is 'abc'",
  ),
  (
    # An Arabic-Indic digit: a digit to Python, not to strtod.
    "csv_not_an_ascii_digit",
    lambda d: {
      "input": _touch(os.path.join(d, "x.csv"), "1,2,3\n4,\u0665,6\n")
    },
    TypeError,
    r"`input` must hold floating-point numbers only; .*x\.csv line 2 field 2 "
    r"is '\u0665'",
  ),
  (
    "csv_empty_field",
    lambda d: {"input": _touch(os.path.join(d, "x.csv"), "1,2,3\n4,,6\n")},
    TypeError,
    r"`input` must hold floating-point numbers only; .*x\.csv line 2 field 2 "
    r"is '' \(empty\)\.$",
  ),
  (
    "csv_trailing_commas",
    lambda d: {"input": _touch(os.path.join(d, "x.csv"), "1,2,3,\n4,5,6,\n")},
    TypeError,
    r"`input` must hold floating-point numbers only; .*x\.csv line 1 field 4 "
    r"is '' \(do the rows end with a comma\?\)",
  ),
  (
    "csv_ragged",
    lambda d: {"input": _touch(os.path.join(d, "x.csv"), "1,2,3\n4,5\n")},
    ValueError,
    r"`input` rows must all have 3 fields like the first one; .* line 2 has 2",
  ),
  (
    "csv_empty",
    lambda d: {"input": _touch(os.path.join(d, "x.csv"), "\n\n")},
    ValueError,
    r"`input` holds no samples: .*x\.csv has no rows",
  ),
  (
    # pandas' `to_csv(path)` with the index: its rows start with their number.
    "csv_pandas_index",
    lambda d: {
      "input": _touch(os.path.join(d, "x.csv"), ",0,1,2\n0,1.5,2.5,3.5\n")
    },
    ValueError,
    r"`input` .*x\.csv line 1 is the header of pandas' `DataFrame.to_csv` "
    r"with the index: .* `to_csv\(path, index=False\)`",
  ),
  (
    "csv_header_only",
    lambda d: {"input": _touch(os.path.join(d, "x.csv"), "a,b,c\n")},
    ValueError,
    r"`input` holds no samples: .* has N = 0",
  ),
  (
    "npz_unknown_key",
    lambda d: {
      "input": _savez(d, a=np.ones((2, _K)), b=np.ones((2, _K))),
      "input_key": "c",
    },
    ValueError,
    r"`input_key` must name an array of .*x\.npz, one of \['a', 'b'\]; "
    r"saw 'c'",
  ),
  (
    "npz_ambiguous",
    lambda d: {"input": _savez(d, a=np.ones((2, _K)), b=np.ones((2, _K)))},
    ValueError,
    r"`input_key` must name the array holding the samples, one of "
    r"\['a', 'b'\]",
  ),
  (
    "npz_not_zip",
    lambda d: {"input": _touch(os.path.join(d, "x.npz"), "hello")},
    ValueError,
    r"`input` must be a \.npz archive; .* is not",
  ),
  (
    "npz_truncated",
    lambda d: {"input": _truncated_npz(os.path.join(d, "x.npz"))},
    ValueError,
    r"`input` member 'x' of .*x\.npz is shorter than its header says: "
    r"float64 \(10, 3\) needs 240 bytes of data, it holds 120; the file is "
    r"truncated or damaged\.",
  ),
  (
    "key_for_npy",
    lambda d: {"input": _save(d, np.ones((2, _K))), "input_key": "a"},
    ValueError,
    r"`input_key` applies to \.npz and TFRecord inputs only",
  ),
  (
    "tfrecord_int_feature",
    lambda d: {"input": _records(d, [_example([1, 2, 3], kind="int")])},
    TypeError,
    r"`input` feature 'x' must be a float_list .*; saw a int64_list",
  ),
  (
    "tfrecord_int_later",
    lambda d: {
      "input": _records(
        d, [_example([1.0, 2.0, 3.0]), _example([1, 2, 3], kind="int")]
      )
    },
    TypeError,
    r"`input` feature 'x' must hold floating-point values in every record",
  ),
  (
    "tfrecord_lengths",
    lambda d: {
      "input": _records(
        d, [_example([1.0, 2.0, 3.0])] * 2 + [_example([1.0, 2.0])]
      )
    },
    ValueError,
    r"`input` records must all hold 3 values in feature 'x' like the first "
    r"one; record 2 of .* holds 2",
  ),
  (
    "tfrecord_unknown_key",
    lambda d: {"input": _records(d, [_example([1.0])]), "input_key": "z"},
    ValueError,
    r"`input_key` must name a feature of the records, one of \['x'\] in "
    r".*; saw 'z'",
  ),
  (
    "tfrecord_not_example",
    lambda d: {"input": _records(d, [b"\xff\xff\xff"])},
    ValueError,
    r"`input` records must be serialized tf\.train\.Example protos",
  ),
  (
    "tfrecord_corrupt",
    lambda d: {"input": _touch(os.path.join(d, "x.tfrecord"), "x" * 40)},
    ValueError,
    r"`input` .* is not a readable TFRecord file",
  ),
  (
    "tfrecord_empty",
    lambda d: {"input": _records(d, [])},
    ValueError,
    r"`input` holds no samples: .* has no records",
  ),
  (
    "unknown_xs",
    lambda d: {"xs": "input:0"},
    ValueError,
    r"`xs` names no tensor of the model: 'input:0'",
  ),
  (
    "unknown_ys",
    lambda d: {"ys": "yy:0"},
    ValueError,
    r"`ys` names no tensor of the model: 'yy:0'\. Closest names: 'y:0'",
  ),
  (
    "ys_independent_of_xs",
    lambda d: {"ys": "Const:0"},
    ValueError,
    r"`ys` must depend on `xs`",
  ),
  (
    "dtype",
    lambda d: {"dtype": "int32"},
    TypeError,
    r"`dtype` must be one of float16, float32, float64 .*; saw 'int32'",
  ),
  (
    "output_not_npy",
    lambda d: {"output": os.path.join(d, "h.txt")},
    ValueError,
    r"`output` must be a \.npy file name; saw .*h\.txt",
  ),
  (
    "output_directory_missing",
    lambda d: {"output": os.path.join(d, "no", "h.npy")},
    FileNotFoundError,
    r"`output` directory does not exist: .*no",
  ),
  (
    "output_is_directory",
    lambda d: {"output": _mkdir(os.path.join(d, "h.npy"))},
    ValueError,
    r"`output` must be a file name; saw the directory",
  ),
  (
    "output_is_input",
    lambda d: {"output": os.path.join(d, "x.npy")},
    ValueError,
    r"`output` must not overwrite `input` .*x\.npy",
  ),
  (
    "gradients_output_is_input",
    lambda d: {"gradients_output": os.path.join(d, "x.npy")},
    ValueError,
    r"`gradients_output` must not overwrite `input`",
  ),
  (
    "same_outputs",
    lambda d: {"gradients_output": os.path.join(d, "h.npy")},
    ValueError,
    r"`gradients_output` must differ from `output`",
  ),
  (
    "gradients_output_named_like_a_shard",
    lambda d: {"gradients_output": os.path.join(d, "h-00001-of-00002.npy")},
    ValueError,
    r"`gradients_output` must not be named like a shard of `output` .*; saw "
    r".*h-00001-of-00002\.npy beside .*h\.npy\.",
  ),
  (
    "output_named_like_a_shard",
    lambda d: {
      "output": os.path.join(d, "g-00000-of-00003.npy"),
      "gradients_output": os.path.join(d, "g.npy"),
    },
    ValueError,
    r"`output` must not be named like a shard of `gradients_output`",
  ),
  (
    "input_named_like_a_shard",
    lambda d: {
      "input": _save(d, _samples(4), "h-00000-of-00002.npy"),
    },
    ValueError,
    r"`output` must not overwrite `input` .*h-00000-of-00002\.npy",
  ),
  (
    "method",
    lambda d: {"method": "rows"},
    ValueError,
    r"`method` must be one of 'auto', 'forward', 'pfor' or 'while_loop'; "
    r"saw 'rows'\.",
  ),
  (
    "chunk_size",
    lambda d: {"chunk_size": 0},
    ValueError,
    r"`chunk_size` must be None or a positive int; saw 0\.",
  ),
  (
    "parallel_iterations",
    lambda d: {"parallel_iterations": 2.5},
    ValueError,
    r"`parallel_iterations` must be None or a positive int; saw 2\.5\.",
  ),
  (
    "forward_without_rule",
    lambda d: {"graph_def": _dawson_graph_def(), "method": "forward"},
    ValueError,
    r"`method`='forward' cannot differentiate `ys` with respect to x:0: no "
    r"forward rule for op type",
  ),
  (
    "fixed_batch_last_short",
    lambda d: {
      "graph_def": mlp_graph_def(batch=8),
      "input": _save(d, _samples(20)),
      "batch_size": 8,
    },
    ValueError,
    r"^`xs` x:0 has a fixed batch dimension of 8 \(shape \(8, 3\)\), so "
    r"every batch fed must hold exactly 8 samples: `batch_size` 8 and a "
    r"number of samples that is a multiple of 8 \(or give `xs` a batch "
    r"dimension of None\); saw `batch_size` 8 and 20 samples in .*x\.npy, "
    r"fed in batches of 8 and 4\.$",
  ),
  (
    "fixed_batch_other_batch_size",
    lambda d: {
      "graph_def": mlp_graph_def(batch=8),
      "input": _save(d, _samples(16)),
      "batch_size": 4,
    },
    ValueError,
    r"^`xs` x:0 has a fixed batch dimension of 8 .*; saw `batch_size` 4 and "
    r"16 samples in .*x\.npy, fed in batches of 4\.$",
  ),
  (
    "fixed_batch_fewer_samples",
    lambda d: {"graph_def": mlp_graph_def(batch=8)},
    ValueError,
    r"^`xs` x:0 has a fixed batch dimension of 8 .*; saw `batch_size` 256 "
    r"and 4 samples in .*x\.npy, fed in batches of 4\.$",
  ),
  (
    "batch_size",
    lambda d: {"batch_size": 0},
    ValueError,
    r"`batch_size` must be a positive int; saw 0",
  ),
  (
    "graph_def",
    lambda d: {"graph_def": "model.pb"},
    TypeError,
    r"`graph_def` must be a tf\.compat\.v1\.GraphDef; saw str",
  ),
)


def _dawson_graph_def():
  """A sum of Dawson's integrals of x: its op has no rule in the forward
  engine."""
  with tf.Graph().as_default() as graph:
    x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
    tf.identity(tf.reduce_sum(tf.math.special.dawsn(x), 1), name="y")
  return graph.as_graph_def()


def _touch(path, text=""):
  _write(path, text)
  return path


def _mkdir(path):
  os.mkdir(path)
  return path


def _save(directory, array, name="x.npy"):
  path = os.path.join(directory, name)
  np.save(path, array)
  return path


def _savez(directory, **arrays):
  path = os.path.join(directory, "x.npz")
  np.savez(path, **arrays)
  return path


def _records(directory, records):
  path = os.path.join(directory, "x.tfrecord")
  _write_records(path, records)
  return path


class BadInputTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(*_BAD_INPUTS)
  def test_bad_input_fails_before_writing(self, setup, error, regex):
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
      tf.constant(1.0, name="Const")
      tf.identity(testing_utils.tanh_mlp(x, *_WEIGHTS), name="y")
    kwargs = {
      "graph_def": graph.as_graph_def(),
      "xs": "x:0",
      "ys": "y:0",
      "input": _save(directory, _samples(4)),
      "output": os.path.join(directory, "h.npy"),
    }
    kwargs.update(setup(directory))
    before = set(os.listdir(directory))
    with self.assertRaisesRegex(error, regex):
      streaming.compute_hessians(**kwargs)
    self.assertEqual(set(os.listdir(directory)), before)

  @parameterized.parameters("output", "gradients_output")
  def test_unwritable_output_directory_fails_before_writing(self, arg):
    unwritable = testing_utils.unwritable_directory()
    if unwritable is None:
      self.skipTest("no directory refuses new files here")
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    kwargs = {
      "output": os.path.join(directory, "h.npy"),
      arg: os.path.join(unwritable, "out.npy"),
    }
    with (
      mock.patch.object(streaming.run, "Engine") as engine,
      self.assertRaisesRegex(
        PermissionError,
        rf"^`{arg}` directory is not writable: {unwritable} \(creating a "
        r"file there fails: .*\); choose another directory\.$",
      ),
    ):
      streaming.compute_hessians(
        mlp_graph_def(), "x:0", "y:0", _save(directory, _samples(4)), **kwargs
      )
    engine.assert_not_called()  # Checked before the model is built.
    self.assertEqual(os.listdir(directory), ["x.npy"])


_RSS_CHILD = """
import os, resource, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
from tf1hess import streaming
with open(sys.argv[1], "rb") as f:
  graph_def = tf.compat.v1.GraphDef.FromString(f.read())
streaming.compute_hessians(
    graph_def, "x:0", "y:0", sys.argv[2], sys.argv[3],
    batch_size=int(sys.argv[4]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


class MemoryTest(tf.test.TestCase):
  # Seconds to minutes each on 2 cores: run with --slow (nox does).
  slow_cases = ("test_peak_memory_does_not_grow_with_n",)

  def test_peak_memory_does_not_grow_with_n(self):
    """Peak RSS of a run over N = 400k equals that of a run over 2 batches.

    The large run reads 12.8 MB and writes 102 MB, 50x its batch budget;
    holding either would show in its peak resident memory.
    """
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    k, batch, large = 8, 4096, 400_000
    weights = testing_utils.mlp_weights(k, hidden=16, seed=4)
    graph_path = os.path.join(directory, "model.pb")
    with open(graph_path, "wb") as f:
      f.write(
        mlp_graph_def(feature_shape=(k,), weights=weights).SerializeToString()
      )
    x = np.lib.format.open_memmap(
      os.path.join(directory, "large.npy"), "w+", np.float32, (large, k)
    )
    rng = np.random.default_rng(5)
    for start in range(0, large, 50_000):
      x[start : start + 50_000] = rng.normal(size=(50_000, k))
    np.save(os.path.join(directory, "small.npy"), np.array(x[: 2 * batch]))
    del x
    procs = {
      name: subprocess.Popen(
        [
          sys.executable,
          "-c",
          _RSS_CHILD,
          graph_path,
          os.path.join(directory, name + ".npy"),
          os.path.join(directory, name + "_h.npy"),
          str(batch),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=_ROOT,
      )
      for name in ("small", "large")
    }
    peaks = {}
    for name, proc in procs.items():
      self.addCleanup(proc.kill)
      out, err = proc.communicate(timeout=600)
      self.assertEqual(proc.returncode, 0, err)
      peaks[name] = int(out.split()[-1])
    output_bytes = large * k * k * 4
    self.assertEqual(
      os.path.getsize(os.path.join(directory, "large_h.npy")),
      output_bytes + 128,
    )
    growth = peaks["large"] - peaks["small"]
    self.assertLess(
      growth,
      output_bytes // 5,
      f"peak RSS grew by {growth / 2**20:.1f} MiB from N = {2 * batch} to "
      f"N = {large} (output {output_bytes / 2**20:.0f} MiB): {peaks}",
    )
    last = np.load(os.path.join(directory, "large_h.npy"), mmap_mode="r")[-3:]
    x_last = np.load(os.path.join(directory, "large.npy"), mmap_mode="r")[-3:]
    self.assertAllClose(
      last,
      testing_utils.tanh_mlp_hessians(x_last, *weights),
      atol=1e-5,
      rtol=1e-4,
    )


if __name__ == "__main__":
  tf.test.main()
