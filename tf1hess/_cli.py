"""Helpers for the absl scripts: clean one-line failures and atomic outputs."""

import contextlib
import os
import sys
import tempfile

import tensorflow as tf

# What a script reports as a one-line error instead of a traceback: bad
# arguments, missing or unreadable files, and TensorFlow run-time errors.
USER_ERRORS = (ValueError, TypeError, OSError, KeyError, tf.errors.OpError)


@contextlib.contextmanager
def exit_on_error(prog):
  """Turns a user error into `prog: error: <message>` and exit status 1.

  Args:
    prog: `str`, the script's name, put in front of the message.

  Yields:
    Nothing; wrap the body of a script's `main` in it.
  """
  try:
    yield
  except USER_ERRORS as error:
    message = getattr(error, "message", None) or str(error)
    if isinstance(error, KeyError) and error.args:
      message = str(error.args[0])
    first = message.strip().splitlines()[0] if message.strip() else repr(error)
    sys.exit(f"{prog}: error: {first}")


@contextlib.contextmanager
def atomic_output(path, suffix=""):
  """Yields a temporary path beside `path`; renames it to `path` on success.

  On any exception the temporary file is removed, so an interrupted or failed
  run leaves nothing half-written under `path`.

  Args:
    path: `str`, the final output path.
    suffix: `str`, ending of the temporary name (e.g. ".npy", which
      `np.save` would otherwise append).

  Yields:
    The temporary path to write to.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(
    prefix="." + os.path.basename(path) + ".",
    suffix=".tmp" + suffix,
    dir=directory,
  )
  os.close(fd)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what users expect.
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
