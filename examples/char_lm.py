"""A character-level language model streamed over a real text, with stateful TBPTT in `fit`.

The text is Python's own help topics (`pydoc_data.topics`, shipped with every Python): about
0.5 M characters of English and code. It is cut into 16 parallel streams (`tbptt.data.batchify`)
and fed window after window; `ChunkedModel(stateful=True)` carries each stream's GRU state from
one window to the next. Two runs from the same start differ only in how far the gradient goes:

  exact      mode="exact": through the whole window of 64 characters (4 chunks of 16);
  truncated  mode="truncated", backprop_chunks=1: 16 characters, as Keras stateful=True does.

    python examples/char_lm.py [--batches 300] [--plot char_lm.png]

Prints the held-out loss (nats per character) of each and plots the training curves.
"""

import argparse

import numpy as np

WINDOW, CHUNK, STREAMS, UNITS = 64, 16, 16, 128


def load_text(limit: int = 600_000):
    from pydoc_data.topics import topics

    text = "\n".join(topics[name] for name in sorted(topics))[:limit]
    vocab = sorted(set(text))
    ids = np.searchsorted(np.array(vocab), np.array(list(text))).astype(np.int32)
    return ids, vocab


def train(mode: str, train_ids, valid_ids, vocab_size: int, batches: int, verbose: int):
    import keras
    import tensorflow as tf
    import tbptt

    keras.utils.set_random_seed(0)
    chain = tbptt.StatefulGRUChain(UNITS, head=keras.layers.Dense(vocab_size), chunk_size=CHUNK,
                                   mode=mode, backprop_chunks=1)
    model = tbptt.keras.ChunkedModel(chain, stateful=True)
    model.compile(optimizer=keras.optimizers.Adam(3e-3, clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    one_hot = lambda x, y: (tf.one_hot(x, vocab_size), y)
    stream = tbptt.data.batchify(train_ids, batch_size=STREAMS, window=WINDOW).map(one_hot)
    epoch_batches = int(stream.cardinality())
    losses = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(logs["loss"]))
    model.fit(stream.take(min(batches, epoch_batches)), epochs=-(-batches // epoch_batches),
              verbose=verbose, callbacks=[record])
    valid = tbptt.data.batchify(valid_ids, batch_size=STREAMS, window=len(valid_ids) // STREAMS
                                - 1).map(one_hot)
    held_out = model.evaluate(valid, verbose=0)
    return np.array(losses), float(held_out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--plot", default="char_lm.png")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)
    ids, vocab = load_text()
    split = int(len(ids) * 0.95)
    results = {}
    for mode in ("exact", "truncated"):
        print(f"== {mode} ==")
        results[mode] = train(mode, ids[:split], ids[split:], len(vocab), args.batches,
                              args.verbose)
    # Keras reports the running mean of the epoch so far after each batch.
    print(f"{'run':10s} {'train (epoch mean)':>18s} {'held-out':>9s}  (nats/char, "
          f"{len(vocab)} symbols)")
    for mode, (curve, held_out) in results.items():
        print(f"{mode:10s} {curve[-1]:18.3f} {held_out:9.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        for mode, (curve, held_out) in results.items():
            axis.plot(curve, label=f"{mode} (held-out {held_out:.2f})")
        axis.set(xlabel="batch (16 streams x 64 characters)",
                 ylabel="training loss so far this epoch, nats/char",
                 title="char LM on pydoc topics: gradient through 64 vs 16 characters")
        axis.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print("plot:", args.plot)
    return results


if __name__ == "__main__":
    main()
