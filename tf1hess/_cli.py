"""Helpers for the absl scripts: shared flags and one-line errors.

Only scripts import this module (it defines absl flags and exits); the
library writes files through `_files` and reads TensorFlow's errors through
`_tf_errors`.
"""

import contextlib
import dataclasses
import os
import signal
import sys
import threading

from absl import flags
from absl import logging
import tensorflow as tf

from tf1hess import plan as plan_lib
from tf1hess import _tf_errors
from tf1hess.streaming import engine as streaming_engine

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

  def xs_value(self):
    """`--xs` as one name, or a list where names are separated by commas
    (for the scripts that take several)."""
    xs = [name.strip() for name in self.xs.value.split(",")]
    return xs[0] if len(xs) == 1 else xs


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
          "tag",
          "serve",
          "The tag of the SavedModel's MetaGraph; several separated by"
          " commas (serve,gpu) for a MetaGraph of several tags.",
        ),
        xs=flags.DEFINE_string(
          "xs",
          None,
          "Name of the batched input tensor, e.g. x:0 (export_hessian_graph:"
          " several, separated by commas, x:0,t:0).",
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


@dataclasses.dataclass(frozen=True)
class PlanFlags:
  """The flags that choose how the rows of the Hessians are built."""

  method: flags.FlagHolder
  chunk_size: flags.FlagHolder
  parallel_iterations: flags.FlagHolder

  def plan(self):
    """The `tf1hess.Plan` the flags give."""
    return plan_lib.Plan(
      method=self.method.value,
      chunk_size=self.chunk_size.value,
      parallel_iterations=self.parallel_iterations.value,
    )


_PLAN_FLAGS = []


def define_plan_flags():
  """Defines the plan flags once per process and returns their holders.

  `--method`, `--chunk_size` and `--parallel_iterations`, the options of
  `tf1hess.batch_hessians` that choose how the rows are built (not what
  they are). Scripts share them so that several can be imported in one
  process (their tests).

  Returns:
    A `PlanFlags`.
  """
  if not _PLAN_FLAGS:
    _PLAN_FLAGS.append(
      PlanFlags(
        method=flags.DEFINE_enum(
          "method",
          "auto",
          list(plan_lib.METHODS),
          "How the rows of each Hessian are built; all give the same "
          "Hessians to float rounding. while_loop: one backward pass per "
          "row (the reference, least memory); pfor: the rows of a chunk "
          "vectorized into one pass (faster for many features, more "
          "memory); forward: the forward engine (fails naming an op it has "
          "no rule for); auto: picks by the number of features and the "
          "graph (docs/speed.md).",
        ),
        chunk_size=flags.DEFINE_integer(
          "chunk_size",
          None,
          "Rows per vectorized backward pass (pfor, or auto when it "
          "vectorizes): smaller uses less memory; default: all rows at once.",
          lower_bound=1,
        ),
        parallel_iterations=flags.DEFINE_integer(
          "parallel_iterations",
          None,
          "Rows of the row loop that may run in parallel (while_loop, or "
          "auto when it loops); default: 10.",
          lower_bound=1,
        ),
      )
    )
  return _PLAN_FLAGS[0]


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
    exit_with(f"{prog}: error: {_tf_errors.error_summary(error)}")


def exit_with(status):
  """`sys.exit(status)`, but where a cluster session is still closing in a
  thread left behind (`streaming.engine.closing_left`), whose end at
  Python's exit would abort the process: then `status` (a message is
  printed to stderr and exits 1, as `sys.exit`) ends it at once, the
  buffers and logs flushed."""
  if not streaming_engine.closing_left():
    sys.exit(status)
  if isinstance(status, str):
    print(status, file=sys.stderr)
    status = 1
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def _interrupt_again(unraisable):
  """`sys.unraisablehook`: a Ctrl-C that a callback swallowed is sent again,
  from another thread, so that it lands once the callback has returned (a
  signal raised here would be handled, and dropped, in the hook)."""
  if issubclass(unraisable.exc_type, KeyboardInterrupt):
    threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT)).start()
  else:
    sys.__unraisablehook__(unraisable)


def interrupt_with_keyboard_interrupt():
  """Ctrl-C raises `KeyboardInterrupt` in the script, and is not lost.

  Python's handler raises it wherever the program is, and an exception
  raised inside a garbage-collector callback (JAX, which TensorFlow may
  import, registers one) is printed and dropped: the run went on to the
  end. Such a dropped interrupt is sent again, to land after the callback
  (and again, should it meet another).
  """
  signal.signal(signal.SIGINT, signal.default_int_handler)
  sys.unraisablehook = _interrupt_again
