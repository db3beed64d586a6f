"""A tiny TF-Hub-style image feature vector SavedModel for fast tests.

Same interface as the offline backbones: float32 [batch, h, w, 3] in [0, 1] -> [batch, FEATURES];
`obj(images, training=...)`, `obj.variables`, `obj.trainable_variables`, signature `serving_default`.
"""

import tensorflow as tf

FEATURES = 16


def save_tiny_backbone(path: str, features: int = FEATURES, seed: int = 0) -> str:
    rng = tf.random.Generator.from_seed(seed)
    kernel = tf.Variable(rng.normal([3, 3, 3, features], stddev=0.5), name="conv/kernel")
    gamma = tf.Variable(tf.ones([features]), name="bn/gamma")
    moving_mean = tf.Variable(tf.zeros([features]), trainable=False, name="bn/moving_mean")

    @tf.function
    def call(images, training=False):
        x = tf.nn.conv2d(2 * images - 1, kernel, strides=4, padding="SAME")
        if training:  # batch statistics, and the moving average updates, as a real batch norm does
            mean = tf.reduce_mean(x, axis=[0, 1, 2])
            moving_mean.assign(0.99 * moving_mean + 0.01 * mean)
        else:
            mean = moving_mean
        return tf.reduce_mean(tf.nn.relu6(gamma * (x - mean)), axis=[1, 2])

    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    call.get_concrete_function(spec, training=True)
    call.get_concrete_function(spec, training=False)

    root = tf.__internal__.tracking.AutoTrackable()
    root.__call__ = call
    root.variables = [kernel, gamma, moving_mean]
    root.trainable_variables = [kernel, gamma]
    signature = tf.function(lambda inputs: {"feature_vector": call(inputs, training=False)},
                            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="inputs")])
    tf.saved_model.save(root, path, signatures={"serving_default": signature})
    return path
