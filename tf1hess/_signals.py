"""Ctrl-C held back while TensorFlow's C++ code calls into Python.

`Session.run` flattens its `feed_dict` in C++ (`nest.flatten_dict_items`),
which hashes the tensors it is given: Python code, where Python's SIGINT
handler may raise `KeyboardInterrupt`. The C++ code does not expect an
error there and the process dies of a segmentation fault, instead of
stopping with the batches it finished kept. A Ctrl-C during such a call is
therefore recorded and handed to the program's own handler once the call
has returned; it loses no time, since the handler cannot run while the
session computes (it runs between Python instructions).
"""

import contextlib
import signal
import threading


@contextlib.contextmanager
def interrupts_held():
  """Delivers a SIGINT that arrives in the block once the block is left.

  In the main thread, with a Python SIGINT handler installed (Python's
  default raises `KeyboardInterrupt`), the handler is swapped for one that
  records the signal, and put back on leaving; a recorded signal is then
  passed to it, so that `KeyboardInterrupt` (or whatever the program's
  handler does) happens after the block. Elsewhere (other threads, which
  never receive signals in Python; SIGINT ignored or left to the system)
  the block runs as it is.

  Yields:
    Nothing.
  """
  handler = signal.getsignal(signal.SIGINT)
  if threading.current_thread() is not threading.main_thread() or not callable(
    handler
  ):
    yield
    return
  frames = []
  signal.signal(signal.SIGINT, lambda _, frame: frames.append(frame))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, handler)
    if frames:
      handler(signal.SIGINT, frames[0])
