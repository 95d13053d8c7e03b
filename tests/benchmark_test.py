"""Tests of the benchmark (`benchmarks/`) and of scripts/benchmark.py."""

import dataclasses
import importlib.util
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

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "scripts"))
import benchmark  # noqa: E402  pylint: disable=wrong-import-position
from benchmarks import cases
from benchmarks import goals  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks import methods  # noqa: E402
from benchmarks import models  # noqa: E402
from benchmarks import pinn  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import suites  # noqa: E402

flags.FLAGS.mark_as_parsed()  # The defaults of scripts/benchmark.py's flags.

_HAVE = {
  m: importlib.util.find_spec(m) is not None
  for m in ("jax", "folx", "deepxde", "matplotlib")
}
_ONCE = harness.Timing(repeats=1)


def _scaled(factor, base="tf1hess_while_loop"):
  """A method that returns `base`'s output times `factor`."""

  def build(case):
    runner = methods.METHODS[base].build(case)
    value = runner.value
    runner.value = lambda: factor * value()
    return runner

  return methods.Method("under_test", "under test", build)


def _run(method, case):
  with mock.patch.dict(methods.METHODS, {method.name: method}):
    (record,) = harness.run_case(case, [method.name], _ONCE)
  return record


class MethodsTest(tf.test.TestCase, parameterized.TestCase):
  """Every available method, on a small case of each kind."""

  @parameterized.named_parameters(
    ("hessian", "tanh_mlp", "hessian"),
    ("laplacian", "mixture", "laplacian"),
    ("diagonal", "quadratic", "diagonal"),
  )
  def test_every_method_passes_its_check_and_is_timed(self, model, quantity):
    case = cases.Case(model, "8x4", quantity)
    # dde.grad.hessian is timed on deepxde_fnn only (and has its own test).
    names = methods.default_methods(model, quantity)
    records = harness.run_case(case, names, _ONCE)
    self.assertEqual([r["method"] for r in records], names)
    for record in records:
      self.assertEqual(record["status"], "ok", str(record))
      self.assertGreater(record["seconds"], 0.0)
      self.assertLen(record["times"], 1)
      if record["method"] == methods.REFERENCE:
        self.assertEqual(record["ratio"], 1.0)
    by_name = {r["method"]: r for r in records}
    base = by_name[methods.REFERENCE]["seconds"]
    self.assertAllClose(
      by_name["tf1hess_while_loop"]["ratio"],
      by_name["tf1hess_while_loop"]["seconds"] / base,
    )
    self.assertRegex(
      by_name["parallel_for_batch_jacobian"]["note"], "fails on a None batch"
    )
    self.assertEqual(
      "folx_forward_laplacian" in names,
      quantity == "laplacian" and _HAVE["folx"],
    )

  def test_labels_name_the_reduction(self):
    jax_method = methods.METHODS["jax_jit_vmap_hessian"]
    self.assertEqual(
      jax_method.label_for("laplacian"), "JAX jit(vmap(trace(hessian)))"
    )
    tape = methods.METHODS["batch_jacobian_pfor"]
    self.assertEqual(tape.label_for("hessian"), "tape.batch_jacobian (pfor)")
    self.assertEqual(
      tape.label_for("diagonal"), "tape.batch_jacobian (pfor) + diagonal"
    )

  def test_dde_grad_hessian_runs_in_a_process_of_its_own(self):
    if not _HAVE["deepxde"]:
      self.skipTest("deepxde is not installed")
    case = cases.Case("deepxde_fnn", "8x3", "laplacian")
    names = ["dde_grad_hessian", "tf1hess_eager_function", "tf1hess_auto"]
    records = {r["method"]: r for r in harness.run_case(case, names, _ONCE)}
    self.assertEqual(records["dde_grad_hessian"]["status"], "ok")
    self.assertLess(records["dde_grad_hessian"]["max_abs_diff"], 1e-3)
    self.assertEqual(records["tf1hess_eager_function"]["status"], "skipped")
    self.assertRegex(records["tf1hess_eager_function"]["error"], "eager")
    # In this process, DeepXDE's backend was never imported.
    self.assertTrue(tf.executing_eagerly())
    self.assertNotIn("deepxde", sys.modules)

  def test_dde_grad_hessian_refuses_this_process(self):
    with self.assertRaisesRegex(RuntimeError, "process of its own"):
      methods.METHODS["dde_grad_hessian"].build(
        cases.Case("deepxde_fnn", "4x2")
      )
    self.assertTrue(methods.METHODS["dde_grad_hessian"].isolated)


class ChecksTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(("doubled", 2.0), ("sign", -1.0))
  def test_a_wrong_method_is_caught_and_not_timed(self, factor):
    record = _run(_scaled(factor), cases.Case("tanh_mlp", "16x5"))
    self.assertEqual(record["status"], "wrong")
    self.assertRegex(record["error"], r"max \|difference\|")
    self.assertNotIn("seconds", record)

  def test_a_close_method_passes(self):
    record = _run(_scaled(1.0 + 1e-5), cases.Case("tanh_mlp", "16x5"))
    self.assertEqual(record["status"], "ok")
    self.assertGreater(record["seconds"], 0.0)

  def test_a_wrong_default_stops_the_case(self):
    # The default is checked against the analytic Hessian of the model.
    wrong = dataclasses.replace(_scaled(1.01), name=methods.REFERENCE)
    with self.assertRaisesRegex(RuntimeError, "default .* wrong"):
      _run(wrong, cases.Case("quadratic", "4x3"))

  def test_a_method_of_the_wrong_shape_is_caught(self):
    def build(case):
      runner = methods.METHODS["tf1hess_while_loop"].build(case)
      value = runner.value
      runner.value = lambda: value()[:, 0]
      return runner

    record = _run(
      methods.Method("under_test", "x", build), cases.Case("tanh_mlp", "4x3")
    )
    self.assertEqual(record["status"], "wrong")
    self.assertRegex(record["error"], "shape")

  def test_a_failing_method_is_reported(self):
    def build(case):
      del case
      raise RuntimeError("this method cannot be built")

    record = _run(
      methods.Method("under_test", "x", build), cases.Case("tanh_mlp", "4x3")
    )
    self.assertEqual(record["status"], "failed")
    self.assertRegex(record["error"], "cannot be built")

  def test_a_method_of_another_quantity_is_skipped(self):
    record = _run(
      methods.METHODS["folx_forward_laplacian"], cases.Case("mixture", "4x3")
    )
    self.assertEqual(record["status"], "skipped")
    self.assertRegex(record["error"], "does not compute hessian")

  def test_a_failing_child_fails_its_case_only(self):
    fail = RuntimeError("benchmarks.child case failed: Killed")
    with mock.patch.object(harness, "run_child", side_effect=fail):
      records = harness.run_case(
        cases.Case("fnn_3x64", "4x2"),
        ["tf1hess_auto", "dde_grad_hessian"],
        _ONCE,
      )
      # A DeepXDE model runs there too, whatever the methods.
      (record,) = harness.run_case(
        cases.Case("deepxde_fnn", "4x2"), ["tf1hess_auto"], _ONCE
      )
    self.assertEqual([r["status"] for r in records], ["failed", "failed"])
    self.assertRegex(records[1]["error"], "RuntimeError: .*Killed")
    self.assertEqual(record["status"], "failed")

  def test_check(self):
    reference = np.ones((2, 3, 3))
    self.assertIsNone(harness.check(reference + 1e-4, reference))
    self.assertRegex(harness.check(reference * 1.01, reference), "> 0.001")
    self.assertRegex(
      harness.check(np.full((2, 3, 3), np.nan), reference), "difference"
    )

  def test_fast_methods_get_fast_repeats(self):
    def build(case):
      runner = methods.METHODS["tf1hess_while_loop"].build(case)
      run = runner.run

      def slowed():
        time.sleep(2 * harness.FAST_RUN)
        run()

      runner.run = slowed
      return runner

    slow = methods.Method("slow", "slow", build)
    with mock.patch.dict(methods.METHODS, {"slow": slow}):
      records = harness.run_case(
        cases.Case("quadratic", "8x4"),
        ["tf1hess_auto", "slow"],
        harness.Timing(repeats=2, fast_repeats=4),
      )
    runs = {r["method"]: len(r["times"]) for r in records}
    self.assertEqual(runs, {"tf1hess_auto": 4, "slow": 2})

  def test_tf_hessians_is_skipped_where_it_does_not_fit(self):
    settings = cases.Settings(tf_hessians_max_bytes=1000)
    record = _run(
      methods.METHODS["tf_hessians_diagonal"],
      cases.Case("quadratic", "16x4", settings=settings),
    )
    self.assertEqual(record["status"], "skipped")
    self.assertRegex(record["error"], "tf_hessians_max_bytes")

  @parameterized.parameters("tf1_output_floor", "jax_output_floor")
  def test_an_output_floor_is_timed_without_a_check(self, name):
    if not methods.METHODS[name].available():
      self.skipTest("jax is not installed")
    for quantity, shape in (("hessian", (16, 5, 5)), ("laplacian", (16,))):
      case = cases.Case("tanh_mlp", "16x5", quantity)
      record = _run(methods.METHODS[name], case)
      self.assertEqual(record["status"], "ok")
      self.assertGreater(record["seconds"], 0.0)
      runner = methods.METHODS[name].build(case)
      self.assertAllEqual(runner.value(), np.ones(shape))
      runner.close()


class ModelsTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(*((name, name) for name in models.MODELS))
  def test_tf_and_jax_agree_and_match_the_reference(self, name):
    if not _HAVE["jax"]:
      self.skipTest("jax is not installed")
    import jax  # pylint: disable=import-outside-toplevel

    case = cases.Case(name, "3x8", settings=cases.Settings(hidden=6))
    y = case.tf_fn(tf.constant(case.x))
    # The TF graph's Hessians by tape.batch_jacobian, not by tf1hess.
    runner = methods.METHODS["batch_jacobian_pfor"].build(case)
    tf_hessians = runner.value()
    runner.close()
    jax_fn = case.jax_fn()
    jax_y = np.asarray(jax.jit(jax.vmap(jax_fn))(case.x))
    jax_hessians = np.asarray(jax.jit(jax.vmap(jax.hessian(jax_fn)))(case.x))
    self.assertEqual(y.shape, (3,))
    self.assertAllClose(y, jax_y, atol=1e-5, rtol=1e-5)
    self.assertAllClose(tf_hessians, jax_hessians, atol=1e-4, rtol=1e-4)
    self.assertGreater(np.abs(jax_hessians).max(), 1e-3)  # Not all zero.
    reference = case.reference()
    if reference is not None:
      self.assertAllClose(jax_hessians, reference, atol=1e-4, rtol=1e-4)

  def test_original_models_keep_their_weights(self):
    # The weights of the first benchmark, from the same seeds.
    case = cases.Case("quadratic", "4x3")
    import zlib  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng([0, 3, zlib.crc32(b"quadratic")])
    a = (rng.normal(size=(3, 3)) / np.sqrt(3)).astype(np.float32)
    self.assertAllEqual(case.weights["a"], a)
    x = np.random.default_rng([0, 4, 3]).normal(size=(4, 3))
    self.assertAllEqual(case.x, x.astype(np.float32))

  def test_unknown_names_are_refused(self):
    with self.assertRaisesRegex(
      ValueError, r"`functions` must name entries of \[.*'tanh_mlp'.*'cubic'"
    ):
      cases.Case("cubic", "4x3")
    with self.assertRaisesRegex(
      ValueError, r"`methods` must name entries of .*'tf1hess_fast'"
    ):
      methods.get("tf1hess_fast")
    with self.assertRaisesRegex(ValueError, "`quantities` must name .*trace"):
      cases.Case("quadratic", "4x3", "trace")
    with self.assertRaisesRegex(ValueError, "K divisible by 4; saw '4x6'"):
      cases.Case("attention", "4x6")
    with self.assertRaisesRegex(ValueError, "`suite` must name entries"):
      suites.get("everything")
    self.assertEqual(
      methods.get("tf1hess_pfor_chunk3").name, "tf1hess_pfor_chunk3"
    )

  def test_suites_name_registered_models_and_methods(self):
    for suite in suites.SUITES.values():
      for name in suite.models:
        models.get(name)
      for spec in suite.cases or ():
        suites.parse_case(spec)
      for name in suite.methods or ():
        methods.get(name)


def _record(model, shape, method, seconds, quantity="hessian"):
  return {
    "model": model,
    "shape": shape,
    "quantity": quantity,
    "method": method,
    "status": "ok",
    "seconds": seconds,
  }


class GoalsTest(tf.test.TestCase):
  def _rows(self, results):
    groups = {name: models.get(name).group for name in models.MODELS}
    return goals.evaluate(results, groups)

  def test_each_case_and_the_geometric_mean(self):
    results = [
      _record("mixture", "8x4", "tf1hess_auto", 1.0),
      _record("mixture", "8x4", "batch_jacobian_pfor", 8.0),
      _record("mixture", "8x4", "jax_jit_vmap_hessian", 0.5),
      _record("conv1d", "8x4", "tf1hess_auto", 2.0),
      _record("conv1d", "8x4", "batch_jacobian_pfor", 2.4),
      _record("conv1d", "8x4", "tf1_output_floor", 0.1),
    ]
    rows = self._rows(results)
    mean = [r for r in rows if "geometric mean" in r["goal"]]
    self.assertLen(mean, 1)
    self.assertEqual(mean[0]["case"], "geometric mean of 2 cases")
    self.assertAllClose(mean[0]["speedup"], (8.0 * 1.2) ** 0.5)
    self.assertTrue(mean[0]["met"])  # 3.1 >= 2
    each = {
      r["case"]: r
      for r in rows
      if r["goal"] == "vs tape.batch_jacobian >= 1.3x"
    }
    self.assertTrue(each["mixture 8x4 hessian"]["met"])
    self.assertFalse(each["conv1d 8x4 hessian"]["met"])  # 1.2 < 1.3
    self.assertAllClose(each["conv1d 8x4 hessian"]["speedup"], 1.2)
    self.assertEqual(each["conv1d 8x4 hessian"]["floor"], 0.1)
    self.assertIsNone(each["mixture 8x4 hessian"]["floor"])
    jax_rows = [r for r in rows if "JAX" in r["goal"]]
    by_case = {r["case"]: r for r in jax_rows}
    self.assertFalse(by_case["mixture 8x4 hessian"]["met"])  # 0.5x
    self.assertIsNone(by_case["conv1d 8x4 hessian"]["met"])  # not timed
    self.assertIsNone(by_case["conv1d 8x4 hessian"]["other"])

  def test_goals_select_their_models_shapes_and_quantities(self):
    results = [
      _record("tanh_mlp", "8x4", "tf1hess_auto", 1.0),
      _record("tanh_mlp", "8x4", "batch_jacobian_pfor", 1.4),
      _record("tanh_mlp", "256x16", "tf1hess_auto", 1.0),
      _record("tanh_mlp", "256x16", "tf_hessians_diagonal", 99.0),
      _record("deepxde_fnn", "4096x10", "tf1hess_auto", 1.0, "laplacian"),
      _record("deepxde_fnn", "4096x10", "dde_grad_hessian", 1.6, "laplacian"),
      _record(
        "deepxde_fnn", "4096x10", "folx_forward_laplacian", 0.9, "laplacian"
      ),
      _record("fnn_3x64", "256x64", "tf1hess_auto", 1.0, "laplacian"),
      _record("fnn_3x64", "256x64", "dde_grad_hessian", 1.0, "laplacian"),
    ]
    rows = {(r["goal"], r["case"]): r for r in self._rows(results)}
    self.assertEqual(
      set(rows),
      {
        ("vs tape.batch_jacobian >= 1.5x", "tanh_mlp 8x4 hessian"),
        ("vs JAX jit(vmap(hessian)) >= 1.2x", "tanh_mlp 8x4 hessian"),
        ("vs tf.hessians + diagonal >= 100x", "tanh_mlp 256x16 hessian"),
        (
          "DeepXDE FNN: Laplacian vs dde.grad.hessian >= 1.5x",
          "deepxde_fnn 4096x10 laplacian",
        ),
        (
          "Laplacian vs folx forward_laplacian not slower",
          "deepxde_fnn 4096x10 laplacian",
        ),
        (
          "Laplacian vs folx forward_laplacian not slower",
          "fnn_3x64 256x64 laplacian",
        ),
      },
    )
    met = {key[0]: row["met"] for key, row in rows.items()}
    self.assertFalse(met["vs tape.batch_jacobian >= 1.5x"])
    self.assertFalse(met["vs tf.hessians + diagonal >= 100x"])
    self.assertTrue(met["DeepXDE FNN: Laplacian vs dde.grad.hessian >= 1.5x"])

  def test_every_goal_compares_with_a_registered_method(self):
    for goal in goals.GOALS:
      methods.get(goal.other)
      self.assertIn(goal.quantity, cases.QUANTITIES)


class ReportTest(tf.test.TestCase):
  def _results(self):
    results = [
      _record("mixture", "8x4", "tf1hess_auto", 0.001),
      _record("mixture", "8x4", "batch_jacobian_pfor", 0.0031),
      _record("mixture", "8x4", "tf1hess_auto", 0.002, "laplacian"),
      _record("mixture", "8x4", "jax_jit_vmap_hessian", 1.5, "laplacian"),
    ]
    results[1]["ratio"] = 3.1
    results[-1].update(status="wrong", error="max |difference| 2 > 0.001")
    return results

  def test_the_default_template_is_filled_in(self):
    notes = report.machine_notes()
    text = report.markdown(self._results(), notes, "python x.py --quick")
    self.assertNotIn("$", text)
    self.assertIn("python x.py --quick\n", text)
    self.assertIn("- `mixture`: log-density of a 10-component", text)
    self.assertIn("### mixture, laplacian: ", text)
    self.assertIn("| tape.batch_jacobian (pfor) | 3.1 ms (3.10x) |", text)
    self.assertIn("| JAX jit(vmap(trace(hessian))) | wrong |", text)
    self.assertIn(
      "| vs tape.batch_jacobian >= 1.3x | mixture 8x4 hessian | 1 ms | "
      "3.1 ms | 3.10 | yes | n/a |",
      text,
    )
    self.assertIn(
      "- JAX jit(vmap(trace(hessian))): wrong: max |difference| 2 > 0.001. "
      "Cases: mixture 8x4 laplacian.",
      text,
    )
    self.assertIn("None in this run (`--chunk_cases`).", text)
    self.assertIn("| vs tape.batch_jacobian >= 1.3x | 1 of 1 | 3.10 |", text)

  def test_the_report_comes_from_the_template_file(self):
    template = self.create_tempfile(content="Title\n$command\n$goals\n")
    text = report.markdown(
      self._results(), report.machine_notes(), "cmd", template.full_path
    )
    self.assertStartsWith(text, "Title\ncmd\n| goal | case |")
    bad = self.create_tempfile(content="$no_such_placeholder")
    with self.assertRaises(KeyError):
      report.markdown(self._results(), {}, "cmd", bad.full_path)

  def test_durations(self):
    self.assertEqual(report.duration(0.01234), "12.3 ms")
    self.assertEqual(report.duration(2.5), "2.5 s")
    self.assertEqual(report.duration(None), "n/a")


class MemoryTest(tf.test.TestCase):
  def test_peak_memory_counts_the_output(self):
    # The quadratic form's Hessians at 1000 x 128: 1000 * 128^2 * 4 bytes.
    case = cases.Case("quadratic", "1000x128")
    peak = harness.measure_memory(case, "tf1hess_while_loop")
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
      if not _HAVE["matplotlib"]:  # Only the "bench" extra installs it.
        with self.assertRaises(SystemExit) as cm:
          benchmark.main(["benchmark.py"])
        self.assertRegex(str(cm.exception.code), "needs matplotlib")
        return
      benchmark.main(["benchmark.py"])
    with open(md, encoding="utf-8") as f:
      report_text = f.read()
    self.assertIn(
      "python scripts/benchmark.py --functions=quadratic "
      "--methods=tf1hess_auto,tf1hess_while_loop,tf_hessians_diagonal --quick",
      report_text,
    )
    self.assertIn("| tf1hess method='while_loop' | ", report_text)
    self.assertIn("| tf.hessians + diagonal blocks | ", report_text)
    self.assertIn(
      "| vs tape.batch_jacobian not slower | quadratic 32x4 hessian |",
      report_text,
    )
    with open(png, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    with open(js, encoding="utf-8") as f:
      data = json.load(f)
    self.assertLen(data["results"], 3 * 2)
    self.assertEqual(
      sorted(os.listdir(out.full_path)), ["b.json", "b.md", "b.png"]
    )
    # The same report again from the raw results, timing nothing.
    again = os.path.join(out.full_path, "again.md")
    with flagsaver.flagsaver(report_from=js, output_md=again):
      with mock.patch.object(harness, "run_all") as run_all:
        benchmark.main(["benchmark.py"])
    run_all.assert_not_called()
    with open(again, encoding="utf-8") as f:
      self.assertEqual(f.read(), report_text)

  def test_forward_suite_times_its_methods_where_they_apply(self):
    out = self.create_tempdir()
    js = os.path.join(out.full_path, "f.json")
    with flagsaver.flagsaver(
      suite="forward", quick=True, functions=["mixture"], output_json=js
    ):
      with mock.patch.object(suites, "QUICK_SHAPES", ("4x4",)):
        benchmark.main(["benchmark.py"])
    with open(js, encoding="utf-8") as f:
      records = json.load(f)["results"]
    timed = {(r["quantity"], r["method"]) for r in records}
    self.assertIn(("laplacian", "tf1hess_forward"), timed)
    self.assertIn(("hessian", "batch_jacobian_pfor"), timed)
    self.assertNotIn(("hessian", "folx_forward_laplacian"), timed)
    self.assertNotIn(("laplacian", "dde_grad_hessian"), timed)  # fnn only
    self.assertEqual(
      ("laplacian", "folx_forward_laplacian") in timed, _HAVE["folx"]
    )
    for record in records:
      self.assertEqual(record["status"], "ok", str(record))

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

  def test_bad_case(self):
    self.assertRegex(
      self._error(cases=["mixture"]),
      r"^benchmark.py: error: `cases` entries must be like .*'mixture'",
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


class SpaceTimeTest(tf.test.TestCase):
  """`benchmarks.pinn.compare_space_time` and its table."""

  def test_every_method_is_checked_against_tf_gradients_and_timed(self):
    rows = pinn.compare_space_time(d=2, batch_size=16, runs=2)
    jax = _HAVE["jax"] and _HAVE["folx"]
    self.assertEqual(
      [row["method"] for row in rows],
      list(pinn.SPACE_TIME_METHODS) + ([pinn.JAX] if jax else []),
    )
    for row in rows:
      self.assertEqual((row["d"], row["quantity"]), (2, "joint hessian"))
      self.assertLess(row["max_abs_diff"], 1e-4, row)
      self.assertGreater(row["ms"], 0.0)
      self.assertLessEqual(row["min_ms"], row["ms"])
    methods = (*pinn.SPACE_TIME_METHODS, pinn.JAX)
    table = pinn.format_table(rows, methods, pinn.SPACE_TIME_PEERS)
    table = table.splitlines()
    self.assertLen(table, 3)
    self.assertIn("| tf.gradients / Derivatives |", table[0])
    self.assertIn("| 2 | joint hessian |", table[2])
    self.assertEqual(table[2].count("n/a"), 0 if jax else 2)


class OrdersTest(tf.test.TestCase):
  """`benchmarks.pinn.compare_orders` and its table."""

  def test_every_method_is_checked_against_tf_gradients_and_timed(self):
    rows = pinn.compare_orders(d=2, order=3, batch_size=16, runs=2)
    jax = _HAVE["jax"] and _HAVE["folx"]
    self.assertEqual(
      [row["method"] for row in rows],
      list(pinn.ORDERS_METHODS) + ([pinn.JAX] if jax else []),
    )
    for row in rows:
      self.assertEqual((row["d"], row["quantity"]), (2, "order 3"))
      self.assertLess(row["max_abs_diff"], 1e-4, row)
      self.assertGreater(row["ms"], 0.0)
    table = pinn.format_table(
      rows,
      (*pinn.ORDERS_METHODS, pinn.JAX),
      ("tf.gradients", pinn.JAX),
      ours=pinn.ORDERS_OURS,
    ).splitlines()
    self.assertLen(table, 3)
    self.assertIn("| tf.gradients / batch_derivatives |", table[0])
    self.assertIn("| 2 | order 3 |", table[2])
    self.assertEqual(table[2].count("n/a"), 0 if jax else 2)


if __name__ == "__main__":
  tf.test.main()
