"""tf1hess: per-sample Hessians for TensorFlow 1 graph code."""

from tf1hess import _compat

_compat.import_tensorflow()

# pylint: disable=g-import-not-at-top,wrong-import-position
from tf1hess import cluster
from tf1hess import dde
from tf1hess import eager
from tf1hess import export
from tf1hess import legacy
from tf1hess import streaming
from tf1hess.cache import Derivatives
from tf1hess.finite_differences import HessianCheck
from tf1hess.finite_differences import check_hessians
from tf1hess.finite_differences import finite_difference_gradients
from tf1hess.finite_differences import finite_difference_hessians
from tf1hess.forward.dispatch import ForwardUnsupportedError
from tf1hess.ops import batch_derivatives
from tf1hess.ops import batch_gradients
from tf1hess.ops import batch_hessian_diagonals
from tf1hess.ops import batch_hessian_vector_products
from tf1hess.ops import batch_hessians
from tf1hess.ops import batch_laplacians
from tf1hess.per_output import batch_jacobians
from tf1hess.per_output import batch_output_hessian_diagonals
from tf1hess.per_output import batch_output_hessians
from tf1hess.per_output import batch_output_laplacians
from tf1hess.plan import Plan

__version__ = "0.1.0"

__all__ = [
  "Derivatives",
  "ForwardUnsupportedError",
  "HessianCheck",
  "Plan",
  "batch_derivatives",
  "batch_gradients",
  "batch_hessian_diagonals",
  "batch_hessian_vector_products",
  "batch_hessians",
  "batch_jacobians",
  "batch_laplacians",
  "batch_output_hessian_diagonals",
  "batch_output_hessians",
  "batch_output_laplacians",
  "check_hessians",
  "cluster",
  "dde",
  "eager",
  "export",
  "finite_difference_gradients",
  "finite_difference_hessians",
  "keras",
  "legacy",
  "streaming",
]


def __getattr__(name):
  # `tf1hess.keras` loads on first use, so that `import tf1hess` imports no
  # Keras (which is optional, and of two generations).
  if name == "keras":
    import importlib  # pylint: disable=g-import-not-at-top

    return importlib.import_module("tf1hess.keras")
  raise AttributeError(f"module 'tf1hess' has no attribute {name!r}")
