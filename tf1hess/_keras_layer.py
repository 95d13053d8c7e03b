"""The body of the `BatchDerivatives` layers, shared by both Keras generations.

Imports no Keras: `_keras2_layer` and `_keras3_layer` put it on the `Wrapper`
of their generation.
"""

import tensorflow as tf

from tf1hess import _checks
from tf1hess import eager
from tf1hess import ops
from tf1hess import plan as plan_lib


class DerivativesMixin:
  """The body shared by the Keras 2 and Keras 3 layers."""

  _generation = None  # "Keras 2" or "Keras 3"; set by the subclasses.
  _layer_type = None
  _other_generation = None  # "Keras 3" or "Keras 2": the twin's.
  _other_class = None  # The twin's class name in tf1hess.keras.
  # Subclasses also define `_other_layer_types()`: a tuple of the twin
  # generation's installed layer classes (empty when it is not installed).

  def __init__(self, layer, order=2, plan=None, **kwargs):
    if not isinstance(layer, self._layer_type):
      other_generation, other_class = self._other_generation, self._other_class
      if isinstance(layer, self._other_layer_types()):
        raise TypeError(
          f"`layer` must be a {self._generation} layer or model for "
          f"{type(self).__name__}; saw a {other_generation} "
          f"{type(layer).__name__}: use tf1hess.keras.{other_class}."
        )
      package = self._layer_type.__module__.split(".")[0]
      seen = type(layer).__module__.split(".")[0]
      hint = ""
      if seen == "tf_keras" != package:
        # TensorFlow <= 2.15 with tf-keras installed too: another Keras 2.
        hint = (
          " To wrap tf_keras models, set TF_USE_LEGACY_KERAS=1 before "
          "importing TensorFlow: tf.keras is then tf_keras."
        )
      raise TypeError(
        f"`layer` must be a {self._generation} layer or model of {package} "
        f"mapping a batch to one value per sample; saw {type(layer).__name__}"
        f" of {seen}.{hint}"
      )
    order = _checks.check_count(order, "order")
    if isinstance(plan, dict):  # From `get_config`.
      plan = plan_lib.Plan(**plan)
    plan = plan_lib.make(plan)
    super().__init__(layer, **kwargs)
    self.order = order
    self.plan = plan

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
      derivatives = [
        ops.batch_derivatives(y, inputs, k, plan=self.plan) for k in orders
      ]
      return [y] + derivatives[::-1]
    values = []

    def fn(x):
      y = self.layer(x)
      self._check_scalar_output(y)
      values.append(y)
      return y

    derivatives = [
      eager.batch_derivatives(fn, inputs, k, plan=self.plan) for k in orders
    ]
    return [values[-1]] + derivatives[::-1]

  def get_config(self):
    config = super().get_config()
    config["order"] = self.order
    config["plan"] = self.plan.record()
    return config
