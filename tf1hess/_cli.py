"""Helpers for the absl scripts: shared flags, one-line errors, atomic files."""

import contextlib
import dataclasses
import glob
import os
import re
import shutil
import sys
import tempfile

from absl import flags
import tensorflow as tf

# What a script reports as a one-line error instead of a traceback: bad
# arguments, missing or unreadable files, and TensorFlow run-time errors.
USER_ERRORS = (ValueError, TypeError, OSError, KeyError, tf.errors.OpError)


# Lines of a TensorFlow run-time error that do not say what went wrong.
_TF_NOISE = re.compile(
  r"^(Graph execution error:|Detected at node|Node: |From /job:|"
  r"Additional GRPC error|File \"|\[\[|Traceback|\(\d+\) )"
)

# A line that says something: rules such as "=====" do not.
_WORDS = re.compile(r"\w")


def error_summary(error):
  """Returns the line of an error message that says what failed.

  Graph-mode run-time errors start with "Graph execution error:" and the
  Python stack of the failing op; this keeps the first other line that
  holds a word (not a rule of "=" signs).

  Args:
    error: an exception, e.g. a `tf.errors.OpError`.

  Returns:
    A one-line `str`.
  """
  message = getattr(error, "message", None) or str(error)
  if isinstance(error, KeyError) and error.args:
    message = str(error.args[0])
  for line in message.splitlines():
    if _WORDS.search(line) and not _TF_NOISE.match(line.strip()):
      if not line.startswith((" ", "\t")):
        return line.strip()
  lines = [line.strip() for line in message.splitlines() if _WORDS.search(line)]
  return lines[0] if lines else type(error).__name__


@dataclasses.dataclass(frozen=True)
class ModelFlags:
  """The flags that name a saved model and its tensors, shared by scripts."""

  saved_model: flags.FlagHolder
  graph: flags.FlagHolder
  meta_graph: flags.FlagHolder
  checkpoint: flags.FlagHolder
  tag: flags.FlagHolder
  xs: flags.FlagHolder
  ys: flags.FlagHolder
  check_independence: flags.FlagHolder

  def model_kwargs(self):
    """The keyword arguments of `tf1hess.legacy.load_graph_def`."""
    return {
      "saved_model": self.saved_model.value,
      "graph": self.graph.value,
      "meta_graph": self.meta_graph.value,
      "checkpoint": self.checkpoint.value,
      "tag": self.tag.value,
    }

  def ys_value(self):
    """`--ys` as one name, or a list when several were given."""
    ys = self.ys.value
    return ys[0] if len(ys) == 1 else ys


_MODEL_FLAGS = []


def define_model_flags():
  """Defines the model flags once per process and returns their holders.

  `--saved_model` | `--graph` | `--meta_graph` with `--checkpoint`, `--tag`,
  `--xs`, `--ys` and `--check_independence`. Every script that loads a model
  calls this, so that several scripts can be imported in one process (their
  tests) without defining a flag twice.

  Returns:
    A `ModelFlags`.
  """
  if not _MODEL_FLAGS:
    _MODEL_FLAGS.append(
      ModelFlags(
        saved_model=flags.DEFINE_string(
          "saved_model", None, "A TF1 SavedModel directory."
        ),
        graph=flags.DEFINE_string(
          "graph", None, "A frozen GraphDef file (binary .pb or text .pbtxt)."
        ),
        meta_graph=flags.DEFINE_string(
          "meta_graph",
          None,
          "A .meta file written by tf.compat.v1.train.Saver.",
        ),
        checkpoint=flags.DEFINE_string(
          "checkpoint",
          None,
          "The checkpoint prefix (or directory) of --meta_graph's variables.",
        ),
        tag=flags.DEFINE_string(
          "tag", "serve", "The SavedModel's MetaGraph tag."
        ),
        xs=flags.DEFINE_string(
          "xs",
          None,
          "Name of the batched input tensor, e.g. x:0.",
          required=True,
        ),
        ys=flags.DEFINE_list(
          "ys",
          None,
          "Name(s) of the per-sample output tensor(s), e.g. y:0; their sum "
          "is differentiated.",
          required=True,
        ),
        check_independence=flags.DEFINE_bool(
          "check_independence",
          False,
          "Fail at run time when samples are coupled (e.g. batch norm in "
          "training mode).",
        ),
      )
    )
  return _MODEL_FLAGS[0]


_OVERWRITE_FLAG = []


def define_overwrite_flag():
  """Defines `--overwrite` once per process and returns its holder.

  The rule of every tf1hess program: an existing output is refused unless
  `--overwrite` is given. Scripts share the flag so that several of them
  can be imported in one process (their tests).

  Returns:
    A `flags.FlagHolder` of `bool`.
  """
  if not _OVERWRITE_FLAG:
    _OVERWRITE_FLAG.append(
      flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace existing outputs; without it an output that exists is "
        "refused (an unfinished run of the same output is resumed).",
      )
    )
  return _OVERWRITE_FLAG[0]


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
    sys.exit(f"{prog}: error: {error_summary(error)}")


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
  next run that finishes `path` calls this.
  """
  parent, prefix, tmp_suffix = _temporary_name(path, suffix)
  pattern = glob.escape(prefix) + "*" + glob.escape(tmp_suffix)
  for stale in glob.glob(os.path.join(glob.escape(parent), pattern)):
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
