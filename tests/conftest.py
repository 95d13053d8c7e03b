"""Test settings shared by every test file: set before TensorFlow loads."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Legacy graph-mode Keras (tf_keras) behind tf.compat.v1.layers and
# tf.compat.v1.nn.rnn_cell, as in the code bases tf1hess serves.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
