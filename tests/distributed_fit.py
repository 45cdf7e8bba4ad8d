"""A stateful ChunkedModel fit under a tf.distribute strategy, run as its own process.

    python tests/distributed_fit.py OUT.npz single|mirrored|multiworker

`mirrored` uses two logical CPU devices; `multiworker` reads TF_CONFIG (one process per worker).
The data, the model and the steps are the same in every case: the final weights must agree.
"""

import sys

import numpy as np
import tensorflow as tf

GLOBAL_BATCH, WINDOW, BATCHES, FEATURES = 8, 8, 4, 3


def strategy_for(kind: str):
    if kind == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if kind == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def main(out: str, kind: str) -> None:
    strategy = strategy_for(kind)
    import keras

    import tbptt

    rng = np.random.default_rng(0)
    x = rng.normal(size=[BATCHES, GLOBAL_BATCH, WINDOW, FEATURES]).astype("float32")
    y = np.cumsum(x, axis=2)[..., :1] * 0.3
    dataset = tf.data.Dataset.from_tensor_slices((x, y))  # consecutive windows of 8 streams
    with strategy.scope():
        keras.utils.set_random_seed(3)
        chain = tbptt.StatefulGRUChain(
            6, head=keras.layers.Dense(1), chunk_size=4, mode="truncated", backprop_chunks=2
        )
        model = tbptt.keras.ChunkedModel(chain, stateful=True)
        model.build([None, None, FEATURES])
        model.compile(optimizer=keras.optimizers.SGD(0.3), loss="mse")
    history = model.fit(dataset, epochs=2, verbose=0)
    np.savez(
        out,
        *[v.numpy() for v in chain.trainable_variables],
        loss=np.array(history.history["loss"]),
        replicas=np.array(strategy.num_replicas_in_sync),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
