"""Reading TensorFlow's error messages: every parse of their text is here.

TensorFlow's exceptions carry no structured reason, so a few places need
the text. Each pattern below was checked on TensorFlow 2.12 to 2.21: the
tests that reach it pass on each version of the matrix (COMPATIBILITY.md).
A pattern that stops matching on a new version makes those tests fail
rather than letting a message pass unread.
"""

import re

# Lines of a TensorFlow run-time error that do not say what went wrong.
_TF_NOISE = re.compile(
  r"^(Graph execution error:|Detected at node|Node: |From /job:|"
  r"[A-Z_]+: From /job:|"
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


def is_dtype_mismatch(summary):
  """Whether an `error_summary` says a TFRecord feature has another dtype.

  `tf.io.parse_example` raises `InvalidArgumentError` with "Data types don't
  match" (TensorFlow 2.12 to 2.21) for an int64 or bytes feature read as
  float.
  """
  return "Data types don't match" in summary


def first_sentence(error):
  """The first sentence of an error's message, without its final period.

  `tf.gradients` raises `LookupError("No gradient defined for
  operation'x' (op type: T). In general ...")` (TensorFlow 2.12 to 2.21,
  with no space before the name); the first sentence names the op.
  """
  return str(error).split(". ")[0].rstrip(".")


def is_sparse_gradient_error(error):
  """Whether a `TypeError` of `tf.gradients` is a gradient function's
  arithmetic on `IndexedSlices`.

  The gradient of a segment sum gathers the adjoint; the gradient of that
  gather is `IndexedSlices`, and the gradients of `TanhGrad`, `SigmoidGrad`
  and others multiply it with Python's `*`: "unsupported operand type(s)
  for *: 'IndexedSlices' and 'float'" (TensorFlow 2.12 to 2.21).
  """
  return isinstance(error, TypeError) and "'IndexedSlices'" in str(error)


def assertion_message(error, start):
  """The message of a failed assert (`tf.debugging.assert_*`) in `error`,
  from the text `start` on, or `None` where `error_summary` does not hold
  `start`.

  Its run-time error says "assertion failed: [<message>] [<what held>]
  [<values>] ..." (TensorFlow 2.12 to 2.21) on the line `error_summary`
  keeps; the first bracket after the message is joined to it.
  """
  summary = error_summary(error)
  at = summary.find(start)
  if at < 0:
    return None
  return summary[at:].replace("] [", " ", 1)
