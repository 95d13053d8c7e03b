"""tf1hess: per-sample Hessians for TensorFlow 1 graph code."""

from tf1hess import eager
from tf1hess.ops import batch_derivatives
from tf1hess.ops import batch_gradients
from tf1hess.ops import batch_hessian_diagonals
from tf1hess.ops import batch_hessian_vector_products
from tf1hess.ops import batch_hessians

__version__ = "0.1.0"

__all__ = [
  "batch_derivatives",
  "batch_gradients",
  "batch_hessian_diagonals",
  "batch_hessian_vector_products",
  "batch_hessians",
  "eager",
]
