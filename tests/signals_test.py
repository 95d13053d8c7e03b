"""Tests of tf1hess._signals: Ctrl-C held back until a block is left."""

import signal
import threading
import time

import tensorflow as tf

from tf1hess import _signals


def _python_work():
  """Runs Python instructions for a while, as a callback from C++ would."""
  for _ in range(5):
    time.sleep(0.01)


class InterruptsHeldTest(tf.test.TestCase):
  def setUp(self):
    super().setUp()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    self.addCleanup(signal.signal, signal.SIGINT, previous)

  def test_interrupt_is_raised_once_the_block_is_left(self):
    finished = []
    with self.assertRaises(KeyboardInterrupt):
      with _signals.interrupts_held():
        signal.raise_signal(signal.SIGINT)
        _python_work()
        finished.append(True)
    self.assertEqual(finished, [True])
    self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)

  def test_without_an_interrupt_nothing_is_raised(self):
    with _signals.interrupts_held():
      _python_work()
    self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)

  def test_an_error_in_the_block_passes_and_the_handler_is_restored(self):
    with self.assertRaisesRegex(ValueError, "inside"):
      with _signals.interrupts_held():
        raise ValueError("inside")
    self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)

  def test_the_programs_own_handler_gets_the_signal_once(self):
    calls = []
    signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    with _signals.interrupts_held():
      signal.raise_signal(signal.SIGINT)
      signal.raise_signal(signal.SIGINT)
      _python_work()
      self.assertEqual(calls, [])
    self.assertEqual(calls, [signal.SIGINT])

  def test_ignored_sigint_stays_ignored(self):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with _signals.interrupts_held():
      self.assertEqual(signal.getsignal(signal.SIGINT), signal.SIG_IGN)
      signal.raise_signal(signal.SIGINT)
      _python_work()
    self.assertEqual(signal.getsignal(signal.SIGINT), signal.SIG_IGN)

  def test_other_threads_run_the_block_as_it_is(self):
    seen = []

    def work():
      with _signals.interrupts_held():
        seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    self.assertEqual(seen, [signal.default_int_handler])


if __name__ == "__main__":
  tf.test.main()
