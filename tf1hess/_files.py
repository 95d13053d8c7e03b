"""Writing files so that an interrupted run leaves nothing half-written.

`atomic_output` writes under a temporary name beside the output and renames
it when complete; `remove_stale_temporaries` removes what a killed process
left. Used by the library (streaming, export) and the scripts alike.
"""

import contextlib
import glob
import os
import shutil
import tempfile


def check_writable(directory, arg):
  """Raises `PermissionError` unless a file can be created in `directory`
  (of argument `arg`).

  A file is created and removed: permission bits (`os.access`) say nothing
  to root, nor of file systems that take no new files (/sys, /proc).
  """
  try:
    fd, probe = tempfile.mkstemp(prefix=".tf1hess-write-check-", dir=directory)
  except OSError as error:
    raise PermissionError(
      f"`{arg}` directory is not writable: {directory} (creating a file "
      f"there fails: {error.strerror}); choose another directory."
    ) from None
  os.close(fd)
  os.remove(probe)


def _temporary_name(path, suffix):
  """`(directory, prefix, suffix)` of `atomic_output`'s temporaries."""
  path = os.path.abspath(path)
  return (
    os.path.dirname(path),
    "." + os.path.basename(path) + ".",
    ".tmp" + suffix,
  )


def remove_stale_temporaries(path, suffix=""):
  """Removes what `atomic_output(path, suffix)` left when its process died.

  A process killed (SIGKILL, power loss) while writing cannot clean up; the
  next run that finishes `path` calls this. It removes the temporary files,
  and the temporary directories of `directory=True` (with an old directory
  moved aside and not yet removed).
  """
  parent, prefix, tmp_suffix = _temporary_name(path, suffix)
  pattern = glob.escape(prefix) + "*" + glob.escape(tmp_suffix)
  for stale in glob.glob(os.path.join(glob.escape(parent), pattern)):
    if os.path.isdir(stale) and not os.path.islink(stale):
      shutil.rmtree(stale, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(stale)


def _empty_directory(path):
  real_dir = os.path.isdir(path) and not os.path.islink(path)
  return real_dir and not os.listdir(path)


@contextlib.contextmanager
def atomic_output(path, suffix="", directory=False):
  """Yields a temporary path beside `path`; renames it to `path` on success.

  On any exception the temporary file (or directory) is removed, so an
  interrupted or failed run leaves nothing half-written under `path`. A
  directory replaces whatever is at `path` (moved aside, then removed).

  Args:
    path: `str`, the final output path.
    suffix: `str`, ending of the temporary name (e.g. ".npy", which
      `np.save` would otherwise append).
    directory: `bool`, default `False`: make a temporary directory (for a
      SavedModel) instead of a file.

  Yields:
    The temporary path to write to, with the usual permissions (those of a
    new file or directory under the process' umask).
  """
  parent, prefix, tmp_suffix = _temporary_name(path, suffix)
  if directory:
    tmp = tempfile.mkdtemp(prefix=prefix, suffix=tmp_suffix, dir=parent)
  else:
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=tmp_suffix, dir=parent)
    os.close(fd)
  umask = os.umask(0)
  os.umask(umask)
  # mkstemp's 0600 and mkdtemp's 0700 are not what users expect.
  os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)
  try:
    yield tmp
    if directory and os.path.lexists(path) and not _empty_directory(path):
      # os.replace cannot replace a non-empty directory: move it aside.
      aside = tmp[: -len(tmp_suffix)] + ".old" + tmp_suffix
      os.rename(path, aside)
      os.replace(tmp, path)
      if os.path.isdir(aside) and not os.path.islink(aside):
        shutil.rmtree(aside, ignore_errors=True)
      else:
        os.remove(aside)
    else:
      os.replace(tmp, path)
  except BaseException:
    if directory:
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    raise
