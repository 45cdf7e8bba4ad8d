"""A stateful ChunkedModel fit that checkpoints after every batch, run as its own process.

python tests/resume_fit.py DIR full       # uninterrupted: DIR/full.npz
python tests/resume_fit.py DIR killable   # checkpoints to DIR/ckpt, then hangs at KILL_AT
python tests/resume_fit.py DIR resume     # restores DIR/ckpt, finishes: DIR/resumed.npz
"""

import os
import sys
import time

import numpy as np
import tensorflow as tf

EPOCHS, BATCH, WINDOW, KILL_AT = 3, 4, 8, 8  # 6 windows per epoch; killed in epoch 1


def build():
    import keras

    import tbptt

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(0)
    stream = rng.normal(size=[BATCH * WINDOW * 6, 3]).astype("float32")
    targets = np.cumsum(stream, axis=0)[:, :1] * 0.05
    dataset = tbptt.data.stream_windows(stream, targets, batch_size=BATCH, window=WINDOW)
    chain = tbptt.StatefulGRUChain(
        6, head=keras.layers.Dense(1), chunk_size=4, mode="truncated", backprop_chunks=2
    )
    model = tbptt.keras.ChunkedModel(chain, stateful=True)
    model.build([None, None, 3])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model, dataset


def save_weights(model, path):
    np.savez(path, *[v.numpy() for v in model.trainable_variables])


def main(directory: str, phase: str) -> None:
    import keras

    model, dataset = build()
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(directory, "ckpt"), 3)
    if phase == "full":
        model.fit(dataset, epochs=EPOCHS, verbose=0)
        save_weights(model, os.path.join(directory, "full.npz"))
    elif phase == "killable":
        done = []

        def after_batch(batch, logs):
            manager.save()
            done.append(batch)
            if len(done) == KILL_AT:
                open(os.path.join(directory, "ready"), "w").close()
                time.sleep(600)  # the test kills the process here, mid-epoch

        model.fit(
            dataset,
            epochs=EPOCHS,
            verbose=0,
            callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=after_batch)],
        )
    else:
        checkpoint.restore(manager.latest_checkpoint).assert_consumed()
        epoch, batch = model.stream_position
        assert batch > 0 and model.carried_state is not None, (epoch, batch)  # mid-stream
        print("resuming at", epoch, batch)
        model.fit(dataset.skip(batch), initial_epoch=epoch, epochs=epoch + 1, verbose=0)
        model.fit(dataset, initial_epoch=epoch + 1, epochs=EPOCHS, verbose=0)
        save_weights(model, os.path.join(directory, "resumed.npz"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
