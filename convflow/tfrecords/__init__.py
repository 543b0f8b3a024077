"""TFRecord shards: the feature spec that writer and reader share, framing without TensorFlow, parts of shards, reading."""
