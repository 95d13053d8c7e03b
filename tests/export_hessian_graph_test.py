"""Tests for scripts/export_hessian_graph.py, in-process and as a program.

Legacy artifacts of a tanh MLP with variables are written here; the script
exports them, a subprocess that never imports tf1hess reloads every export
and runs it at two batch sizes, and the Hessians are compared with the
analytic ones. Every bad input ends with exit status 1, one line naming the
problem, no traceback and no output.
"""

import concurrent.futures
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl import app
from absl import flags
from absl.testing import flagsaver
from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import testing_utils

from tf1hess import legacy

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "scripts", "export_hessian_graph.py")
_K, _H = 3, 4
_BATCH_SIZES = (2, 7)


def _import_script():
  spec = importlib.util.spec_from_file_location("export_hessian_graph", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


script = _import_script()

# Runs each exported SavedModel and frozen graph with TensorFlow alone.
_RELOAD = r"""
import json, sys
import numpy as np
import tensorflow as tf

jobs = json.loads(sys.argv[1])
inputs = dict(np.load(sys.argv[2]))
results = {}
for key, kind, path in jobs:
  for name, x in inputs.items():
    if kind == "saved_model":
      with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.load(sess, ["serve"], path)
        sig = meta.signature_def["hessians"]
        h = sess.run(sig.outputs["hessians"].name, {sig.inputs["x"].name: x})
    else:
      graph_def = tf.compat.v1.GraphDef()
      with open(path, "rb") as f:
        graph_def.ParseFromString(f.read())
      with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        tf.compat.v1.import_graph_def(graph_def, name="")
        h = sess.run("hessians:0", {"x:0": x})
    results[f"{key}/{kind}/{name}"] = h
assert "tf1hess" not in sys.modules, "the export needed tf1hess"
np.savez(sys.argv[3], **results)
"""


def _write_artifacts(directory, weights):
  """Writes the MLP (with variables and a train op) in the three formats."""
  paths = {
    "saved_model": os.path.join(directory, "saved_model"),
    "graph": os.path.join(directory, "frozen.pb"),
    "meta_graph": os.path.join(directory, "model.ckpt.meta"),
    "checkpoint": os.path.join(directory, "model.ckpt"),
    "int_graph": os.path.join(directory, "int_input.pb"),
  }
  with tf.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
    w1, b1, w2 = [
      tf.compat.v1.get_variable(name, initializer=value)
      for name, value in zip(("w1", "b1", "w2"), weights)
    ]
    y = tf.identity(tf.linalg.matvec(tf.tanh(x @ w1 + b1), w2), name="y")
    tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(
      tf.reduce_mean(y**2)
    )
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
  with tf.Graph().as_default() as graph:
    x = tf.compat.v1.placeholder(tf.int32, [None, _K], name="x")
    tf.identity(tf.reduce_sum(tf.cast(x, tf.float32) ** 2, 1), name="y")
  tf.io.write_graph(graph, directory, "int_input.pb", as_text=False)
  return paths


def _model_flags(paths, kind):
  if kind == "meta_graph":
    return {
      "meta_graph": paths["meta_graph"],
      "checkpoint": paths["checkpoint"],
    }
  return {kind: paths[kind]}


def _run_script(*args):
  return subprocess.run(
    [sys.executable, _SCRIPT, *args],
    capture_output=True,
    text=True,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    check=False,
  )


class ExportScriptTest(tf.test.TestCase, parameterized.TestCase):
  """Exports in setUpClass (in-process and as a program), reloads them."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    cls.dir = tempfile.mkdtemp()
    cls.weights = testing_utils.mlp_weights(_K, _H, 5, np.float32)
    cls.paths = _write_artifacts(os.path.join(cls.dir, "model"), cls.weights)
    cls.outputs, jobs = {}, []
    for kind in ("saved_model", "graph", "meta_graph"):
      out = os.path.join(cls.dir, kind)
      os.mkdir(out)
      cls.outputs[kind] = {
        "export_dir": os.path.join(out, "hessians_model"),
        "output_graph": os.path.join(out, "hessians.pb"),
        "logdir": os.path.join(out, "logs"),
      }
      # One export builds its rows with the reference loop: --method
      # reaches the exported graph, and the numbers stay the same.
      method = "while_loop" if kind == "meta_graph" else "auto"
      with flagsaver.flagsaver(
        xs="x:0", ys=["y:0"], method=method, **_model_flags(cls.paths, kind)
      ):
        with flagsaver.flagsaver(**cls.outputs[kind]):
          script.main(["export_hessian_graph"])
      jobs.append([kind, "saved_model", cls.outputs[kind]["export_dir"]])
      jobs.append([kind, "pb", cls.outputs[kind]["output_graph"]])
    out = os.path.join(cls.dir, "program")
    os.mkdir(out)
    cls.program_outputs = {
      "export_dir": os.path.join(out, "hessians_model"),
      "output_graph": os.path.join(out, "hessians.pb"),
    }
    cls.program = _run_script(
      f"--meta_graph={cls.paths['meta_graph']}",
      f"--checkpoint={cls.paths['checkpoint']}",
      "--xs=x:0",
      "--ys=y",
      "--method=pfor",
      "--chunk_size=2",
      *(f"--{k}={v}" for k, v in cls.program_outputs.items()),
    )
    jobs.append(["program", "saved_model", cls.program_outputs["export_dir"]])
    jobs.append(["program", "pb", cls.program_outputs["output_graph"]])
    rng = np.random.default_rng(11)
    cls.inputs = {
      f"n{n}": rng.normal(size=(n, _K)).astype(np.float32) for n in _BATCH_SIZES
    }
    inputs_path = os.path.join(cls.dir, "inputs.npz")
    results_path = os.path.join(cls.dir, "results.npz")
    np.savez(inputs_path, **cls.inputs)
    cls.reload = subprocess.run(
      [
        sys.executable,
        "-c",
        _RELOAD,
        json.dumps(jobs),
        inputs_path,
        results_path,
      ],
      capture_output=True,
      text=True,
      cwd=cls.dir,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
      check=False,
    )
    cls.results = (
      dict(np.load(results_path)) if cls.reload.returncode == 0 else {}
    )

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def test_overwrite_replaces_the_exports(self):
    out = tempfile.mkdtemp(dir=self.dir)
    outputs = {
      "export_dir": os.path.join(out, "hessians_model"),
      "output_graph": os.path.join(out, "hessians.pb"),
    }
    with flagsaver.flagsaver(
      xs="x:0", ys=["y:0"], **_model_flags(self.paths, "graph"), **outputs
    ):
      script.main(["export_hessian_graph"])
      before = os.path.getmtime(outputs["output_graph"])
      with self.assertRaisesRegex(SystemExit, r"`export_dir` must not exist"):
        script.main(["export_hessian_graph"])
      with flagsaver.flagsaver(overwrite=True):
        script.main(["export_hessian_graph"])
    self.assertGreaterEqual(os.path.getmtime(outputs["output_graph"]), before)
    self.assertCountEqual(os.listdir(out), ["hessians_model", "hessians.pb"])
    self.assertCountEqual(
      os.listdir(outputs["export_dir"]), ["saved_model.pb", "variables"]
    )

  def test_program_succeeds(self):
    self.assertEqual(self.program.returncode, 0, self.program.stderr[-3000:])
    self.assertNotIn("Traceback", self.program.stderr)
    self.assertIn(
      "Wrote " + self.program_outputs["export_dir"], self.program.stderr
    )
    for path in self.program_outputs.values():
      self.assertTrue(os.path.exists(path), path)

  @parameterized.named_parameters(
    (f"{key}_{kind}", key, kind)
    for key in ("saved_model", "graph", "meta_graph", "program")
    for kind in ("saved_model", "pb")
  )
  def test_reloaded_exports_match_analytic(self, key, kind):
    self.assertEqual(self.reload.returncode, 0, self.reload.stderr[-3000:])
    for name, x in self.inputs.items():
      want = testing_utils.tanh_mlp_hessians(x, *self.weights)
      got = self.results[f"{key}/{kind}/{name}"]
      self.assertEqual(got.shape, (len(x), _K, _K))
      self.assertAllClose(got, want, atol=1e-5, rtol=1e-4)

  def test_method_flag_reaches_the_exported_graph(self):
    def loops(kind):
      graph_def = tf.compat.v1.GraphDef()
      with open(self.outputs[kind]["output_graph"], "rb") as f:
        graph_def.ParseFromString(f.read())
      nodes = list(graph_def.node) + [
        node for f in graph_def.library.function for node in f.node_def
      ]
      return [node.name for node in nodes if "While" in node.op]

    self.assertNotEmpty(loops("meta_graph"))  # --method=while_loop
    self.assertEmpty(loops("graph"))  # auto: a few rows, no loop.

  def test_graph_log_written(self):
    for kind, outputs in self.outputs.items():
      self.assertLen(os.listdir(outputs["logdir"]), 1, kind)

  def test_export_model_returns_model(self):
    out = os.path.join(self.dir, "function")
    os.mkdir(out)
    model = script.export_model(
      "x:0",
      "y:0",
      graph=self.paths["graph"],
      output_graph=os.path.join(out, "h.pb"),
    )
    self.assertIsInstance(model, legacy.HessianModel)
    self.assertEqual(model.hessians.shape.as_list(), [None, _K, _K])
    self.assertEqual(os.listdir(out), ["h.pb"])

  def test_several_xs(self):
    # `--xs=x:0,t:0`: Hessians of each, "hessians_0" and "hessians_1",
    # against TensorFlow's diagonal blocks on the model's own graph.
    out = tempfile.mkdtemp(dir=self.dir)
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
      t = tf.compat.v1.placeholder(tf.float32, [None, 1], name="t")
      y = tf.identity(tf.reduce_sum(tf.sin(x) * t**3, 1), name="y")
      full = tf.hessians(tf.reduce_sum(y), [x, t])
    path = tf.io.write_graph(graph, out, "model.pb", as_text=False)
    rng = np.random.default_rng(8)
    xv = rng.normal(size=(3, 2)).astype(np.float32)
    tv = rng.normal(size=(3, 1)).astype(np.float32)
    with tf.compat.v1.Session(graph=graph) as sess:
      full = sess.run(full, {x: xv, t: tv})
    output_graph = os.path.join(out, "hessians.pb")
    with flagsaver.flagsaver(
      xs="x:0,t:0", ys=["y:0"], graph=path, output_graph=output_graph
    ):
      script.main(["export_hessian_graph"])
    graph_def = tf.compat.v1.GraphDef()
    with open(output_graph, "rb") as f:
      graph_def.ParseFromString(f.read())
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
      tf.compat.v1.import_graph_def(graph_def, name="")
      got = sess.run(["hessians_0:0", "hessians_1:0"], {"x:0": xv, "t:0": tv})
    for g, f in zip(got, full):
      self.assertAllClose(g, np.stack([f[i, :, i, :] for i in range(3)]))

  def test_extra_argument_is_usage_error(self):
    with flagsaver.flagsaver(xs="x:0", ys=["y:0"]):
      with self.assertRaisesRegex(app.UsageError, "Too many"):
        script.main(["export_hessian_graph", "extra"])


# Bad inputs: (name, flags, regex of the one-line message). The paths are
# filled in per test: {model} is the artifacts directory.
_BAD_INPUTS = (
  (
    "missing_file",
    {"graph": "{model}/missing.pb", "xs": "x:0", "ys": "y:0"},
    r"`graph` names no file: '.*/missing\.pb'\.",
  ),
  (
    "missing_saved_model",
    {"saved_model": "{model}/missing", "xs": "x:0", "ys": "y:0"},
    r"`saved_model` names no directory: '.*/missing'\.",
  ),
  (
    "missing_checkpoint",
    {
      "meta_graph": "{model}/model.ckpt.meta",
      "checkpoint": "{model}/other.ckpt",
      "xs": "x:0",
      "ys": "y:0",
    },
    r"`checkpoint` names no checkpoint: '.*/other\.ckpt'",
  ),
  (
    "unknown_tensor",
    {"graph": "{model}/frozen.pb", "xs": "x:0", "ys": "yy:0"},
    r"`ys` names no tensor of the model: 'yy:0'\. Closest names: 'y:0'",
  ),
  (
    "unknown_input",
    {"saved_model": "{model}/saved_model", "xs": "input:0", "ys": "y:0"},
    r"`xs` names no tensor of the model: 'input:0'\. ",
  ),
  (
    "conflicting_model_flags",
    {
      "saved_model": "{model}/saved_model",
      "graph": "{model}/frozen.pb",
      "xs": "x:0",
      "ys": "y:0",
    },
    r"Give exactly one model: .*; saw `saved_model` and `graph`\.",
  ),
  (
    "meta_graph_without_checkpoint",
    {"meta_graph": "{model}/model.ckpt.meta", "xs": "x:0", "ys": "y:0"},
    r"`meta_graph` needs `checkpoint`",
  ),
  (
    "non_float_xs",
    {"graph": "{model}/int_input.pb", "xs": "x:0", "ys": "y:0"},
    r"`xs` must be a floating tensor .*; saw dtype int32\.",
  ),
  (
    "no_output",
    {"graph": "{model}/frozen.pb", "xs": "x:0", "ys": "y:0", "outputs": ""},
    r"Give at least one output: `export_dir`, `output_graph` or `logdir`\.",
  ),
  (
    "export_dir_not_empty",
    {"graph": "{model}/frozen.pb", "xs": "x:0", "ys": "y:0", "full": "1"},
    r"`export_dir` must not exist \(or be an empty directory\)",
  ),
  (
    "output_graph_exists",
    {"graph": "{model}/frozen.pb", "xs": "x:0", "ys": "y:0", "file": "1"},
    r"`output_graph` must not exist; '.*hessians\.pb' does; pass "
    r"--overwrite \(overwrite=True\) to replace it\.$",
  ),
)

# Run as programs too, one per kind of failure: a missing file, an unknown
# tensor name, conflicting model flags, a non-float input, an output in the
# way. (Each program spends seconds loading TensorFlow.)
_PROGRAM_CASES = (
  "missing_file",
  "unknown_tensor",
  "conflicting_model_flags",
  "non_float_xs",
  "export_dir_not_empty",
)


class BadInputTest(tf.test.TestCase, parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    cls.dir = tempfile.mkdtemp()
    cls.model_dir = os.path.join(cls.dir, "model")
    cls.weights = testing_utils.mlp_weights(_K, _H, 6, np.float32)
    _write_artifacts(cls.model_dir, cls.weights)
    # The programs run side by side: each spends its time loading TensorFlow.
    cases = {
      name: cls._flags(case)
      for name, case, _ in _BAD_INPUTS
      if name in _PROGRAM_CASES
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
      runs = {
        name: pool.submit(
          _run_script, *(f"--{k}={v}" for k, v in values.items())
        )
        for name, (values, _, _) in cases.items()
      }
    cls.programs = {
      name: (runs[name].result(), out, existing)
      for name, (_, out, existing) in cases.items()
    }

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  @classmethod
  def _flags(cls, case):
    """Returns `(flags as strings, output dir, existing outputs)`."""
    out = tempfile.mkdtemp(dir=cls.dir)
    values = {
      k: v.format(model=cls.model_dir)
      for k, v in case.items()
      if k not in ("outputs", "full", "file")
    }
    existing = []
    if "outputs" not in case:
      values["export_dir"] = os.path.join(out, "hessians_model")
      values["output_graph"] = os.path.join(out, "hessians.pb")
      values["logdir"] = os.path.join(out, "logs")
    if "full" in case:
      os.mkdir(values["export_dir"])
      existing = ["hessians_model"]
      with open(os.path.join(values["export_dir"], "keep"), "w") as f:
        f.write("not ours")
    if "file" in case:
      existing = ["hessians.pb"]
      with open(values["output_graph"], "w") as f:
        f.write("not ours")
    return values, out, existing

  def _check_nothing_written(self, out, existing):
    self.assertCountEqual(os.listdir(out), existing)
    if existing:
      path = os.path.join(out, existing[0])
      if os.path.isdir(path):
        self.assertEqual(os.listdir(path), ["keep"])
      else:
        with open(path) as f:
          self.assertEqual(f.read(), "not ours")

  @parameterized.named_parameters(*_BAD_INPUTS)
  def test_in_process(self, case, regex):
    values, out, existing = self._flags(case)
    with flagsaver.as_parsed(**values):
      with self.assertRaises(SystemExit) as raised:
        script.main(["export_hessian_graph"])
    message = raised.exception.code
    self.assertIsInstance(message, str)  # sys.exit(str) exits with status 1
    self.assertRegex(message, r"^export_hessian_graph: error: " + regex)
    self.assertNotIn("\n", message)
    self._check_nothing_written(out, existing)

  @parameterized.named_parameters(
    (name, name, regex)
    for name, _, regex in _BAD_INPUTS
    if name in _PROGRAM_CASES
  )
  def test_program(self, name, regex):
    result, out, existing = self.programs[name]
    self.assertEqual(result.returncode, 1, result.stderr[-3000:])
    self.assertNotIn("Traceback", result.stderr)
    last_line = result.stderr.strip().splitlines()[-1]
    self.assertRegex(last_line, r"^export_hessian_graph: error: " + regex)
    self._check_nothing_written(out, existing)

  @parameterized.parameters(
    ("export_dir", "hessians_model"),
    ("output_graph", "hessians.pb"),
    ("logdir", "logs/run"),
  )
  def test_unwritable_directory_is_refused_before_loading(self, flag, name):
    unwritable = testing_utils.unwritable_directory()
    if unwritable is None:
      self.skipTest("no directory refuses new files here")
    values, out, _ = self._flags(
      {"graph": "{model}/frozen.pb", "xs": "x:0", "ys": "y:0"}
    )
    values[flag] = os.path.join(unwritable, name)
    with (
      mock.patch.object(legacy, "load") as load,
      flagsaver.as_parsed(**values),
      self.assertRaises(SystemExit) as raised,
    ):
      script.main(["export_hessian_graph"])
    load.assert_not_called()  # Checked before the model is loaded.
    self.assertRegex(
      raised.exception.code,
      rf"^export_hessian_graph: error: `{flag}` directory is not writable: "
      rf"{unwritable} \(creating a file there fails: [^\n]*\); choose "
      "another directory.$",
    )
    self._check_nothing_written(out, [])

  def test_missing_required_flag(self):
    result = _run_script("--graph=" + os.path.join(self.model_dir, "frozen.pb"))
    self.assertNotEqual(result.returncode, 0)
    self.assertNotIn("Traceback", result.stderr)
    self.assertIn("--xs", result.stderr)


if __name__ == "__main__":
  tf.test.main()
