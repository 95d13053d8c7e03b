"""Tests of scripts/compute_hessians.py, in-process and as a subprocess.

A small tanh MLP with variables is saved as a TF1 SavedModel, a frozen
GraphDef and a MetaGraph with its checkpoint; the script's Hessians are
compared with the analytic ones (testing_utils), and interrupted runs with
the bytes of an uninterrupted one.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl import app
from absl import flags
from absl.testing import flagsaver
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
import tf1hess

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "scripts", "compute_hessians.py")
sys.path.insert(0, os.path.dirname(_SCRIPT))
import compute_hessians  # pylint: disable=g-import-not-at-top

_K, _H = 3, 5
_WEIGHTS = testing_utils.mlp_weights(_K, hidden=_H, seed=6)
_TIMEOUT = 300


def write_artifacts(directory):
  """Saves the tanh MLP, with variables, in the three legacy formats."""
  paths = {
    "saved_model": os.path.join(directory, "saved_model"),
    "graph": os.path.join(directory, "frozen.pb"),
    "meta_graph": os.path.join(directory, "ckpt", "model.ckpt.meta"),
    "checkpoint": os.path.join(directory, "ckpt", "model.ckpt"),
  }
  w1, b1, w2 = _WEIGHTS
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
    v1, c1, v2 = (
      tf.compat.v1.Variable(w.astype(np.float32), name=n)
      for w, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))
    )
    hidden = tf.tanh(tf.matmul(x, v1) + c1)
    y = tf.identity(tf.reduce_sum(hidden * v2, axis=1), name="y")
    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      tf.compat.v1.saved_model.simple_save(
        sess, paths["saved_model"], {"x": x}, {"y": y}
      )
      saver.save(sess, paths["checkpoint"])
      frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
        sess, sess.graph.as_graph_def(), ["y"]
      )
  tf.io.write_graph(frozen, directory, "frozen.pb", as_text=False)
  return paths


_MODELS = (
  ("saved_model", lambda p: {"saved_model": p["saved_model"]}),
  ("frozen_pb", lambda p: {"graph": p["graph"]}),
  (
    "meta_graph",
    lambda p: {"meta_graph": p["meta_graph"], "checkpoint": p["checkpoint"]},
  ),
)


class ComputeHessiansTest(tf.test.TestCase, parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    flags.FLAGS.mark_as_parsed()
    cls.models_dir = tempfile.mkdtemp()
    cls.paths = write_artifacts(cls.models_dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.models_dir, ignore_errors=True)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

  def path(self, name):
    return os.path.join(self.dir, name)

  def save_samples(self, n, name="x.npy", seed=0):
    x = np.random.default_rng(seed).normal(size=(n, _K)).astype(np.float32)
    np.save(self.path(name), x)
    return self.path(name), x

  def _run_main(self, **flag_values):
    with flagsaver.flagsaver(**flag_values):
      compute_hessians.main(["compute_hessians"])

  def _flags(self, path, **changes):
    """The flags of a run of the graph on the samples at `path` into
    h.npy, with `changes`."""
    return {
      "graph": self.paths["graph"],
      "xs": "x:0",
      "ys": ["y:0"],
      "input": path,
      "output": self.path("h.npy"),
      **changes,
    }

  @parameterized.named_parameters(*_MODELS)
  def test_main_writes_analytic_hessians(self, model_flags):
    path, x = self.save_samples(10)
    self._run_main(
      **model_flags(self.paths),
      xs="x:0",
      ys=["y:0"],
      input=path,
      output=self.path("h.npy"),
      gradients_output=self.path("g.npy"),
      batch_size=4,
    )
    self.assertAllClose(
      np.load(self.path("h.npy")),
      testing_utils.tanh_mlp_hessians(x, *_WEIGHTS),
      atol=1e-5,
      rtol=1e-4,
    )
    self.assertAllClose(
      np.load(self.path("g.npy")),
      testing_utils.tanh_mlp_gradients(x, *_WEIGHTS),
      atol=1e-5,
      rtol=1e-4,
    )
    self.assertCountEqual(os.listdir(self.dir), ["x.npy", "h.npy", "g.npy"])

  @parameterized.named_parameters(
    ("auto", {}),
    ("forward", {"method": "forward"}),
    ("pfor_chunk_2", {"method": "pfor", "chunk_size": 2}),
    ("while_loop", {"method": "while_loop", "parallel_iterations": 2}),
  )
  def test_main_strategies_write_analytic_hessians(self, strategy):
    path, x = self.save_samples(7)
    with mock.patch.object(
      compute_hessians.streaming,
      "compute_hessians",
      wraps=compute_hessians.streaming.compute_hessians,
    ) as run:
      self._run_main(
        graph=self.paths["graph"],
        xs="x:0",
        ys=["y:0"],
        input=path,
        output=self.path("h.npy"),
        batch_size=3,
        **strategy,
      )
    self.assertEqual(run.call_args.kwargs["plan"], tf1hess.Plan(**strategy))
    self.assertAllClose(
      np.load(self.path("h.npy")),
      testing_utils.tanh_mlp_hessians(x, *_WEIGHTS),
      atol=1e-5,
      rtol=1e-4,
    )

  @parameterized.named_parameters(
    ("method", "--method=rows", r"value should be one of <auto\|forward\|"),
    ("chunk_size", "--chunk_size=0", r"0 is not a positive integer"),
    (
      "parallel_iterations",
      "--parallel_iterations=-1",
      r"-1 is not a positive integer",
    ),
  )
  def test_bad_strategy_flag_subprocess_writes_nothing(self, flag, regex):
    path, _ = self.save_samples(4)
    result = self._run_script(path, "--ys=y:0", flag)
    self.assertEqual(result.returncode, 1, result.stderr)
    self.assertRegex(
      testing_utils.clean_stderr(result.stderr)[0],
      rf"^FATAL Flags parsing error: flag {flag}: {regex}",
    )
    self.assertEqual(os.listdir(self.dir), ["x.npy"])

  def test_existing_output_needs_overwrite(self):
    path, x = self.save_samples(6)
    with open(self.path("h.npy"), "w", encoding="utf-8") as f:
      f.write("someone else's")
    flag_values = self._flags(path)
    with self.assertRaises(SystemExit) as raised:
      self._run_main(**flag_values)
    self.assertRegex(
      raised.exception.code,
      r"^compute_hessians: error: `output` exists: .*h\.npy; pass "
      r"--overwrite \(overwrite=True\) to replace it, or choose another "
      r"name\.$",
    )
    with open(self.path("h.npy"), encoding="utf-8") as f:
      self.assertEqual(f.read(), "someone else's")
    self._run_main(overwrite=True, **flag_values)
    self.assertAllClose(
      np.load(self.path("h.npy")),
      testing_utils.tanh_mlp_hessians(x, *_WEIGHTS),
      atol=1e-5,
      rtol=1e-4,
    )
    self.assertCountEqual(os.listdir(self.dir), ["x.npy", "h.npy"])

  def test_subprocess_csv_to_float64(self):
    x = np.random.default_rng(1).normal(size=(7, _K)).astype(np.float32)
    with open(self.path("x.csv"), "w", encoding="utf-8") as f:
      f.write("a,b,c\n")
      for row in x:
        f.write(",".join(repr(float(v)) for v in row) + "\n")
    result = self._run_script(
      self.path("x.csv"),
      "--ys=y:0",
      "--batch_size=3",
      "--dtype=float64",
      "--progress_secs=0",
    )
    self.assertEqual(result.returncode, 0, result.stderr)
    hessians = np.load(self.path("h.npy"))
    self.assertEqual(hessians.dtype, np.float64)
    self.assertAllClose(
      hessians,
      testing_utils.tanh_mlp_hessians(x, *_WEIGHTS),
      atol=1e-5,
      rtol=1e-4,
    )
    self.assertRegex(result.stderr, r"7/7 samples \(100\.0%\).* ETA")

  def _bad_flags(self, case):
    path, _ = self.save_samples(4)
    base = self._flags(path)
    np.save(self.path("ints.npy"), np.ones((4, _K), np.int64))
    np.save(self.path("wide.npy"), np.ones((4, _K + 2), np.float32))
    changes = {
      "missing_input": {"input": self.path("nope.npy")},
      "missing_model": {"graph": self.path("nope.pb")},
      "unknown_xs": {"xs": "X:0"},
      "unknown_ys": {"ys": ["y_out:0"]},
      "width": {"input": self.path("wide.npy")},
      "non_float": {"input": self.path("ints.npy")},
      "conflicting_models": {"saved_model": self.paths["saved_model"]},
      "meta_graph_alone": {
        "graph": None,
        "meta_graph": self.paths["meta_graph"],
      },
      "worker_hosts": {"worker_hosts": ["localhost"]},
      # Flag values that only the command line's parser would refuse: they
      # reach `compute_hessians`, which refuses them too.
      "method": {"method": "rows"},
      "forward_without_rule": {
        "graph": self._dawson_graph(),
        "method": "forward",
      },
      "fixed_batch": {"graph": self._fixed_batch_graph(), "batch_size": 8},
    }[case]
    return {**base, **changes}

  _BAD = (
    ("missing_input", r"`input` does not exist: .*nope\.npy"),
    ("missing_model", r"`graph` names no file: .*nope\.pb"),
    (
      "unknown_xs",
      r"`xs` names no tensor of the model: 'X:0'\. Closest names: .*'x:0'",
    ),
    (
      "unknown_ys",
      r"`ys` names no tensor of the model: 'y_out:0'\. Closest names: 'y:0'",
    ),
    (
      "width",
      r"`input` samples must match `xs` x:0, which takes 3 features per "
      r"sample \(shape \(None, 3\)\); saw 5 features per sample",
    ),
    (
      "non_float",
      r"`input` must hold floating-point values .* saw dtype int64",
    ),
    (
      "conflicting_models",
      r"Give exactly one model: .*; saw `saved_model` and `graph`",
    ),
    ("meta_graph_alone", r"`meta_graph` needs `checkpoint`"),
    ("worker_hosts", r"`worker_hosts` entries must be HOST:PORT .*'localhost'"),
    (
      "method",
      r"`method` must be one of 'auto', 'forward', 'pfor' or 'while_loop'; "
      r"saw 'rows'\.$",
    ),
    (
      "forward_without_rule",
      r"`method`='forward' cannot differentiate `ys` with respect to x:0: "
      r"no forward rule for op type",
    ),
    (
      "fixed_batch",
      r"`xs` x:0 has a fixed batch dimension of 8 \(shape \(8, 3\)\), so "
      r"every batch fed must hold exactly 8 samples: `batch_size` 8 and a "
      r"number of samples that is a multiple of 8 .*; saw `batch_size` 8 and "
      r"4 samples in .*x\.npy, fed in batches of 4\.$",
    ),
  )

  def _dawson_graph(self):
    """A frozen sum of Dawson's integrals of x: no forward rule for its op."""
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
      tf.identity(tf.reduce_sum(tf.math.special.dawsn(x), 1), name="y")
    tf.io.write_graph(graph, self.models_dir, "dawsn.pb", as_text=False)
    return os.path.join(self.models_dir, "dawsn.pb")

  def _fixed_batch_graph(self):
    """The frozen MLP with a static batch dimension of 8."""
    w1, b1, w2 = _WEIGHTS
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [8, _K], name="x")
      hidden = tf.tanh(tf.matmul(x, w1.astype(np.float32)) + b1)
      tf.identity(tf.reduce_sum(hidden * w2, axis=1), name="y")
    tf.io.write_graph(graph, self.models_dir, "fixed8.pb", as_text=False)
    return os.path.join(self.models_dir, "fixed8.pb")

  @parameterized.named_parameters((name, name, regex) for name, regex in _BAD)
  def test_bad_input_is_one_line_and_writes_nothing(self, case, regex):
    flag_values = self._bad_flags(case)
    before = sorted(os.listdir(self.dir))
    with self.assertRaises(SystemExit) as raised:
      self._run_main(**flag_values)
    message = raised.exception.code
    self.assertIsInstance(message, str)  # sys.exit(str): status 1.
    self.assertNotIn("\n", message)
    self.assertRegex(message, r"^compute_hessians: error: " + regex)
    self.assertEqual(sorted(os.listdir(self.dir)), before)

  @parameterized.parameters("output", "gradients_output")
  def test_unwritable_output_directory_is_one_line(self, flag):
    unwritable = testing_utils.unwritable_directory()
    if unwritable is None:
      self.skipTest("no directory refuses new files here")
    path, _ = self.save_samples(4)
    flag_values = self._flags(
      path, **{flag: os.path.join(unwritable, "out.npy")}
    )
    load = mock.patch.object(
      compute_hessians.legacy,
      "load_graph_def",
      wraps=compute_hessians.legacy.load_graph_def,
    )
    with load as loaded, self.assertRaises(SystemExit) as raised:
      self._run_main(**flag_values)
    loaded.assert_not_called()  # Refused before the model is loaded.
    self.assertRegex(
      raised.exception.code,
      rf"^compute_hessians: error: `{flag}` directory is not writable: "
      rf"{unwritable} \(creating a file there fails: [^\n]*\); choose "
      r"another directory\.$",
    )
    self.assertEqual(os.listdir(self.dir), ["x.npy"])

  def test_coupled_samples_fail_in_one_line(self):
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
      centered = x - tf.reduce_mean(x, axis=0)  # Couples the samples.
      tf.identity(tf.reduce_sum(tf.tanh(centered) ** 3, axis=1), name="y")
    tf.io.write_graph(graph, self.dir, "coupled.pb", as_text=False)
    path, _ = self.save_samples(6)
    with self.assertRaises(SystemExit) as raised:
      self._run_main(
        graph=self.path("coupled.pb"),
        xs="x:0",
        ys=["y:0"],
        input=path,
        output=self.path("h.npy"),
        check_independence=True,
      )
    self.assertNotIn("\n", raised.exception.code)
    self.assertRegex(
      raised.exception.code,
      r"^compute_hessians: error: .*The samples of `x:0` are not independent",
    )
    self.assertCountEqual(os.listdir(self.dir), ["coupled.pb", "x.npy"])

  def _run_script(self, path, *flags_):
    """Runs the script on the frozen model, `path` and `h.npy`; its result."""
    return subprocess.run(
      [
        sys.executable,
        _SCRIPT,
        f"--graph={self.paths['graph']}",
        "--xs=x:0",
        f"--input={path}",
        f"--output={self.path('h.npy')}",
        *flags_,
      ],
      capture_output=True,
      text=True,
      timeout=_TIMEOUT,
      check=False,
    )

  def test_bad_input_subprocess_exit_status(self):
    path, _ = self.save_samples(4)
    result = self._run_script(path, "--ys=y_out:0")
    self.assertEqual(result.returncode, 1)
    self.assertEqual(
      testing_utils.clean_stderr(result.stderr),
      [
        "compute_hessians: error: `ys` names no tensor of the model: "
        "'y_out:0'. Closest names: 'y:0'."
      ],
    )
    self.assertEqual(os.listdir(self.dir), ["x.npy"])

  def test_extra_argument_is_a_usage_error(self):
    with self.assertRaisesRegex(app.UsageError, "Too many"):
      compute_hessians.main(["compute_hessians", "extra"])

  def _progress(self, name):
    try:
      with open(self.path(name + ".progress.json"), encoding="utf-8") as f:
        return sum(b - a for a, b in json.load(f)["completed"])
    except (FileNotFoundError, ValueError):
      return 0

  def _batch_by_batch(self, path, *flags_):
    """The script's flags for `h.npy` of `path`, one sample a batch."""
    return [
      f"--graph={self.paths['graph']}",
      "--xs=x:0",
      "--ys=y:0",
      f"--input={path}",
      f"--output={self.path('h.npy')}",
      "--batch_size=1",
      *flags_,
    ]

  def _start_and_stop(self, args, sig, at_least):
    """Starts the script; sends `sig` once `at_least` batches are done."""
    proc = subprocess.Popen(
      [sys.executable, _SCRIPT, *args],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.addCleanup(proc.kill)
    deadline = time.monotonic() + _TIMEOUT
    while self._progress("h.npy") < at_least and proc.poll() is None:
      self.assertLess(time.monotonic(), deadline, "no progress")
      time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=_TIMEOUT)
    return proc.returncode, err

  def test_interrupted_run_on_a_csv_input_exits(self):
    """A CSV is read through `tf.data` in a session of the reader's own,
    which the interrupt must not leave to be closed at the interpreter's
    exit: the run hung there."""
    x = np.random.default_rng(2).normal(size=(500, _K)).astype(np.float32)
    np.savetxt(self.path("x.csv"), x, delimiter=",", fmt="%.9g")
    args = self._batch_by_batch(self.path("x.csv"))
    code, err = self._start_and_stop(args, signal.SIGINT, 1)
    self.assertEqual(code, 130, err)
    self.assertIn(
      "compute_hessians: interrupted; finished batches are kept", err
    )
    done = self._progress("h.npy")
    self.assertBetween(done, 1, 499)
    summary = compute_hessians.compute(
      "x:0",
      "y:0",
      self.path("x.csv"),
      self.path("h.npy"),
      graph=self.paths["graph"],
      batch_size=1,
    )
    self.assertEqual(summary.resumed_batches, done)
    self.assertAllClose(
      np.load(self.path("h.npy")),
      testing_utils.tanh_mlp_hessians(x.astype(np.float64), *_WEIGHTS),
      atol=1e-5,
      rtol=1e-4,
    )

  def test_interrupted_and_killed_runs_resume_to_the_same_bytes(self):
    path, _ = self.save_samples(500)
    kwargs = {"batch_size": 1, "gradients_output": self.path("g.npy")}
    args = self._batch_by_batch(
      path, f"--gradients_output={self.path('g.npy')}"
    )
    # Ctrl-C: exit 130 and a hint; the partial files stay.
    code, err = self._start_and_stop(args, signal.SIGINT, 1)
    self.assertEqual(code, 130, err)
    self.assertIn(
      "compute_hessians: interrupted; finished batches are kept", err
    )
    self.assertNotIn("Traceback", err)
    after_interrupt = self._progress("h.npy")
    self.assertBetween(after_interrupt, 1, 499)
    # Started again, it resumes; SIGKILL it a few batches later.
    code, err = self._start_and_stop(args, signal.SIGKILL, after_interrupt + 3)
    self.assertEqual(code, -signal.SIGKILL)
    self.assertRegex(
      err, rf"Resuming .*h\.npy: {after_interrupt} of 500 batches already done"
    )
    after_kill = self._progress("h.npy")
    self.assertBetween(after_kill, after_interrupt + 3, 499)
    self.assertNotIn("h.npy", os.listdir(self.dir))
    self.assertIn("h.npy.partial", os.listdir(self.dir))
    # The third run finishes the missing batches only.
    summary = compute_hessians.compute(
      "x:0",
      "y:0",
      path,
      self.path("h.npy"),
      graph=self.paths["graph"],
      **kwargs,
    )
    self.assertEqual(summary.resumed_batches, after_kill)
    self.assertEqual(summary.computed_batches, 500 - after_kill)
    compute_hessians.compute(
      "x:0",
      "y:0",
      path,
      self.path("ref.npy"),
      graph=self.paths["graph"],
      batch_size=1,
      gradients_output=self.path("ref_g.npy"),
    )
    for name, ref in (("h.npy", "ref.npy"), ("g.npy", "ref_g.npy")):
      with open(self.path(name), "rb") as a, open(self.path(ref), "rb") as b:
        self.assertEqual(a.read(), b.read(), name)
    self.assertCountEqual(
      os.listdir(self.dir),
      ["x.npy", "h.npy", "g.npy", "ref.npy", "ref_g.npy"],
    )


if __name__ == "__main__":
  tf.test.main()
