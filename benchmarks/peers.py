"""tbptt's exact chunked gradient beside Keras and JAX, in one process, with the same weights.

Seed 001's set-up: B=34, F=200, two stacked layers of 64 and 32 units (GRU with Keras's default
reset_after=True, or LSTM), a Dense(3) head, L1 loss summed over all steps, chunks of 100.
Every method starts from the same weights and inputs and prints its loss, so the rows can be
seen to compute the same thing. The methods run round-robin (one step of each in turn), and the
table gives the median step time of each and its ratio to Keras and to JAX:

  keras_full        one tf.GradientTape over Keras GRU/LSTM layers (full BPTT, all activations)
  tbptt_exact       chain.value_and_gradients, mode="exact" (bounded memory: one chunk)
  tbptt_exact_graph the same with backend="graph" (tf.gradients)
  tbptt_truncated   mode="truncated", backprop_chunks=1
  jax_full          jax.jit(jax.value_and_grad) of a lax.scan over the steps (full BPTT)
  jax_checkpoint    a lax.scan over chunks, each a jax.checkpoint of a lax.scan over its steps
                    (bounded memory, as tbptt_exact)
  tbptt_apply       tbptt_exact's call plus optimizer.apply_gradients (SGD), on a copy
  tbptt_fit         one ChunkedModel training step (train_on_batch) on that copy, SGD: what
                    `fit` adds to tbptt_apply is the wrapper's cost
  tbptt_defaults    tbptt_exact with memory_budget="auto" (the default): a call that fits
                    runs as one chunk; the rows above pin memory_budget=None

The last table is the distance to the machine's limit: the matmul work of a step (counted from
the shapes: forward, the recompute where there is one, and backward) over its time, against the
GFLOP/s of one large float32 matmul measured in the same process.

    pip install -e ".[bench]"               # jax[cpu] and matplotlib
    python benchmarks/peers.py              # T = 1000, 4000 (5 repeats) and 16000 (1)
    python benchmarks/peers.py --steps 1000 --cells gru --repeats 3     # a quick look

Writes benchmarks/results/peers.md and peers.png; with --update-readme also the
documentation's table, benchmarks/peers.md and docs/peers.png.
"""

import argparse
import os
import shutil
import statistics
import time

import numpy as np
from harness import matmul_gflops, positive_int, replace_in_readme, save  # noqa: E402 (benchmarks/ is the script folder)

SETUP = {"batch": 34, "features": 200, "units": (64, 32), "labels": 3, "chunk": 100}
METHODS = (
    "keras_full",
    "tbptt_exact",
    "tbptt_exact_graph",
    "tbptt_truncated",
    "jax_full",
    "jax_checkpoint",
    "tbptt_apply",
    "tbptt_fit",
    "tbptt_defaults",
)
GATES = {"gru": 3, "lstm": 4}
# Forward passes of a step: one, plus a recompute where memory is bounded.
FORWARDS = {"keras_full": 1, "tbptt_truncated": 1, "jax_full": 1, "tbptt_defaults": 1}


def l1(y_true, y_pred):
    import tensorflow as tf

    return tf.reduce_sum(tf.abs(y_true - y_pred))


# -- the implementations, each a step (x, y) -> (loss, grads) from the same weights -----------


def tbptt_chain(cell: str, **options):
    import keras

    import tbptt

    make = {"gru": keras.layers.GRUCell, "lstm": keras.layers.LSTMCell}[cell]
    return tbptt.RecurrentChain(
        [make(u) for u in SETUP["units"]],
        head=keras.layers.Dense(SETUP["labels"]),
        chunk_size=SETUP["chunk"],
        **{"memory_budget": None, **options},  # bounded memory: one chunk's (see the docstring)
    )


def keras_full_step(cell: str, weights: list):
    import keras
    import tensorflow as tf

    make = {"gru": keras.layers.GRU, "lstm": keras.layers.LSTM}[cell]
    rnns = [make(u, return_sequences=True) for u in SETUP["units"]]
    head = keras.layers.Dense(SETUP["labels"])
    model = keras.Sequential([keras.Input([None, SETUP["features"]])] + rnns + [head])
    model.set_weights(weights)

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = l1(y, model(x, training=True))
        return loss, tape.gradient(loss, model.trainable_variables)

    return step


def fit_steps(cell: str, weights: list, shape):
    """(value_and_gradients + apply_gradients, ChunkedModel.train_on_batch), SGD, on a chain of
    their own (they change its weights, by a step too small to matter)."""
    import keras

    import tbptt

    chain = tbptt_chain(cell)
    chain.build(shape)
    for variable, value in zip(chain.trainable_variables, weights):
        variable.assign(value)
    optimizer = keras.optimizers.SGD(1e-12)

    def apply(x, y):
        result = chain.value_and_gradients(x, y, l1)
        optimizer.apply_gradients(zip(result.grads, chain.trainable_variables))
        return result.loss, result.grads

    model = tbptt.keras.ChunkedModel(chain)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-12), loss=keras.losses.MeanAbsoluteError(reduction="sum")
    )

    def fit(x, y):
        return model.train_on_batch(x, y, return_dict=True)["loss"] * 3, []  # MAE: L1 / labels

    return apply, fit


def jax_steps(cell: str, weights: list):
    """(full BPTT, checkpointed chunks) as jitted JAX functions of (x, y)."""
    import jax
    import jax.numpy as jnp

    layers = len(SETUP["units"])
    params = [jnp.asarray(w) for w in weights]
    per_layer = 3  # kernel, recurrent kernel, bias

    def run_layer(layer_params, xs, state):
        kernel, recurrent, bias = layer_params
        if cell == "gru":  # Keras GRUCell, reset_after=True: bias [2, 3U]
            projected = xs @ kernel + bias[0]

            def step(h, x):
                inner = h @ recurrent + bias[1]
                x_z, x_r, x_h = jnp.split(x, 3, axis=-1)
                i_z, i_r, i_h = jnp.split(inner, 3, axis=-1)
                z, r = jax.nn.sigmoid(x_z + i_z), jax.nn.sigmoid(x_r + i_r)
                hh = jnp.tanh(x_h + r * i_h)
                h = z * h + (1 - z) * hh
                return h, h
        else:  # Keras LSTMCell: gates i, f, c, o
            projected = xs @ kernel + bias

            def step(carry, x):
                h, c = carry
                i, f, g, o = jnp.split(x + h @ recurrent, 4, axis=-1)
                c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
                h = jax.nn.sigmoid(o) * jnp.tanh(c)
                return (h, c), h

        state, ys = jax.lax.scan(step, state, projected)
        return ys, state

    def run(params, xs, ys, states):  # time-major [K, B, ...]
        new_states = []
        for k in range(layers):
            xs, state = run_layer(params[per_layer * k : per_layer * (k + 1)], xs, states[k])
            new_states.append(state)
        head_kernel, head_bias = params[-2:]
        return jnp.sum(jnp.abs(ys - (xs @ head_kernel + head_bias))), new_states

    def zeros(batch):
        if cell == "gru":
            return [jnp.zeros([batch, u]) for u in SETUP["units"]]
        return [(jnp.zeros([batch, u]), jnp.zeros([batch, u])) for u in SETUP["units"]]

    def full_loss(params, x, y):
        return run(params, jnp.swapaxes(x, 0, 1), jnp.swapaxes(y, 0, 1), zeros(x.shape[0]))[0]

    def chunked_loss(params, x, y):
        size = SETUP["chunk"]
        batch, steps = x.shape[:2]

        def chunks(a):  # [B, T, ...] -> [T/K, K, B, ...]
            return jnp.swapaxes(a, 0, 1).reshape((steps // size, size, batch) + a.shape[2:])

        @jax.checkpoint
        def chunk(states, xy):
            loss, states = run(params, xy[0], xy[1], states)
            return states, loss

        _, losses = jax.lax.scan(chunk, zeros(batch), (chunks(x), chunks(y)))
        return jnp.sum(losses)

    full = jax.jit(jax.value_and_grad(full_loss))
    checkpointed = jax.jit(jax.value_and_grad(chunked_loss))
    return (lambda x, y: full(params, x, y)), (lambda x, y: checkpointed(params, x, y))


def make_steps(cell: str, methods, x) -> dict:
    """name -> step(x, y), all from the weights of one tbptt chain."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # each chain traces its own functions: no news here
    exact = tbptt_chain(cell)
    exact.build(x.shape)
    weights = [v.numpy() for v in exact.trainable_variables]
    chains = {
        "tbptt_exact": exact,
        "tbptt_exact_graph": exact.with_config(backend="graph"),
        "tbptt_truncated": exact.with_config(mode="truncated"),
        # memory_budget="auto": the call fits 1 GiB, so it runs as one chunk (no recompute)
        "tbptt_defaults": exact.with_config(memory_budget="auto"),
    }
    steps = {
        name: (lambda c: lambda x, y: c.value_and_gradients(x, y, l1)[:2])(chain)
        for name, chain in chains.items()
    }
    steps["keras_full"] = keras_full_step(cell, weights)
    steps["tbptt_apply"], steps["tbptt_fit"] = fit_steps(cell, weights, x.shape)
    if {"jax_full", "jax_checkpoint"} & set(methods):
        steps["jax_full"], steps["jax_checkpoint"] = jax_steps(cell, weights)
    return {name: steps[name] for name in methods}


def force(result) -> float:
    """Waits for a step's loss and gradients; returns the loss."""
    loss, grads = result
    for grad in grads:
        np.asarray(grad)
    return float(loss)


def round_robin(steps: dict, x, y, repeats: int) -> dict:
    """name -> {"time": median seconds, "loss": value}; a warm-up step of each first."""
    import jax.numpy as jnp

    jx, jy = jnp.asarray(x), jnp.asarray(y)
    inputs = {name: (jx, jy) if name.startswith("jax") else (x, y) for name in steps}
    losses = {name: force(step(*inputs[name])) for name, step in steps.items()}  # warm-up
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            force(step(*inputs[name]))
            times[name].append(time.perf_counter() - start)
    return {name: {"time": statistics.median(times[name]), "loss": losses[name]} for name in steps}


def step_flops(cell: str, steps: int, method: str) -> float:
    """Matmul FLOPs of one training step, counted from the shapes: each forward pass (input
    projections, recurrent matmuls, head), and the backward, which for each matmul forms the
    gradients of both its operands except the data's (the first layer's inputs)."""
    batch, forward, inputs = SETUP["batch"], 0, SETUP["features"]
    for units in SETUP["units"]:
        forward += 2 * batch * (inputs + units) * GATES[cell] * units
        inputs = units
    forward += 2 * batch * inputs * SETUP["labels"]
    data_gradient = 2 * batch * SETUP["features"] * GATES[cell] * SETUP["units"][0]
    return steps * (FORWARDS.get(method, 2) * forward + 2 * forward - data_gradient)


def tables(rows: list, peak: float) -> str:
    lines = [
        "| cell | T | method | step (s) | x keras_full | x jax_full | x jax_checkpoint "
        "| loss | GFLOP/s | share of matmul peak |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        same = {
            r["method"]: r["time"] for r in rows if (r["cell"], r["T"]) == (row["cell"], row["T"])
        }
        ratio = lambda name: f"{row['time'] / same[name]:.2f}" if name in same else "-"  # noqa
        gflops = step_flops(row["cell"], row["T"], row["method"]) / row["time"] / 1e9
        lines.append(
            f"| {row['cell']} | {row['T']} | {row['method']} | {row['time']:.3f} | "
            f"{ratio('keras_full')} | {ratio('jax_full')} | {ratio('jax_checkpoint')} "
            f"| {row['loss']:.6g} | {gflops:.1f} | {gflops / peak:.1%} |"
        )
    lines.append(f"\nOne [2048, 2048] float32 matmul in the same process: {peak:.1f} GFLOP/s.")
    times = {(r["cell"], r["T"], r["method"]): r["time"] for r in rows}
    repeats = {(r["cell"], r["T"]): r["repeats"] for r in rows}
    for cell, steps, method in times:
        if repeats[cell, steps] < 3:
            continue  # one or two samples say nothing about a few percent
        if method == "tbptt_fit" and (cell, steps, "tbptt_apply") in times:
            extra = times[cell, steps, "tbptt_fit"] / times[cell, steps, "tbptt_apply"] - 1
            lines.append(
                f"{cell.upper()}, T={steps}: a ChunkedModel training step takes "
                f"{extra:+.1%} over value_and_gradients + apply_gradients."
            )
    return "\n".join(lines)


def summary(rows: list, peak: float) -> str:
    """The documentation's short table: tbptt exact beside the others, per cell and T."""
    lines = [
        "| cell | T | Keras full BPTT (s) | tbptt exact (s) | x Keras | x JAX full "
        "| x JAX checkpointed | share of matmul peak: tbptt / JAX full |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    times = {(r["cell"], r["T"], r["method"]): r["time"] for r in rows}
    share = lambda cell, steps, method: (  # noqa: E731
        step_flops(cell, steps, method) / times[cell, steps, method] / 1e9 / peak
    )
    for cell, steps in dict.fromkeys((r["cell"], r["T"]) for r in rows):
        exact = times[cell, steps, "tbptt_exact"]
        lines.append(
            f"| {cell.upper()} | {steps:,} | {times[cell, steps, 'keras_full']:.3f} | {exact:.3f} "
            f"| {exact / times[cell, steps, 'keras_full']:.2f} "
            f"| {exact / times[cell, steps, 'jax_full']:.2f} "
            f"| {exact / times[cell, steps, 'jax_checkpoint']:.2f} "
            f"| {share(cell, steps, 'tbptt_exact'):.0%} / {share(cell, steps, 'jax_full'):.0%} |"
        )
    return "\n".join(lines)


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({r["cell"] for r in rows})
    figure, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4), squeeze=False)
    for axis, cell in zip(axes[0], cells):
        lengths = sorted({r["T"] for r in rows if r["cell"] == cell})
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            ratios = []
            for steps in lengths:
                same = {
                    r["method"]: r["time"] for r in rows if (r["cell"], r["T"]) == (cell, steps)
                }
                ratios.append(same.get(method, np.nan) / same["keras_full"])
            axis.bar(np.arange(len(lengths)) + i * width, ratios, width, label=method)
        axis.set_xticks(np.arange(len(lengths)) + 0.4 - width / 2, [f"T={t}" for t in lengths])
        axis.set(ylabel="step time / keras_full", title=f"{cell.upper()} 64+32, B=34, F=200")
        axis.axhline(1.0, color="gray", linewidth=0.5)
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        nargs="+",
        default=[1000, 4000, 16_000],
        metavar="T",
        help="sequence lengths (default: %(default)s)",
    )
    parser.add_argument(
        "--cells",
        nargs="+",
        default=["gru", "lstm"],
        choices=sorted(GATES),
        help="cell kinds, a table each (default: %(default)s)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        metavar="METHOD",
        help="methods to run (default: all)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="timed rounds after the warm-up; T >= 16000 runs one (default: 5)",
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="also put the table in docs/benchmarks.md, benchmarks/peers.md and docs/peers.png",
    )
    args = parser.parse_args()
    if any(steps % SETUP["chunk"] for steps in args.steps):
        parser.error(
            f"every T must be a multiple of the chunk size {SETUP['chunk']} "
            f"(jax_checkpoint scans whole chunks); got {args.steps}"
        )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows = []
    for cell in args.cells:
        for steps in args.steps:
            rng = np.random.default_rng(0)
            x = rng.normal(size=[SETUP["batch"], steps, SETUP["features"]]).astype("float32")
            y = rng.normal(size=[SETUP["batch"], steps, SETUP["labels"]]).astype("float32")
            repeats = args.repeats if steps < 16_000 else 1
            measured = round_robin(make_steps(cell, args.methods, x), x, y, repeats)
            for method, result in measured.items():
                rows.append(dict(result, cell=cell, T=steps, method=method, repeats=repeats))
                print(rows[-1], flush=True)
    peak = matmul_gflops()
    text = tables(rows, peak)
    save(rows, "peers", text, None, None, None, plot_fn=lambda path: plot(rows, path))
    if args.update_readme:
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "peers.md"), "w") as f:
            f.write(text + "\n")
        replace_in_readme("peers", summary(rows, peak))
        os.makedirs(os.path.join(os.path.dirname(here), "docs"), exist_ok=True)
        shutil.copy(
            os.path.join(here, "results", "peers.png"),
            os.path.join(os.path.dirname(here), "docs", "peers.png"),
        )


if __name__ == "__main__":
    main()
