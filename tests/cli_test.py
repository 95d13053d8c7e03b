"""Tests of tf1hess._cli, the scripts' shared helpers: errors and flags."""

import gc
import io
import signal
import sys
import time
import types
from unittest import mock

from absl import flags
from absl.testing import flagsaver
import tensorflow as tf

import tf1hess
from tf1hess import _cli


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

  def test_ends_at_once_where_a_cluster_session_is_left_closing(self):
    # Python's exit would abort in the thread that waits for a lost worker.
    for status, code, printed in (
      ("prog: error: lost", 1, True),
      (130, 130, False),
    ):
      with self.subTest(status=status):
        with (
          mock.patch.object(
            _cli.streaming_engine, "closing_left", return_value=True
          ),
          mock.patch.object(
            _cli.os, "_exit", side_effect=SystemExit
          ) as exit_now,
          mock.patch.object(sys, "stderr", io.StringIO()) as stderr,
        ):
          with self.assertRaises(SystemExit):
            _cli.exit_with(status)
        exit_now.assert_called_once_with(code)
        self.assertEqual(
          stderr.getvalue(), "prog: error: lost\n" if printed else ""
        )

  def test_other_errors_propagate(self):
    with self.assertRaises(ZeroDivisionError):
      with _cli.exit_on_error("prog"):
        raise ZeroDivisionError()


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


class PlanFlagsTest(tf.test.TestCase):
  def setUp(self):
    super().setUp()
    self.holders = _cli.define_plan_flags()
    flags.FLAGS.mark_as_parsed()

  def test_defined_once(self):
    self.assertIs(_cli.define_plan_flags(), self.holders)

  def test_defaults_are_those_of_batch_hessians(self):
    self.assertEqual(self.holders.plan(), tf1hess.Plan())

  def _parse(self, argument):
    """Parses `--name=value` as the command line would."""
    name, value = argument[2:].split("=")
    flags.FLAGS[name].parse(value)

  def test_parsed_values(self):
    with flagsaver.flagsaver():
      for argument in (
        "--method=pfor",
        "--chunk_size=8",
        "--parallel_iterations=4",
      ):
        self._parse(argument)
      self.assertEqual(
        self.holders.plan(),
        tf1hess.Plan(method="pfor", chunk_size=8, parallel_iterations=4),
      )

  def test_bad_values_are_refused_when_parsed(self):
    for argument, regex in (
      ("--method=rows", r"value should be one of <auto\|forward\|pfor\|"),
      ("--chunk_size=0", r"0 is not a positive integer"),
      ("--parallel_iterations=-2", r"-2 is not a positive integer"),
    ):
      with flagsaver.flagsaver():
        with self.assertRaisesRegex(flags.IllegalFlagValueError, regex):
          self._parse(argument)


class InterruptTest(tf.test.TestCase):
  def setUp(self):
    super().setUp()
    handler, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    self.addCleanup(signal.signal, signal.SIGINT, handler)
    self.addCleanup(setattr, sys, "unraisablehook", hook)

  def _interrupted_in_a_gc_callback(self):
    """Ctrl-C while a garbage-collector callback runs (as JAX's)."""
    fired = []

    def callback(phase, info):
      del info
      if phase == "start" and not fired:
        fired.append(True)
        signal.raise_signal(signal.SIGINT)  # Raised inside the callback.

    gc.callbacks.append(callback)
    self.addCleanup(gc.callbacks.remove, callback)
    gc.collect()
    return fired

  def test_an_interrupt_a_callback_swallows_is_sent_again(self):
    _cli.interrupt_with_keyboard_interrupt()
    with self.assertRaises(KeyboardInterrupt):
      self.assertTrue(self._interrupted_in_a_gc_callback())
      for _ in range(500):  # Sent again from a thread, within 10 ms.
        time.sleep(0.01)

  def test_python_alone_loses_it(self):
    # The reason for the hook: without it, the run would go on.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = lambda unraisable: None
    self.assertTrue(self._interrupted_in_a_gc_callback())

  def test_other_unraisable_exceptions_are_printed_as_before(self):
    _cli.interrupt_with_keyboard_interrupt()
    seen = []
    sys.__unraisablehook__, original = seen.append, sys.__unraisablehook__
    self.addCleanup(setattr, sys, "__unraisablehook__", original)
    sys.unraisablehook(types.SimpleNamespace(exc_type=ValueError))
    self.assertLen(seen, 1)


if __name__ == "__main__":
  tf.test.main()
