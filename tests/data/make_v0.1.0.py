"""Wrote the saved models of tbptt 0.1.0 (commit 9428104) that tests/test_saving.py loads.

Run once, from the repository root, with that version; kept as the record of how the files
were made. Later versions must load them and predict the same."""
import os; os.environ["TF_CPP_MIN_LOG_LEVEL"]="2"
import numpy as np, keras, tbptt
out = "tests/data"
keras.utils.set_random_seed(7)
x = np.sin(np.arange(2 * 9 * 3).reshape(2, 9, 3) * 0.37).astype("float32")
y = np.cos(np.arange(2 * 9 * 2).reshape(2, 9, 2) * 0.21).astype("float32")
chain = tbptt.RecurrentChain([keras.layers.GRUCell(5), keras.layers.LSTMCell(4)],
                             head=keras.layers.Dense(2), chunk_size=4)
model = tbptt.keras.ChunkedModel(chain)
model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
model.fit(x, y, batch_size=2, epochs=2, verbose=0)
model.save(f"{out}/v0.1.0_gru_lstm.keras")
ids = (np.arange(2 * 8).reshape(2, 8) * 7 % 11).astype("int32")
labels = (np.arange(2 * 8).reshape(2, 8) % 3).astype("int32")
chain2 = tbptt.StatefulGRUChain(6, head=keras.layers.Dense(3), chunk_size=4,
                                inputs_layer=keras.layers.Embedding(11, 4), mode="truncated",
                                backprop_chunks=2)
model2 = tbptt.keras.ChunkedModel(chain2, stateful=True)
model2.compile(optimizer=keras.optimizers.Adam(0.01),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model2.fit(ids, labels, batch_size=2, epochs=2, verbose=0, shuffle=False)
model2.save(f"{out}/v0.1.0_embedding_stateful.keras")
np.savez(f"{out}/v0.1.0_expected.npz", x=x, y=y, ids=ids, labels=labels,
         gru_lstm=model.predict(x, verbose=0),
         embedding=model2.chain(ids)[0].numpy(),
         gru_lstm_weights=np.concatenate([v.numpy().ravel() for v in chain.trainable_variables]),
         gru_lstm_moments=np.concatenate([v.numpy().ravel() for v in model.optimizer.variables]),
         embedding_weights=np.concatenate([v.numpy().ravel() for v in chain2.trainable_variables]))
print(tbptt.__version__, [v.path for v in model2.optimizer.variables][:4])
