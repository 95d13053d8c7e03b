"""Helpers for the absl scripts: shared flags and one-line errors.

Only scripts import this module (it defines absl flags and exits); the
library writes files through `_files` and reads TensorFlow's errors through
`_tf_errors`.
"""

import contextlib
import dataclasses
import sys

from absl import flags
import tensorflow as tf

from tf1hess import _tf_errors

# What a script reports as a one-line error instead of a traceback: bad
# arguments, missing or unreadable files, and TensorFlow run-time errors.
USER_ERRORS = (ValueError, TypeError, OSError, KeyError, tf.errors.OpError)


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
    sys.exit(f"{prog}: error: {_tf_errors.error_summary(error)}")
