"""TensorFlow cluster helpers: worker servers, their devices and failures.

tf1hess spreads the batches of a streaming run over the workers of a
TensorFlow cluster with TensorFlow's own runtime, by in-graph replication:
the client builds one graph holding one copy of the model (and its Hessian
ops) per worker, each under `tf.device("/job:worker/task:i")`, opens one
session on `grpc://` the first worker (which acts as the master), and sends
different batches to different copies from a few threads. Every worker is a
plain `tf.distribute.Server` in the job "worker" that knows the whole cluster
(`scripts/worker.py`); workers hold no state between batches, so a run can be
resumed on another set of workers, or on one machine.
"""

import re
import socket
import time

from absl import logging
import tensorflow as tf

JOB_NAME = "worker"

#: Seconds a batch may take on a worker before the run fails naming it
#: (`compute_hessians(timeout=...)`, `--worker_timeout`).
DEFAULT_WORKER_TIMEOUT = 600.0

# What a client sends first on an HTTP/2 connection (gRPC runs on HTTP/2):
# the connection preface and an empty SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(
  [0, 0, 0, 4, 0, 0, 0, 0, 0]
)
_HTTP2_SETTINGS = 4

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:,\[\]]+):(\d{1,5})$")


def parse_worker_hosts(worker_hosts):
  """Returns the list of `HOST:PORT` addresses of the workers.

  Args:
    worker_hosts: `str` of comma-separated `HOST:PORT` entries (as given to
      `--worker_hosts`), or a list of them. IPv6 hosts go in brackets.

  Returns:
    A `list` of `str`, one per worker, in task order.

  Raises:
    ValueError: when the list is empty, an entry is not `HOST:PORT` with a
      port in [1, 65535], or an address appears twice.

  Example:
    >>> parse_worker_hosts("127.0.0.1:2222, 127.0.0.1:2223")
    ['127.0.0.1:2222', '127.0.0.1:2223']
  """
  if isinstance(worker_hosts, str):
    hosts = [h.strip() for h in worker_hosts.split(",") if h.strip()]
  else:
    hosts = [str(h).strip() for h in worker_hosts]
  if not hosts:
    raise ValueError(
      f"`worker_hosts` must list at least one HOST:PORT; saw {worker_hosts!r}."
    )
  for host in hosts:
    match = _HOST_PORT.match(host)
    if not match or not 0 < int(match.group(2)) < 65536:
      raise ValueError(
        "`worker_hosts` entries must be HOST:PORT with a port in [1, 65535]"
        f"; saw {host!r}."
      )
  seen = set()
  for host in hosts:
    if host in seen:
      raise ValueError(
        f"`worker_hosts` must list each worker once; saw {host!r} twice."
      )
    seen.add(host)
  return hosts


def cluster_spec(worker_hosts):
  """Returns the `tf.train.ClusterSpec` of the job "worker" on these hosts.

  Args:
    worker_hosts: as in `parse_worker_hosts`.

  Returns:
    A `tf.train.ClusterSpec` with one job, "worker", one task per host.
  """
  return tf.train.ClusterSpec({JOB_NAME: parse_worker_hosts(worker_hosts)})


def worker_device(task_index):
  """Returns the device string of worker `task_index`: `/job:worker/task:i`."""
  return f"/job:{JOB_NAME}/task:{task_index}"


def session_target(worker_hosts):
  """Returns the session target of the cluster: `grpc://` the first worker."""
  return "grpc://" + parse_worker_hosts(worker_hosts)[0]


def describe_worker(worker_hosts, task_index):
  """Returns how messages name a worker: `worker task 1 (HOST:PORT)`."""
  hosts = parse_worker_hosts(worker_hosts)
  return f"worker task {task_index} ({hosts[task_index]})"


def start_worker(worker_hosts, task_index):
  """Starts the worker server of task `task_index` and returns it.

  The server listens on its own `HOST:PORT` entry of `worker_hosts` (on all
  interfaces) and knows every other worker, so that the client's session on
  the first worker can place work on any of them.

  Args:
    worker_hosts: as in `parse_worker_hosts`; the same list, in the same
      order, for every worker and for the client.
    task_index: `int` in `[0, len(worker_hosts))`: which entry this is.

  Returns:
    The started `tf.distribute.Server`; call `join()` to serve until killed.

  Raises:
    ValueError: when `worker_hosts` is malformed or `task_index` is out of
      range.
    tf.errors.OpError: when the server cannot start (e.g. the port is in
      use).

  Example:
    >>> server = start_worker("127.0.0.1:2222", 0)  # doctest: +SKIP
    >>> server.join()  # doctest: +SKIP
  """
  hosts = parse_worker_hosts(worker_hosts)
  if (
    isinstance(task_index, bool)
    or not isinstance(task_index, int)
    or not 0 <= task_index < len(hosts)
  ):
    raise ValueError(
      f"`task_index` must be an int in [0, {len(hosts)}) for "
      f"{len(hosts)} `worker_hosts`; saw {task_index!r}."
    )
  try:
    return tf.distribute.Server(
      cluster_spec(hosts), job_name=JOB_NAME, task_index=task_index, start=True
    )
  except tf.errors.OpError as error:
    port = int(hosts[task_index].rsplit(":", 1)[1])
    reason = _port_in_use(port)
    if reason is None:
      raise
    raise tf.errors.UnavailableError(
      None,
      None,
      f"{describe_worker(hosts, task_index)} cannot listen on port {port}: "
      f"{reason} (another worker or program holds it); stop it or give "
      "this worker another port in --worker_hosts.",
    ) from error


def _port_in_use(port):
  """Returns why `port` cannot be bound on all interfaces, or `None`."""
  with socket.socket() as probe:
    try:
      probe.bind(("", port))
    except OSError as error:
      return error.strerror or str(error)
  return None


def unreachable_workers(worker_hosts, timeout=2.0, protocol=False):
  """Returns `[(task_index, reason)]` for the workers that refuse connections.

  Opens (and closes) one TCP connection to each worker, each bounded by
  `timeout` seconds. With `protocol`, also checks that the worker answers
  like a gRPC server (the protocol of TensorFlow's workers): it must send
  the HTTP/2 SETTINGS frame within `timeout`, which another program on
  that port does not.

  Args:
    worker_hosts: as in `parse_worker_hosts`.
    timeout: `float` seconds per connection attempt; default 2.
    protocol: `bool`, default `False`: also check the answer.

  Returns:
    A `list` of `(int, str)`: task index and the socket error (or why the
    answer is not a worker's), empty when every worker is fine.
  """
  failures = []
  for i, host in enumerate(parse_worker_hosts(worker_hosts)):
    name, port = host.rsplit(":", 1)
    try:
      with socket.create_connection(
        (name.strip("[]"), int(port)), timeout=timeout
      ) as connection:
        if protocol:
          reason = _not_grpc(connection)
          if reason:
            failures.append((i, reason))
    except OSError as error:
      failures.append((i, error.strerror or str(error) or type(error).__name__))
  return failures


def _not_grpc(connection):
  """Why the peer of `connection` is not a gRPC server, or `None`."""
  try:
    connection.sendall(_HTTP2_PREFACE)
    answer = b""
    while len(answer) < 4:
      chunk = connection.recv(64)
      if not chunk:
        break
      answer += chunk
  except TimeoutError:
    return (
      "it accepts connections but does not answer like a TensorFlow worker "
      f"(no gRPC answer in {connection.gettimeout():g} s)"
    )
  if len(answer) < 4 or answer[3] != _HTTP2_SETTINGS:
    return (
      "it accepts connections but does not answer like a TensorFlow worker "
      f"(answered {answer[:16]!r} to a gRPC request)"
    )
  return None


def check_reachable(worker_hosts, wait=0.0, timeout=2.0):
  """Waits up to `wait` seconds for every worker to accept connections.

  Called before a run starts, because a TensorFlow session on a cluster
  with a missing worker waits for it instead of failing, and because
  workers started at the same time as the client may still be starting.
  A port that accepts connections but does not answer like a TensorFlow
  worker (gRPC) is refused too.

  Args:
    worker_hosts: as in `parse_worker_hosts`.
    wait: `float` seconds to keep trying (0, the default: try once).
    timeout: `float` seconds per connection attempt; default 2.

  Raises:
    tf.errors.UnavailableError: when a worker still does not accept
      connections (or answer like a worker) after `wait` seconds; the
      message names each such worker and how to start it.
  """
  hosts = parse_worker_hosts(worker_hosts)
  deadline = time.monotonic() + wait
  logged = False
  while True:
    failures = unreachable_workers(hosts, timeout, protocol=True)
    if not failures or time.monotonic() >= deadline:
      break
    if not logged:
      logging.info(
        "Waiting up to %.0f s for %s.",
        wait,
        ", ".join(describe_worker(hosts, i) for i, _ in failures),
      )
      logged = True
    time.sleep(0.5)
  if failures:
    names = "; ".join(
      f"{describe_worker(hosts, i)}: {reason}" for i, reason in failures
    )
    raise tf.errors.UnavailableError(
      None,
      None,
      f"Cannot reach {names}. Start each worker with scripts/worker.py "
      f"--worker_hosts={','.join(hosts)} --task_index=I.",
    )


def worker_failure(worker_hosts, task_index, batch, reason):
  """Returns the `tf.errors.UnavailableError` for a worker lost mid-run.

  The worker is named by what can be seen when the failure is handled: the
  workers that no longer accept connections, else the worker whose batch
  failed (`task_index`).

  Args:
    worker_hosts: as in `parse_worker_hosts`.
    task_index: `int`, the worker whose batch failed.
    batch: `int`, the index of that batch.
    reason: `str`, the one-line TensorFlow error.

  Returns:
    A `tf.errors.UnavailableError` whose one-line message names the worker,
    the batch and what to do next.
  """
  hosts = parse_worker_hosts(worker_hosts)
  down = [i for i, _ in unreachable_workers(hosts)]
  names = ", ".join(describe_worker(hosts, i) for i in (down or [task_index]))
  state = "is down" if down else "failed"
  return tf.errors.UnavailableError(
    None,
    None,
    f"{names} {state} (batch {batch}: {reason}). Finished batches are "
    "saved: restart the worker and rerun the same command with --resume.",
  )
