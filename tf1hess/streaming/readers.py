"""The inputs of `compute_hessians`: `.npy`, `.npz`, `.csv` and TFRecord.

Each reader yields batches without loading the file whole, and is checked
before the first output file is written (`open_input`).
"""

import abc
import codecs
import contextlib
import os
import re
import zipfile
import zlib

from absl import logging
import numpy as np
import tensorflow as tf

from tf1hess import _signals
from tf1hess import _tf_errors


_NPY = (".npy",)
_NPZ = (".npz",)
_CSV = (".csv",)
_TFRECORD = (".tfrecord", ".tfrecords", ".tfr")
_GZIP = ".gz"

# A number as `tf.strings.to_number` (strtod) reads it in a CSV field.
_NUMBER = (
  r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf(inity)?|nan)"
)
# ASCII digits only, as RE2's `\d` (the validation pass, `tf.strings`).
_NUMBER_RE = re.compile(_NUMBER, re.IGNORECASE | re.ASCII)
# A field in double quotes, as spreadsheets write every field.
_QUOTED = r'^"(.*)"$'
# Spaces at either end of a field or line, for RE2: those of Python's
# `str.strip()` (a spreadsheet's non-breaking space, U+00A0, among them),
# not only the ASCII ones of `tf.strings.strip`.
_EDGE_SPACES = r"^[\t-\r\x1c-\x1f\x{85}\p{Z}]+|[\t-\r\x1c-\x1f\x{85}\p{Z}]+$"


def _strip(strings):
  """`tf.strings` without the spaces at their ends (`_EDGE_SPACES`)."""
  return tf.strings.regex_replace(strings, _EDGE_SPACES, "")


def _csv_fields(line):
  """The fields of a CSV line, stripped, out of their double quotes."""
  fields = [field.strip() for field in line.split(",")]
  return [re.sub(_QUOTED, r"\1", field).strip() for field in fields]


def _is_csv_header(fields, path, lineno):
  """Whether the first line's `fields` are a header, not a sample.

  A header has a field that is neither a number nor empty, or is pandas'
  default, the column numbers 0 to K - 1 of `DataFrame(x).to_csv(path,
  index=False)` (K >= 2: a sample of one feature "0" is data). With the
  index (`to_csv(path)`) the rows would start with their row number, which
  is not a feature: that file is refused.
  """
  names = [str(i) for i in range(len(fields))]
  if len(fields) >= 2 and fields[0] == "" and fields[1:] == names[:-1]:
    raise ValueError(
      f"`input` {path} line {lineno} is the header of pandas' "
      "`DataFrame.to_csv` with the index: every row then starts with its "
      "row number, which is not a feature. Write the file with "
      "`to_csv(path, index=False)`."
    )
  if len(fields) >= 2 and fields == names:
    return True
  return not all(not f or _NUMBER_RE.fullmatch(f) for f in fields)


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


def read_npy_header(f, path):
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
  if fortran and sum(d > 1 for d in shape) > 1:
    # Fortran order is C order only where one axis at most is longer than 1.
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
        read_npy_header(f, self.path)
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
  """Yields the elements of `make_dataset()` as numpy values.

  The session is closed by `close()`, not by leaving a `with` block:
  `Session.__exit__` on an exception (the `GeneratorExit` of a generator
  closed unfinished) closes it from a new thread, and a generator left
  open until the interpreter exits (an interrupted run) is closed where
  no thread starts any more: the process hung.
  """
  graph = tf.Graph()
  with graph.as_default():
    element = tf.compat.v1.data.make_one_shot_iterator(
      make_dataset()
    ).get_next()
  session = tf.compat.v1.Session(graph=graph)
  try:
    while True:
      try:
        with _signals.interrupts_held():
          element_value = session.run(element)
      except tf.errors.OutOfRangeError:
        return
      yield element_value
  finally:
    session.close()


# Lines per step of the validation pass over a CSV or TFRecord file.
_SCAN_BATCH = 8192


class _CsvReader(_DatasetReader):
  """Numeric comma-separated rows, read through `tf.data` in batches.

  Blank lines are skipped; a first line with a field that is neither a
  number nor empty, or of pandas' default column names (0, 1, ..., K - 1),
  is a header. Fields may be in double quotes, and the
  file may start with a byte-order mark. A validation pass at open time
  counts the rows and finds the first bad line, so that a bad file fails
  before any output is written.
  """

  def __init__(self, path):
    self.path = path
    self.dtype = np.dtype(np.float64)
    self._header_line = 0
    width = None
    with open(path, "rb") as f:
      self._bom = f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8
    with open(path, encoding="utf-8-sig", errors="replace") as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        fields = _csv_fields(line)
        width = len(fields)
        if _is_csv_header(fields, path, lineno):
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
    if self._bom:
      lines = lines.map(
        lambda n, line: (n, tf.strings.regex_replace(line, "^\ufeff", ""))
      )
    header = self._header_line
    return lines.filter(
      lambda n, line: tf.logical_and(
        n > header, tf.strings.length(_strip(line)) > 0
      )
    )

  @staticmethod
  def _fields(lines):
    """`_csv_fields` of each line, a ragged tensor."""
    fields = _strip(tf.strings.split(lines, ","))
    return _strip(tf.strings.regex_replace(fields, _QUOTED, r"\1"))

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
    fields = _csv_fields(line)
    width = self.feature_shape[0]
    if len(fields) != width:
      raise ValueError(
        f"`input` rows must all have {width} fields like the first one; "
        f"{self.path} line {lineno} has {len(fields)}."
      )
    column, field = next(
      (i, f) for i, f in enumerate(fields, 1) if not _NUMBER_RE.fullmatch(f)
    )
    empty = ""
    if not field:
      last = column == len(fields)
      empty = " (do the rows end with a comma?)" if last else " (empty)"
    raise TypeError(
      "`input` must hold floating-point numbers only; "
      f"{self.path} line {lineno} field {column} is {field!r}{empty}."
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

# A zip member's local file header (PKWARE APPNOTE 4.3.7): 30 fixed bytes,
# of which the file name length and the extra field length (two little-
# endian uint16) sit at bytes 26 to 29; the name, the extra field and then
# the member's data follow.
_LOCAL_HEADER_BYTES = 30
_LOCAL_HEADER_LENGTHS_AT = 26


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
      shape, fortran, dtype = read_npy_header(f, path)
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
    f.seek(info.header_offset + _LOCAL_HEADER_LENGTHS_AT)
    name_length, extra_length = np.frombuffer(f.read(4), "<u2")
  offset = (
    info.header_offset
    + _LOCAL_HEADER_BYTES
    + int(name_length)
    + int(extra_length)
  )
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
  - `.csv`: numeric comma-separated rows of K values, optional header line
    (with a field that is not a number, or pandas' default 0, ..., K - 1),
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
      shape, fortran, dtype = read_npy_header(f, path)
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
