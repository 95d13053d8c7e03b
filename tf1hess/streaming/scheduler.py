"""Runs batches on every worker of a cluster at once, watching the workers.

One batch in flight per worker, each in a thread of its own, while the
calling thread stays responsive to Ctrl-C and ends the run, naming the
worker, when one is lost or silent.
"""

import queue
import threading
import time

import tensorflow as tf

from tf1hess import _tf_errors
from tf1hess import cluster

# Seconds between two looks at the workers while batches run on a cluster.
_WATCH_SECS = 1.0
# Looks in a row that must find a worker refusing connections to call it
# lost (a single refused connection may be a restart of its listener).
_DOWN_LOOKS = 2
# Seconds a batch may run past `timeout` before its worker is called silent
# (TensorFlow's own deadline normally fires first).
_TIMEOUT_GRACE_SECS = 10.0

_WORKER_ERRORS = (
  tf.errors.UnavailableError,
  tf.errors.DeadlineExceededError,
  tf.errors.AbortedError,
  tf.errors.CancelledError,
  tf.errors.InternalError,
  tf.errors.UnknownError,
)


def dispatch(engine, pending, record, failed):
  """Runs batches on every replica at once; records results as they come.

  Each batch runs in a daemon thread, at most one per worker, while this
  thread waits with a timeout: it stays responsive to Ctrl-C, looks at the
  workers every `_WATCH_SECS` (a worker that takes no connection twice in
  a row is lost; a batch past `timeout` marks its worker silent) and gives
  up on batches that cannot return (a session whose master, worker 0, is
  gone waits for it for ever). On a failure no new batch is sent; the
  batches still running are recorded if they finish while the workers are
  watched, then the failure is raised naming the worker; TensorFlow's error
  of the batch itself (a `tf.debugging.check_numerics` of the model) is
  raised as `failed(index, error)` returns it.
  """
  results = queue.Queue()
  free = list(range(len(engine.replicas)))
  running = {}  # replica -> (batch index, start time)
  failure = None
  computed = 0
  exhausted = False
  down_looks = {}
  next_look = time.monotonic() + _WATCH_SECS

  def work(replica, index, batch):
    try:
      results.put((replica, index, engine.run(replica, batch), None))
    except Exception as error:  # pylint: disable=broad-except
      results.put((replica, index, None, error))

  while True:
    while free and not exhausted and failure is None:
      item = next(pending, None)
      if item is None:
        exhausted = True
        break
      replica = free.pop(0)
      running[replica] = (item[0], time.monotonic())
      threading.Thread(
        target=work, args=(replica,) + tuple(item), daemon=True
      ).start()
    if not running:
      break
    try:
      replica, index, values, error = results.get(timeout=_WATCH_SECS)
    except queue.Empty:
      pass
    else:
      del running[replica]
      if error is not None:
        if failure is None:
          failure = (replica, index, error)
      else:
        record(index, values)
        computed += 1
        free.append(replica)
    now = time.monotonic()
    if running and now >= next_look:
      next_look = now + _WATCH_SECS
      lost = _watch_workers(engine, running, down_looks, now)
      if lost is not None:
        if failure is None or not isinstance(failure[2], _LostWorker):
          failure = lost
        break  # The batches still running may never return.
  if failure is not None:
    replica, index, error = failure
    if isinstance(error, _LostWorker):
      raise cluster.worker_failure(
        engine.hosts, replica, index, error.reason
      ) from None
    if isinstance(error, _WORKER_ERRORS):
      raise cluster.worker_failure(
        engine.hosts, replica, index, _tf_errors.error_summary(error)
      ) from error
    if isinstance(error, tf.errors.OpError):
      raise failed(index, error) from error
    raise error
  return computed


class _LostWorker(Exception):
  """A worker found down or silent while batches were running."""

  def __init__(self, reason):
    super().__init__(reason)
    self.reason = reason


def _watch_workers(engine, running, down_looks, now):
  """Returns `(replica, batch, _LostWorker)` for a lost worker, or `None`."""
  refused = dict(cluster.unreachable_workers(engine.hosts, timeout=1.0))
  for i in range(len(engine.hosts)):
    down_looks[i] = down_looks.get(i, 0) + 1 if i in refused else 0
  for i, looks in sorted(down_looks.items()):
    if looks >= _DOWN_LOOKS:
      batch = running.get(i, next(iter(running.values())))[0]
      return i, batch, _LostWorker(f"no connection: {refused[i]}")
  if engine.timeout:
    for replica, (batch, started) in sorted(running.items()):
      if now - started > engine.timeout + _TIMEOUT_GRACE_SECS:
        return (
          replica,
          batch,
          _LostWorker(
            f"no answer in {now - started:.0f} s, more than the "
            f"{engine.timeout:g} s of the worker timeout"
          ),
        )
  return None
