"""The outputs of `compute_hessians` and what makes them resumable.

The sharded `.npy` files written with ordinary file I/O (`NpyFiles`), the
CRC-32 of every finished batch (`Checksums`), the progress file with the
run's fingerprint (`Manifest`), and the output paths.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import struct
import zlib

import numpy as np

from tf1hess import _checks
from tf1hess import _files
from tf1hess.streaming.readers import read_npy_header


def _shard_paths(output, num_files):
  if num_files == 1:
    return [output]
  stem = output[: -len(".npy")]
  return [f"{stem}-{i:05d}-of-{num_files:05d}.npy" for i in range(num_files)]


def _shard_pattern(output):
  """The names of the shard files of `output`, as a regular expression of
  the base name."""
  stem = output[: -len(".npy")] if output.endswith(".npy") else output
  base = os.path.basename(stem)
  return re.compile(re.escape(base) + r"-(\d{5})-of-(\d{5})\.npy$")


def is_file_of(path, output):
  """Whether `path` names `output` or one of the shards it may be split
  into (`NAME-00000-of-0000S.npy` beside it)."""
  if path == output:
    return True
  return os.path.dirname(path) == os.path.dirname(output) and bool(
    _shard_pattern(output).match(os.path.basename(path))
  )


def _shard_sets(output):
  """`{num_files: [names]}` of the shard files of `output` that exist.

  The names are in the form of `output` (relative when it is), as
  `_shard_paths` makes them.
  """
  directory = os.path.dirname(output)
  pattern = _shard_pattern(output)
  shards = {}
  for name in os.listdir(directory or os.curdir):
    match = pattern.match(name)
    if match:
      shards.setdefault(int(match.group(2)), []).append(
        os.path.join(directory, name)
      )
  return shards


def existing_outputs(output):
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
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NpyFiles:
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
          shape, _, dtype = read_npy_header(io.BytesIO(head), path)
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
    for stale in existing_outputs(self.output):
      if stale not in self.finals:  # An earlier result, now out of date.
        with contextlib.suppress(FileNotFoundError):
          os.remove(stale)

  def remove_partials(self):
    for partial in self.partials:
      with contextlib.suppress(FileNotFoundError):
        os.remove(partial)


class Checksums:
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


class Intervals:
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


def _fingerprint(settings):
  return hashlib.sha256(
    json.dumps(settings, sort_keys=True).encode()
  ).hexdigest()


class Manifest:
  """The progress file of a run: its settings and its completed batches.

  Besides the settings (whose fingerprint a resumed run must match), it
  records the strategies (`tf1hess.batch_hessians`' `method`, `chunk_size`,
  `parallel_iterations`) of the runs that wrote it, which a resumed run may
  change: they agree to float rounding, not bit for bit. Progress files written
  before the strategy could be chosen have no "strategies"; they resume
  alike.
  """

  FORMAT = "tf1hess.streaming/1"
  # Settings recorded since a later version: a progress file without one
  # is compared without it.
  ADDED_SETTINGS = ("input_sample_sha256",)
  # Tensor names, recorded in full ("x:0" for "x") since a later version.
  NAME_SETTINGS = ("xs", "ys")

  def __init__(self, output, settings, strategy):
    self.path = output + ".progress.json"
    self.settings = settings
    self.fingerprint = _fingerprint(settings)
    self.done = Intervals()
    self.partial_files = []
    self.strategies = [strategy]

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
    old = state.get("settings", {})
    settings = {
      k: v
      for k, v in self.settings.items()
      if k in old or k not in self.ADDED_SETTINGS
    }
    for k in self.NAME_SETTINGS:  # Recorded as typed by earlier versions.
      if k in old and _checks.full_tensor_names(old[k]) == settings.get(k):
        settings[k] = old[k]
    if state["fingerprint"] == _fingerprint(settings):
      return
    changed = sorted(
      k for k in set(old) | set(settings) if old.get(k) != settings.get(k)
    )
    raise ValueError(
      f"`output` has an unfinished run with other settings "
      f"({', '.join(changed)} differ; see {self.path}); rerun it with its "
      "settings to finish it, or pass --noresume (resume=False) to start "
      "over."
    )

  def add_strategies(self, state, legacy):
    """Adds the strategies of the run being resumed; returns the others.

    Args:
      state: the `dict` that `load` returned.
      legacy: the strategy (a `dict`) of progress files that record none:
        the only one of the version that wrote them.

    Returns:
      A `list` of the earlier strategies (`dict`s) other than this run's.
    """
    current = self.strategies[-1]
    earlier = state.get("strategies") or [legacy]
    self.strategies = [s for s in earlier if s != current] + [current]
    return self.strategies[:-1]

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
      "strategies": self.strategies,
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


def check_output_path(path, arg):
  """Checks the output path `path` (argument `arg`); returns it absolute.

  Every file of a run is named from the returned path, so that names of
  the same file compare equal whatever the current directory: a relative
  `output` must not make `finish` take the shards it wrote (named from
  `output`) for stale ones (found in its directory).
  """
  path = os.fspath(path)
  if not path.endswith(".npy"):
    raise ValueError(f"`{arg}` must be a .npy file name; saw {path}.")
  path = os.path.abspath(path)
  directory = os.path.dirname(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"`{arg}` directory does not exist: {directory}")
  _files.check_writable(directory, arg)
  if os.path.isdir(path):
    raise ValueError(f"`{arg}` must be a file name; saw the directory {path}.")
  return path
