"""Tests of tf1hess.cluster and streaming runs on a loopback TF cluster.

Three `scripts/worker.py` servers run as subprocesses on free 127.0.0.1
ports for the whole class and are always killed at the end. Cluster results
are compared with the single-machine run byte for byte, and with analytic
Hessians; a worker is killed in the middle of a run and the run resumed.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
from tf1hess import cluster
from tf1hess import streaming

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = os.path.join(_ROOT, "scripts", "worker.py")
_SCRIPT = os.path.join(_ROOT, "scripts", "compute_hessians.py")
_K = 3
_WEIGHTS = testing_utils.mlp_weights(_K, hidden=5, seed=8)
_TIMEOUT = 240


def _wait_reachable(hosts, proc_by_task, timeout=_TIMEOUT):
  deadline = time.monotonic() + timeout
  while cluster.unreachable_workers(hosts, timeout=1.0):
    for i, proc in proc_by_task.items():
      if proc.poll() is not None:
        raise RuntimeError(f"worker {i} exited with {proc.returncode}")
    if time.monotonic() > deadline:
      raise TimeoutError(f"workers {hosts} did not start in {timeout} s")
    time.sleep(0.2)


def _answer_like_grpc(listening):
  """Answers every connection with an empty HTTP/2 SETTINGS frame."""
  while True:
    try:
      connection, _ = listening.accept()
    except OSError:
      return
    with connection:
      connection.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))


class ClusterHelpersTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("string", " 127.0.0.1:2222, host-b:1 ,", ["127.0.0.1:2222", "host-b:1"]),
    ("list", ["a:1", "b:65535"], ["a:1", "b:65535"]),
    ("ipv6", "[::1]:2222", ["[::1]:2222"]),
  )
  def test_parse_worker_hosts(self, value, expected):
    self.assertEqual(cluster.parse_worker_hosts(value), expected)

  @parameterized.named_parameters(
    ("empty", " , ", r"`worker_hosts` must list at least one HOST:PORT"),
    ("no_port", "a:1,b", r"entries must be HOST:PORT .*; saw 'b'"),
    ("port_0", "a:0", r"entries must be HOST:PORT .*; saw 'a:0'"),
    ("port_big", "a:70000", r"entries must be HOST:PORT .*; saw 'a:70000'"),
    ("twice", "a:1,a:1", r"must list each worker once; saw 'a:1' twice"),
  )
  def test_parse_worker_hosts_errors(self, value, regex):
    with self.assertRaisesRegex(ValueError, regex):
      cluster.parse_worker_hosts(value)

  @parameterized.named_parameters(
    ("too_big", 2), ("negative", -1), ("bool", True), ("str", "0")
  )
  def test_start_worker_task_index_errors(self, task_index):
    with self.assertRaisesRegex(
      ValueError,
      r"`task_index` must be an int in \[0, 2\) for 2 `worker_hosts`",
    ):
      cluster.start_worker("127.0.0.1:1,127.0.0.1:2", task_index)

  def test_names(self):
    hosts = "h0:1,h1:2"
    self.assertEqual(cluster.worker_device(1), "/job:worker/task:1")
    self.assertEqual(cluster.session_target(hosts), "grpc://h0:1")
    self.assertEqual(cluster.describe_worker(hosts, 1), "worker task 1 (h1:2)")
    self.assertEqual(
      cluster.cluster_spec(hosts).as_dict(), {"worker": ["h0:1", "h1:2"]}
    )

  def test_check_reachable_names_the_missing_worker(self):
    with socket.socket() as listening:
      listening.bind(("127.0.0.1", 0))
      listening.listen()
      threading.Thread(
        target=_answer_like_grpc, args=(listening,), daemon=True
      ).start()
      up = f"127.0.0.1:{listening.getsockname()[1]}"
      down = f"127.0.0.1:{testing_utils.free_port()}"
      cluster.check_reachable([up])
      with (
        self.assertLogs("absl", "INFO") as logs,
        self.assertRaisesRegex(
          tf.errors.UnavailableError,
          rf"Cannot reach worker task 1 \({down}\): .*Start each worker with "
          rf"scripts/worker\.py --worker_hosts={up},{down} --task_index=I\.",
        ),
      ):
        cluster.check_reachable([up, down], wait=0.6)
      self.assertRegex(
        logs.output[0], rf"Waiting up to 1 s for worker task 1 \({down}\)"
      )
      failure = cluster.worker_failure([up, down], 0, 7, "boom")
      self.assertRegex(
        failure.message,
        rf"^worker task 1 \({down}\) is down \(batch 7: boom\)\. Finished "
        r"batches are saved: restart the worker and rerun the same command "
        r"with --resume\.$",
      )
      failure = cluster.worker_failure([up], 0, 3, "boom")
      self.assertRegex(
        failure.message, rf"^worker task 0 \({up}\) failed \(batch 3: boom\)"
      )

  def test_worker_script_bad_task_index(self):
    result = subprocess.run(
      [sys.executable, _WORKER, "--worker_hosts=127.0.0.1:1", "--task_index=3"],
      capture_output=True,
      text=True,
      timeout=_TIMEOUT,
      check=False,
    )
    self.assertEqual(result.returncode, 1)
    self.assertEqual(
      testing_utils.clean_stderr(result.stderr),
      [
        "worker: error: `task_index` must be an int in [0, 1) for 1 "
        "`worker_hosts`; saw 3."
      ],
    )


class ClusterRunTest(tf.test.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.hosts = [f"127.0.0.1:{testing_utils.free_port()}" for _ in range(3)]
    cls.procs = {}
    cls.addClassCleanup(cls._stop_workers)
    for i in range(len(cls.hosts)):
      cls._start_worker(i)
    _wait_reachable(cls.hosts, cls.procs)
    with tf.Graph().as_default() as graph:
      x = tf.compat.v1.placeholder(tf.float32, [None, _K], name="x")
      tf.identity(testing_utils.tanh_mlp(x, *_WEIGHTS), name="y")
    cls.graph_def = graph.as_graph_def()

  @classmethod
  def _start_worker(cls, i):
    cls.procs[i] = subprocess.Popen(
      [
        sys.executable,
        _WORKER,
        "--worker_hosts=" + ",".join(cls.hosts),
        f"--task_index={i}",
      ],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )

  @classmethod
  def _stop_workers(cls):
    for proc in cls.procs.values():
      proc.kill()
      proc.wait(timeout=60)

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

  def path(self, name):
    return os.path.join(self.dir, name)

  def samples(self, n):
    x = np.random.default_rng(n).normal(size=(n, _K)).astype(np.float32)
    np.save(self.path("x.npy"), x)
    return self.path("x.npy"), x

  def assert_same_bytes(self, a, b):
    with open(self.path(a), "rb") as fa, open(self.path(b), "rb") as fb:
      self.assertEqual(fa.read(), fb.read(), f"{a} != {b}")

  def test_matches_single_machine(self):
    path, x = self.samples(50)
    args = (self.graph_def, "x:0", "y:0", path)
    summary = streaming.compute_hessians(
      *args,
      self.path("h.npy"),
      batch_size=4,
      gradients_output=self.path("g.npy"),
      worker_hosts=self.hosts,
      timeout=_TIMEOUT,
    )
    self.assertEqual(summary.computed_batches, 13)
    streaming.compute_hessians(
      *args,
      self.path("ref.npy"),
      batch_size=4,
      gradients_output=self.path("ref_g.npy"),
    )
    self.assert_same_bytes("h.npy", "ref.npy")
    self.assert_same_bytes("g.npy", "ref_g.npy")
    self.assertAllClose(
      np.load(self.path("h.npy")),
      testing_utils.tanh_mlp_hessians(x, *_WEIGHTS),
      atol=1e-5,
      rtol=1e-4,
    )

  def test_error_of_a_batch_names_it(self):
    path, x = self.samples(14)
    x[9, 1] = np.nan
    np.save(path, x)
    with self.assertRaisesRegex(
      tf.errors.InvalidArgumentError, testing_utils.NAN_IN_BATCH_2
    ):
      streaming.compute_hessians(
        testing_utils.checking_mlp_graph_def(_WEIGHTS),
        "x:0",
        "y:0",
        path,
        self.path("h.npy"),
        batch_size=4,
        worker_hosts=self.hosts,
        timeout=_TIMEOUT,
      )

  def test_unreachable_worker_fails_before_writing(self):
    path, _ = self.samples(4)
    down = f"127.0.0.1:{testing_utils.free_port()}"
    with self.assertRaisesRegex(
      tf.errors.UnavailableError, rf"Cannot reach worker task 1 \({down}\)"
    ):
      streaming.compute_hessians(
        self.graph_def,
        "x:0",
        "y:0",
        path,
        self.path("h.npy"),
        worker_hosts=[self.hosts[0], down],
        connect_timeout=1.0,
      )
    self.assertEqual(os.listdir(self.dir), ["x.npy"])

  def _progress(self):
    try:
      with open(self.path("h.npy.progress.json"), encoding="utf-8") as f:
        return sum(b - a for a, b in json.load(f)["completed"])
    except (FileNotFoundError, ValueError):
      return 0

  def test_lost_worker_fails_naming_it_and_resume_completes(self):
    n = 400
    path, _ = self.samples(n)
    graph_path = self.path("model.pb")
    with open(graph_path, "wb") as f:
      f.write(self.graph_def.SerializeToString())
    client = subprocess.Popen(
      [
        sys.executable,
        _SCRIPT,
        f"--graph={graph_path}",
        "--xs=x:0",
        "--ys=y:0",
        f"--input={path}",
        f"--output={self.path('h.npy')}",
        "--batch_size=1",
        "--worker_hosts=" + ",".join(self.hosts),
        f"--worker_timeout={_TIMEOUT}",
      ],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.addCleanup(client.kill)
    deadline = time.monotonic() + _TIMEOUT
    while self._progress() < 6 and client.poll() is None:
      self.assertLess(time.monotonic(), deadline, "no progress")
      time.sleep(0.005)
    self.procs[2].send_signal(signal.SIGKILL)
    self.procs[2].wait(timeout=60)
    _, err = client.communicate(timeout=_TIMEOUT)
    self.assertEqual(client.returncode, 1, err)
    lines = testing_utils.clean_stderr(err)
    self.assertNotIn("Traceback", err)
    self.assertRegex(
      lines[-1],
      rf"^compute_hessians: error: worker task 2 \({self.hosts[2]}\) is "
      r"down \(batch \d+: .+\)\. Finished batches are saved: restart the "
      r"worker and rerun the same command with --resume\.$",
    )
    done = self._progress()
    self.assertBetween(done, 6, n - 1)
    self.assertNotIn("h.npy", os.listdir(self.dir))

    self._start_worker(2)
    _wait_reachable(self.hosts, self.procs)
    args = (self.graph_def, "x:0", "y:0", path)
    summary = streaming.compute_hessians(
      *args,
      self.path("h.npy"),
      batch_size=1,
      worker_hosts=self.hosts,
      resume=True,
      timeout=_TIMEOUT,
    )
    self.assertEqual(summary.resumed_batches, done)
    self.assertEqual(summary.computed_batches, n - done)
    streaming.compute_hessians(*args, self.path("ref.npy"), batch_size=1)
    self.assert_same_bytes("h.npy", "ref.npy")
    self.assertCountEqual(
      os.listdir(self.dir), ["x.npy", "model.pb", "h.npy", "ref.npy"]
    )


if __name__ == "__main__":
  tf.test.main()
