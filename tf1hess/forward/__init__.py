"""The forward engine: per-sample second derivatives op by op (see engine)."""

from tf1hess.forward import composite  # noqa: F401 (registers rules)
from tf1hess.forward import conv  # noqa: F401 (registers rules)
from tf1hess.forward import elementwise  # noqa: F401 (registers rules)
from tf1hess.forward import linalg  # noqa: F401 (registers rules)
from tf1hess.forward import reductions  # noqa: F401 (registers rules)
from tf1hess.forward import softmax  # noqa: F401 (registers rules)
from tf1hess.forward import structural  # noqa: F401 (registers rules)
from tf1hess.forward.engine import Unsupported
from tf1hess.forward.engine import second_derivatives
from tf1hess.forward.jacobians import DIAGONAL
from tf1hess.forward.jacobians import HESSIAN
from tf1hess.forward.jacobians import LAPLACIAN

__all__ = [
  "DIAGONAL",
  "HESSIAN",
  "LAPLACIAN",
  "Unsupported",
  "second_derivatives",
]
