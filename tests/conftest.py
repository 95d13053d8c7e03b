"""Test settings shared by every test file: set before TensorFlow loads."""

import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Legacy graph-mode Keras (tf_keras) behind tf.compat.v1.layers and
# tf.compat.v1.nn.rnn_cell, as in the code bases tf1hess serves.
# Only where tf-keras is installed: TensorFlow 2.15 with the variable set and
# no tf-keras cannot import Keras at all; <= 2.15 has Keras 2 as tf.keras.
if importlib.util.find_spec("tf_keras"):
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
