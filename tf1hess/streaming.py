"""Per-sample Hessians of a frozen graph over inputs larger than memory.

`compute_hessians` reads the samples of a file batch by batch, runs the
per-sample Hessians (`tf1hess.batch_hessians`, and optionally the gradients)
of a frozen `GraphDef` on each batch through one session, and writes each
batch into a `.npy` file at its place. Memory is bounded by the batch size,
whatever the number of samples:

- inputs are never loaded whole: a `.npy` (and an uncompressed `.npz`
  member) is read one batch at a time; a compressed `.npz` member is
  decompressed as a stream, batch after batch (zip members cannot be read
  at an offset); `.csv` and TFRecord files are read through `tf.data`;
- the `(N, K, K)` output is a `.npy` file created at its full size and
  filled batch by batch with ordinary file writes (not a memory map, whose
  failure on a full disk is a SIGBUS); when it would exceed
  `max_file_bytes`, it is split into shards `NAME-00000-of-00004.npy`, ...
  of whole batches.

Inputs are checked before any file is written (an `.npy` against the size
its header promises, an `.npz` member against its CRC-32), and so is the
free space the output needs.

Runs are resumable. Until a run is complete its data lives in
`OUTPUT.partial` beside a progress file `OUTPUT.progress.json` that records
a fingerprint of the run's settings and the completed batches, and
`OUTPUT.checksums`, the CRC-32 of every completed batch; after each batch
its data is flushed, its checksum appended and the progress file replaced
atomically. A run that is interrupted (Ctrl-C, killed, a lost worker, a
full disk) and started again with the same settings checks the batches
recorded as done against their checksums and computes only the missing
(or damaged) ones; the partial files are renamed to their final names only
when every batch is done, so a file under the final name is always
complete, and it is byte for byte the file an uninterrupted run writes.
The lock `OUTPUT.lock`, taken before any other file is touched, keeps a
second run off the output. See docs/guarantees.md.

With `worker_hosts`, the batches are spread over the workers of a TensorFlow
cluster (see `tf1hess.cluster`): one copy of the model per worker under
`tf.device("/job:worker/task:i")` in one graph, one session on the first
worker, one batch in flight per worker, each in a thread of its own while
the client watches the workers (a lost or silent worker, the first one
included, ends the run in a bounded time). The results go into the same
file, equal to the single-machine result.
"""

import abc
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import io
import json
import os
import queue
import re
import shutil
import struct
import threading
import time
import zipfile
import zlib

from absl import logging
import numpy as np
import tensorflow as tf

from tf1hess import _checks
from tf1hess import _files
from tf1hess import _tf_errors
from tf1hess import cluster
from tf1hess import legacy

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # Windows has no fcntl: runs there are not locked.
  fcntl = None

#: Output dtypes `compute_hessians` can write (`dtype` argument).
OUTPUT_DTYPES = ("float16", "float32", "float64")

#: Largest output file written as one `.npy` before sharding (2 GiB).
DEFAULT_MAX_FILE_BYTES = 2**31

# Seconds to wait for a cluster session to close.
_CLOSE_WAIT_SECS = 5

_NPY = (".npy",)
_NPZ = (".npz",)
_CSV = (".csv",)
_TFRECORD = (".tfrecord", ".tfrecords", ".tfr")
_GZIP = ".gz"

# A number as `tf.strings.to_number` (strtod) reads it in a CSV field.
_NUMBER = (
  r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf(inity)?|nan)"
)
_NUMBER_RE = re.compile(_NUMBER, re.IGNORECASE)

# ----------------------------------------------------------------- inputs


class InputReader(abc.ABC):
  """Samples `(N, d...)` of a file, read a batch at a time, never whole.

  Use `open_input` to get one. Attributes: `path`, `num_samples` (N),
  `feature_shape` (the `d...` of one sample), `dtype` (`np.dtype` of the
  values returned), `description` (how the data is read, for the log).
  """

  path = ""
  num_samples = 0
  feature_shape = ()
  dtype = np.dtype(np.float32)
  description = ""

  @abc.abstractmethod
  def batches(self, batch_size, first_batch=0, wanted=None):
    """Yields `(index, array)` for batches `first_batch, first_batch+1, ...`.

    Args:
      batch_size: `int`, samples per batch (the last batch may be smaller).
      first_batch: `int`, the first batch to yield; default 0.
      wanted: optional callable `index -> bool`; batches it rejects are not
        yielded (and not read at all when the format allows random access).

    Yields:
      `(int, np.ndarray)`: the batch index and its samples, shape
      `(b,) + feature_shape`, a copy owned by the caller.
    """

  def _count(self, batch_size):
    return -(-self.num_samples // batch_size)


def _read_npy_header(f, path):
  """Returns `(shape, fortran_order, dtype)` and leaves `f` at the data."""
  try:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  except (ValueError, OSError, EOFError) as error:
    raise ValueError(
      f"`input` must be a .npy array file; {path} is not: {error}"
    ) from None
  return tuple(shape), fortran, np.dtype(dtype)


def _check_samples(shape, fortran, dtype, path):
  """Checks an array header: float values, batch first, C order."""
  if dtype.kind != "f":
    raise TypeError(
      "`input` must hold floating-point values (float16, float32 or "
      f"float64); saw dtype {dtype} in {path}."
    )
  if len(shape) < 2:
    raise ValueError(
      "`input` must have rank >= 2 (samples, features...); saw shape "
      f"{shape} in {path}."
    )
  if fortran and len(shape) > 1 and shape[0] > 1 and np.prod(shape[1:]) > 1:
    raise ValueError(
      "`input` must be stored in C (row-major) order to be read batch by "
      f"batch; {path} is in Fortran order. Re-save it with "
      "np.save(path, np.ascontiguousarray(array))."
    )


class _RawReader(InputReader):
  """A `.npy` array (or stored `.npz` member) read one batch at a time.

  Each batch is read with ordinary file reads (not a memory map, whose
  failures on a file truncated under it would be a SIGBUS), into a buffer
  the caller owns.
  """

  def __init__(self, path, offset, shape, dtype, description):
    self.path = path
    self._offset = offset
    self.num_samples = shape[0]
    self.feature_shape = tuple(shape[1:])
    self.dtype = dtype
    self._row_bytes = int(np.prod(self.feature_shape)) * dtype.itemsize
    self.description = description

  def batches(self, batch_size, first_batch=0, wanted=None):
    with open(self.path, "rb", buffering=0) as f:
      for index in range(first_batch, self._count(batch_size)):
        if wanted is not None and not wanted(index):
          continue
        start = index * batch_size
        rows = min(batch_size, self.num_samples - start)
        buffer = bytearray(rows * self._row_bytes)
        f.seek(self._offset + start * self._row_bytes)
        if f.readinto(buffer) != len(buffer):
          raise ValueError(
            f"`input` {self.path} ends before its {self.num_samples} "
            "samples: it was truncated while being read."
          )
        yield (
          index,
          np.frombuffer(buffer, self.dtype).reshape(
            (rows,) + self.feature_shape
          ),
        )


class _ZipStreamReader(InputReader):
  """A compressed `.npz` member, decompressed as a stream, batch by batch.

  Members of a compressed zip cannot be memory-mapped; they are read in
  order, so resuming decompresses (and drops) the batches already done.
  """

  def __init__(self, path, member, shape, dtype):
    self.path = path
    self._member = member
    self.num_samples = shape[0]
    self.feature_shape = tuple(shape[1:])
    self.dtype = dtype
    self._row_bytes = int(np.prod(self.feature_shape)) * dtype.itemsize
    self.description = (
      f"compressed .npz member {member[: -len('.npy')]!r}, decompressed as "
      "a stream"
    )

  def batches(self, batch_size, first_batch=0, wanted=None):
    with _zip_errors(self.path, self._member):
      yield from self._batches(batch_size, first_batch, wanted)

  def _batches(self, batch_size, first_batch, wanted):
    with zipfile.ZipFile(self.path) as archive:
      with archive.open(self._member) as f:
        _read_npy_header(f, self.path)
        for index in range(self._count(batch_size)):
          start = index * batch_size
          rows = min(batch_size, self.num_samples - start)
          if index < first_batch or (wanted is not None and not wanted(index)):
            f.seek(rows * self._row_bytes, os.SEEK_CUR)
            continue
          data = f.read(rows * self._row_bytes)
          if len(data) != rows * self._row_bytes:
            raise ValueError(
              f"`input` member {self._member!r} of {self.path} ends before "
              f"its {self.num_samples} samples."
            )
          yield (
            index,
            np.frombuffer(data, self.dtype)
            .reshape((rows,) + self.feature_shape)
            .copy(),
          )


class _DatasetReader(InputReader):
  """A `tf.data` pipeline iterated in a private graph and session.

  A private graph works whether or not eager execution is enabled (TF1
  programs often disable it), and keeps the pipeline out of the caller's
  graph.
  """

  @abc.abstractmethod
  def _dataset(self, batch_size, first_batch):
    """The `tf.data.Dataset` of batches from `first_batch` on."""

  def batches(self, batch_size, first_batch=0, wanted=None):
    for i, batch in enumerate(
      _run_dataset(lambda: self._dataset(batch_size, first_batch))
    ):
      index = first_batch + i
      if wanted is None or wanted(index):
        yield index, batch


def _run_dataset(make_dataset):
  """Yields the elements of `make_dataset()` as numpy values."""
  graph = tf.Graph()
  with graph.as_default():
    element = tf.compat.v1.data.make_one_shot_iterator(
      make_dataset()
    ).get_next()
  with tf.compat.v1.Session(graph=graph) as session:
    while True:
      try:
        yield session.run(element)
      except tf.errors.OutOfRangeError:
        return


# Lines per step of the validation pass over a CSV or TFRecord file.
_SCAN_BATCH = 8192


class _CsvReader(_DatasetReader):
  """Numeric comma-separated rows, read through `tf.data` in batches.

  Blank lines are skipped; a first line that is not all numbers is a header.
  A validation pass at open time counts the rows and finds the first bad
  line, so that a bad file fails before any output is written.
  """

  def __init__(self, path):
    self.path = path
    self.dtype = np.dtype(np.float64)
    self._header_line = 0
    width = None
    with open(path, encoding="utf-8", errors="replace") as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        fields = [field.strip() for field in line.split(",")]
        width = len(fields)
        if not all(_NUMBER_RE.fullmatch(field) for field in fields):
          self._header_line = lineno
        break
    if width is None:
      raise ValueError(f"`input` holds no samples: {path} has no rows.")
    self.feature_shape = (width,)
    self.description = "CSV through tf.data" + (
      f" (header on line {self._header_line})" if self._header_line else ""
    )
    self.num_samples = self._scan()

  def _lines(self):
    lines = tf.data.TextLineDataset(self.path).enumerate(start=1)
    header = self._header_line
    return lines.filter(
      lambda n, line: tf.logical_and(
        n > header, tf.strings.length(tf.strings.strip(line)) > 0
      )
    )

  @staticmethod
  def _fields(lines):
    return tf.strings.strip(tf.strings.split(lines, ","))

  def _scan(self):
    width = self.feature_shape[0]

    def check(linenos, lines):
      fields = self._fields(lines)
      numeric = tf.reduce_all(
        tf.strings.regex_full_match(fields, "(?i)" + _NUMBER), axis=1
      )
      bad = tf.logical_or(
        tf.not_equal(fields.row_lengths(), width), tf.logical_not(numeric)
      )
      first = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int32)
      return (
        tf.size(lines),
        tf.reduce_any(bad),
        tf.gather(linenos, first),
        tf.gather(lines, first),
      )

    count = 0
    for rows, any_bad, lineno, line in _run_dataset(
      lambda: self._lines().batch(_SCAN_BATCH).map(check)
    ):
      if any_bad:
        self._raise_bad_line(int(lineno), line.decode("utf-8", "replace"))
      count += int(rows)
    return count

  def _raise_bad_line(self, lineno, line):
    fields = [field.strip() for field in line.split(",")]
    width = self.feature_shape[0]
    if len(fields) != width:
      raise ValueError(
        f"`input` rows must all have {width} fields like the first one; "
        f"{self.path} line {lineno} has {len(fields)}."
      )
    column, field = next(
      (i, f) for i, f in enumerate(fields, 1) if not _NUMBER_RE.fullmatch(f)
    )
    raise TypeError(
      "`input` must hold floating-point numbers only; "
      f"{self.path} line {lineno} field {column} is {field!r}."
    )

  def _dataset(self, batch_size, first_batch):
    width = self.feature_shape[0]
    return (
      self._lines()
      .skip(first_batch * batch_size)
      .batch(batch_size)
      .map(
        lambda _, lines: tf.reshape(
          tf.strings.to_number(self._fields(lines), tf.float64).flat_values,
          [-1, width],
        )
      )
    )


class _TFRecordReader(_DatasetReader):
  """`tf.train.Example` records with a float feature, read via `tf.data`.

  Each record holds one sample: the `float_list` feature `key` of the same
  length K in every record. A validation pass at open time counts the
  records and checks every one.
  """

  def __init__(self, path, key):
    self.path = path
    self.dtype = np.dtype(np.float32)
    self._compression = "GZIP" if path.lower().endswith(_GZIP) else ""
    try:
      first = next(iter(_run_dataset(lambda: self._records().take(1))), None)
    except tf.errors.DataLossError as error:
      raise ValueError(
        f"`input` {path} is not a readable TFRecord file: "
        f"{_tf_errors.error_summary(error)}"
      ) from None
    if first is None:
      raise ValueError(f"`input` holds no samples: {path} has no records.")
    try:
      example = tf.train.Example.FromString(first)
    except Exception as error:  # protobuf's DecodeError, not re-exported.
      raise ValueError(
        "`input` records must be serialized tf.train.Example protos; the "
        f"first record of {path} is not ({error})."
      ) from None
    features = example.features.feature
    if key is None:
      if len(features) != 1:
        raise ValueError(
          "`input_key` must name the feature holding the samples, one of "
          f"{sorted(features)} in {path}; saw none."
        )
      key = next(iter(features))
    if key not in features:
      raise ValueError(
        f"`input_key` must name a feature of the records, one of "
        f"{sorted(features)} in {path}; saw {key!r}."
      )
    kind = features[key].WhichOneof("kind")
    if kind != "float_list":
      raise TypeError(
        f"`input` feature {key!r} must be a float_list of floating-point "
        f"values; saw a {kind} in {path}."
      )
    self._key = key
    self.feature_shape = (len(features[key].float_list.value),)
    self.description = f"TFRecord feature {key!r} through tf.data" + (
      " (GZIP)" if self._compression else ""
    )
    self.num_samples = self._scan()

  def _records(self):
    return tf.data.TFRecordDataset(
      self.path, compression_type=self._compression
    )

  def _scan(self):
    width = self.feature_shape[0]
    key = self._key

    def check(serialized):
      values = tf.io.parse_example(
        serialized, {key: tf.io.VarLenFeature(tf.float32)}
      )[key]
      n = tf.size(serialized)
      lengths = tf.math.bincount(
        tf.cast(values.indices[:, 0], tf.int32), minlength=n, maxlength=n
      )
      bad = tf.not_equal(lengths, width)
      first = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int32)
      return n, tf.reduce_any(bad), first, tf.gather(lengths, first)

    count = 0
    try:
      for rows, any_bad, first, length in _run_dataset(
        lambda: self._records().batch(_SCAN_BATCH).map(check)
      ):
        if any_bad:
          raise ValueError(
            f"`input` records must all hold {width} values in feature "
            f"{key!r} like the first one; record {count + int(first)} of "
            f"{self.path} holds {int(length)}."
          )
        count += int(rows)
    except tf.errors.InvalidArgumentError as error:
      summary = _tf_errors.error_summary(error)
      records = f"records {count}..{count + _SCAN_BATCH - 1}"
      if _tf_errors.is_dtype_mismatch(summary):
        raise TypeError(
          f"`input` feature {key!r} must hold floating-point values in "
          f"every record; one of {records} of {self.path} does not: "
          f"{summary}"
        ) from None
      raise ValueError(
        f"`input` {records} of {self.path} cannot be read: {summary}"
      ) from None
    except tf.errors.DataLossError as error:
      raise ValueError(
        f"`input` {self.path} is not a readable TFRecord file: "
        f"{_tf_errors.error_summary(error)}"
      ) from None
    return count

  def _dataset(self, batch_size, first_batch):
    width, key = self.feature_shape[0], self._key
    return (
      self._records()
      .skip(first_batch * batch_size)
      .batch(batch_size)
      .map(
        lambda s: tf.io.parse_example(
          s, {key: tf.io.FixedLenFeature([width], tf.float32)}
        )[key]
      )
    )


# Bytes read at a time when checking the CRC-32 of an `.npz` member.
_CRC_CHUNK = 1 << 20


@contextlib.contextmanager
def _zip_errors(path, member):
  """Turns what a damaged zip raises into one `ValueError`."""
  try:
    yield
  except (zipfile.BadZipFile, zlib.error, EOFError) as error:
    raise ValueError(
      f"`input` member {member!r} of {path} is damaged ({error}); "
      "restore the file or write it again."
    ) from None


def _check_data_size(path, what, shape, dtype, available):
  """Raises when fewer bytes hold the data than its header promises."""
  needed = int(np.prod(shape)) * dtype.itemsize
  if available < needed:
    raise ValueError(
      f"`input` {what}{path} is shorter than its header says: {dtype} "
      f"{tuple(shape)} needs {needed} bytes of data, it holds "
      f"{max(available, 0)}; the file is truncated or damaged."
    )


def _open_npz(path, key):
  """Returns the reader of member `key` of an `.npz` archive.

  Reads the member once to check its CRC-32 (stored or compressed), so
  that a damaged archive fails before any output is written.
  """
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as error:
    raise ValueError(
      f"`input` must be a .npz archive; {path} is not: {error}"
    ) from None
  with archive:
    names = [
      n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")
    ]
    if key is None:
      if len(names) != 1:
        raise ValueError(
          "`input_key` must name the array holding the samples, one of "
          f"{sorted(names)} in {path}; saw none."
        )
      key = names[0]
    if key not in names:
      raise ValueError(
        f"`input_key` must name an array of {path}, one of {sorted(names)}; "
        f"saw {key!r}."
      )
    info = archive.getinfo(key + ".npy")
    with _zip_errors(path, info.filename), archive.open(info) as f:
      shape, fortran, dtype = _read_npy_header(f, path)
      header_bytes = f.tell()
      _check_samples(shape, fortran, dtype, path)
      _check_data_size(
        path,
        f"member {key!r} of ",
        shape,
        dtype,
        info.file_size - header_bytes,
      )
      logging.info("Checking the CRC-32 of %r in %s.", key, path)
      while f.read(_CRC_CHUNK):  # zipfile checks the CRC at the end.
        pass
  if info.compress_type != zipfile.ZIP_STORED:
    return _ZipStreamReader(path, info.filename, shape, dtype)
  with open(path, "rb") as f:  # Local file header: where the data starts.
    f.seek(info.header_offset + 26)
    name_length, extra_length = np.frombuffer(f.read(4), "<u2")
  offset = info.header_offset + 30 + int(name_length) + int(extra_length)
  return _RawReader(
    path,
    offset + header_bytes,
    shape,
    dtype,
    f"stored .npz member {key!r}, read a batch at a time",
  )


def open_input(input, input_key=None):  # pylint: disable=redefined-builtin
  """Opens a file of samples for reading a batch at a time.

  Formats, by file name:
  - `.npy`: an array `(N, d...)` of floats in C order, memory-mapped one
    batch at a time;
  - `.npz`: its array `input_key` (or its only array); memory-mapped one
    batch at a time when stored uncompressed (`np.savez`), decompressed as a
    stream when compressed (`np.savez_compressed`);
  - `.csv`: numeric comma-separated rows of K values, optional header line,
    blank lines skipped; read through `tf.data`;
  - `.tfrecord`, `.tfrecords`, `.tfr` (`.gz` for GZIP): one
    `tf.train.Example` per sample with a `float_list` feature `input_key`
    (or its only feature) of K values; read through `tf.data`.

  CSV and TFRecord files are read once at open time to count and check
  every sample (memory stays bounded), so a bad file fails here.

  Args:
    input: `str`, path of the file.
    input_key: `str` or `None` (default): the array of an `.npz` or the
      feature of TFRecord records; `None` takes the only one.

  Returns:
    An `InputReader`.

  Raises:
    FileNotFoundError: when `input` does not exist.
    TypeError: when the values are not floating-point numbers.
    ValueError: for an unknown format, `input_key` that names nothing (or is
      given for a format without keys), an array of rank < 2 or in Fortran
      order, rows of different widths, or no samples.

  Example:
    >>> import numpy as np, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> np.save(path, np.ones((5, 3), np.float32))
    >>> reader = open_input(path)
    >>> reader.num_samples, reader.feature_shape
    (5, (3,))
    >>> [batch.shape for _, batch in reader.batches(2)]
    [(2, 3), (2, 3), (1, 3)]
  """
  path = os.fspath(input)
  if not os.path.exists(path):
    raise FileNotFoundError(f"`input` does not exist: {path}")
  if os.path.isdir(path):
    raise ValueError(f"`input` must be a file; saw the directory {path}.")
  lower = path.lower()
  stem = lower[: -len(_GZIP)] if lower.endswith(_GZIP) else lower
  keyed = stem.endswith(_NPZ + _TFRECORD)
  if input_key is not None and not keyed:
    raise ValueError(
      "`input_key` applies to .npz and TFRecord inputs only; saw "
      f"input_key={input_key!r} for {path}."
    )
  if stem.endswith(_TFRECORD):
    reader = _TFRecordReader(path, input_key)
  elif lower.endswith(_NPY):
    with open(path, "rb") as f:
      shape, fortran, dtype = _read_npy_header(f, path)
      offset = f.tell()
    _check_samples(shape, fortran, dtype, path)
    _check_data_size(path, "", shape, dtype, os.path.getsize(path) - offset)
    reader = _RawReader(
      path, offset, shape, dtype, ".npy read a batch at a time"
    )
  elif lower.endswith(_NPZ):
    reader = _open_npz(path, input_key)
  elif lower.endswith(_CSV):
    reader = _CsvReader(path)
  else:
    raise ValueError(
      f"`input` must be a .npy, .npz, .csv or .tfrecord file; saw {path}."
    )
  if reader.num_samples == 0:
    raise ValueError(f"`input` holds no samples: {path} has N = 0.")
  return reader


# ---------------------------------------------------------------- outputs


def _shard_paths(output, num_files):
  if num_files == 1:
    return [output]
  stem = output[: -len(".npy")]
  return [f"{stem}-{i:05d}-of-{num_files:05d}.npy" for i in range(num_files)]


def _shard_sets(output):
  """`{num_files: [names]}` of the shard files of `output` that exist."""
  stem = output[: -len(".npy")] if output.endswith(".npy") else output
  directory = os.path.dirname(os.path.abspath(output))
  base = os.path.basename(stem)
  pattern = re.compile(re.escape(base) + r"-(\d{5})-of-(\d{5})\.npy$")
  shards = {}
  for name in os.listdir(directory):
    match = pattern.match(name)
    if match:
      shards.setdefault(int(match.group(2)), []).append(
        os.path.join(directory, name)
      )
  return shards


def _existing_outputs(output):
  """The files that hold (or held) a result under the name `output`."""
  found = [output] if os.path.lexists(output) else []
  for names in _shard_sets(output).values():
    found.extend(sorted(names))
  return found


def output_files(output):
  """Returns the files of a finished output: `[output]` or its shards.

  Args:
    output: `str`, the `output` path given to `compute_hessians`.

  Returns:
    A `list` of `str`: `[output]` when that file exists, else the shards
    `NAME-00000-of-0000S.npy`, ... in order (rows of shard `i` follow those
    of shard `i - 1`); `[]` when neither exists.

  Example:
    >>> import os, tempfile
    >>> output_files(os.path.join(tempfile.mkdtemp(), "h.npy"))
    []
    >>> # After a run: [np.load(f, mmap_mode="r") for f in output_files(...)]
  """
  if os.path.exists(output):
    return [output]
  for total, names in sorted(_shard_sets(output).items(), reverse=True):
    if len(names) == total:
      return sorted(names)
  return []


def _npy_header(shape, dtype):
  """The bytes `np.save` writes before the data of an array."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
    buffer,
    {
      "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
      "fortran_order": False,
      "shape": tuple(shape),
    },
  )
  return buffer.getvalue()


# What a failed write of an output raises when the disk is full.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class _NpyFiles:
  """An `(N,) + row_shape` array written batch by batch into `.npy` files.

  The files are created at full size under `FINAL.partial` names (sparse
  until written) and renamed by `finish`. Each batch is written with
  ordinary file writes and flushed to disk (`fsync`): unlike stores into a
  memory map, a write that finds the disk full fails with an `OSError`
  that can be reported, instead of a SIGBUS. `write` returns the CRC-32 of
  the bytes written, which `verify` checks when a run is resumed.
  """

  def __init__(self, key, output, num_rows, row_shape, dtype, rows_per_file):
    self.key = key
    self.output = output
    self.num_rows = num_rows
    self.row_shape = tuple(row_shape)
    self.dtype = np.dtype(dtype)
    self.rows_per_file = rows_per_file
    num_files = -(-num_rows // rows_per_file)
    self.finals = _shard_paths(output, num_files)
    self.partials = [f + ".partial" for f in self.finals]
    self._row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
    self._headers = [
      _npy_header((self._rows(i),) + self.row_shape, self.dtype)
      for i in range(num_files)
    ]

  def _rows(self, i):
    return min(self.rows_per_file, self.num_rows - i * self.rows_per_file)

  def _size(self, i):
    return len(self._headers[i]) + self._rows(i) * self._row_bytes

  def _path(self, i):
    """The partial file `i`, or its final name once renamed."""
    partial = self.partials[i]
    return self.finals[i] if not os.path.exists(partial) else partial

  def bytes_needed(self):
    """Bytes the files still take on disk until they are complete."""
    needed = 0
    for i, partial in enumerate(self.partials):
      try:
        st = os.stat(partial)
        allocated = st.st_blocks * 512
      except FileNotFoundError:
        allocated = 0 if not os.path.exists(self.finals[i]) else self._size(i)
      needed += max(self._size(i) - allocated, 0)
    return needed

  def create(self):
    for i, path in enumerate(self.partials):
      with open(path, "wb") as f:
        f.write(self._headers[i])
        f.truncate(self._size(i))

  def reopen(self):
    """Checks the partial files of a run being resumed; repairs their frame.

    A header that says another shape or dtype is refused (the file is not
    this run's); a damaged header is written again, and a file of the
    wrong size is cut or extended to its size: the batches that this
    damaged are found by `verify`.

    Returns:
      A `list` of `str`: what was repaired, for the log.
    """
    repaired = []
    for i, partial in enumerate(self.partials):
      path = self._path(i)
      header = self._headers[i]
      with open(path, "rb") as f:
        head = f.read(len(header))
      if head != header:
        try:
          shape, _, dtype = _read_npy_header(io.BytesIO(head), path)
        except ValueError:
          shape, dtype = None, None
        expected = (self._rows(i),) + self.row_shape
        if shape is not None and (shape, dtype) != (expected, self.dtype):
          raise ValueError(
            f"`output` partial file {path} holds {dtype} {shape}, not the "
            f"{self.dtype} {expected} of this run; rerun with --noresume "
            "(resume=False) to start over."
          )
        with open(path, "r+b") as f:
          f.write(header)
        repaired.append(f"the header of {path}")
      size = os.path.getsize(path)
      if size != self._size(i):
        os.truncate(path, self._size(i))
        repaired.append(
          f"the size of {path} ({size} bytes, not {self._size(i)})"
        )
      if path != partial:
        os.replace(path, partial)  # Renamed by a run that did not finish.
    return repaired

  def missing(self):
    return [
      (p, f)
      for p, f in zip(self.partials, self.finals)
      if not os.path.exists(p) and not os.path.exists(f)
    ]

  def _place(self, start):
    i, row = divmod(start, self.rows_per_file)
    return self.partials[i], len(self._headers[i]) + row * self._row_bytes

  def write(self, start, values):
    """Writes rows `start...` and flushes them; returns their CRC-32."""
    path, offset = self._place(start)
    data = memoryview(np.ascontiguousarray(values, self.dtype)).cast("B")
    fd = os.open(path, os.O_WRONLY)
    try:
      written = 0
      while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)
      os.fsync(fd)
    except OSError as error:  # Name the file: pwrite and fsync do not.
      raise OSError(error.errno, error.strerror, path) from None
    finally:
      os.close(fd)
    return zlib.crc32(data)

  def verify(self, start, rows, crc):
    """Whether rows `start...start+rows` read back with CRC-32 `crc`."""
    path, offset = self._place(start)
    with open(path, "rb") as f:
      f.seek(offset)
      data = f.read(rows * self._row_bytes)
    return len(data) == rows * self._row_bytes and zlib.crc32(data) == crc

  def finish(self):
    """Renames the partial files; removes other results under this name."""
    for partial, final in zip(self.partials, self.finals):
      if os.path.exists(partial):
        os.replace(partial, final)
    for stale in _existing_outputs(self.output):
      if stale not in self.finals:  # An earlier result, now out of date.
        with contextlib.suppress(FileNotFoundError):
          os.remove(stale)

  def remove_partials(self):
    for partial in self.partials:
      with contextlib.suppress(FileNotFoundError):
        os.remove(partial)


class _Checksums:
  """The CRC-32 of every batch written, one fixed-size record per batch.

  The file `OUTPUT.checksums` only grows during a run (one record appended
  and flushed per batch, whatever the number of batches), and each record
  carries its own CRC-32, so a record torn by a crash or a full disk is
  recognized and dropped, with everything after it.
  """

  def __init__(self, output, num_files):
    self.path = output + ".checksums"
    self._record = struct.Struct("<Q" + "I" * (num_files + 1))

  def load(self):
    """Returns `{batch: (crc, ...)}`; cuts a torn tail off the file."""
    try:
      with open(self.path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return {}
    size = self._record.size
    crcs = {}
    good = 0
    while good + size <= len(data):
      index, *values, check = self._record.unpack_from(data, good)
      if zlib.crc32(data[good : good + size - 4]) != check:
        break
      crcs[index] = tuple(values)
      good += size
    if good != len(data):
      os.truncate(self.path, good)
    return crcs

  def append(self, index, crcs):
    body = self._record.pack(index, *crcs, 0)[:-4]
    with open(self.path, "ab") as f:
      f.write(body + struct.pack("<I", zlib.crc32(body)))
      f.flush()
      os.fsync(f.fileno())

  def bytes_needed(self, num_batches):
    return num_batches * self._record.size

  def remove(self):
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path)


class _Intervals:
  """A set of batch indices kept as sorted disjoint `[start, end)` ranges.

  Runs complete batches mostly in order, so this stays a handful of ranges
  whatever the number of batches.
  """

  def __init__(self, ranges=()):
    self.ranges = [list(r) for r in ranges]

  def __contains__(self, index):
    return any(a <= index < b for a, b in self.ranges)

  def __len__(self):
    return sum(b - a for a, b in self.ranges)

  def add(self, index):
    ranges = self.ranges
    for r in ranges:
      if r[0] <= index < r[1]:
        return
    ranges.append([index, index + 1])
    ranges.sort()
    merged = [ranges[0]]
    for a, b in ranges[1:]:
      if a <= merged[-1][1]:
        merged[-1][1] = max(merged[-1][1], b)
      else:
        merged.append([a, b])
    self.ranges = merged

  def first_missing(self):
    return self.ranges[0][1] if self.ranges and self.ranges[0][0] == 0 else 0


class _Manifest:
  """The progress file of a run: its settings and its completed batches."""

  FORMAT = "tf1hess.streaming/1"

  def __init__(self, output, settings):
    self.path = output + ".progress.json"
    self.settings = settings
    self.fingerprint = hashlib.sha256(
      json.dumps(settings, sort_keys=True).encode()
    ).hexdigest()
    self.done = _Intervals()
    self.partial_files = []

  def load(self):
    """Returns the stored dict, or `None` when there is no progress file."""
    try:
      with open(self.path, encoding="utf-8") as f:
        state = json.load(f)
    except FileNotFoundError:
      return None
    except ValueError as error:
      raise ValueError(
        f"`output` progress file {self.path} is unreadable ({error}); "
        "rerun with --noresume (resume=False) to start over."
      ) from None
    if state.get("format") != self.FORMAT:
      raise ValueError(
        f"`output` progress file {self.path} is not a tf1hess progress "
        "file; remove it or rerun with --noresume (resume=False)."
      )
    return state

  def check_same_run(self, state):
    if state["fingerprint"] == self.fingerprint:
      return
    old = state.get("settings", {})
    changed = sorted(
      k
      for k in set(old) | set(self.settings)
      if old.get(k) != self.settings.get(k)
    )
    raise ValueError(
      f"`output` has an unfinished run with other settings "
      f"({', '.join(changed)} differ; see {self.path}); rerun it with its "
      "settings to finish it, or pass --noresume (resume=False) to start "
      "over."
    )

  def saved_count(self):
    """How many batches the progress file on disk records as done."""
    try:
      with open(self.path, encoding="utf-8") as f:
        return sum(b - a for a, b in json.load(f)["completed"])
    except (OSError, ValueError, KeyError, TypeError):
      return 0

  def save(self, num_batches, done):
    """Replaces the progress file with `done`; then makes it `self.done`."""
    state = {
      "format": self.FORMAT,
      "fingerprint": self.fingerprint,
      "settings": self.settings,
      "num_batches": num_batches,
      "completed": done.ranges,
      "partial_files": self.partial_files,
    }
    with _files.atomic_output(self.path, suffix=".json") as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    self.done = done

  def remove(self):
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path)
    _files.remove_stale_temporaries(self.path, suffix=".json")


def _check_output_path(path, arg):
  path = os.fspath(path)
  if not path.endswith(".npy"):
    raise ValueError(f"`{arg}` must be a .npy file name; saw {path}.")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"`{arg}` directory does not exist: {directory}")
  if os.path.isdir(path):
    raise ValueError(f"`{arg}` must be a file name; saw the directory {path}.")
  return path


# ------------------------------------------------------------------ model


def _without_devices(graph_def):
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
    return tuple(dims.as_list())
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


def _model_tensors(graph, xs, ys, scope=""):
  """Returns `(x, ys)` of `graph`: `ys` a tensor or a list, like the names."""
  prefix = scope + "/" if scope else ""
  names, was_sequence = _checks.as_list(ys)
  x = legacy.find_tensor(graph, prefix + xs, "xs")
  y_list = [legacy.find_tensor(graph, prefix + y, "ys") for y in names]
  return x, _checks.restore_structure(y_list, was_sequence)


class _Engine:
  """The model and its Hessian ops, once per replica, in one session.

  Locally there is one replica; on a cluster one per worker, each under
  `tf.device("/job:worker/task:i")`, all in one graph and one session on
  the first worker. `run(replica, batch)` may be called from one thread per
  replica at a time.
  """

  def __init__(
    self,
    graph_def,
    xs,
    ys,
    reader,
    gradients,
    check_independence,
    worker_hosts,
    timeout,
  ):
    keys = ["hessians", "gradients"] if gradients else ["hessians"]
    graph = legacy.import_graph_def(graph_def)
    x, y = _model_tensors(graph, xs, ys)
    self.feed_shape = _feed_shape(x, reader)
    added = legacy.add_hessian_ops(
      graph, x, y, check_independence=check_independence
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
      logging.warning(
        "Closing the cluster session did not finish in %d s (a worker is "
        "down); leaving it.",
        _CLOSE_WAIT_SECS,
      )

  def _close_quietly(self):
    with contextlib.suppress(tf.errors.OpError):
      self._session.close()


# ---------------------------------------------------------------- running


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
      order (one unless sharded).
    gradients_files: `tuple` of `str`: the files of the gradients, or `()`.
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
  not yet done, and the complete result is renamed to `output`.

  Args:
    graph_def: a frozen `tf.compat.v1.GraphDef` (variables folded into
      constants), e.g. from `tf1hess.legacy.load_graph_def`.
    xs: `str`, name of the input tensor (e.g. "x:0"), batch first, of shape
      `(None, d...)`; it is fed the samples (cast to its dtype).
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

  Returns:
    A `RunSummary`.

  Raises:
    FileNotFoundError: when `input` or an output directory does not exist.
    TypeError: when `input` is not floating-point, `xs` or `ys` is not a
      floating tensor, or `dtype` is not one of `OUTPUT_DTYPES`.
    ValueError: for unknown tensor names (the message lists the closest
      names), input samples whose shape does not match `xs`, an empty or
      malformed input, an output name that is not `.npy`, `ys` that does
      not depend on `xs`, malformed `worker_hosts`, or an unfinished run on
      `output` with other settings, or another run writing `output`.
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
  _checks.check_positive_int(batch_size, "batch_size")
  _checks.check_positive_int(max_file_bytes, "max_file_bytes")
  out_dtype = _output_dtype(dtype)
  hosts = (
    None if worker_hosts is None else cluster.parse_worker_hosts(worker_hosts)
  )
  output = _check_output_path(output, "output")
  if gradients_output is not None:
    gradients_output = _check_output_path(gradients_output, "gradients_output")
    if os.path.abspath(gradients_output) == os.path.abspath(output):
      raise ValueError(
        f"`gradients_output` must differ from `output`; both are {output}."
      )
  if not isinstance(graph_def, tf.compat.v1.GraphDef):
    raise TypeError(
      "`graph_def` must be a tf.compat.v1.GraphDef; saw "
      f"{type(graph_def).__name__}."
    )
  reader = open_input(input, input_key)
  for arg, path in (("output", output), ("gradients_output", gradients_output)):
    if path and os.path.abspath(path) == os.path.abspath(reader.path):
      raise ValueError(f"`{arg}` must not overwrite `input` {reader.path}.")
  if not os.path.exists(output + ".progress.json"):  # Again under the lock.
    _check_overwrite([output, gradients_output], overwrite)
  graph_def = _without_devices(graph_def)
  if hosts is not None:
    cluster.check_reachable(hosts, wait=connect_timeout)
  engine = _Engine(
    graph_def,
    xs,
    ys,
    reader,
    gradients_output is not None,
    check_independence,
    hosts,
    timeout,
  )
  try:
    return _run(
      engine,
      reader,
      output,
      gradients_output,
      batch_size,
      out_dtype or engine.hessian_dtype,
      resume,
      overwrite,
      max_file_bytes,
      progress_interval,
      settings={
        "graph_sha256": _graph_digest(graph_def),
        "xs": xs,
        "ys": ys,
        "input": os.path.abspath(reader.path),
        "input_bytes": os.path.getsize(reader.path),
        "input_mtime_ns": os.stat(reader.path).st_mtime_ns,
        "input_key": input_key,
        "num_samples": reader.num_samples,
        "feature_shape": list(reader.feature_shape),
        "batch_size": batch_size,
        "dtype": (out_dtype or engine.hessian_dtype).name,
        "gradients_output": (
          os.path.abspath(gradients_output) if gradients_output else None
        ),
        "max_file_bytes": max_file_bytes,
        "check_independence": bool(check_independence),
      },
    )
  finally:
    engine.close()


def _run(
  engine,
  reader,
  output,
  gradients_output,
  batch_size,
  out_dtype,
  resume,
  overwrite,
  max_file_bytes,
  progress_interval,
  settings,
):
  """Creates or resumes the outputs, computes the missing batches, renames."""
  n = reader.num_samples
  k = int(np.prod(reader.feature_shape))
  num_batches = -(-n // batch_size)
  hess = _NpyFiles(
    "hessians",
    output,
    n,
    (k, k),
    out_dtype,
    _rows_per_file(batch_size, k * k * out_dtype.itemsize, max_file_bytes),
  )
  files = [hess]
  if gradients_output:
    grads = _NpyFiles(
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
      locks.enter_context(_lock(f.output))
    manifest = _Manifest(output, settings)
    checksums = _Checksums(output, len(files))
    manifest.partial_files = [
      os.path.abspath(p) for f in files for p in f.partials
    ]
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
      if isinstance(error, OSError) and error.errno in _NO_SPACE:
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


def _check_overwrite(outputs, overwrite):
  """Refuses to replace an existing result unless `overwrite`.

  Args:
    outputs: `[output, gradients_output]`, the second may be `None`.
    overwrite: `bool`.
  """
  if overwrite:
    return
  for arg, path in zip(("output", "gradients_output"), outputs):
    existing = _existing_outputs(path) if path else []
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
  recorded = _Intervals(state["completed"])
  done = _Intervals()
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


def _mib(nbytes):
  return f"{nbytes / 2**20:.1f} MiB"


@contextlib.contextmanager
def _lock(output):
  """Holds the exclusive lock `OUTPUT.lock` during the run, or raises.

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
        f"`output` is being written by another run ({path} is locked); "
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
    new = _Intervals(manifest.done.ranges)
    new.add(index)
    manifest.save(num_batches, new)
    progress.update(values["hessians"].shape[0], len(new))

  pending = reader.batches(
    batch_size, done.first_missing(), lambda i: i not in done
  )
  if engine.hosts is None:
    computed = 0
    for index, batch in pending:
      record(index, engine.run(0, batch))
      computed += 1
    return computed
  return _dispatch(engine, pending, record)


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


def _dispatch(engine, pending, record):
  """Runs batches on every replica at once; records results as they come.

  Each batch runs in a daemon thread, at most one per worker, while this
  thread waits with a timeout: it stays responsive to Ctrl-C, looks at the
  workers every `_WATCH_SECS` (a worker that takes no connection twice in
  a row is lost; a batch past `timeout` marks its worker silent) and gives
  up on batches that cannot return (a session whose master, worker 0, is
  gone waits for it for ever). On a failure no new batch is sent; the
  batches still running are recorded if they finish while the workers are
  watched, then the failure is raised naming the worker.
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
