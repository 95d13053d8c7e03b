"""`Keras3BatchDerivatives`, the layer for Keras 3 (`import keras`, >= 3).

Importing this module imports Keras 3 (`_compat.keras3()`) and raises
`ImportError`, saying what to install, where there is none.
"""

from tf1hess import _compat
from tf1hess import _keras_layer

_keras = _compat.keras3()


def _keras2_layers():
  try:
    return (_compat.legacy_keras().layers.Layer,)
  except ImportError:
    return ()


@_keras.saving.register_keras_serializable(
  package="tf1hess", name="BatchDerivatives"
)
class Keras3BatchDerivatives(
  _keras_layer.DerivativesMixin, _keras.layers.Wrapper
):
  """The Keras 3 twin of `BatchDerivatives`, for `import keras` models.

  Same inputs, outputs and costs as `BatchDerivatives`, as a
  `keras.layers.Wrapper` of a Keras 3 layer or model; needs the TensorFlow
  backend (the derivatives are `tf1hess.eager` gradient tapes). Saves and
  loads with the model (`.keras`), registered as "tf1hess>BatchDerivatives".

  Args:
    layer: a Keras 3 layer or model with one input `(N, d...)` and one value
      per sample as output.
    order: `int` >= 1, default 2: the highest derivative order returned.
    plan: a `tf1hess.Plan` or `None` (default): how the rows are built, as
      in `tf1hess.batch_hessians`; saved in the layer's config.
    **kwargs: passed to `keras.layers.Layer` (`name`, ...).

  Returns (when called):
    A list of `order + 1` tensors: `y`, then the derivatives of orders 1 to
    `order`, shapes `(N,) + (d...) * k`.

  Raises:
    TypeError: when `layer` is not a Keras 3 layer (a Keras 2 layer is
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
  _layer_type = _keras.layers.Layer
  _other_generation = "Keras 2"
  _other_class = "BatchDerivatives"
  _other_layer_types = staticmethod(_keras2_layers)

  def __init__(self, layer, order=2, **kwargs):
    if _keras.backend.backend() != "tensorflow":
      raise ValueError(
        "Keras3BatchDerivatives needs the TensorFlow backend of Keras 3 "
        "(KERAS_BACKEND=tensorflow); saw backend "
        f"{_keras.backend.backend()!r}."
      )
    super().__init__(layer, order=order, **kwargs)
