"""The session that runs the Hessians of a frozen graph on one batch.

One copy of the model on the local machine, or one per worker of a
TensorFlow cluster (`tf1hess.cluster`) in one graph.
"""

import contextlib
import threading

from absl import logging
import numpy as np
import tensorflow as tf

from tf1hess import _checks
from tf1hess import _signals
from tf1hess import cluster
from tf1hess import legacy


# Seconds to wait for a cluster session to close.
_CLOSE_WAIT_SECS = 5
# The threads of cluster sessions whose closing was left hanging (`close`).
_LEFT_CLOSING = []


def closing_left():
  """Whether a cluster session is still closing in a thread left behind.

  Such a thread waits inside TensorFlow for a lost worker. When Python
  exits, a thread that is still there is ended by unwinding its C++ frames,
  which aborts the process ("FATAL: exception not rethrown"): a script
  then ends with `os._exit` (`tf1hess._cli.exit_with`) instead.
  """
  return any(thread.is_alive() for thread in _LEFT_CLOSING)


def without_devices(graph_def):
  """Returns a copy of `graph_def` whose nodes carry no device."""
  copy = tf.compat.v1.GraphDef()
  copy.CopyFrom(graph_def)
  for node in copy.node:
    node.device = ""
  for function in copy.library.function:
    for node in function.node_def:
      node.device = ""
  return copy


def _feed_shape(x, reader):
  """Returns the per-sample shape to feed `x` with the reader's samples."""
  dims = x.shape[1:]
  features = reader.feature_shape
  k = int(np.prod(features))
  if dims.is_compatible_with(features):
    return tuple(features)
  if dims.is_fully_defined() and dims.num_elements() == k:
    if len(features) == 1 or dims.rank == 1:
      # A flat row of K values for `(None, d...)`, or the reverse; samples
      # of another shape of K values (channels first for channels last)
      # would be reordered silently.
      return tuple(dims.as_list())
    raise ValueError(
      f"`input` samples must have the shape of `xs` {x.name} "
      f"{tuple(dims.as_list())}, or be flat rows of its {k} values; saw "
      f"samples of shape {tuple(features)} in {reader.path} (channels "
      "first for channels last?). Reorder the axes of the data, or "
      "flatten it to (N, K) in the order the model takes."
    )
  per = (
    f"{dims.num_elements()} features per sample (shape {x.shape})"
    if dims.is_fully_defined()
    else f"samples of shape {x.shape}"
  )
  raise ValueError(
    f"`input` samples must match `xs` {x.name}, which takes {per}; saw "
    f"{k} features per sample (shape {(reader.num_samples,) + features}) "
    f"in {reader.path}."
  )


def _check_batch_axis(x, reader, batch_size):
  """Refuses an `x` with a static batch dimension that a fed batch misses.

  `x` is fed batches of `batch_size` samples, the last one holding the
  rest; a static batch dimension B (a placeholder `[B, d...]`) takes only
  batches of exactly B samples, so every batch must hold B: `batch_size`
  B and a number of samples that is a multiple of B (or N = B, one batch
  whatever `batch_size`).
  """
  if x.shape.rank is None or x.shape.rank == 0:
    return
  fixed = tf.compat.dimension_value(x.shape[0])
  if fixed is None:
    return
  n = reader.num_samples
  num_batches = -(-n // batch_size)
  sizes = sorted({min(batch_size, n), n - (num_batches - 1) * batch_size})
  if sizes == [fixed]:
    return
  raise ValueError(
    f"`xs` {x.name} has a fixed batch dimension of {fixed} (shape "
    f"{x.shape}), so every batch fed must hold exactly {fixed} samples: "
    f"`batch_size` {fixed} and a number of samples that is a multiple of "
    f"{fixed} (or give `xs` a batch dimension of None); saw `batch_size` "
    f"{batch_size} and {n} samples in {reader.path}, fed in batches of "
    f"{' and '.join(map(str, reversed(sizes)))}."
  )


def _model_tensors(graph, xs, ys, scope=""):
  """Returns `(x, ys)` of `graph`: `ys` a tensor or a list, like the names."""
  prefix = scope + "/" if scope else ""
  names, was_sequence = _checks.as_list(ys)
  x = legacy.find_tensor(graph, prefix + xs, "xs")
  y_list = [legacy.find_tensor(graph, prefix + y, "ys") for y in names]
  return x, _checks.restore_structure(y_list, was_sequence)


class Engine:
  """The model and its Hessian ops, once per replica, in one session.

  Locally there is one replica; on a cluster one per worker, each under
  `tf.device("/job:worker/task:i")`, all in one graph and one session on
  the first worker. `run(replica, batch)` may be called from one thread per
  replica at a time. Every replica's Hessians are built with the same
  `tf1hess.Plan`.
  """

  def __init__(
    self,
    graph_def,
    xs,
    ys,
    reader,
    batch_size,
    gradients,
    check_independence,
    plan,
    worker_hosts,
    timeout,
  ):
    keys = ["hessians", "gradients"] if gradients else ["hessians"]
    graph = legacy.import_graph_def(graph_def)
    x, y = _model_tensors(graph, xs, ys)
    self.feed_shape = _feed_shape(x, reader)
    _check_batch_axis(x, reader, batch_size)
    added = legacy.add_hessian_ops(
      graph,
      x,
      y,
      check_independence=check_independence,
      plan=plan,
    )
    self.x_dtype = np.dtype(x.dtype.as_numpy_dtype)
    self.hessian_dtype = np.dtype(added["hessians"].dtype.as_numpy_dtype)
    self.hosts = worker_hosts
    self.timeout = timeout
    config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
    if worker_hosts is None:
      self.replicas = [(x, {k: added[k] for k in keys})]
      self._session = tf.compat.v1.Session(graph=graph, config=config)
      self._options = None
      return
    graph = tf.Graph()
    self.replicas = []
    with graph.as_default():
      for i in range(len(worker_hosts)):
        scope = f"worker_{i}"
        with tf.device(cluster.worker_device(i)):
          tf.import_graph_def(graph_def, name=scope)
          x, y = _model_tensors(graph, xs, ys, scope)
          added = legacy.add_hessian_ops(
            graph,
            x,
            y,
            name=scope + "/tf1hess",
            check_independence=check_independence,
            plan=plan,
          )
        self.replicas.append((x, {k: added[k] for k in keys}))
    timeout_ms = int(timeout * 1000) if timeout else 0
    config.operation_timeout_in_ms = timeout_ms
    self._options = tf.compat.v1.RunOptions(timeout_in_ms=timeout_ms)
    self._session = tf.compat.v1.Session(
      cluster.session_target(worker_hosts), graph=graph, config=config
    )

  def run(self, replica, batch):
    """Returns `{'hessians': (b, K, K), 'gradients': (b, K)}` for a batch."""
    x, fetches = self.replicas[replica]
    feed = batch.reshape((-1,) + self.feed_shape).astype(self.x_dtype)
    with _signals.interrupts_held():
      values = self._session.run(fetches, {x: feed}, options=self._options)
    k = int(np.prod(self.feed_shape))
    n = batch.shape[0]
    out = {"hessians": values["hessians"].reshape(n, k, k)}
    if "gradients" in values:
      out["gradients"] = values["gradients"].reshape(n, k)
    return out

  def close(self):
    """Closes the session; on a cluster, gives up after a few seconds.

    Closing a cluster session asks every worker to drop its graphs and
    waits for a lost worker until the session's timeout (for ever without
    one), so it runs in a daemon thread that is left behind if it hangs.
    """
    if self.hosts is None:
      self._session.close()
      return
    closer = threading.Thread(target=self._close_quietly, daemon=True)
    closer.start()
    closer.join(_CLOSE_WAIT_SECS)
    if closer.is_alive():
      _LEFT_CLOSING.append(closer)
      logging.warning(
        "Closing the cluster session did not finish in %d s (a worker is "
        "down); leaving it.",
        _CLOSE_WAIT_SECS,
      )

  def _close_quietly(self):
    with contextlib.suppress(tf.errors.OpError):
      self._session.close()
