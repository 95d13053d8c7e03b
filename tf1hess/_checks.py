"""Argument checks shared by the graph and eager paths."""

import numbers
import os

import numpy as np
import tensorflow as tf

FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def as_list(value):
  """Returns `(list, was_sequence)` for a tensor or a list/tuple of them."""
  if isinstance(value, (list, tuple)):
    return list(value), True
  return [value], False


def full_tensor_names(names):
  """Tensor names in full: an op name "x" means "x:0"; lists alike, and
  anything but names as it is."""
  if isinstance(names, (list, tuple)):
    return [full_tensor_names(n) for n in names]
  return names + ":0" if isinstance(names, str) and ":" not in names else names


def restore_structure(values, was_sequence):
  return values if was_sequence else values[0]


def check_float(t, arg):
  """Raises `TypeError` unless `t` has a floating dtype tf1hess supports."""
  if t.dtype.base_dtype not in FLOAT_DTYPES:
    raise TypeError(
      f"`{arg}` must be a floating tensor (float16, bfloat16, float32 or "
      f"float64); saw dtype {t.dtype.name}."
    )


def is_floating_array(dtype):
  """Whether a numpy dtype is floating, bfloat16 (of `ml_dtypes`, which
  numpy does not count as floating) included."""
  return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def check_batched(t, arg):
  """Raises `ValueError` unless `t` has a known rank >= 2."""
  rank = t.shape.rank
  if rank is None:
    raise ValueError(
      f"`{arg}` must have a known rank >= 2 (batch, features...); saw "
      "unknown rank."
    )
  if rank < 2:
    raise ValueError(
      f"`{arg}` must have rank >= 2 (batch, features...); saw rank {rank} "
      f"with shape {t.shape}."
    )


def check_unconnected(unconnected_gradients):
  """Returns a `tf.UnconnectedGradients` member or raises `ValueError`."""
  try:
    return tf.UnconnectedGradients(unconnected_gradients)
  except ValueError:
    raise ValueError(
      "`unconnected_gradients` must be 'zero' or 'none' (or a "
      f"tf.UnconnectedGradients); saw {unconnected_gradients!r}."
    ) from None


def is_int(value):
  """Whether `value` is an integer: a Python or numpy one, not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(
    value, (bool, np.bool_)
  )


def check_count(value, arg, allow_none=False, allow_zero=False):
  """Returns `value` as an `int` (numpy integers too), or `None` where
  `allow_none`; raises `ValueError` naming `arg` otherwise."""
  if value is None and allow_none:
    return None
  least = 0 if allow_zero else 1
  if not is_int(value) or value < least:
    expected = "a non-negative int" if allow_zero else "a positive int"
    if allow_none:
      expected = f"None or {expected}"
    raise ValueError(f"`{arg}` must be {expected}; saw {value!r}.")
  return int(value)


def physical_memory_bytes():
  """Returns this machine's physical memory in bytes."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_output_fits(x, order, arg="order"):
  """Raises `ValueError` when the derivative tensor cannot fit in memory.

  The tensor of order `order` holds `K^order` elements per sample. With a
  static `K` (and `N`, when known; else a single sample) it is refused before
  anything is built when it exceeds the machine's physical memory.

  Args:
    x: the input `Tensor` `(N, d...)`.
    order: `int`, the derivative order.
    arg: the argument name to put in the message.
  """
  dims = x.shape[1:]
  if not dims.is_fully_defined():
    return
  k = dims.num_elements()
  static_n = tf.compat.dimension_value(x.shape[0])
  n = static_n if static_n is not None else 1
  nbytes = n * k**order * x.dtype.size
  limit = physical_memory_bytes()
  if nbytes > limit:
    per = f"N = {n}" if static_n is not None else "a single sample"
    if order <= 2:  # Hessians (or gradients): too many features, not order.
      what = {1: "gradients", 2: "Hessians"}[order]
      head = (
        f"Per-sample {what} of K = {k} features take K^{order} = "
        f"{k}^{order} elements per sample"
      )
      advice = "Use fewer features, or Hessian-vector products."
    else:
      head = (
        f"`{arg}` = {order} asks for K^{order} = {k}^{order} elements per "
        "sample"
      )
      advice = "Use a lower order, fewer features, or Hessian-vector products."
    raise ValueError(
      f"{head}: {nbytes / 2**30:.1f} GiB for {per}, more than this "
      f"machine's {limit / 2**30:.1f} GiB of memory. {advice}"
    )
