"""Per-sample derivatives of Keras models with respect to their inputs.

Three ways in, one per kind of Keras code:

* Legacy graph-mode Keras (`tf_keras`, Keras 2, used from TF1 session code):
  `model_hessians(model)` is `tf1hess.batch_hessians(model.output,
  model.input)`, built in the model's graph, to be run in the session that
  holds the model's variables (initialised or restored). The batch dimension
  stays `None`.
* Models called eagerly, of either generation (Keras 3 `keras` and
  `tf_keras`): pass the model as the function,
  `tf1hess.eager.batch_hessians(model, x)`.
* Inside a model: the layer `BatchDerivatives(sub_model, order=2)` (for
  `tf_keras`) or `Keras3BatchDerivatives(sub_model, order=2)` (for Keras 3)
  outputs `[y, dy/dx, ..., d^n y/dx^n]` per sample of `sub_model` with respect
  to its input, and saves and loads with the model.

A linear model has a constant gradient and a Hessian of zeros; all three give
zeros there (of shape `(N, K, K)` for inputs `(N, K)`), never `None`.
"""

import keras
import tensorflow as tf
import tf_keras

from tf1hess import _checks
from tf1hess import eager
from tf1hess import ops


def _symbolic_io(model):
  """Returns `(inputs, outputs, single_input)` of a graph-mode Keras model."""
  if isinstance(model, keras.layers.Layer):
    raise ValueError(
      "`model` is a Keras 3 model, which has no graph mode; use "
      "tf1hess.eager.batch_hessians(model, x) or the layer "
      "tf1hess.keras.Keras3BatchDerivatives."
    )
  if not isinstance(model, tf_keras.Model):
    raise TypeError(
      "`model` must be a tf_keras Model with symbolic inputs and outputs; "
      f"saw {type(model).__name__}."
    )
  inputs, outputs = model.inputs, model.outputs
  if not inputs or not outputs:
    raise ValueError(
      "`model` has no symbolic inputs and outputs yet (a Sequential model "
      "without an Input layer, or a subclassed model); give it a "
      "tf_keras.Input, or call it on a placeholder `x` and use "
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
  return list(inputs), list(outputs), len(inputs) == 1


def model_derivatives(
  model,
  order,
  name=None,
  unconnected_gradients="zero",
  parallel_iterations=None,
):
  """Per-sample derivatives of a graph-mode `tf_keras` model's outputs.

  `tf1hess.batch_derivatives(model.outputs, model.inputs, order)`, built in
  the model's graph (also when another graph is the default): the outputs
  are summed per sample like `tf.gradients` does, so a model with one output
  per sample gives its derivative tensors.

  Args:
    model: a `tf_keras` (Keras 2) `Model` built in graph mode, with symbolic
      inputs of rank >= 2 (batch first, usually `None`).
    order: `int` >= 1: 1 gives gradients, 2 Hessians, n the tensor of
      n-th derivatives (`K^(n-1)` backward passes).
    name: `str`, optional scope name; default "model_derivatives".
    unconnected_gradients: 'zero' (default) or 'none', as in
      `tf1hess.batch_hessians`.
    parallel_iterations: `int` or `None`, for the row loop.

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
    >>> import numpy as np, tensorflow as tf, tf_keras, tf1hess.keras
    >>> with tf.Graph().as_default():
    ...   model = tf_keras.Sequential([
    ...       tf_keras.Input((3,)),
    ...       tf_keras.layers.Dense(8, activation="tanh"),
    ...       tf_keras.layers.Dense(1)])
    ...   d3 = tf1hess.keras.model_derivatives(model, order=3)
    ...   sess = tf.compat.v1.keras.backend.get_session()
    ...   sess.run(d3, {model.input: np.ones((5, 3), np.float32)}).shape
    (5, 3, 3, 3)
  """
  _checks.check_positive_int(order, "order")
  inputs, outputs, single = _symbolic_io(model)
  with outputs[0].graph.as_default():
    result = ops.batch_derivatives(
      outputs,
      inputs,
      order,
      name=name or "model_derivatives",
      unconnected_gradients=unconnected_gradients,
      parallel_iterations=parallel_iterations,
    )
  return result[0] if single else result


def model_hessians(
  model,
  name=None,
  unconnected_gradients="zero",
  check_independence=False,
  parallel_iterations=None,
):
  """Per-sample Hessians of a graph-mode `tf_keras` model's outputs.

  `tf1hess.batch_hessians(model.outputs, model.inputs)`, built in the
  model's graph: `H[i] = d^2 sum(model(x)[i]) / d x[i]^2`. Run it in the
  session that holds the model's variables (for example
  `tf.compat.v1.keras.backend.get_session()`, or your own session after
  `global_variables_initializer()` or a `Saver.restore`).

  Args:
    model: a `tf_keras` (Keras 2) `Model` built in graph mode with symbolic
      inputs of rank >= 2 (batch first, usually `None`).
    name: `str`, optional scope name; default "model_hessians".
    unconnected_gradients: 'zero' (default): a linear model gives zeros;
      'none' gives `None` there, like `tf.gradients`.
    check_independence: `bool`, default `False`: add a run-time check that
      samples are independent (fails for batch norm in training mode).
    parallel_iterations: `int` or `None`, for the row loop.

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
    >>> import numpy as np, tensorflow as tf, tf_keras, tf1hess.keras
    >>> with tf.Graph().as_default():
    ...   model = tf_keras.Sequential([
    ...       tf_keras.Input((24,)),
    ...       tf_keras.layers.Dense(10),
    ...       tf_keras.layers.Dense(1)])
    ...   h = tf1hess.keras.model_hessians(model)
    ...   sess = tf.compat.v1.keras.backend.get_session()
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
    )
  return result[0] if single else result


class _DerivativesMixin:
  """The body shared by the `tf_keras` and Keras 3 layers."""

  _generation = None  # "tf_keras" or "Keras 3"; set by the subclasses.
  _layer_type = None
  _other = None  # (generation, layer type, class name) of the twin class.

  def __init__(self, layer, order=2, **kwargs):
    if not isinstance(layer, self._layer_type):
      other_generation, other_type, other_class = self._other
      if isinstance(layer, other_type):
        raise TypeError(
          f"`layer` must be a {self._generation} layer or model for "
          f"{type(self).__name__}; saw a {other_generation} "
          f"{type(layer).__name__}: use tf1hess.keras.{other_class}."
        )
      raise TypeError(
        f"`layer` must be a {self._generation} layer or model mapping a "
        f"batch to one value per sample; saw {type(layer).__name__}."
      )
    _checks.check_positive_int(order, "order")
    super().__init__(layer, **kwargs)
    self.order = order

  def _check_scalar_output(self, y):
    per_sample = y.shape[1:]
    if y.shape.rank == 0 or (
      per_sample.is_fully_defined() and per_sample.num_elements() != 1
    ):
      raise ValueError(
        f"`layer` ({self.layer.name}) must output one value per sample, "
        "shape (N,) or (N, 1), for "
        f"{type(self).__name__}; saw shape {y.shape}. Reduce or select the "
        "output first (e.g. a sub-model ending in Dense(1))."
      )

  def _single(self, inputs, is_one):
    """Returns the one input (or shape) in `inputs`, or raises."""
    if is_one(inputs):
      return inputs
    if len(inputs) != 1:
      raise ValueError(
        f"`inputs` of {type(self).__name__} must be one tensor (the "
        f"sub-model's single input); saw {len(inputs)} tensors."
      )
    return inputs[0]

  def build(self, input_shape=None):
    def is_shape(shape):
      return not isinstance(shape, (list, tuple)) or not any(
        isinstance(d, (list, tuple, tf.TensorShape)) for d in shape
      )

    super().build(self._single(input_shape, is_shape))

  def call(self, inputs):
    inputs = self._single(
      inputs, lambda value: not isinstance(value, (list, tuple))
    )
    # The highest order first: an order too large for memory is refused
    # before anything is built.
    orders = range(self.order, 0, -1)
    if not tf.executing_eagerly():
      # Traced (a TF1 graph, a tf.function, model.predict or fit, Keras'
      # symbolic build): one forward pass and tf.gradients, which unlike
      # gradient tapes can also differentiate the row loop of order >= 3
      # under control flow v1 (after disable_v2_behavior()).
      y = self.layer(inputs)
      self._check_scalar_output(y)
      derivatives = [ops.batch_derivatives(y, inputs, k) for k in orders]
      return [y] + derivatives[::-1]
    values = []

    def fn(x):
      y = self.layer(x)
      self._check_scalar_output(y)
      values.append(y)
      return y

    derivatives = [eager.batch_derivatives(fn, inputs, k) for k in orders]
    return [values[-1]] + derivatives[::-1]

  def get_config(self):
    config = super().get_config()
    config["order"] = self.order
    return config


@tf_keras.saving.register_keras_serializable(
  package="tf1hess", name="BatchDerivatives"
)
class BatchDerivatives(_DerivativesMixin, tf_keras.layers.Wrapper):
  """A `tf_keras` layer: a sub-model's value and per-sample input derivatives.

  Called on a batch `x` of shape `(N, d1, ..., dm)` it returns the list
  `[y, dy/dx, d^2y/dx^2, ..., d^n y/dx^n]` where `y = layer(x)` has one value
  per sample (shape `(N,)` or `(N, 1)`) and the k-th derivative has shape
  `(N,) + (d1, ..., dm) * k`: gradients `(N, K)`, Hessians `(N, K, K)`, ...
  for `x` of shape `(N, K)`. Where the layer is traced (graph-mode TF1
  models run in a session, `tf.function`s, `model.predict` and `fit`) it is
  built with `tf1hess.batch_derivatives`; called eagerly it uses
  `tf1hess.eager` (gradient tapes). The batch dimension may be `None`. A
  linear sub-model gives zeros, not `None`.

  Order n costs about `K^(n-1)` backward passes of the sub-model (plus the
  lower orders, `K^(n-2) + ... + 1`); the output of order n holds
  `N * K^n` values, and an order that cannot fit in memory is refused when
  the layer is called, before anything is built.

  The layer wraps the sub-model like `tf_keras.layers.Wrapper`: its weights
  are the sub-model's, and it saves and loads with the model (`.h5`,
  `.keras` and SavedModel), registered as "tf1hess>BatchDerivatives". For
  Keras 3 (`import keras`) use `Keras3BatchDerivatives`.

  Args:
    layer: a `tf_keras` layer or model with one input `(N, d...)` and one
      value per sample as output.
    order: `int` >= 1, default 2: the highest derivative order returned.
    **kwargs: passed to `tf_keras.layers.Layer` (`name`, ...).

  Returns (when called):
    A list of `order + 1` tensors: `y` (the sub-model's output, as is), then
    the derivatives of orders 1 to `order`, shapes `(N,) + (d...) * k`.

  Raises:
    TypeError: when `layer` is not a `tf_keras` layer (a Keras 3 layer is
      named as such).
    ValueError: when `order` is not a positive int; when called, when the
      sub-model has more than one input, when it outputs more than one
      value per sample, or when an order would not fit in memory.

  Example:
    >>> import numpy as np, tf_keras, tf1hess.keras
    >>> u = tf_keras.Sequential([
    ...     tf_keras.Input((2,)),
    ...     tf_keras.layers.Dense(16, activation="tanh"),
    ...     tf_keras.layers.Dense(1)])
    >>> x = tf_keras.Input((2,))
    >>> y, grad, hess = tf1hess.keras.BatchDerivatives(u, order=2)(x)
    >>> model = tf_keras.Model(x, [y, grad, hess])
    >>> [o.shape for o in model.predict(np.ones((5, 2)), verbose=0)]
    [(5, 1), (5, 2), (5, 2, 2)]
  """

  _generation = "tf_keras"
  _layer_type = tf_keras.layers.Layer
  _other = ("Keras 3", keras.layers.Layer, "Keras3BatchDerivatives")


@keras.saving.register_keras_serializable(
  package="tf1hess", name="BatchDerivatives"
)
class Keras3BatchDerivatives(_DerivativesMixin, keras.layers.Wrapper):
  """The Keras 3 twin of `BatchDerivatives`, for `import keras` models.

  Same inputs, outputs and costs as `BatchDerivatives`, as a
  `keras.layers.Wrapper` of a Keras 3 layer or model; needs the TensorFlow
  backend (the derivatives are `tf1hess.eager` gradient tapes). Saves and
  loads with the model (`.keras`), registered as "tf1hess>BatchDerivatives".

  Args:
    layer: a Keras 3 layer or model with one input `(N, d...)` and one value
      per sample as output.
    order: `int` >= 1, default 2: the highest derivative order returned.
    **kwargs: passed to `keras.layers.Layer` (`name`, ...).

  Returns (when called):
    A list of `order + 1` tensors: `y`, then the derivatives of orders 1 to
    `order`, shapes `(N,) + (d...) * k`.

  Raises:
    TypeError: when `layer` is not a Keras 3 layer (a `tf_keras` layer is
      named as such).
    ValueError: as `BatchDerivatives`; and when Keras does not run on the
      TensorFlow backend.

  Example:
    >>> import keras, numpy as np, tf1hess.keras
    >>> u = keras.Sequential([
    ...     keras.Input((2,)),
    ...     keras.layers.Dense(16, activation="tanh"),
    ...     keras.layers.Dense(1)])
    >>> x = keras.Input((2,))
    >>> outputs = tf1hess.keras.Keras3BatchDerivatives(u, order=2)(x)
    >>> model = keras.Model(x, outputs)
    >>> [o.shape for o in model.predict(np.ones((5, 2)), verbose=0)]
    [(5, 1), (5, 2), (5, 2, 2)]
  """

  _generation = "Keras 3"
  _layer_type = keras.layers.Layer
  _other = ("tf_keras", tf_keras.layers.Layer, "BatchDerivatives")

  def __init__(self, layer, order=2, **kwargs):
    if keras.backend.backend() != "tensorflow":
      raise ValueError(
        "Keras3BatchDerivatives needs the TensorFlow backend of Keras 3 "
        "(KERAS_BACKEND=tensorflow); saw backend "
        f"{keras.backend.backend()!r}."
      )
    super().__init__(layer, order=order, **kwargs)
