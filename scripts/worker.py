r"""A TensorFlow worker for `compute_hessians.py --worker_hosts=...`.

Starts a `tf.distribute.Server` for task `--task_index` of the job "worker"
of the cluster `--worker_hosts`, and serves until it is killed. Start one on
each host, with the same `--worker_hosts` list everywhere:

  python scripts/worker.py --worker_hosts=host0:2222,host1:2222 \
    --task_index=0    # on host0; --task_index=1 on host1
"""

import os
import signal

if __name__ == "__main__":
  # A worker holds nothing to save: Ctrl-C ends it quietly, at any time.
  signal.signal(signal.SIGINT, signal.SIG_DFL)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's pooling CPU allocator; see docs/speed.md.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

from absl import app
from absl import flags
from absl import logging

from tf1hess import _cli
from tf1hess import cluster

_WORKER_HOSTS = flags.DEFINE_list(
  "worker_hosts",
  None,
  "HOST:PORT of every worker of the cluster, in task order; the same list "
  "on every worker and for compute_hessians.py.",
  required=True,
)
_TASK_INDEX = flags.DEFINE_integer(
  "task_index", None, "Which entry of --worker_hosts this is.", required=True
)

PROG = "worker"


def start(worker_hosts, task_index):
  """Starts the worker server and returns it (see `tf1hess.cluster`).

  Args:
    worker_hosts: `str` or list of `HOST:PORT`.
    task_index: `int`, this worker's entry of `worker_hosts`.

  Returns:
    The started `tf.distribute.Server`.

  Raises:
    As `tf1hess.cluster.start_worker`.
  """
  server = cluster.start_worker(worker_hosts, task_index)
  logging.info(
    "%s serving %s (target %s).",
    cluster.describe_worker(worker_hosts, task_index),
    cluster.worker_device(task_index),
    server.target,
  )
  return server


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  with _cli.exit_on_error(PROG):
    server = start(_WORKER_HOSTS.value, _TASK_INDEX.value)
  server.join()


if __name__ == "__main__":
  app.run(main)
