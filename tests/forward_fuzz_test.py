"""Random compositions: the forward engine against the row loop.

Runs a fixed set of seeds of `tools/forward_fuzz.py`: each builds a random
model of 3-7 ops (dense layers, elementwise functions, products, distances
to centres, matmuls written as broadcasts, pairwise products, reductions,
softmax, reshapes, slices, gathers, tiles, layer normalization; loops in
some) and checks
the engine's Hessians, diagonals and Laplacians against the row loop's in
float64, and the rows' other builds (pfor, auto's unrolled, looped and
vectorized rows) against the plain loop. The tool runs more seeds by hand
(see its docstring).
"""

import os
import sys
from unittest import mock

from absl.testing import parameterized
import tensorflow as tf

import testing_utils
from tf1hess.forward import chunks as forward_chunks

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools")
)
import forward_fuzz  # noqa: E402  pylint: disable=wrong-import-position

_MODES = ("hessian", "diagonal", "laplacian")


class ForwardFuzzTest(
  testing_utils.ControlFlowMixin, tf.test.TestCase, parameterized.TestCase
):
  slow_cases = (
    "test_auto_switching_on_n_agrees_with_the_rows1",
    "test_other_row_builds_agree_with_the_loop1",
    "test_other_row_builds_agree_with_the_loop2",
    "test_seed_agrees_with_the_rows17",
    "test_seed_agrees_with_the_rows19",
    "test_seed_agrees_with_the_rows3",
    "test_seed_with_loops_agrees_with_the_rows0",
    "test_seed_with_loops_agrees_with_the_rows2",
    "test_seed_with_loops_agrees_with_the_rows3",
    "test_seed_with_loops_agrees_with_the_rows4",
    "test_seed_with_loops_agrees_with_the_rows5",
  )

  @parameterized.parameters(
    testing_utils.in_turn(
      case=[(seed, 6, False) for seed in range(16)]
      + [(100, 6, True), (101, 6, True), (102, 6, True)]
      + [(200, 16, False), (201, 16, False)]
    )
  )
  def test_seed_agrees_with_the_rows(self, case, cf):
    self.control_flow(cf)
    seed, k, lists = case
    lines, results, _ = forward_fuzz.check_seed(seed, _MODES, k, 5, lists)
    self._assert_agree(lines, results)

  @parameterized.parameters(
    testing_utils.in_turn(seed=[502, 505, 509, 510, 516, 518])
  )
  def test_seed_with_loops_agrees_with_the_rows(self, seed, cf):
    # Models that draw scans, folds, maps and while loops too; the rows'
    # reference is built under control flow v2 in a graph of its own.
    self.control_flow(cf)
    lines, results, _ = forward_fuzz.check_seed(
      seed, _MODES, 6, 5, False, loops=True
    )
    self._assert_agree(lines, results)

  @parameterized.parameters(testing_utils.in_turn(seed=[300, 301, 302, 303]))
  def test_auto_switching_on_n_agrees_with_the_rows(self, seed, cf):
    # A tf.cond on N that runs the engine (even seeds) or the rows (odd),
    # the engine in chunks of 8 samples, the rows on a copy of the model.
    self.control_flow(cf)
    with (
      mock.patch.object(forward_chunks, "MIN_CHUNK", 8),
      mock.patch.object(forward_chunks, "CHUNK_BYTES", 2**10),
    ):
      lines, results, _ = forward_fuzz.check_seed(
        seed, _MODES, 6, 24, False, switch=True
      )
    self._assert_agree(lines, results)

  @parameterized.parameters(testing_utils.in_turn(seed=[400, 401, 402]))
  def test_other_row_builds_agree_with_the_loop(self, seed, cf):
    # pfor (whole and in chunks), and auto's unrolled, looped and
    # vectorized rows with the linear shortcuts, against the plain loop.
    self.control_flow(cf)
    rows = sorted(forward_fuzz._ROW_BUILDS)  # pylint: disable=protected-access
    lines, results, _ = forward_fuzz.check_seed(
      seed, _MODES, 6, 5, seed == 402, rows=rows
    )
    self._assert_agree(lines, results, len(rows))

  def _assert_agree(self, lines, results, builds=1):
    failed = [
      (mode, detail) for mode, status, detail in results if status == "failed"
    ]
    self.assertEmpty(failed, msg="\n".join(lines))
    self.assertLen(results, len(_MODES) * builds)


if __name__ == "__main__":
  tf.test.main()
