"""A case: one model at one shape, for one quantity, with its data.

The weights and the inputs are float32 numpy arrays drawn from seeds fixed
by the model's name, the shape and `Settings.seed`, so that every method
and every run gets the same ones.
"""

import dataclasses
import re
import zlib

import numpy as np

from benchmarks import models

QUANTITIES = ("hessian", "diagonal", "laplacian")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The options every case is built from (one object, not many flags).

  Attributes:
    hidden: units per hidden layer of `tanh_mlp` and `softplus_net`.
    depth: hidden layers of `softplus_net`.
    seed: seed of the weights and inputs.
    tf_hessians_max_bytes: `tf.hessians` runs only where its `(N*K)^2`
      output fits in this many bytes.
  """

  hidden: int = 64
  depth: int = 3
  seed: int = 0
  tf_hessians_max_bytes: int = 1 << 30


def parse_shape(shape):
  """`"NxK"` -> `(N, K)`."""
  match = re.fullmatch(r"(\d+)x(\d+)", shape.strip())
  if not match:
    raise ValueError(f"`shapes` must be like 256x16 (N x K); saw {shape!r}.")
  return int(match.group(1)), int(match.group(2))


class Case:
  """One model at one shape and one quantity: weights, inputs, functions.

  Attributes:
    model: the `Model`.
    shape: `"NxK"`; `n`, `k` its numbers.
    quantity: `"hessian"`, `"diagonal"` or `"laplacian"`.
    settings: the `Settings` it was built from.
    weights: the float32 weights; `x` the float32 inputs `(N, K)`.
    tf_fn: the model as TF ops of a batch.
  """

  def __init__(self, model, shape, quantity="hessian", settings=Settings()):
    self.model = models.get(model)
    self.n, self.k = parse_shape(shape)
    if self.k % self.model.k_multiple:
      raise ValueError(
        f"`{model}` needs K divisible by {self.model.k_multiple}; saw "
        f"{shape!r}."
      )
    if quantity not in QUANTITIES:
      raise ValueError(
        f"`quantities` must name entries of {list(QUANTITIES)}; saw "
        f"{quantity!r}."
      )
    self.shape = shape
    self.quantity = quantity
    self.settings = settings
    rng = np.random.default_rng(
      [settings.seed, self.k, zlib.crc32(model.encode())]
    )
    self.weights = self.model.weights(rng, self.k, settings)
    rng = np.random.default_rng([settings.seed, self.n, self.k])
    self.x = rng.normal(size=(self.n, self.k)).astype(np.float32)
    self.tf_fn = self.model.tf_fn(self.weights)

  @property
  def name(self):
    return f"{self.model.name} {self.shape} {self.quantity}"

  def jax_fn(self):
    return self.model.jax_fn(self.weights)

  def reference(self):
    """The analytic quantity in float64, or `None` if there is none."""
    if self.model.hessian is None:
      return None
    return reduce_numpy(
      self.model.hessian(self.weights, self.x.astype(np.float64)),
      self.quantity,
    )


def reduce_numpy(hessians, quantity):
  """`(N, K, K)` -> the quantity: itself, its diagonals, its traces."""
  if quantity == "hessian":
    return hessians
  if quantity == "diagonal":
    return np.diagonal(hessians, axis1=1, axis2=2)
  return np.trace(hessians, axis1=1, axis2=2)
