"""Per-sample Hessians of a frozen graph over inputs larger than memory.

`compute_hessians` reads the samples of a file batch by batch, runs the
per-sample Hessians (`tf1hess.batch_hessians`, and optionally the gradients)
of a frozen `GraphDef` on each batch through one session, and writes each
batch into a `.npy` file at its place. Memory is bounded by the batch size,
whatever the number of samples:

- inputs are never loaded whole: a `.npy` (and an uncompressed `.npz`
  member) is memory-mapped one batch at a time; a compressed `.npz` member is
  decompressed as a stream, batch after batch (zip members cannot be
  memory-mapped); `.csv` and TFRecord files are read through `tf.data`;
- the `(N, K, K)` output is a `.npy` file created at its full size and
  filled batch by batch through a memory map of that batch only; when it
  would exceed `max_file_bytes`, it is split into shards
  `NAME-00000-of-00004.npy`, ... of whole batches.

Runs are resumable. Until a run is complete its data lives in
`OUTPUT.partial` beside a progress file `OUTPUT.progress.json` that records
a fingerprint of the run's settings and the completed batches; the progress
file is replaced atomically after each batch's data is flushed. A run that
is interrupted (Ctrl-C, killed, a lost worker) and started again with the
same settings computes only the missing batches; the partial files are
renamed to their final names only when every batch is done, so a file under
the final name is always complete, and it is byte for byte the file an
uninterrupted run writes.

With `worker_hosts`, the batches are spread over the workers of a TensorFlow
cluster (see `tf1hess.cluster`): one copy of the model per worker under
`tf.device("/job:worker/task:i")` in one graph, one session on the first
worker, one thread per worker. The results go into the same file, equal to
the single-machine result.
"""

import abc
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import threading
import time
import zipfile

from absl import logging
import numpy as np
import tensorflow as tf

from tf1hess import _checks
from tf1hess import _cli
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


class _MemmapReader(InputReader):
  """A `.npy` array (or stored `.npz` member) mapped one batch at a time.

  Each batch maps only its own rows and unmaps them when copied, so the
  pages of the input never accumulate in the process.
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
    for index in range(first_batch, self._count(batch_size)):
      if wanted is not None and not wanted(index):
        continue
      start = index * batch_size
      rows = min(batch_size, self.num_samples - start)
      view = np.memmap(
        self.path,
        dtype=self.dtype,
        mode="r",
        offset=self._offset + start * self._row_bytes,
        shape=(rows,) + self.feature_shape,
      )
      batch = np.array(view)
      del view
      yield index, batch


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
        f"{_cli.error_summary(error)}"
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
      summary = _cli.error_summary(error)
      records = f"records {count}..{count + _SCAN_BATCH - 1}"
      if "Data types don't match" in summary:
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
        f"{_cli.error_summary(error)}"
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


def _open_npz(path, key):
  """Returns the reader of member `key` of an `.npz` archive."""
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
    with archive.open(info) as f:
      shape, fortran, dtype = _read_npy_header(f, path)
      header_bytes = f.tell()
  _check_samples(shape, fortran, dtype, path)
  if info.compress_type != zipfile.ZIP_STORED:
    return _ZipStreamReader(path, info.filename, shape, dtype)
  with open(path, "rb") as f:  # Local file header: where the data starts.
    f.seek(info.header_offset + 26)
    name_length, extra_length = np.frombuffer(f.read(4), "<u2")
  offset = info.header_offset + 30 + int(name_length) + int(extra_length)
  return _MemmapReader(
    path,
    offset + header_bytes,
    shape,
    dtype,
    f"stored .npz member {key!r}, memory-mapped a batch at a time",
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
    reader = _MemmapReader(
      path, offset, shape, dtype, ".npy memory-mapped a batch at a time"
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
  stem = output[: -len(".npy")] if output.endswith(".npy") else output
  directory = os.path.dirname(os.path.abspath(output))
  base = os.path.basename(stem)
  pattern = re.compile(re.escape(base) + r"-(\d{5})-of-(\d{5})\.npy$")
  shards = {}
  for name in os.listdir(directory):
    match = pattern.match(name)
    if match:
      shards.setdefault(int(match.group(2)), []).append(name)
  for total, names in sorted(shards.items(), reverse=True):
    if len(names) == total:
      return [os.path.join(directory, n) for n in sorted(names)]
  return []


class _NpyFiles:
  """An `(N,) + row_shape` array written batch by batch into `.npy` files.

  The files are created at full size under `FINAL.partial` names (sparse
  until written) and renamed by `finish`. Each write maps only the rows of
  its batch, copies them in, flushes them to the file and unmaps them.
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
    self._offsets = None

  def _rows(self, i):
    return min(self.rows_per_file, self.num_rows - i * self.rows_per_file)

  def create(self):
    offsets = []
    for i, path in enumerate(self.partials):
      array = np.lib.format.open_memmap(
        path,
        mode="w+",
        dtype=self.dtype,
        shape=(self._rows(i),) + self.row_shape,
      )
      offsets.append(array.offset)
      del array
    self._offsets = offsets

  def reopen(self):
    """Checks the partial files of a run being resumed; finds their data."""
    offsets = []
    for i, path in enumerate(self.partials):
      if not os.path.exists(path):
        offsets.append(None)
        continue
      with open(path, "rb") as f:
        shape, _, dtype = _read_npy_header(f, path)
        offsets.append(f.tell())
      expected = (self._rows(i),) + self.row_shape
      if shape != expected or dtype != self.dtype:
        raise ValueError(
          f"`output` partial file {path} holds {dtype} {shape}, not the "
          f"{self.dtype} {expected} of this run; rerun with --noresume "
          "(resume=False) to start over."
        )
    self._offsets = offsets

  def missing(self):
    return [
      (p, f)
      for p, f in zip(self.partials, self.finals)
      if not os.path.exists(p) and not os.path.exists(f)
    ]

  def write(self, start, values):
    i, row = divmod(start, self.rows_per_file)
    view = np.memmap(
      self.partials[i],
      dtype=self.dtype,
      mode="r+",
      offset=self._offsets[i] + row * self._row_bytes,
      shape=values.shape,
    )
    view[...] = values
    view.flush()
    del view

  def finish(self):
    for partial, final in zip(self.partials, self.finals):
      if os.path.exists(partial):
        os.replace(partial, final)
    if len(self.finals) > 1:  # An earlier unsharded result is out of date.
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.output)

  def remove_partials(self):
    for partial in self.partials:
      with contextlib.suppress(FileNotFoundError):
        os.remove(partial)


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

  def save(self, num_batches):
    state = {
      "format": self.FORMAT,
      "fingerprint": self.fingerprint,
      "settings": self.settings,
      "num_batches": num_batches,
      "completed": self.done.ranges,
      "partial_files": self.partial_files,
    }
    with _cli.atomic_output(self.path, suffix=".json") as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())

  def remove(self):
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path)
    _cli.remove_stale_temporaries(self.path, suffix=".json")


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
  timeout=None,
  connect_timeout=60.0,
  progress_interval=10.0,
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
    timeout: `float` seconds or `None` (default, no limit): on a cluster,
      the longest a batch may take before the run fails.
    connect_timeout: `float` seconds, default 60: on a cluster, how long to
      wait at the start for every worker to accept connections.
    progress_interval: `float` seconds between progress log lines.

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
      `output` with other settings.
    tf.errors.UnavailableError: when a worker cannot be reached at the
      start, or is lost during the run (the message names the worker;
      finished batches are kept for the next call).
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
  manifest = _Manifest(output, settings)
  manifest.partial_files = [
    os.path.abspath(p) for f in files for p in f.partials
  ]
  state = manifest.load()
  if state is not None:  # Neither resume nor discard a run still going on.
    for path in set(state.get("partial_files", [])) | set(hess.partials):
      with _lock(path):
        pass
  if state is not None and not resume:
    logging.info("Discarding the unfinished run of %s.", output)
    for path in state.get("partial_files", []):
      if path.endswith(".partial"):
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
    manifest.remove()
    state = None
  created = state is None
  if state is not None:
    manifest.check_same_run(state)
    manifest.done = _Intervals(state["completed"])
    for f in files:
      lost = f.missing()
      if lost:
        raise ValueError(
          f"`output` has a progress file {manifest.path} but its partial "
          f"file {lost[0][0]} is gone; rerun with --noresume "
          "(resume=False) to start over."
        )
      f.reopen()
    logging.info(
      "Resuming %s: %d of %d batches already done.",
      output,
      len(manifest.done),
      num_batches,
    )
  else:
    for f in files:
      f.create()
    manifest.save(num_batches)
  resumed = len(manifest.done)
  computed = 0
  try:
    with _lock(hess.partials[0]):
      computed = _compute_missing(
        engine,
        reader,
        files,
        manifest,
        batch_size,
        num_batches,
        out_dtype,
        progress_interval,
      )
  except KeyboardInterrupt:
    logging.warning(
      "Interrupted with %d of %d batches of %s done; run the same command "
      "again to resume.",
      len(manifest.done),
      num_batches,
      output,
    )
    raise
  except Exception:
    if created and not len(manifest.done):
      for f in files:  # Nothing to resume: leave nothing behind.
        f.remove_partials()
      manifest.remove()
    raise
  for f in files:
    f.finish()
  manifest.remove()
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


@contextlib.contextmanager
def _lock(path):
  """Holds an exclusive lock on `path` (if it exists) during the run."""
  if fcntl is None or not os.path.exists(path):
    yield
    return
  with open(path, "rb") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ValueError(
        f"`output` is being written by another run ({path} is locked); "
        "wait for it or stop it first."
      ) from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _compute_missing(
  engine,
  reader,
  files,
  manifest,
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
    for f in files:
      f.write(start, values[f.key].astype(out_dtype, copy=False))
    done.add(index)
    manifest.save(num_batches)
    progress.update(values["hessians"].shape[0], len(done))

  pending = reader.batches(
    batch_size, done.first_missing(), lambda i: i not in done
  )
  if len(engine.replicas) == 1:
    computed = 0
    for index, batch in pending:
      record(index, engine.run(0, batch))
      computed += 1
    return computed
  return _dispatch(engine, pending, record)


def _dispatch(engine, pending, record):
  """Runs batches on every replica at once; records results as they come.

  One thread per replica keeps at most one batch in flight per worker. On a
  failure no new batch is sent; the batches still running are waited for
  and recorded, then the failure is raised naming the worker.
  """
  free = list(range(len(engine.replicas)))
  running = {}
  failure = None
  computed = 0
  exhausted = False
  with concurrent.futures.ThreadPoolExecutor(len(free)) as pool:
    while True:
      while free and not exhausted and failure is None:
        item = next(pending, None)
        if item is None:
          exhausted = True
          break
        replica = free.pop(0)
        future = pool.submit(engine.run, replica, item[1])
        running[future] = (replica, item[0])
      if not running:
        break
      finished, _ = concurrent.futures.wait(
        running, return_when=concurrent.futures.FIRST_COMPLETED
      )
      for future in finished:
        replica, index = running.pop(future)
        try:
          values = future.result()
        except tf.errors.OpError as error:
          if failure is None:
            failure = (replica, index, error)
          continue
        record(index, values)
        computed += 1
        free.append(replica)
  if failure is not None:
    replica, index, error = failure
    if isinstance(
      error,
      (
        tf.errors.UnavailableError,
        tf.errors.DeadlineExceededError,
        tf.errors.AbortedError,
        tf.errors.CancelledError,
        tf.errors.InternalError,
        tf.errors.UnknownError,
      ),
    ):
      raise cluster.worker_failure(
        engine.hosts, replica, index, _cli.error_summary(error)
      ) from error
    raise error
  return computed
