"""Tests of scripts/benchmark.py: its quick mode, its checks and its reports."""

import json
import os
import sys
import time
from unittest import mock

from absl import flags
from absl.testing import flagsaver
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts")
)
import benchmark  # noqa: E402  pylint: disable=wrong-import-position

flags.FLAGS.mark_as_parsed()  # The defaults of scripts/benchmark.py's flags.

try:
  import matplotlib  # noqa: F401  pylint: disable=unused-import

  _HAVE_MATPLOTLIB = True
except ImportError:
  _HAVE_MATPLOTLIB = False


def _scaled(factor):
  """A method that returns tf1hess's Hessians times `factor`."""

  def make(case):
    runner = benchmark.METHODS["tf1hess_while_loop"](case)
    value = runner.value

    runner.value = lambda: factor * value()
    return runner

  return make


def _broken(case):
  del case
  raise RuntimeError("this method cannot be built")


class QuickModeTest(tf.test.TestCase, parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.results = benchmark.run_all(
      list(benchmark.FUNCTIONS),
      benchmark._QUICK_SHAPES,
      benchmark.default_methods(),
      repeats=1,
      warmup=1,
      max_seconds=10.0,
    )

  def test_every_method_passes_its_check_and_is_timed(self):
    methods = set(benchmark.default_methods())
    seen = set()
    for record in self.results:
      seen.add(record["method"])
      self.assertEqual(record["status"], "ok", record)
      self.assertGreater(record["seconds"], 0.0)
      self.assertLen(record["times"], 1)
    self.assertEqual(seen, methods)
    self.assertLen(self.results, len(methods) * 3 * 2)

  def test_ratios_are_relative_to_tf1hess_default(self):
    for record in self.results:
      if record["method"] == benchmark.REFERENCE:
        self.assertEqual(record["ratio"], 1.0)
      else:
        base = [
          r["seconds"]
          for r in self.results
          if r["method"] == benchmark.REFERENCE
          and r["function"] == record["function"]
          and r["shape"] == record["shape"]
        ][0]
        self.assertAllClose(record["ratio"], record["seconds"] / base)

  def test_parallel_for_failure_on_a_none_batch_is_reported(self):
    notes = [
      r["note"]
      for r in self.results
      if r["method"] == "parallel_for_batch_jacobian"
    ]
    self.assertNotEmpty(notes)
    for note in notes:
      self.assertRegex(note, "fails on a None batch")

  def test_goals_compare_with_the_named_methods(self):
    goals = benchmark.goals(self.results)
    mlp = {g["target"]: g for g in goals if g["case"] == "tanh_mlp 32x4"}
    self.assertCountEqual(mlp, [1.2, 1.5])
    self.assertIn("JAX", mlp[1.2]["goal"])
    jax_timed = "jax_jit_vmap_hessian" in benchmark.default_methods()
    floors = {
      f"{r['function']} {r['shape']}": r["seconds"]
      for r in self.results
      if r["method"] == "tf1_output_floor"
    }
    for g in goals:
      self.assertEqual(g["floor"], floors[g["case"]])
      if g["other"] is None:  # JAX not installed: shown as not measured.
        self.assertFalse(jax_timed)
        self.assertIsNone(g["speedup"])
        self.assertIsNone(g["met"])
        continue
      self.assertAllClose(g["speedup"], g["other"] / g["tf1hess"])
      self.assertEqual(g["met"], g["speedup"] >= g["target"])


class ChecksTest(tf.test.TestCase, parameterized.TestCase):
  def _run(self, method):
    case = benchmark.Case("tanh_mlp", "16x5", hidden=8)
    with mock.patch.dict(benchmark.METHODS, {"under_test": method}):
      (record,) = benchmark.run_case(case, ["under_test"], 1, 1)
    return record

  @parameterized.named_parameters(("doubled", 2.0), ("sign", -1.0))
  def test_a_wrong_method_is_caught_and_not_timed(self, factor):
    record = self._run(_scaled(factor))
    self.assertEqual(record["status"], "wrong")
    self.assertRegex(record["error"], r"max \|difference\|")
    self.assertNotIn("seconds", record)

  def test_a_close_method_passes(self):
    record = self._run(_scaled(1.0 + 1e-5))
    self.assertEqual(record["status"], "ok")
    self.assertGreater(record["seconds"], 0.0)

  def test_a_method_of_the_wrong_shape_is_caught(self):
    def make(case):
      runner = benchmark.METHODS["tf1hess_while_loop"](case)
      value = runner.value
      runner.value = lambda: value()[:, 0]
      return runner

    record = self._run(make)
    self.assertEqual(record["status"], "wrong")
    self.assertRegex(record["error"], "shape")

  def test_a_failing_method_is_reported(self):
    record = self._run(_broken)
    self.assertEqual(record["status"], "failed")
    self.assertRegex(record["error"], "cannot be built")

  def test_check(self):
    reference = np.ones((2, 3, 3))
    self.assertIsNone(benchmark.check(reference + 1e-4, reference))
    self.assertRegex(benchmark.check(reference * 1.01, reference), "> 0.001")
    self.assertRegex(
      benchmark.check(np.full((2, 3, 3), np.nan), reference), "difference"
    )

  def test_fast_methods_get_fast_repeats(self):
    def slow(case):
      runner = benchmark.METHODS["tf1hess_while_loop"](case)
      run = runner.run

      def slowed():
        time.sleep(2 * benchmark._FAST_RUN)
        run()

      runner.run = slowed
      return runner

    case = benchmark.Case("quadratic", "8x4")
    with mock.patch.dict(benchmark.METHODS, {"slow": slow}):
      records = benchmark.run_case(
        case, ["tf1hess_auto", "slow"], 2, 1, fast_repeats=4
      )
    runs = {r["method"]: len(r["times"]) for r in records}
    self.assertEqual(runs, {"tf1hess_auto": 4, "slow": 2})

  @parameterized.parameters(*benchmark.OUTPUT_FLOORS)
  def test_an_output_floor_is_timed_without_a_check(self, name):
    if name not in benchmark.default_methods():
      self.skipTest("jax is not installed")
    case = benchmark.Case("tanh_mlp", "16x5", hidden=8)
    (record,) = benchmark.run_case(case, [name], 1, 1)
    self.assertEqual(record["status"], "ok")
    self.assertGreater(record["seconds"], 0.0)
    # Its output has the Hessians' shape, but not their values.
    runner = benchmark.METHODS[name](case)
    self.assertAllEqual(runner.value(), np.ones((16, 5, 5)))
    runner.close()

  @flagsaver.flagsaver(tf_hessians_max_bytes=1000)
  def test_tf_hessians_is_skipped_where_it_does_not_fit(self):
    case = benchmark.Case("quadratic", "16x4")
    (record,) = benchmark.run_case(case, ["tf_hessians_diagonal"], 1, 1)
    self.assertEqual(record["status"], "skipped")
    self.assertRegex(record["error"], "tf_hessians_max_bytes")


class MemoryTest(tf.test.TestCase):
  def test_peak_memory_counts_the_output(self):
    # The quadratic form's Hessians at 1000 x 128: 1000 * 128^2 * 4 bytes.
    case = benchmark.Case("quadratic", "1000x128")
    peak = benchmark.measure_memory(
      case, {"method": "tf1hess_while_loop"}, hidden=64, depth=3, seed=0
    )
    output_mib = 1000 * 128 * 128 * 4 / 2**20
    self.assertGreaterEqual(peak, output_mib)
    self.assertLess(peak, 20 * output_mib)


class MainTest(tf.test.TestCase):
  def test_quick_run_writes_report_plot_and_json(self):
    out = self.create_tempdir()
    md, png, js = (
      os.path.join(out.full_path, name) for name in ("b.md", "b.png", "b.json")
    )
    with flagsaver.flagsaver(
      quick=True,
      functions=["quadratic"],
      methods=["tf1hess_auto", "tf1hess_while_loop", "tf_hessians_diagonal"],
      output_md=md,
      output_png=png,
      output_json=js,
    ):
      if not _HAVE_MATPLOTLIB:  # Only the "bench" extra installs it.
        with self.assertRaises(SystemExit) as cm:
          benchmark.main(["benchmark.py"])
        self.assertRegex(str(cm.exception.code), "needs matplotlib")
        return
      benchmark.main(["benchmark.py"])
    with open(md, encoding="utf-8") as f:
      report = f.read()
    self.assertIn(
      "python scripts/benchmark.py --functions=quadratic "
      "--methods=tf1hess_auto,tf1hess_while_loop,tf_hessians_diagonal --quick",
      report,
    )
    self.assertIn("| tf1hess method='while_loop' | ", report)
    self.assertIn("| tf.hessians + diagonal blocks | ", report)
    self.assertIn(
      "| vs tape.batch_jacobian not slower | quadratic 32x4 |", report
    )
    with open(png, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    with open(js, encoding="utf-8") as f:
      data = json.load(f)
    self.assertLen(data["results"], 3 * 2)
    self.assertEqual(
      sorted(os.listdir(out.full_path)), ["b.json", "b.md", "b.png"]
    )

  def test_command_line_names_a_non_bfc_allocator(self):
    with flagsaver.flagsaver(repeats=3):
      with mock.patch.dict(os.environ, {"TF_CPU_ALLOCATOR_USE_BFC": "true"}):
        self.assertEqual(
          benchmark.command_line(), "python scripts/benchmark.py --repeats=3"
        )
      with mock.patch.dict(os.environ, {"TF_CPU_ALLOCATOR_USE_BFC": "false"}):
        self.assertEqual(
          benchmark.command_line(),
          "TF_CPU_ALLOCATOR_USE_BFC=false python scripts/benchmark.py "
          "--repeats=3",
        )

  def test_extra_arguments(self):
    with self.assertRaisesRegex(Exception, "Too many command-line arguments"):
      benchmark.main(["benchmark.py", "extra"])

  def _error(self, **flags):
    with flagsaver.flagsaver(**flags):
      with self.assertRaises(SystemExit) as cm:
        benchmark.main(["benchmark.py"])
    return str(cm.exception.code)

  def test_unknown_function(self):
    self.assertRegex(
      self._error(functions=["cubic"]),
      r"^benchmark.py: error: `functions` must name entries of .*'cubic'",
    )

  def test_bad_shape(self):
    self.assertRegex(
      self._error(shapes=["16by4"]),
      r"^benchmark.py: error: `shapes` must be like 256x16 .*'16by4'",
    )

  def test_unknown_method(self):
    self.assertRegex(
      self._error(methods=["tf1hess_fast"]),
      r"^benchmark.py: error: `methods` must name entries of .*'tf1hess_fast'",
    )

  def test_bad_chunk_case(self):
    self.assertRegex(
      self._error(chunk_cases=["tanh_mlp:256x16"]),
      r"^benchmark.py: error: `chunk_cases` entries must be like .*256x16'",
    )


if __name__ == "__main__":
  tf.test.main()
