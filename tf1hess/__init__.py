"""tf1hess: per-sample Hessians for TensorFlow 1 graph code."""

from tf1hess import cluster
from tf1hess import eager
from tf1hess import export
from tf1hess import keras
from tf1hess import legacy
from tf1hess import streaming
from tf1hess.finite_differences import HessianCheck
from tf1hess.finite_differences import check_hessians
from tf1hess.finite_differences import finite_difference_gradients
from tf1hess.finite_differences import finite_difference_hessians
from tf1hess.ops import batch_derivatives
from tf1hess.ops import batch_gradients
from tf1hess.ops import batch_hessian_diagonals
from tf1hess.ops import batch_hessian_vector_products
from tf1hess.ops import batch_hessians
from tf1hess.ops import batch_laplacians

__version__ = "0.1.0"

__all__ = [
  "HessianCheck",
  "batch_derivatives",
  "batch_gradients",
  "batch_hessian_diagonals",
  "batch_hessian_vector_products",
  "batch_hessians",
  "batch_laplacians",
  "check_hessians",
  "cluster",
  "eager",
  "export",
  "finite_difference_gradients",
  "finite_difference_hessians",
  "keras",
  "legacy",
  "streaming",
]
