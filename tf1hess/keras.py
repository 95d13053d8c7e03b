"""Per-sample derivatives of Keras models with respect to their inputs.

Three ways in, one per kind of Keras code:

* Legacy graph-mode Keras (Keras 2: `tf.keras` on TensorFlow <= 2.15,
  `tf_keras` on >= 2.16; `legacy_keras()` returns it), used from TF1 session
  code:
  `model_hessians(model)` is `tf1hess.batch_hessians(model.output,
  model.input)`, built in the model's graph, to be run in the session that
  holds the model's variables (initialised or restored; Keras' own is
  `legacy_session()`). The batch dimension stays `None`.
* Models called eagerly, of either generation (Keras 3 `keras` and
  Keras 2): pass the model as the function,
  `tf1hess.eager.batch_hessians(model, x)`.
* Inside a model: the layer `BatchDerivatives(sub_model, order=2)` (for
  Keras 2) or `Keras3BatchDerivatives(sub_model, order=2)` (for Keras 3)
  outputs `[y, dy/dx, ..., d^n y/dx^n]` per sample of `sub_model` with respect
  to its input, and saves and loads with the model.

A linear model has a constant gradient and a Hessian of zeros; all three give
zeros there (of shape `(N, K, K)` for inputs `(N, K)`), never `None`.

Keras is optional: this module imports whichever generations are installed
(`import tf1hess` alone imports none), and a name that needs a missing one
raises `ImportError` saying what to install. Import `tf1hess.keras` before
loading a saved model that holds a `BatchDerivatives` layer, so that Keras
knows the layer.
"""

import importlib

import tensorflow as tf

from tf1hess import _checks
from tf1hess import _compat
from tf1hess import ops

legacy_keras = _compat.legacy_keras
keras3 = _compat.keras3


def legacy_session(model=None):
  """The session of graph-mode Keras 2 (`legacy_keras()`), which holds its
  models' variables: `get_session()` of its backend.

  `tf.compat.v1.keras.backend.get_session()` is that session only where
  `tf.compat.v1.keras` is Keras 2 (TensorFlow <= 2.15, or
  `TF_USE_LEGACY_KERAS=1`); from TensorFlow 2.16 on without that variable
  it is Keras 3, which has no sessions, and this returns tf_keras' own.

  Args:
    model: `None`, or a Keras 2 model: the session of the Keras it is
      from. On TensorFlow <= 2.15 with tf-keras installed too, `tf.keras`
      and `tf_keras` are two Keras 2, each with its own session, and only
      that of a model's Keras has initialized its variables.

  Returns:
    A `tf.compat.v1.Session` for the current default graph.

  Raises:
    ImportError: as `legacy_keras()`.
    TypeError: when `model` is not a Keras 2 model.

  Example:
    >>> import tensorflow as tf, tf1hess.keras
    >>> with tf.Graph().as_default():
    ...   sess = tf1hess.keras.legacy_session()
    ...   float(sess.run(tf.constant(2.0)))
    2.0
  """
  keras = legacy_keras()
  if model is not None and not isinstance(model, keras.Model):
    if not isinstance(model, _compat.legacy_keras_models()):
      raise TypeError(
        f"`model` must be a Keras 2 model ({keras.__name__}, or tf_keras); "
        f"saw {type(model).__name__}."
      )
    return importlib.import_module("tf_keras.src.backend").get_session()
  get_session = getattr(tf.compat.v1.keras.backend, "get_session", None)
  if get_session is None:  # tf.compat.v1.keras is Keras 3.
    get_session = importlib.import_module(
      f"{keras.__name__}.src.backend"
    ).get_session
  return get_session()


# The layers of the generations that are installed; the error for the others.
_MISSING = {}
try:
  from tf1hess._keras2_layer import BatchDerivatives  # noqa: F401
except ImportError as _error:
  _MISSING["BatchDerivatives"] = _error
try:
  from tf1hess._keras3_layer import Keras3BatchDerivatives  # noqa: F401
except ImportError as _error:
  _MISSING["Keras3BatchDerivatives"] = _error


def __getattr__(name):
  if name in _MISSING:
    raise ImportError(
      f"tf1hess.keras.{name} is not available: {_MISSING[name]}"
    ) from _MISSING[name]
  raise AttributeError(f"module 'tf1hess.keras' has no attribute {name!r}")


def _keras3_layer_type():
  try:
    return keras3().layers.Layer
  except ImportError:
    return ()


def _symbolic_io(model):
  """Returns `(inputs, outputs, single_input)` of a graph-mode Keras model."""
  if isinstance(model, _keras3_layer_type()):
    raise ValueError(
      "`model` is a Keras 3 model, which has no graph mode; use "
      "tf1hess.eager.batch_hessians(model, x) or the layer "
      "tf1hess.keras.Keras3BatchDerivatives."
    )
  if not isinstance(model, _compat.legacy_keras_models()):
    raise TypeError(
      "`model` must be a Keras 2 (tf.keras <= 2.15 or tf_keras) Model with "
      f"symbolic inputs and outputs; saw {type(model).__name__}."
    )
  inputs, outputs = model.inputs, model.outputs
  if not inputs or not outputs:
    raise ValueError(
      "`model` has no symbolic inputs and outputs yet (a Sequential model "
      "without an Input layer, or a subclassed model); give it a "
      "Keras Input, or call it on a placeholder `x` and use "
      "tf1hess.batch_hessians(model(x), x)."
    )
  tensors = list(inputs) + list(outputs)
  if not all(isinstance(t, tf.Tensor) and hasattr(t, "graph") for t in tensors):
    raise ValueError(
      "`model` was built eagerly (its outputs are "
      f"{type(outputs[0]).__name__}, not graph tensors); for such models "
      "use tf1hess.eager.batch_hessians(model, x), or build the model in "
      "graph mode (inside `with tf.Graph().as_default():` or after "
      "tf.compat.v1.disable_eager_execution())."
    )
  not_floating = [t for t in inputs if not t.dtype.is_floating]
  if not_floating:
    floating = [i for i, t in enumerate(inputs) if t.dtype.is_floating]
    raise ValueError(
      "Every input of `model` must be floating, since the derivatives are "
      "taken with respect to each; saw "
      + ", ".join(f"{t.name} ({t.dtype.name})" for t in not_floating)
      + ". For the floating ones only, call tf1hess.batch_hessians("
      f"model.outputs, [model.inputs[i] for i in {floating}]) (or another "
      "op of tf1hess) in the model's graph."
    )
  return list(inputs), list(outputs), len(inputs) == 1


def model_derivatives(
  model,
  order,
  name=None,
  unconnected_gradients="zero",
  parallel_iterations=None,
  method="auto",
  chunk_size=None,
  plan=None,
):
  """Per-sample derivatives of a graph-mode Keras 2 model's outputs.

  `tf1hess.batch_derivatives(model.outputs, model.inputs, order)`, built in
  the model's graph (also when another graph is the default): the outputs
  are summed per sample like `tf.gradients` does, so a model with one output
  per sample gives its derivative tensors.

  Args:
    model: a Keras 2 (`legacy_keras()`) `Model` built in graph mode, with
      symbolic inputs of rank >= 2 (batch first, usually `None`).
    order: `int` >= 1: 1 gives gradients, 2 Hessians, n the tensor of
      n-th derivatives (`K^(n-1)` backward passes).
    name: `str`, optional scope name; default "model_derivatives".
    unconnected_gradients: 'zero' (default) or 'none', as in
      `tf1hess.batch_hessians`.
    parallel_iterations: `int` or `None`, for the row loop.
    method: `str`, default "auto": how the rows are built, as in
      `tf1hess.batch_hessians` (docs/speed.md, docs/forward.md).
    chunk_size: `int` or `None`, for `method="pfor"`, as in
      `tf1hess.batch_hessians`.
    plan: a `tf1hess.Plan` in place of `parallel_iterations`, `method`
      and `chunk_size`, as in `tf1hess.batch_hessians`.

  Returns:
    A `Tensor` of shape `(N,) + (d1, ..., dm) * order` for a model with one
    input `(N, d1, ..., dm)`; a list of them (one per input) otherwise. Run
    it in the session that holds the model's variables, feeding
    `model.input`.

  Raises:
    TypeError: when `model` is not a Keras model.
    ValueError: when `model` is a Keras 3 model, was built eagerly, has no
      symbolic inputs yet, or `order` is not a positive int; and as
      `tf1hess.batch_derivatives`.

  Example:
    >>> import numpy as np, tensorflow as tf, tf1hess.keras
    >>> k = tf1hess.keras.legacy_keras()  # tf.keras <= 2.15, else tf_keras
    >>> with tf.Graph().as_default():
    ...   model = k.Sequential([
    ...       k.Input((3,)),
    ...       k.layers.Dense(8, activation="tanh"),
    ...       k.layers.Dense(1)])
    ...   d3 = tf1hess.keras.model_derivatives(model, order=3)
    ...   sess = tf1hess.keras.legacy_session()
    ...   sess.run(d3, {model.input: np.ones((5, 3), np.float32)}).shape
    (5, 3, 3, 3)
  """
  order = _checks.check_count(order, "order")
  inputs, outputs, single = _symbolic_io(model)
  with outputs[0].graph.as_default():
    result = ops.batch_derivatives(
      outputs,
      inputs,
      order,
      name=name or "model_derivatives",
      unconnected_gradients=unconnected_gradients,
      parallel_iterations=parallel_iterations,
      method=method,
      chunk_size=chunk_size,
      plan=plan,
    )
  return result[0] if single else result


def model_hessians(
  model,
  name=None,
  unconnected_gradients="zero",
  check_independence=False,
  parallel_iterations=None,
  method="auto",
  chunk_size=None,
  plan=None,
):
  """Per-sample Hessians of a graph-mode Keras 2 model's outputs.

  `tf1hess.batch_hessians(model.outputs, model.inputs)`, built in the
  model's graph: `H[i] = d^2 sum(model(x)[i]) / d x[i]^2`. Run it in the
  session that holds the model's variables (for example Keras' own,
  `tf1hess.keras.legacy_session(model)`, or your own session after
  `global_variables_initializer()` or a `Saver.restore`).

  Args:
    model: a Keras 2 (`legacy_keras()`) `Model` built in graph mode with
      symbolic inputs of rank >= 2 (batch first, usually `None`).
    name: `str`, optional scope name; default "model_hessians".
    unconnected_gradients: 'zero' (default): a linear model gives zeros;
      'none' gives `None` there, like `tf.gradients`.
    check_independence: `bool`, default `False`: add a run-time check that
      samples are independent (fails for batch norm in training mode).
    parallel_iterations: `int` or `None`, for the row loop.
    method: `str`, default "auto": how the rows are built, as in
      `tf1hess.batch_hessians` (docs/speed.md, docs/forward.md).
    chunk_size: `int` or `None`, for `method="pfor"`, as in
      `tf1hess.batch_hessians`.
    plan: a `tf1hess.Plan` in place of `parallel_iterations`, `method`
      and `chunk_size`, as in `tf1hess.batch_hessians`.

  Returns:
    A `Tensor` of shape `(N, d..., d...)` (`(N, K, K)` for inputs `(N, K)`)
    for a model with one input; a list of them (one per input) otherwise.

  Raises:
    TypeError: when `model` is not a Keras model.
    ValueError: when `model` is a Keras 3 model, was built eagerly or has
      no symbolic inputs yet; and as `tf1hess.batch_hessians`.
    tf.errors.InvalidArgumentError: at run time, when `check_independence`
      finds samples that are not independent.

  Example:
    >>> import numpy as np, tensorflow as tf, tf1hess.keras
    >>> k = tf1hess.keras.legacy_keras()
    >>> with tf.Graph().as_default():
    ...   model = k.Sequential([
    ...       k.Input((24,)),
    ...       k.layers.Dense(10),
    ...       k.layers.Dense(1)])
    ...   h = tf1hess.keras.model_hessians(model)
    ...   sess = tf1hess.keras.legacy_session()
    ...   out = sess.run(h, {model.input: np.ones((100, 24), np.float32)})
    >>> out.shape, float(abs(out).max())  # linear: zeros, not None
    ((100, 24, 24), 0.0)
  """
  inputs, outputs, single = _symbolic_io(model)
  with outputs[0].graph.as_default():
    result = ops.batch_hessians(
      outputs,
      inputs,
      name=name or "model_hessians",
      unconnected_gradients=unconnected_gradients,
      check_independence=check_independence,
      parallel_iterations=parallel_iterations,
      method=method,
      chunk_size=chunk_size,
      plan=plan,
    )
  return result[0] if single else result
