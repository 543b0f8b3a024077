"""TFRecord shards: the feature spec that writer and reader share (spec), framing without TensorFlow
(writer, example_proto), parts of shards (parts), reading (features)."""
