"""Tests of tf1hess._tf_errors: reading TensorFlow's error text.

Each reading is checked on errors this TensorFlow raises (an assertion in
a session, a TFRecord feature of another dtype through a session and
through `tf.data`, an op without a gradient) and on messages as
TensorFlow 2.12 and 2.21, the ends of the supported range, word them
(recorded from those versions, paths shortened), so that a change of
wording on either end shows here.
"""

from absl.testing import parameterized
import tensorflow as tf

from tf1hess import _tf_errors

# Recorded messages, by TensorFlow version.
_ASSERT = (
  "Graph execution error:\n\nassertion failed: [x must be positive.  ] "
  "[Condition x > 0 did not hold element-wise:] [x (Placeholder:0) = ] "
  "[-1]\n\t [[{{node Assert}}]]"
)
_PARSE_SESSION_2_12 = (
  "Graph execution error:\n\nDetected at node 'ParseExample/ParseExampleV2' "
  "defined at (most recent call last):\n"
  '    File "probe.py", line 15, in <module>\n'
  "      parsed = tf.io.parse_example(s, {'x': spec})\n"
  "Node: 'ParseExample/ParseExampleV2'\n"
  "Name: <unknown>, Key: x, Index: 0.  Data types don't match. Data type: "
  "int64 but expected type: float\n"
  "\t [[{{node ParseExample/ParseExampleV2}}]]"
)
_PARSE_SESSION_2_21 = (
  "Graph execution error:\n\nDetected at node 'ParseExample/ParseExampleV2' "
  "defined at (most recent call last):\n"
  '    File "probe.py", line 15, in <module>\n'
  "Node: 'ParseExample/ParseExampleV2'\n"
  "Name: <unknown>, Key: x, Index: 0.  Data types don't match. Data type: "
  "int64 but expected type: float\n"
  "\t [[{{node ParseExample/ParseExampleV2}}]]"
)
_PARSE_DATA_2_12 = (
  "{{function_node __wrapped__IteratorGetNext_output_types_1_device_/job:"
  "localhost/replica:0/task:0/device:CPU:0}} Name: <unknown>, Key: x, "
  "Index: 0.  Data types don't match. Data type: int64 but expected type: "
  "float\n\t [[{{node ParseExample/ParseExampleV2}}]] [Op:IteratorGetNext]"
)
_PARSE_DATA_2_21 = (
  "{{function_node __wrapped__IteratorGetNext_output_types_1_device_/job:"
  "localhost/replica:0/task:0/device:CPU:0}} Error in user-defined "
  "function passed to MapDataset:2 transformation with iterator: "
  "Iterator::Root::ParallelMapV2: Name: <unknown>, Key: x, Index: 0.  Data "
  "types don't match. Data type: int64 but expected type: float\n\t "
  "[[{{node ParseExample/ParseExampleV2}}]] [Op:IteratorGetNext] name: "
)
_WORKER_LOST = (
  "Graph execution error:\n\nFrom /job:worker/replica:0/task:1:\n"
  "recvmsg:Connection reset by peer\nAdditional GRPC error information"
)
# 2.12 and 2.21 alike.
_NO_GRADIENT = (
  "No gradient defined for operation'Bucketize' (op type: Bucketize). In "
  "general every operation must have an associated `@tf.RegisterGradient` "
  "for correct autodiff, which this op is lacking. If you want to pretend "
  "this operation is a constant in your program, you may insert "
  "`tf.stop_gradient`."
)


def _int_example():
  feature = tf.train.Feature(int64_list=tf.train.Int64List(value=[1, 2, 3]))
  return tf.train.Example(
    features=tf.train.Features(feature={"x": feature})
  ).SerializeToString()


def _parse(serialized):
  return tf.io.parse_example(
    serialized, {"x": tf.io.FixedLenFeature([3], tf.float32)}
  )


class ErrorSummaryTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("assert", _ASSERT, "assertion failed: [x must be positive.  ] "),
    (
      "parse_session_2_12",
      _PARSE_SESSION_2_12,
      "Name: <unknown>, Key: x, Index: 0.  Data types don't match. ",
    ),
    (
      "parse_session_2_21",
      _PARSE_SESSION_2_21,
      "Name: <unknown>, Key: x, Index: 0.  Data types don't match. ",
    ),
    ("parse_data_2_12", _PARSE_DATA_2_12, "{{function_node "),
    ("parse_data_2_21", _PARSE_DATA_2_21, "{{function_node "),
    ("worker_lost", _WORKER_LOST, "recvmsg:Connection reset by peer"),
  )
  def test_recorded_messages(self, message, start):
    error = tf.errors.InvalidArgumentError(None, None, message)
    summary = _tf_errors.error_summary(error)
    self.assertStartsWith(summary, start)
    self.assertIn(summary, message.splitlines())
    self.assertNotIn("\n", summary)

  def test_session_assertion(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32)
      check = tf.debugging.assert_positive(x, message="x must be positive")
      with tf.compat.v1.Session() as sess:
        with self.assertRaises(tf.errors.InvalidArgumentError) as raised:
          sess.run(check, {x: -1.0})
    self.assertRegex(
      _tf_errors.error_summary(raised.exception),
      r"^assertion failed: \[x must be positive",
    )

  def test_session_parse_example_dtype(self):
    with tf.Graph().as_default():
      serialized = tf.compat.v1.placeholder(tf.string, [None])
      parsed = _parse(serialized)
      with tf.compat.v1.Session() as sess:
        with self.assertRaises(tf.errors.InvalidArgumentError) as raised:
          sess.run(parsed, {serialized: [_int_example()]})
    summary = _tf_errors.error_summary(raised.exception)
    self.assertRegex(summary, r"^Name: .*Key: x, Index: 0\.  Data types")
    self.assertTrue(_tf_errors.is_dtype_mismatch(summary))

  def test_data_parse_example_dtype(self):
    dataset = tf.data.Dataset.from_tensor_slices([_int_example()])
    with self.assertRaises(tf.errors.InvalidArgumentError) as raised:
      for _ in dataset.batch(1).map(_parse):
        pass
    summary = _tf_errors.error_summary(raised.exception)
    self.assertIn("Key: x, Index: 0.", summary)
    self.assertTrue(_tf_errors.is_dtype_mismatch(summary))

  def test_key_error_without_quotes(self):
    self.assertEqual(_tf_errors.error_summary(KeyError("no 'a'")), "no 'a'")

  @parameterized.named_parameters(
    ("rule", "=====\n`xs` is bad.\n=====", "`xs` is bad."),
    ("indented_first", '  File "x.py"\n\t[[node]]\nwhat failed', "what failed"),
    (
      "numbered",
      "2 root error(s) found.\n  (0) Bad.",
      "2 root error(s) found.",
    ),
    (
      "only_noise",
      "Graph execution error:\n\t [[{{node A}}]]",
      "Graph execution error:",
    ),
    ("only_indented", "\n   indented words  \n", "indented words"),
  )
  def test_plain_messages(self, message, summary):
    self.assertEqual(_tf_errors.error_summary(ValueError(message)), summary)

  def test_empty_message_gives_the_type(self):
    self.assertEqual(_tf_errors.error_summary(OSError()), "OSError")
    self.assertEqual(_tf_errors.error_summary(ValueError("==")), "ValueError")


class IsDtypeMismatchTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("session_2_12", _PARSE_SESSION_2_12, True),
    ("session_2_21", _PARSE_SESSION_2_21, True),
    ("data_2_12", _PARSE_DATA_2_12, True),
    ("data_2_21", _PARSE_DATA_2_21, True),
    ("assert", _ASSERT, False),
    ("worker_lost", _WORKER_LOST, False),
  )
  def test_recorded_messages(self, message, mismatch):
    summary = _tf_errors.error_summary(
      tf.errors.InvalidArgumentError(None, None, message)
    )
    self.assertEqual(_tf_errors.is_dtype_mismatch(summary), mismatch)


class FirstSentenceTest(tf.test.TestCase, parameterized.TestCase):
  def test_recorded_message(self):
    self.assertEqual(
      _tf_errors.first_sentence(LookupError(_NO_GRADIENT)),
      "No gradient defined for operation'Bucketize' (op type: Bucketize)",
    )

  def test_op_without_gradient(self):
    with tf.Graph().as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 3])
      y = tf.raw_ops.Bucketize(input=x, boundaries=[0.0])
      with self.assertRaises(LookupError) as raised:
        tf.gradients(y, x)
    self.assertRegex(
      _tf_errors.first_sentence(raised.exception),
      r"^No gradient defined for operation ?'Bucketize' \(op type: "
      r"Bucketize\)$",
    )

  @parameterized.named_parameters(
    ("one", "Only one sentence.", "Only one sentence"),
    ("no_period", "No period", "No period"),
    ("decimal", "Saw 2.5 here. Then more.", "Saw 2.5 here"),
  )
  def test_plain_messages(self, message, sentence):
    self.assertEqual(_tf_errors.first_sentence(ValueError(message)), sentence)


if __name__ == "__main__":
  tf.test.main()
