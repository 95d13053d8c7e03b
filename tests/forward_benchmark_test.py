"""Tests of scripts/forward_benchmark.py: models, check and table."""

import os
import sys
from unittest import mock

from absl import flags
from absl.testing import flagsaver
import numpy as np
import tensorflow as tf

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts")
)
import forward_benchmark  # noqa: E402  pylint: disable=wrong-import-position

flags.FLAGS.mark_as_parsed()


class ForwardBenchmarkTest(tf.test.TestCase):
  def test_tf_and_jax_models_agree(self):
    try:
      import jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      self.skipTest("jax is not installed")
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    for model in forward_benchmark.MODELS:
      w = forward_benchmark.weights(model, 4)
      tf_out = forward_benchmark.model_fn(model, w, "tf")(tf.constant(x))
      jax_fn = forward_benchmark.model_fn(model, w, "jax")
      jax_out = np.stack([np.asarray(jax_fn(row)) for row in x])
      self.assertAllClose(tf_out, jax_out, atol=1e-5, rtol=1e-5, msg=model)

  def test_run_case_times_every_method(self):
    times = forward_benchmark.run_case("mixture", 4, 3, "laplacian", 1)
    self.assertIn("tf1hess default", times)
    self.assertIn("tape.batch_jacobian (tf.function)", times)
    self.assertTrue(all(t > 0 for t in times.values()))
    table = forward_benchmark.markdown({("mixture", "4x3", "laplacian"): times})
    self.assertIn("| mixture 4x3 | ", table)
    self.assertIn("(1.00x)", table)

  def test_a_wrong_method_stops_the_run(self):
    def wrong(fn, x_val):
      return lambda: None, lambda: np.zeros(len(x_val), np.float32)

    methods = forward_benchmark.methods("laplacian") | {"wrong": wrong}
    with mock.patch.object(forward_benchmark, "methods", return_value=methods):
      with self.assertRaisesRegex(AssertionError, "wrong differs"):
        forward_benchmark.run_case("fnn_3x64", 4, 3, "laplacian", 1)

  def test_main_writes_the_table(self):
    path = os.path.join(self.get_temp_dir(), "forward.md")
    with flagsaver.flagsaver(
      tiny=True, table_md=path, quantities=["laplacian"]
    ):
      forward_benchmark.main(["forward_benchmark"])
    with open(path) as f:
      self.assertIn("### laplacian", f.read())


if __name__ == "__main__":
  tf.test.main()
