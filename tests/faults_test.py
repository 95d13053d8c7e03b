"""Fault injection: races, damaged files, full disks, lost workers, Ctrl-C.

Each fault is made for real: two runs on one output at once, partial files
truncated or with a flipped bit, inputs damaged on disk, a 2 MiB tmpfs that
fills up (mounted only when the tests run as root; skipped otherwise), a
worker killed or stopped on loopback ports, a port that is not a worker, a
signal sent to a program. What must hold: no run deletes another's files,
nothing wrong is returned (every result is compared byte for byte with an
uninterrupted single-machine run of the same input, or with the analytic
Hessians), finished batches survive, and every failure ends within a
bounded time with one line that names its cause.
"""

import errno
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
import unittest
import zipfile
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import testing_utils
from tf1hess import _tf_errors
from tf1hess import cluster
from tf1hess import ops
from tf1hess import streaming

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "scripts", "compute_hessians.py")
_WORKER = os.path.join(_ROOT, "scripts", "worker.py")
_EXAMPLE = os.path.join(_ROOT, "scripts", "example.py")
_K = 3
_WEIGHTS = testing_utils.mlp_weights(_K, hidden=5, seed=3)
# Bound on anything that waits for a program; the faults must end far
# sooner (each test asserts its own, shorter bound).
_TIMEOUT = 300


def _graph_def(k=_K, weights=_WEIGHTS):
  """Frozen `y = w2 . tanh(x w1 + b1)` on `x:0` `(None, k)`, output `y:0`."""
  with tf.Graph().as_default() as graph:
    x = tf.compat.v1.placeholder(tf.float32, [None, k], name="x")
    tf.identity(testing_utils.tanh_mlp(x, *weights), name="y")
  return graph.as_graph_def()


def _samples(n, k=_K, seed=0):
  return np.random.default_rng(seed).normal(size=(n, k)).astype(np.float32)


class _FilesTestCase(testing_utils.TempDirTestCase, parameterized.TestCase):
  """A temporary directory, its files, and the reference of an input."""

  def read(self, name):
    with open(self.path(name), "rb") as f:
      return f.read()

  def save_input(self, x, name="x.npy"):
    np.save(self.path(name), x)
    return self.path(name)

  def reference(self, graph_def, path, **kwargs):
    """The bytes of an uninterrupted single-machine run, written aside."""
    ref = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, ref, ignore_errors=True)
    out = os.path.join(ref, "ref.npy")
    streaming.compute_hessians(graph_def, "x:0", "y:0", path, out, **kwargs)
    with open(out, "rb") as f:
      return f.read()

  def progress(self, name="h.npy"):
    try:
      with open(self.path(name + ".progress.json"), encoding="utf-8") as f:
        return sum(b - a for a, b in json.load(f)["completed"])
    except (FileNotFoundError, ValueError):
      return 0

  def script_args(self, path, output, graph_def=None):
    """Writes the model beside; the flags that run it over `path`."""
    with open(self.path("model.pb"), "wb") as f:
      f.write((graph_def or _graph_def()).SerializeToString())
    return [
      f"--graph={self.path('model.pb')}",
      "--xs=x:0",
      "--ys=y:0",
      f"--input={path}",
      f"--output={output}",
    ]

  def start_script(self, *args):
    proc = subprocess.Popen(
      [sys.executable, _SCRIPT, *args],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.addCleanup(proc.kill)
    return proc

  def assert_one_line_error(self, code, err, regex):
    """Exit status 1, no traceback, and a last line that matches `regex`."""
    self.assertEqual(code, 1, err)
    self.assertNotIn("Traceback", err)
    self.assertRegex(testing_utils.clean_stderr(err)[-1], regex)

  def wait_progress(self, proc, at_least):
    deadline = time.monotonic() + _TIMEOUT
    while self.progress() < at_least:
      self.assertIsNone(proc.poll(), "the program ended early")
      self.assertLess(time.monotonic(), deadline, "no progress")
      time.sleep(0.01)


class ConcurrentRunsTest(_FilesTestCase):
  def test_second_run_touches_nothing_of_the_first(self):
    path = self.save_input(_samples(9))
    args = (_graph_def(), "x:0", "y:0", path, self.path("h.npy"))
    expected = self.reference(_graph_def(), path, batch_size=2)
    paused, release = threading.Event(), threading.Event()
    original = streaming.writer.NpyFiles.create
    outcome = {}

    def create(files):  # The first run stops right after its first file.
      original(files)
      if threading.current_thread().name == "first":
        paused.set()
        release.wait(_TIMEOUT)

    def first():
      try:
        outcome["summary"] = streaming.compute_hessians(*args, batch_size=2)
      except Exception as error:  # pylint: disable=broad-except
        outcome["error"] = error

    with mock.patch.object(streaming.writer.NpyFiles, "create", create):
      thread = threading.Thread(target=first, name="first")
      thread.start()
      self.addCleanup(thread.join, _TIMEOUT)
      self.addCleanup(release.set)
      self.assertTrue(paused.wait(_TIMEOUT))
      before = {name: self.read(name) for name in self.files()}
      self.assertIn("h.npy.partial", before)
      for resume in (True, False):
        with self.assertRaisesRegex(
          ValueError, r"`output` is being written by another run"
        ):
          streaming.compute_hessians(*args, batch_size=2, resume=resume)
      self.assertEqual({name: self.read(name) for name in self.files()}, before)
      release.set()
      thread.join(_TIMEOUT)
    self.assertNotIn("error", outcome)
    self.assertEqual(outcome["summary"].computed_batches, 5)
    self.assertEqual(self.read("h.npy"), expected)
    self.assertEqual(self.files(), ["h.npy", "x.npy"])

  def test_two_programs_at_once(self):
    path = self.save_input(_samples(300))
    args = self.script_args(path, self.path("h.npy")) + ["--batch_size=1"]
    procs = [self.start_script(*args) for _ in range(2)]
    results = [(p.wait(_TIMEOUT), p.stderr.read()) for p in procs]
    for code, err in results:
      self.assertNotIn("Traceback", err)
      if code:
        self.assertEqual(code, 1, err)
        self.assertRegex(
          testing_utils.clean_stderr(err)[-1],
          r"^compute_hessians: error: `output` (is being written by another "
          r"run|exists: .*h\.npy; pass --overwrite)",
        )
    self.assertIn(0, [code for code, _ in results])
    self.assertEqual(
      self.read("h.npy"), self.reference(_graph_def(), path, batch_size=1)
    )
    self.assertEqual(self.files(), ["h.npy", "model.pb", "x.npy"])


class DamagedFilesTest(_FilesTestCase):
  """Partial files and inputs damaged between runs, or before the first."""

  def interrupted_run(self, n=9, calls=3):
    """Runs batches of 2 until `calls` are done; returns the arguments."""
    path = self.save_input(_samples(n))
    args = (_graph_def(), "x:0", "y:0", path, self.path("h.npy"))
    kwargs = {"batch_size": 2, "gradients_output": self.path("g.npy")}
    with (
      testing_utils.interrupt_after(streaming.engine.Engine, calls),
      self.assertRaises(KeyboardInterrupt),
    ):
      streaming.compute_hessians(*args, **kwargs)
    self.assertEqual(self.progress(), calls)
    return args, kwargs

  def check_resume(self, args, kwargs, resumed):
    """Resumes; the result must be the bytes of an uninterrupted run."""
    with self.assertLogs("absl", "INFO") as logs:
      summary = streaming.compute_hessians(*args, **kwargs)
    self.assertEqual(summary.resumed_batches, resumed)
    self.assertEqual(summary.computed_batches, 5 - resumed)
    ref = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, ref, ignore_errors=True)
    streaming.compute_hessians(
      *args[:4],
      os.path.join(ref, "h.npy"),
      batch_size=2,
      gradients_output=os.path.join(ref, "g.npy"),
    )
    for name in ("h.npy", "g.npy"):
      with open(os.path.join(ref, name), "rb") as f:
        self.assertEqual(self.read(name), f.read(), name)
    self.assertEqual(self.files(), ["g.npy", "h.npy", "x.npy"])
    return logs.output

  # A Hessian row is 9 float32 (36 bytes), a gradient row 3 (12 bytes); the
  # .npy header takes 128 bytes; batches hold 2 rows; batches 0..2 are done.
  @parameterized.named_parameters(
    ("data_cut", "h.npy.partial", 128 + 72 + 10, 1),
    ("header_cut", "g.npy.partial", 50, 0),
    ("emptied", "h.npy.partial", 0, 0),
  )
  def test_truncated_partial_file_is_repaired(self, name, size, resumed):
    args, kwargs = self.interrupted_run()
    os.truncate(self.path(name), size)
    logs = self.check_resume(args, kwargs, resumed)
    self.assertTrue(
      any("do not match their checksums" in line for line in logs), logs
    )

  @parameterized.named_parameters(
    ("hessians_batch_1", "h.npy.partial", 128 + 72 + 5, 2),
    ("gradients_batch_0", "g.npy.partial", 128 + 3, 2),
    ("header", "h.npy.partial", 20, 3),
  )
  def test_flipped_bit_is_found(self, name, offset, resumed):
    args, kwargs = self.interrupted_run()
    with open(self.path(name), "r+b") as f:
      f.seek(offset)
      byte = f.read(1)[0]
      f.seek(offset)
      f.write(bytes([byte ^ 0x10]))
    self.check_resume(args, kwargs, resumed)

  def test_torn_checksum_record_is_dropped(self):
    args, kwargs = self.interrupted_run()
    with open(self.path("h.npy.checksums"), "r+b") as f:
      f.truncate(os.path.getsize(self.path("h.npy.checksums")) - 3)
    self.check_resume(args, kwargs, 2)

  def test_interrupt_log_counts_the_saved_batches(self):
    path = self.save_input(_samples(9))
    original = streaming.writer.Manifest.save
    calls = [0]

    def save(manifest, num_batches, done):
      calls[0] += 1  # 1: the new run; 2: batch 0; 3: batch 1 (interrupted).
      if calls[0] == 3:
        raise KeyboardInterrupt
      original(manifest, num_batches, done)

    with (
      mock.patch.object(streaming.writer.Manifest, "save", save),
      self.assertLogs("absl", "WARNING") as logs,
      self.assertRaises(KeyboardInterrupt),
    ):
      streaming.compute_hessians(
        _graph_def(), "x:0", "y:0", path, self.path("h.npy"), batch_size=2
      )
    self.assertEqual(self.progress(), 1)
    self.assertRegex(logs.output[-1], r"Interrupted with 1 of 5 batches")

  def _member_data_offset(self, path):
    with zipfile.ZipFile(path) as archive:
      info = archive.infolist()[0]
    with open(path, "rb") as f:
      f.seek(info.header_offset + 26)
      name_length, extra_length = np.frombuffer(f.read(4), "<u2")
    start = info.header_offset + 30 + int(name_length) + int(extra_length)
    return start, info.compress_size

  def _flip(self, path, offset):
    with open(path, "r+b") as f:
      f.seek(offset)
      byte = f.read(1)[0]
      f.seek(offset)
      f.write(bytes([byte ^ 0x01]))

  def test_stored_npz_with_a_bad_crc_is_refused(self):
    path = self.path("x.npz")
    np.savez(path, x=_samples(50))
    start, size = self._member_data_offset(path)
    self._flip(path, start + 128 + size // 2)  # In the samples, not header.
    with self.assertRaisesRegex(
      ValueError,
      r"`input` member 'x\.npy' of .*x\.npz is damaged \(Bad CRC-32 .*\); "
      r"restore the file or write it again\.",
    ):
      streaming.compute_hessians(
        _graph_def(), "x:0", "y:0", path, self.path("h.npy")
      )
    self.assertEqual(self.files(), ["x.npz"])

  def test_compressed_npz_damage_is_one_line_and_writes_nothing(self):
    path = self.path("x.npz")
    np.savez_compressed(path, x=_samples(2000))
    start, size = self._member_data_offset(path)
    self._flip(path, start + size // 2)
    proc = self.start_script(
      *self.script_args(path, self.path("h.npy")), "--batch_size=100"
    )
    _, err = proc.communicate(timeout=_TIMEOUT)
    self.assert_one_line_error(
      proc.returncode,
      err,
      r"^compute_hessians: error: `input` member 'x\.npy' of .*x\.npz is "
      r"damaged \(.+\); restore the file or write it again\.$",
    )
    self.assertEqual(self.files(), ["model.pb", "x.npz"])

  def test_npy_shorter_than_its_header_is_refused(self):
    path = self.save_input(_samples(10))
    os.truncate(path, os.path.getsize(path) - 10)
    with self.assertRaisesRegex(
      ValueError,
      r"`input` .*x\.npy is shorter than its header says: float32 \(10, 3\) "
      r"needs 120 bytes of data, it holds 110; the file is truncated or "
      r"damaged\.",
    ):
      streaming.compute_hessians(
        _graph_def(), "x:0", "y:0", path, self.path("h.npy")
      )
    self.assertEqual(self.files(), ["x.npy"])


class OverwriteTest(_FilesTestCase):
  def test_existing_output_is_refused_unless_overwrite(self):
    path = self.save_input(_samples(5))
    args = (_graph_def(), "x:0", "y:0", path, self.path("h.npy"))
    with open(self.path("h.npy"), "wb") as f:
      f.write(b"not ours")
    with open(self.path("g.npy"), "wb") as f:
      f.write(b"nor this")
    for kwargs, arg, name in (
      ({}, "output", "h.npy"),
      ({"gradients_output": self.path("g.npy")}, "output", "h.npy"),
    ):
      with self.assertRaisesRegex(
        FileExistsError,
        rf"`{arg}` exists: .*{name}; pass --overwrite \(overwrite=True\) to "
        "replace it, or choose another name.",
      ):
        streaming.compute_hessians(*args, **kwargs)
    os.remove(self.path("h.npy"))
    with self.assertRaisesRegex(FileExistsError, r"`gradients_output` exists"):
      streaming.compute_hessians(*args, gradients_output=self.path("g.npy"))
    self.assertEqual(self.read("g.npy"), b"nor this")
    summary = streaming.compute_hessians(
      *args, gradients_output=self.path("g.npy"), overwrite=True
    )
    self.assertEqual(summary.computed_batches, 1)
    self.assertAllClose(
      np.load(self.path("g.npy")),
      testing_utils.tanh_mlp_gradients(np.load(path), *_WEIGHTS),
      rtol=1e-4,
      atol=1e-5,
    )
    # A finished run is not computed again either.
    with self.assertRaisesRegex(FileExistsError, r"`output` exists"):
      streaming.compute_hessians(*args)


class NonFiniteSamplesTest(
  testing_utils.ControlFlowMixin, _FilesTestCase, parameterized.TestCase
):
  def _batch(self):
    x = _samples(5).astype(np.float64)
    x[1, 0] = np.nan
    x[3, 2] = np.inf
    return x

  @parameterized.parameters(1, 2)
  def test_independence_check_passes_a_nan_sample(self, cf):
    self.control_flow(cf)
    x = self._batch()
    with tf.Graph().as_default():
      ph = tf.compat.v1.placeholder(tf.float64, [None, _K])
      h = ops.batch_hessians(
        testing_utils.tanh_mlp(ph, *_WEIGHTS), ph, check_independence=True
      )
      with tf.compat.v1.Session() as sess:
        value = sess.run(h, {ph: x})
    self.assertTrue(np.isnan(value[1]).all())
    finite = [0, 2, 4]
    self.assertAllClose(
      value[finite],
      testing_utils.tanh_mlp_hessians(x[finite], *_WEIGHTS),
      atol=1e-10,
    )

  @parameterized.parameters(1, 2)
  def test_coupling_is_still_found_beside_a_nan_sample(self, cf):
    self.control_flow(cf)
    with tf.Graph().as_default():
      ph = tf.compat.v1.placeholder(tf.float64, [None, _K])
      y = testing_utils.tanh_mlp(ph, *_WEIGHTS) + 0.1 * tf.reduce_sum(ph) ** 2
      h = ops.batch_hessians(y, ph, check_independence=True)
      with tf.compat.v1.Session() as sess:
        with self.assertRaisesRegex(
          tf.errors.InvalidArgumentError, r"are not independent"
        ):
          sess.run(h, {ph: self._batch()})

  def test_streaming_run_with_a_nan_sample(self):
    x = _samples(6)
    x[4, 1] = np.nan
    path = self.save_input(x)
    streaming.compute_hessians(
      _graph_def(),
      "x:0",
      "y:0",
      path,
      self.path("h.npy"),
      batch_size=4,
      check_independence=True,
    )
    h = np.load(self.path("h.npy"))
    self.assertTrue(np.isnan(h[4]).all())
    finite = [0, 1, 2, 3, 5]
    self.assertAllClose(
      h[finite],
      testing_utils.tanh_mlp_hessians(x[finite], *_WEIGHTS),
      rtol=1e-4,
      atol=1e-5,
    )

  def test_too_many_features_names_the_features(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2**22])
      with self.assertRaisesRegex(
        ValueError,
        r"^Per-sample Hessians of K = 4194304 features take K\^2 = "
        r"4194304\^2 elements per sample: .* GiB for a single sample, more "
        r"than this machine's .* GiB of memory\. Use fewer features",
      ) as raised:
        ops.batch_hessians(tf.reduce_sum(x**3, axis=1), x)
      self.assertNotIn("order", str(raised.exception))


class FullDiskTest(_FilesTestCase):
  """Outputs on a 2 MiB tmpfs, mounted for these tests (root only)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
      raise unittest.SkipTest("mounting a tmpfs needs root")
    cls.disk = tempfile.mkdtemp()
    mounted = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", cls.disk],
      capture_output=True,
      check=False,
    )
    if mounted.returncode:
      os.rmdir(cls.disk)
      raise unittest.SkipTest(f"cannot mount a tmpfs: {mounted.stderr!r}")
    cls.addClassCleanup(os.rmdir, cls.disk)
    cls.addClassCleanup(
      subprocess.run, ["umount", cls.disk], check=True, timeout=60
    )

  def setUp(self):
    super().setUp()
    self.addCleanup(self._empty_disk)

  def _empty_disk(self):
    for name in os.listdir(self.disk):
      os.remove(os.path.join(self.disk, name))

  def test_output_larger_than_the_disk_is_refused_first(self):
    k = 8
    path = self.save_input(_samples(20_000, k))
    proc = self.start_script(
      *self.script_args(
        path,
        os.path.join(self.disk, "h.npy"),
        _graph_def(k, testing_utils.mlp_weights(k)),
      ),
      "--batch_size=5000",
    )
    _, err = proc.communicate(timeout=_TIMEOUT)
    self.assertNotIn("Bus error", err)
    self.assert_one_line_error(
      proc.returncode,
      err,
      r"^compute_hessians: error: `output` needs 4\.9 MiB more in "
      rf"{self.disk} and only 2\.0 MiB are free; free some space or write "
      r"elsewhere\.$",
    )
    self.assertEqual(os.listdir(self.disk), [])

  def _fill_disk(self):
    fd = os.open(os.path.join(self.disk, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
      for chunk in (1 << 16, 1 << 12):
        while True:
          try:
            os.write(fd, b"\1" * chunk)
          except OSError as error:
            self.assertEqual(error.errno, errno.ENOSPC)
            break
    finally:
      os.close(fd)

  def test_disk_full_during_the_run_keeps_finished_batches(self):
    k = 8
    weights = testing_utils.mlp_weights(k)
    path = self.save_input(_samples(2000, k))
    args = (_graph_def(k, weights), "x:0", "y:0", path)
    output = os.path.join(self.disk, "h.npy")
    original = streaming.writer.Manifest.save
    calls = [0]

    def save(manifest, num_batches, done):
      original(manifest, num_batches, done)
      calls[0] += 1  # 1: the new run; 2: batch 0; 3: batch 1.
      if calls[0] == 3:  # Someone else takes the rest of the disk.
        self._fill_disk()

    with (
      mock.patch.object(streaming.writer.Manifest, "save", save),
      self.assertRaisesRegex(
        OSError,
        r"^`output` cannot be written, no space left on device \(.*h\.npy"
        r"\.partial\); 2 of 8 batches are saved: free some space and run the "
        r"same command again to resume\.$",
      ),
    ):
      streaming.compute_hessians(*args, output, batch_size=250)
    self.assertCountEqual(
      os.listdir(self.disk),
      ["filler", "h.npy.partial", "h.npy.progress.json", "h.npy.checksums"],
    )
    os.remove(os.path.join(self.disk, "filler"))
    summary = streaming.compute_hessians(*args, output, batch_size=250)
    self.assertEqual(summary.resumed_batches, 2)
    self.assertEqual(summary.computed_batches, 6)
    with open(output, "rb") as f:
      self.assertEqual(f.read(), self.reference(args[0], path, batch_size=250))
    self.assertEqual(os.listdir(self.disk), ["h.npy"])


class _SilentServer:
  """A TCP port that accepts connections and never answers (or `reply`)."""

  def __init__(self, reply=None):
    self.socket = socket.socket()
    self.socket.bind(("127.0.0.1", 0))
    self.socket.listen()
    self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
    self._reply = reply
    self._connections = []
    threading.Thread(target=self._serve, daemon=True).start()

  def _serve(self):
    while True:
      try:
        connection, _ = self.socket.accept()
      except OSError:
        return
      self._connections.append(connection)
      if self._reply is not None:
        connection.sendall(self._reply)

  def close(self):
    self.socket.close()
    for connection in self._connections:
      connection.close()


class ClusterFaultsTest(_FilesTestCase):
  """Loopback workers (`scripts/worker.py`) killed, stopped or faked."""

  def start_workers(self, count):
    ports = [testing_utils.free_port() for _ in range(count)]
    self.hosts = [f"127.0.0.1:{port}" for port in ports]
    self.workers = []
    for i in range(count):
      proc = subprocess.Popen(
        [
          sys.executable,
          _WORKER,
          "--worker_hosts=" + ",".join(self.hosts),
          f"--task_index={i}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
      )
      self.addCleanup(self._stop, proc)
      self.workers.append(proc)
    deadline = time.monotonic() + _TIMEOUT
    while cluster.unreachable_workers(self.hosts, timeout=1.0):
      for proc in self.workers:
        self.assertIsNone(proc.poll(), "a worker did not start")
      self.assertLess(time.monotonic(), deadline, "workers did not start")
      time.sleep(0.2)

  @staticmethod
  def _stop(proc):
    if proc.poll() is None:
      proc.send_signal(signal.SIGCONT)
      proc.kill()
      proc.wait(timeout=60)

  def client(self, n, *flags):
    path = self.save_input(_samples(n))
    return path, self.start_script(
      *self.script_args(path, self.path("h.npy")),
      "--batch_size=1",
      "--worker_hosts=" + ",".join(self.hosts),
      *flags,
    )

  def finish_on_this_machine(self, path, done):
    """Resumes without the cluster: only the missing batches, same bytes."""
    n = np.load(path).shape[0]
    summary = streaming.compute_hessians(
      _graph_def(), "x:0", "y:0", path, self.path("h.npy"), batch_size=1
    )
    self.assertEqual(summary.resumed_batches, done)
    self.assertEqual(summary.computed_batches, n - done)
    self.assertEqual(
      self.read("h.npy"), self.reference(_graph_def(), path, batch_size=1)
    )

  def test_killed_chief_ends_the_run_naming_it(self):
    self.start_workers(2)
    path, proc = self.client(1000)
    self.wait_progress(proc, 5)
    self.workers[0].kill()
    killed = time.monotonic()
    _, err = proc.communicate(timeout=_TIMEOUT)
    self.assertLess(time.monotonic() - killed, 60)
    self.assert_one_line_error(
      proc.returncode,
      err,
      rf"^compute_hessians: error: worker task 0 \({self.hosts[0]}\) is "
      r"down \(batch \d+: .*\)\. Finished batches are saved",
    )
    self.assertNotRegex(testing_utils.clean_stderr(err)[-1], r"batch \d+: =+\)")
    done = self.progress()
    self.assertBetween(done, 5, 999)
    self.finish_on_this_machine(path, done)

  def test_stopped_worker_ends_the_run_after_the_timeout(self):
    self.start_workers(2)
    path, proc = self.client(1000, "--worker_timeout=3")
    self.wait_progress(proc, 5)
    self.workers[1].send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    _, err = proc.communicate(timeout=_TIMEOUT)
    self.assertLess(time.monotonic() - stopped, 60)
    self.assert_one_line_error(
      proc.returncode,
      err,
      rf"^compute_hessians: error: worker task 1 \({self.hosts[1]}\) failed "
      r"\(batch \d+: .+\)\. Finished batches are saved",
    )
    self.finish_on_this_machine(path, self.progress())

  def test_ctrl_c_works_while_the_chief_hangs(self):
    self.start_workers(2)
    _, proc = self.client(1000, "--worker_timeout=0")
    self.wait_progress(proc, 5)
    self.workers[0].send_signal(signal.SIGSTOP)
    time.sleep(3)  # The batches in flight now wait for ever.
    self.assertIsNone(proc.poll())
    proc.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    _, err = proc.communicate(timeout=_TIMEOUT)
    self.assertLess(time.monotonic() - interrupted, 30)
    self.assertEqual(proc.returncode, 130, err)
    self.assertNotIn("Traceback", err)
    self.assertIn(
      "compute_hessians: interrupted; finished batches are kept", err
    )
    self.assertGreaterEqual(self.progress(), 5)

  @parameterized.named_parameters(
    ("silent", None, r"no gRPC answer in 2 s"),
    ("http", b"HTTP/1.1 400 Bad Request\r\n\r\n", r"answered b'HTTP/1\.1 400"),
  )
  def test_port_that_is_not_a_worker(self, reply, reason):
    server = _SilentServer(reply)
    self.addCleanup(server.close)
    path = self.save_input(_samples(4))
    outcome = {}

    def run():
      try:
        streaming.compute_hessians(
          _graph_def(),
          "x:0",
          "y:0",
          path,
          self.path("h.npy"),
          worker_hosts=[server.address],
          connect_timeout=1.0,
        )
      except Exception as error:  # pylint: disable=broad-except
        outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(60)
    self.assertFalse(thread.is_alive(), "the run hangs")
    self.assertLess(time.monotonic() - started, 60)
    self.assertIsInstance(outcome.get("error"), tf.errors.UnavailableError)
    self.assertRegex(
      outcome["error"].message,
      rf"^Cannot reach worker task 0 \({server.address}\): it accepts "
      rf"connections but does not answer like a TensorFlow worker \({reason}",
    )
    self.assertEqual(self.files(), ["x.npy"])

  def test_ctrl_c_stops_a_worker_quietly(self):
    self.start_workers(1)
    self.workers[0].send_signal(signal.SIGINT)
    self.assertEqual(self.workers[0].wait(_TIMEOUT), -signal.SIGINT)

  def test_busy_port_names_the_worker(self):
    with socket.socket() as holder:
      holder.bind(("", 0))
      holder.listen()
      port = holder.getsockname()[1]
      result = subprocess.run(
        [
          sys.executable,
          _WORKER,
          f"--worker_hosts=127.0.0.1:{port}",
          "--task_index=0",
        ],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        check=False,
      )
    self.assertEqual(result.returncode, 1, result.stderr)
    self.assertEqual(
      testing_utils.clean_stderr(result.stderr)[-1],
      f"worker: error: worker task 0 (127.0.0.1:{port}) cannot listen on "
      f"port {port}: Address already in use (another worker or program "
      "holds it); stop it or give this worker another port in "
      "--worker_hosts.",
    )


class ProgramSignalsTest(_FilesTestCase):
  def test_ctrl_c_during_start_up_is_quiet(self):
    path = self.save_input(_samples(5))
    proc = self.start_script(
      "--graph=missing.pb",
      "--xs=x:0",
      "--ys=y:0",
      f"--input={path}",
      f"--output={self.path('h.npy')}",
    )
    time.sleep(0.5)  # TensorFlow takes seconds to load.
    self.assertIsNone(proc.poll())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=_TIMEOUT)
    self.assertIn(proc.returncode, (130, -signal.SIGINT), err)
    self.assertNotIn("Traceback", err)
    self.assertEqual(self.files(), ["x.npy"])

  def test_example_output_in_a_missing_directory(self):
    result = subprocess.run(
      [sys.executable, _EXAMPLE, f"--output={self.path('missing/h.npz')}"],
      capture_output=True,
      text=True,
      timeout=_TIMEOUT,
      check=False,
    )
    self.assert_one_line_error(
      result.returncode,
      result.stderr,
      r"^example: error: `output` must be in an existing directory; "
      r"'.*missing' does not exist\.$",
    )
    self.assertEqual(self.files(), [])


class ErrorSummaryTest(tf.test.TestCase):
  def test_rules_are_not_the_reason(self):
    error = tf.errors.UnavailableError(
      None,
      None,
      "Graph execution error:\n\n=====================\nFrom /job:worker/"
      "replica:0/task:1:\n=====================\nSocket closed\n",
    )
    self.assertEqual(_tf_errors.error_summary(error), "Socket closed")


if __name__ == "__main__":
  tf.test.main()
