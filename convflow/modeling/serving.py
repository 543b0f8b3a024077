"""The classifier's serving function: raw uint8 images of any size in; float32 probabilities,
class names and embeddings out. It resizes and rescales inside the graph, so clients send images as
they have them. The embeddings (the input of the final Dense layer: pooled features, after dropout,
which is off in inference) let a later run compare its test split with this model's own, as the
model sees them (the evaluate stage's embedding drift check).

The evaluate stage scores the test split through it and export_savedmodel saves the same traced
function as the SavedModel's signature. Tracing a base such as MobileNet takes a second or two
on a CPU; one trace per model in a process serves both stages of a `convflow run`.
"""

from __future__ import annotations

from concurrent.futures import Future

from convflow.core.records import TFRecordSet
from convflow.runtime.process_caches import traced_once


def serving_function(model, tfrecords: TFRecordSet):
    """The traced tf.function serving `model` for images like `tfrecords`'; the same object again
    for the same model and data (a stage before this one in the process may have traced it, or be
    tracing it: then this waits for that trace)."""
    return _made(model, tfrecords, in_background=False).result()


def trace_ahead(model, tfrecords: TFRecordSet) -> Future:
    """Start tracing `model`'s serving function in a thread, for the evaluate and export stages that
    come after training in this process. The trace reads the model's variables when called, not
    now, so it can start before the weights are trained; the train stage starts it while the frozen
    base computes its features, which leaves the CPU's Python side idle.

    The caller must wait for the Future before calling the model's layers from Python again."""
    return _made(model, tfrecords, in_background=True)


def _made(model, tfrecords: TFRecordSet, in_background: bool) -> Future:
    made_for = (tuple(tfrecords.image_size), tfrecords.channels, tuple(tfrecords.label_names))
    return traced_once(model, made_for, lambda: _traced(model, *made_for), in_background)


def _with_embeddings(model):
    """A model over the same layers and weights that answers (embeddings, logits): one forward pass
    for both. The embeddings are the input of the final layer (the "logits" Dense of a wrapped
    classifier)."""
    import keras

    head = model.get_layer("logits") if "logits" in [layer.name for layer in model.layers] else model.layers[-1]
    return keras.Model(model.input, [head.input, model.outputs[0]], name=f"{model.name}_with_embeddings")


def _traced(model, image_size: tuple[int, int], channels: int, label_names: tuple[str, ...]):
    import tensorflow as tf

    height, width = image_size
    names = tf.constant(list(label_names))
    forward = _with_embeddings(model)

    def serve(images):
        pixels = tf.cast(images, tf.float32)
        same_size = tf.logical_and(tf.shape(pixels)[1] == height, tf.shape(pixels)[2] == width)
        pixels = tf.cond(same_size, lambda: pixels, lambda: tf.image.resize(pixels, [height, width]))
        pixels = tf.ensure_shape(pixels, [None, height, width, channels])
        embeddings, logits = forward(pixels, training=False)
        embeddings = tf.reshape(tf.cast(embeddings, tf.float32), [tf.shape(pixels)[0], -1])
        logits = tf.cast(logits, tf.float32)
        if logits.shape[-1] == 1:  # binary head: the one logit is the second class's
            positive = tf.sigmoid(logits)
            probabilities = tf.concat([1.0 - positive, positive], axis=1)
        else:
            probabilities = tf.nn.softmax(logits)
        return {
            "probabilities": probabilities,
            "classes": tf.gather(names, tf.argmax(probabilities, axis=1)),
            "embeddings": embeddings,
        }

    signature = [tf.TensorSpec([None, None, None, channels], tf.uint8, name="images")]
    traced = tf.function(serve, input_signature=signature, autograph=False)
    traced.get_concrete_function()  # trace now: a SavedModel takes only a function traced before
    return traced
