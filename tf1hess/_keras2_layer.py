"""`BatchDerivatives`, the layer for Keras 2 (`tf.keras` <= 2.15, tf_keras).

Importing this module imports Keras 2 (`_compat.legacy_keras()`) and raises
`ImportError`, saying what to install, where there is none.
"""

from tf1hess import _compat
from tf1hess import _keras_layer

_keras = _compat.legacy_keras()


def _keras3_layers():
  try:
    return (_compat.keras3().layers.Layer,)
  except ImportError:
    return ()


@_keras.utils.register_keras_serializable(
  package="tf1hess", name="BatchDerivatives"
)
class BatchDerivatives(_keras_layer.DerivativesMixin, _keras.layers.Wrapper):
  """A Keras 2 layer: a sub-model's value and per-sample input derivatives.

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

  The layer wraps the sub-model like Keras 2's `layers.Wrapper`: its weights
  are the sub-model's, and it saves and loads with the model (`.h5`,
  `.keras` and SavedModel), registered as "tf1hess>BatchDerivatives". For
  Keras 3 (`import keras`) use `Keras3BatchDerivatives`.

  Args:
    layer: a Keras 2 layer or model (of `tf1hess.keras.legacy_keras()`:
      `tf.keras` on TensorFlow <= 2.15, `tf_keras` on >= 2.16) with one input
      `(N, d...)` and one value per sample as output.
    order: `int` >= 1, default 2: the highest derivative order returned.
    plan: a `tf1hess.Plan` or `None` (default): how the rows are built, as
      in `tf1hess.batch_hessians`; saved in the layer's config.
    **kwargs: passed to Keras 2's `layers.Layer` (`name`, ...).

  Returns (when called):
    A list of `order + 1` tensors: `y` (the sub-model's output, as is), then
    the derivatives of orders 1 to `order`, shapes `(N,) + (d...) * k`.

  Raises:
    TypeError: when `layer` is not a Keras 2 layer (a Keras 3 layer is
      named as such).
    ValueError: when `order` is not a positive int; when called, when the
      sub-model has more than one input, when it outputs more than one
      value per sample, or when an order would not fit in memory.

  Example:
    >>> import numpy as np, tf1hess.keras
    >>> k = tf1hess.keras.legacy_keras()  # tf.keras <= 2.15, else tf_keras
    >>> u = k.Sequential([
    ...     k.Input((2,)),
    ...     k.layers.Dense(16, activation="tanh"),
    ...     k.layers.Dense(1)])
    >>> x = k.Input((2,))
    >>> y, grad, hess = tf1hess.keras.BatchDerivatives(u, order=2)(x)
    >>> model = k.Model(x, [y, grad, hess])
    >>> [o.shape for o in model.predict(np.ones((5, 2)), verbose=0)]
    [(5, 1), (5, 2), (5, 2, 2)]
  """

  _generation = "Keras 2"
  _layer_type = _keras.layers.Layer
  _other_generation = "Keras 3"
  _other_class = "Keras3BatchDerivatives"
  _other_layer_types = staticmethod(_keras3_layers)
