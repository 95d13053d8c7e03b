"""`compute_hessians`: the lock, the resume and progress.

Takes the lock, checks the input and the free space, resumes what an
earlier run finished, and hands the missing batches to the engine: in turn
on this machine, or through `scheduler.dispatch` on a cluster.
"""

import contextlib
import dataclasses
import datetime
import hashlib
import os
import shutil
import time

from absl import logging
import numpy as np
import tensorflow as tf

from tf1hess import _checks
from tf1hess import _tf_errors
from tf1hess import cluster
from tf1hess import plan as plan_lib
from tf1hess.streaming.engine import Engine
from tf1hess.streaming.engine import without_devices
from tf1hess.streaming.readers import open_input
from tf1hess.streaming.scheduler import dispatch
from tf1hess.streaming.writer import Checksums
from tf1hess.streaming.writer import Intervals
from tf1hess.streaming.writer import Manifest
from tf1hess.streaming.writer import NO_SPACE
from tf1hess.streaming.writer import NpyFiles
from tf1hess.streaming.writer import check_output_path
from tf1hess.streaming.writer import existing_outputs
from tf1hess.streaming.writer import is_file_of

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # Windows has no fcntl: runs there are not locked.
  fcntl = None


#: Output dtypes `compute_hessians` can write (`dtype` argument).
OUTPUT_DTYPES = ("float16", "float32", "float64")

#: Largest output file written as one `.npy` before sharding (2 GiB).
DEFAULT_MAX_FILE_BYTES = 2**31


class _ProgressLog:
  """Logs samples done, rate and ETA at most every `interval` seconds."""

  def __init__(self, total, done, num_batches, interval):
    self.total, self.done, self.new = total, done, 0
    self.num_batches, self.batches = num_batches, 0
    self.interval = interval
    self.start = self.last = time.monotonic()

  def update(self, samples, batches_done):
    self.done += samples
    self.new += samples
    self.batches = batches_done
    now = time.monotonic()
    if now - self.last >= self.interval or self.done == self.total:
      self.last = now
      rate = self.new / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else 0.0
      logging.info(
        "Hessians: %d/%d samples (%.1f%%), batch %d/%d, %.1f samples/s, ETA %s",
        self.done,
        self.total,
        100.0 * self.done / self.total,
        self.batches,
        self.num_batches,
        rate,
        datetime.timedelta(seconds=round(eta)),
      )


@dataclasses.dataclass(frozen=True)
class RunSummary:
  """What `compute_hessians` did.

  Attributes:
    output_files: `tuple` of `str`: the `.npy` files of the Hessians, in row
      order (one unless sharded), as absolute paths.
    gradients_files: `tuple` of `str`: the files of the gradients (absolute
      paths), or `()`.
    num_samples: `int`, N.
    num_features: `int`, K.
    num_batches: `int`: batches of the whole run.
    resumed_batches: `int`: batches found done by an earlier run.
    computed_batches: `int`: batches computed by this call.
  """

  output_files: tuple
  gradients_files: tuple
  num_samples: int
  num_features: int
  num_batches: int
  resumed_batches: int
  computed_batches: int


def _output_dtype(dtype):
  if dtype is None:
    return None
  try:
    name = np.dtype(dtype).name
  except TypeError:
    name = None
  if name not in OUTPUT_DTYPES:
    raise TypeError(
      f"`dtype` must be one of {', '.join(OUTPUT_DTYPES)} (or None for the "
      f"dtype of `xs`); saw {dtype!r}."
    )
  return np.dtype(name)


def _rows_per_file(batch_size, row_bytes, max_file_bytes):
  batches = max(1, max_file_bytes // (row_bytes * batch_size))
  return batches * batch_size


def _graph_digest(graph_def):
  return hashlib.sha256(
    graph_def.SerializeToString(deterministic=True)
  ).hexdigest()


# The input's bytes a resumed run compares: all of a file up to
# `_SAMPLED_BLOCKS` blocks, else that many blocks spread evenly over it.
_SAMPLED_BLOCKS = 64
_SAMPLED_BLOCK_BYTES = 1 << 16


def _sampled_digest(path):
  """The SHA-256 of `path`'s bytes, all of them in a file of at most 4 MiB,
  else of 64 blocks of 64 KiB spread evenly from its start to its end: an
  input replaced by another of the same size and modification time (a
  copy with `cp -p`) is told apart without reading a large file whole."""
  size = os.path.getsize(path)
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    if size <= _SAMPLED_BLOCKS * _SAMPLED_BLOCK_BYTES:
      for block in iter(lambda: f.read(_SAMPLED_BLOCK_BYTES), b""):
        digest.update(block)
      return digest.hexdigest()
    last = size - _SAMPLED_BLOCK_BYTES
    for i in range(_SAMPLED_BLOCKS):
      f.seek(last * i // (_SAMPLED_BLOCKS - 1))
      digest.update(f.read(_SAMPLED_BLOCK_BYTES))
  return digest.hexdigest()


def compute_hessians(
  graph_def,
  xs,
  ys,
  input,  # pylint: disable=redefined-builtin
  output,
  input_key=None,
  batch_size=256,
  dtype=None,
  gradients_output=None,
  resume=True,
  worker_hosts=None,
  max_file_bytes=DEFAULT_MAX_FILE_BYTES,
  check_independence=False,
  timeout=cluster.DEFAULT_WORKER_TIMEOUT,
  connect_timeout=60.0,
  progress_interval=10.0,
  overwrite=False,
  method="auto",
  chunk_size=None,
  parallel_iterations=None,
  plan=None,
):
  """Writes the per-sample Hessians of a frozen graph over a file of samples.

  For each sample `x_i` of `input`, writes `H_i = d^2 ys / d x_i^2` (K x K,
  K = the number of features per sample) as row `i` of the `.npy` file
  `output` of shape `(N, K, K)` (sharded when larger than
  `max_file_bytes`), computing `batch_size` samples at a time with
  `tf1hess.batch_hessians` in one session. Memory stays bounded by
  `batch_size` whatever N is (see the module docstring for how each format
  is read and how the output is written).

  Every check runs before any output file is created. The run then writes
  `OUTPUT.partial` and the progress file `OUTPUT.progress.json`; calling
  again with the same arguments (`resume=True`) computes only the batches
  not yet done, and the complete result is renamed to `output`. `method`,
  `chunk_size` and `parallel_iterations` choose how the rows are built, not
  what they are: a call that changes only them resumes too (with a warning:
  the strategies agree to float rounding, not bit for bit).

  Args:
    graph_def: a frozen `tf.compat.v1.GraphDef` (variables folded into
      constants), e.g. from `tf1hess.legacy.load_graph_def`.
    xs: `str`, name of the input tensor (e.g. "x:0"), batch first, of shape
      `(None, d...)`; it is fed the samples (cast to its dtype). A fixed
      batch dimension B (`(B, d...)`) takes only batches of B samples:
      `batch_size` B and N a multiple of B (or N = B).
    ys: `str`, name of the output tensor; per-sample outputs (`(N,)`,
      `(N, 1)`) or their sum, as in `tf1hess.batch_hessians`.
    input: `str`, the samples: `.npy`, `.npz`, `.csv` or TFRecord (see
      `open_input`), `(N, d...)` or `(N, K)` with `K = prod(d...)`.
    output: `str`, the `.npy` file of the Hessians `(N, K, K)`.
    input_key: `str` or `None`: the `.npz` array or TFRecord feature.
    batch_size: `int` >= 1, samples per session run; default 256.
    dtype: `str` or `None` (default): the dtype written, one of
      `OUTPUT_DTYPES`; `None` writes the dtype of `xs`.
    gradients_output: `str` or `None` (default): also write the per-sample
      gradients `(N, K)` to this `.npy` file (same resume and sharding).
    resume: `bool`, default `True`: continue an unfinished run of the same
      settings on `output`; `False` discards it and starts over.
    worker_hosts: `None` (default, this machine) or the `HOST:PORT` list of
      the TensorFlow cluster's workers (`str` comma-separated or `list`):
      spread the batches over them (see `tf1hess.cluster`).
    max_file_bytes: `int`, the largest output file; larger outputs are
      split into shards of whole batches; default 2 GiB.
    check_independence: `bool`, default `False`: check at run time that the
      samples do not interact (`tf1hess.batch_hessians`).
    timeout: `float` seconds, default `cluster.DEFAULT_WORKER_TIMEOUT`
      (600): on a cluster, the longest a batch may take before the run
      fails naming its worker; `None` or 0: no limit (a worker that is
      lost, not hung, still ends the run within seconds).
    connect_timeout: `float` seconds, default 60: on a cluster, how long to
      wait at the start for every worker to accept connections.
    progress_interval: `float` seconds between progress log lines.
    overwrite: `bool`, default `False`: replace an existing `output` (or
      `gradients_output`, or their shards) that no unfinished run of this
      output wrote; `False` refuses it with a `FileExistsError`.
    method: `str`, default "auto": how the rows of each Hessian are built,
      one of "auto", "forward", "pfor", "while_loop", as in
      `tf1hess.batch_hessians` (docs/speed.md, docs/forward.md).
    chunk_size: `int` or `None` (default: all rows at once): rows per
      vectorized backward pass, as in `tf1hess.batch_hessians`.
    parallel_iterations: `int` or `None` (default): rows of the row loop
      that may run in parallel, as in `tf1hess.batch_hessians`.
    plan: a `tf1hess.Plan` in place of `method`, `chunk_size` and
      `parallel_iterations`, as in `tf1hess.batch_hessians`.

  Returns:
    A `RunSummary`.

  Raises:
    FileNotFoundError: when `input` or an output directory does not exist.
    PermissionError: when a file cannot be created in an output directory.
    TypeError: when `input` is not floating-point, `xs` or `ys` is not a
      floating tensor, or `dtype` is not one of `OUTPUT_DTYPES`.
    ValueError: for unknown tensor names (the message lists the closest
      names), input samples whose shape does not match `xs`, an `xs` with a
      fixed batch dimension that not every batch matches, an empty or
      malformed input, an output name that is not `.npy`, `ys` that does
      not depend on `xs`, malformed `worker_hosts`, an unknown `method`, a
      `chunk_size` or `parallel_iterations` that is not a positive int, an
      op `method="forward"` has no rule for, an unfinished run on `output`
      with other settings, or another run writing `output`.
    FileExistsError: when `output` or `gradients_output` exists and
      `overwrite` is `False`.
    OSError: when the outputs cannot fit on their disk (checked before
      the run starts), or a write fails, e.g. the disk is full (finished
      batches are kept for the next call).
    tf.errors.UnavailableError: when a worker cannot be reached at the
      start, is not a TensorFlow worker, or is lost, hung or silent during
      the run (the message names the worker; finished batches are kept for
      the next call).
    tf.errors.OpError: when the model fails at run time.

  Example:
    >>> import numpy as np, os, tempfile, tensorflow as tf
    >>> d = tempfile.mkdtemp()
    >>> with tf.Graph().as_default() as g:
    ...   x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
    ...   y = tf.reduce_sum(x ** 3, axis=1, name="y")
    >>> np.save(os.path.join(d, "x.npy"), np.ones((5, 2), np.float32))
    >>> s = compute_hessians(g.as_graph_def(), "x:0", "y:0",
    ...     os.path.join(d, "x.npy"), os.path.join(d, "h.npy"), batch_size=2)
    >>> np.load(os.path.join(d, "h.npy"))[4]
    array([[6., 0.],
           [0., 6.]], dtype=float32)
  """
  batch_size = _checks.check_count(batch_size, "batch_size")
  max_file_bytes = _checks.check_count(max_file_bytes, "max_file_bytes")
  plan = plan_lib.make(plan, method, chunk_size, parallel_iterations)
  out_dtype = _output_dtype(dtype)
  hosts = (
    None if worker_hosts is None else cluster.parse_worker_hosts(worker_hosts)
  )
  output = check_output_path(output, "output")
  if gradients_output is not None:
    gradients_output = check_output_path(gradients_output, "gradients_output")
    if gradients_output == output:
      raise ValueError(
        f"`gradients_output` must differ from `output`; both are {output}."
      )
    for arg, path, of, other in (
      ("gradients_output", gradients_output, "output", output),
      ("output", output, "gradients_output", gradients_output),
    ):
      if is_file_of(path, other):
        raise ValueError(
          f"`{arg}` must not be named like a shard of `{of}` (a large "
          f"`{of}` is split into NAME-00000-of-0000S.npy files); saw {path} "
          f"beside {other}."
        )
  if not isinstance(graph_def, tf.compat.v1.GraphDef):
    raise TypeError(
      "`graph_def` must be a tf.compat.v1.GraphDef; saw "
      f"{type(graph_def).__name__}."
    )
  reader = open_input(input, input_key)
  for arg, path in (("output", output), ("gradients_output", gradients_output)):
    if path and is_file_of(os.path.abspath(reader.path), path):
      raise ValueError(f"`{arg}` must not overwrite `input` {reader.path}.")
  if not os.path.exists(output + ".progress.json"):  # Again under the lock.
    _check_overwrite([output, gradients_output], overwrite)
  graph_def = without_devices(graph_def)
  if hosts is not None:
    cluster.check_reachable(hosts, wait=connect_timeout)
  engine = Engine(
    graph_def,
    xs,
    ys,
    reader,
    batch_size,
    gradients_output is not None,
    check_independence,
    plan,
    hosts,
    timeout,
  )
  try:
    return _run(
      engine,
      reader,
      output=output,
      gradients_output=gradients_output,
      batch_size=batch_size,
      out_dtype=out_dtype or engine.hessian_dtype,
      resume=resume,
      overwrite=overwrite,
      max_file_bytes=max_file_bytes,
      progress_interval=progress_interval,
      plan=plan,
      settings={
        "graph_sha256": _graph_digest(graph_def),
        "xs": _checks.full_tensor_names(xs),
        "ys": _checks.full_tensor_names(ys),
        "input": os.path.abspath(reader.path),
        "input_bytes": os.path.getsize(reader.path),
        "input_mtime_ns": os.stat(reader.path).st_mtime_ns,
        "input_sample_sha256": _sampled_digest(reader.path),
        "input_key": input_key,
        "num_samples": reader.num_samples,
        "feature_shape": list(reader.feature_shape),
        "batch_size": batch_size,
        "dtype": (out_dtype or engine.hessian_dtype).name,
        "gradients_output": gradients_output,
        "max_file_bytes": max_file_bytes,
        "check_independence": bool(check_independence),
      },
    )
  finally:
    engine.close()


def _run(
  engine,
  reader,
  *,
  output,
  gradients_output,
  batch_size,
  out_dtype,
  resume,
  overwrite,
  max_file_bytes,
  progress_interval,
  plan,
  settings,
):
  """Creates or resumes the outputs, computes the missing batches, renames.

  `settings` (a `dict`) must match those of the run being resumed; `plan`
  (a `tf1hess.Plan`) may differ from its.
  """
  n = reader.num_samples
  k = int(np.prod(reader.feature_shape))
  num_batches = -(-n // batch_size)
  hess = NpyFiles(
    "hessians",
    output,
    n,
    (k, k),
    out_dtype,
    _rows_per_file(batch_size, k * k * out_dtype.itemsize, max_file_bytes),
  )
  files = [hess]
  if gradients_output:
    grads = NpyFiles(
      "gradients",
      gradients_output,
      n,
      (k,),
      out_dtype,
      _rows_per_file(batch_size, k * out_dtype.itemsize, max_file_bytes),
    )
    files.insert(0, grads)  # Renamed first: `output` appears last.
  with contextlib.ExitStack() as locks:
    for f in files:  # Before any other file is created or removed.
      locks.enter_context(_lock(f.output, _ARGS[f.key]))
    manifest = Manifest(output, settings, plan.record())
    checksums = Checksums(output, len(files))
    manifest.partial_files = [p for f in files for p in f.partials]
    state = manifest.load()
    if state is not None and not resume:
      logging.info("Discarding the unfinished run of %s.", output)
      for path in state.get("partial_files", []):
        if path.endswith(".partial"):
          with contextlib.suppress(FileNotFoundError):
            os.remove(path)
      checksums.remove()
      manifest.remove()
      state = None
    if state is None:
      _check_overwrite([output, gradients_output], overwrite)
    created = state is None
    if state is not None:
      manifest.check_same_run(state)
      _resume(files, manifest, checksums, state, batch_size, n)
      earlier = manifest.add_strategies(state, plan_lib.Plan().record())
      if earlier and manifest.done:
        logging.warning(
          "Resuming %s with %s, though earlier runs of it used %s. The "
          "strategies agree to float rounding, not bit for bit: the result "
          "may differ from an uninterrupted run in the last bits.",
          output,
          _describe(manifest.strategies[-1]),
          " or ".join(map(_describe, earlier)),
        )
      logging.info(
        "Resuming %s: %d of %d batches already done.",
        output,
        len(manifest.done),
        num_batches,
      )
    _check_space(files, checksums, num_batches)
    if created:
      checksums.remove()
      for f in files:
        f.create()
      manifest.save(num_batches, manifest.done)
    resumed = len(manifest.done)
    try:
      computed = _compute_missing(
        engine,
        reader,
        files,
        manifest,
        checksums,
        batch_size,
        num_batches,
        out_dtype,
        progress_interval,
      )
    except KeyboardInterrupt:
      logging.warning(
        "Interrupted with %d of %d batches of %s done; run the same command "
        "again to resume.",
        manifest.saved_count(),
        num_batches,
        output,
      )
      raise
    except Exception as error:
      saved = manifest.saved_count()
      if created and not saved:
        for f in files:  # Nothing to resume: leave nothing behind.
          f.remove_partials()
        checksums.remove()
        manifest.remove()
      if isinstance(error, OSError) and error.errno in NO_SPACE:
        raise OSError(
          f"`output` cannot be written, {error.strerror.lower()} "
          f"({error.filename or output}); {saved} of {num_batches} batches "
          "are saved: free some space and run the same command again to "
          "resume."
        ) from None
      raise
    for f in files:
      f.finish()
    manifest.remove()
    checksums.remove()
  logging.info("Wrote %s.", ", ".join(hess.finals))
  return RunSummary(
    output_files=tuple(hess.finals),
    gradients_files=tuple(grads.finals) if gradients_output else (),
    num_samples=n,
    num_features=k,
    num_batches=num_batches,
    resumed_batches=resumed,
    computed_batches=computed,
  )


def _describe(strategy):
  return ", ".join(f"{k}={v!r}" for k, v in strategy.items())


def _check_overwrite(outputs, overwrite):
  """Refuses to replace an existing result unless `overwrite`.

  Args:
    outputs: `[output, gradients_output]`, the second may be `None`.
    overwrite: `bool`.
  """
  if overwrite:
    return
  for arg, path in zip(("output", "gradients_output"), outputs):
    existing = existing_outputs(path) if path else []
    if existing:
      raise FileExistsError(
        f"`{arg}` exists: {existing[0]}; pass --overwrite (overwrite=True) "
        "to replace it, or choose another name."
      )


def _resume(files, manifest, checksums, state, batch_size, n):
  """Checks the files of an unfinished run; keeps the batches that verify.

  Every batch recorded as done must read back with the CRC-32 recorded
  when it was written; the others (a truncated or overwritten partial
  file, a lost checksum) are computed again.
  """
  for f in files:
    lost = f.missing()
    if lost:
      raise ValueError(
        f"`output` has a progress file {manifest.path} but its partial "
        f"file {lost[0][0]} is gone; rerun with --noresume "
        "(resume=False) to start over."
      )
  for f in files:
    for repair in f.reopen():
      logging.warning("Repaired %s of the unfinished run.", repair)
  crcs = checksums.load()
  recorded = Intervals(state["completed"])
  done = Intervals()
  damaged = []
  for a, b in recorded.ranges:
    for index in range(a, b):
      start = index * batch_size
      rows = min(batch_size, n - start)
      values = crcs.get(index)
      if values is not None and all(
        f.verify(start, rows, crc) for f, crc in zip(files, values)
      ):
        done.add(index)
      else:
        damaged.append(index)
  if damaged:
    logging.warning(
      "%d finished batches of %s do not match their checksums (first: "
      "batch %d); computing them again.",
      len(damaged),
      manifest.path[: -len(".progress.json")],
      damaged[0],
    )
  manifest.done = done


def _check_space(files, checksums, num_batches):
  """Refuses to start when the outputs cannot fit on their disks."""
  needed = {}
  for f in files:
    directory = os.path.dirname(os.path.abspath(f.output))
    needed[directory] = needed.get(directory, 0) + f.bytes_needed()
  directory = os.path.dirname(os.path.abspath(checksums.path))
  needed[directory] += checksums.bytes_needed(num_batches) + 2**16
  for directory, nbytes in needed.items():
    free = shutil.disk_usage(directory).free
    if nbytes > free:
      raise OSError(
        f"`output` needs {_mib(nbytes)} more in {directory} and only "
        f"{_mib(free)} are free; free some space or write elsewhere."
      )


# The argument each output file is given as, by its key in the results.
_ARGS = {"hessians": "output", "gradients": "gradients_output"}


def _mib(nbytes):
  return f"{nbytes / 2**20:.1f} MiB"


@contextlib.contextmanager
def _lock(output, arg="output"):
  """Holds the exclusive lock `OUTPUT.lock` during the run, or raises
  naming the argument `arg` that `output` was given as.

  The lock is taken before any other file of the run is created or
  removed, so a second run on the same output touches nothing of the
  first. The lock file is removed by the run that holds it; a run that
  locked a file removed in the meantime tries again with the new one.
  """
  if fcntl is None:
    yield
    return
  path = output + ".lock"
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise ValueError(
        f"`{arg}` is being written by another run ({path} is locked); "
        "wait for it or stop it first."
      ) from None
    try:
      same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    os.close(fd)


def _compute_missing(
  engine,
  reader,
  files,
  manifest,
  checksums,
  batch_size,
  num_batches,
  out_dtype,
  progress_interval,
):
  """Computes, writes and records every batch not yet done."""
  done = manifest.done
  if len(done) == num_batches:
    return 0
  n = reader.num_samples
  done_samples = sum(
    min((b - 1) * batch_size + batch_size, n) - a * batch_size
    for a, b in done.ranges
  )
  progress = _ProgressLog(n, done_samples, num_batches, progress_interval)
  logging.info(
    "Computing %d batches of up to %d samples from %s (%s) on %s.",
    num_batches - len(done),
    batch_size,
    reader.path,
    reader.description,
    "this machine" if engine.hosts is None else f"{len(engine.hosts)} workers",
  )

  def record(index, values):
    start = index * batch_size
    crcs = [
      f.write(start, values[f.key].astype(out_dtype, copy=False)) for f in files
    ]
    checksums.append(index, crcs)
    new = Intervals(manifest.done.ranges)
    new.add(index)
    manifest.save(num_batches, new)
    progress.update(values["hessians"].shape[0], len(new))

  def failed(index, error):
    """TensorFlow's `error` of batch `index`, its message naming the batch
    and its samples."""
    start = index * batch_size
    stop = min(start + batch_size, reader.num_samples)
    return type(error)(
      error.node_def,
      error.op,
      f"{_tf_errors.error_summary(error)} (batch {index}: samples {start} "
      f"to {stop - 1} of {reader.path})\n{error.message}",
    )

  pending = reader.batches(
    batch_size, done.first_missing(), lambda i: i not in done
  )
  # Closed on the way out, an interrupt too: the reader's files and session.
  with contextlib.closing(pending):
    if engine.hosts is None:
      computed = 0
      for index, batch in pending:
        try:
          values = engine.run(0, batch)
        except tf.errors.OpError as error:
          raise failed(index, error) from error
        record(index, values)
        computed += 1
      return computed
    return dispatch(engine, pending, record, failed)
