"""Custom Keras layers convflow's models use; registered so saved models load anywhere."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="convflow")
class ReverseChannels(keras.layers.Layer):
    """RGB -> BGR, the channel order of caffe-style bases (VGG, ResNet50)."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=-1)
