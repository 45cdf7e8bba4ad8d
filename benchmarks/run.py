"""Step time and peak memory of chunked BPTT against one-tape full BPTT and the alternatives.

Two sweeps, each (method, T) in its own process so that peak RSS is that method's alone; times
are medians of several steps after a warm-up step (which includes tracing). Compare ratios from
one run: the machines are shared and noisy.

speed (DESIGN §6 reference set-up, seed 001: B=34, F=200, GRU 64+32, Dense 3, L1 loss, K=100):
  full_bptt       one tape over Keras GRU layers (the reference)
  exact_eager     StatefulGRUChain, mode="exact", backend="eager"
  exact_graph     the same, backend="graph" (tf.gradients)
  recompute_grad  one tape over the chunks, each wrapped in tf.recompute_grad (the alternative)
  truncated       StatefulGRUChain, mode="truncated", backprop_chunks=1
  keras_loop      hand-written truncated loop: one compiled tape per chunk over Keras GRU layers

scale (B=8, F=16, GRU 64, Dense 1, chunk_size="auto"; inputs from a ChunkSource, so only the
model's memory is measured; one step each, tracing included; full BPTT gets the whole array and
is stopped above --cap-gb):
  full_bptt, exact_auto (K ~ sqrt(T)), exact_levels2 (K ~ T^(1/3), two-level checkpointing)

    python benchmarks/run.py --quick        # speed at T = 1000, 2000; scale at T = 16k, 64k
    python benchmarks/run.py                # speed at 1k, 2k, 4k, 16k; scale at 16k .. 1M

Activation memory is how much more a step's RSS grows at the longest T of the speed sweep than
at the shortest (fixed costs such as tracing cancel out); T >= 16k runs one repeat, and
recompute_grad stops at 4k (its Python loop over chunks is unrolled: the trace grows with T).

Writes benchmarks/results/results_speed.md and results_scale.md (tables) and a PNG plot of
each; with --update-readme also the documentation's tables and the tracked benchmarks/results_*.md.
"""

import argparse
import json

from harness import (  # noqa: E402
    markdown_table,
    measure,
    positive_float,
    positive_int,
    run_worker,  # (benchmarks/ is the script folder)
    save,
)

SPEED = ("full_bptt", "exact_eager", "exact_graph", "recompute_grad", "truncated", "keras_loop")
SCALE = ("full_bptt", "exact_auto", "exact_levels2")
SPEED_SETUP = {"batch": 34, "features": 200, "units": (64, 32), "labels": 3, "chunk": 100}
SCALE_SETUP = {"batch": 8, "features": 16, "units": (64,), "labels": 1, "chunk": "auto"}


def l1(y_true, y_pred):
    import tensorflow as tf

    return tf.reduce_sum(tf.abs(y_true - y_pred))


def keras_stack(setup, stateful_input=False):
    """The reference model: Keras GRU layers returning sequences and states, a Dense head."""
    import keras

    grus = [keras.layers.GRU(u, return_sequences=True, return_state=True) for u in setup["units"]]
    head = keras.layers.Dense(setup["labels"])

    def run(x, states):
        new_states = []
        for gru, state in zip(grus, states):
            x, state = gru(x, initial_state=state, training=True)
            new_states.append(state)
        return head(x), new_states

    def variables():
        return [v for layer in grus + [head] for v in layer.trainable_variables]

    return run, variables


def zero_states(setup, batch):
    import tensorflow as tf

    return [tf.zeros([batch, u]) for u in setup["units"]]


def chunks_of(steps, size):
    return [(start, min(start + size, steps)) for start in range(0, steps, size)]


def make_step(method: str, setup: dict, steps: int):
    """A training-gradient function for `method`: (x, y) -> (loss, grads)."""
    import keras
    import tensorflow as tf

    import tbptt

    batch = setup["batch"]
    if method in ("full_bptt", "recompute_grad", "keras_loop"):
        run, variables = keras_stack(setup)
        run(tf.zeros([batch, 1, setup["features"]]), zero_states(setup, batch))  # build
    if method == "full_bptt":

        @tf.function(reduce_retracing=True)
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = l1(y, run(x, zero_states(setup, batch))[0])
            return loss, tape.gradient(loss, variables())

        return step
    if method == "recompute_grad":
        chunk = tf.recompute_grad(lambda x, *states: run(x, list(states)))

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                states, loss = zero_states(setup, batch), 0.0
                for start, stop in chunks_of(steps, setup["chunk"]):
                    outputs, states = chunk(x[:, start:stop], *states)
                    loss += l1(y[:, start:stop], outputs)
            return loss, tape.gradient(loss, variables())

        return step
    if method == "keras_loop":

        @tf.function(reduce_retracing=True)
        def chunk_step(x, y, states):
            with tf.GradientTape() as tape:
                outputs, states = run(x, states)
                loss = l1(y, outputs)
            return loss, tape.gradient(loss, variables()), states

        def step(x, y):
            states, loss, grads = zero_states(setup, batch), 0.0, None
            for start, stop in chunks_of(steps, setup["chunk"]):
                chunk_loss, chunk_grads, states = chunk_step(
                    x[:, start:stop], y[:, start:stop], states
                )
                loss += chunk_loss
                grads = (
                    chunk_grads if grads is None else [a + b for a, b in zip(grads, chunk_grads)]
                )
            return loss, grads

        return step
    kwargs = {
        "mode": "truncated" if method == "truncated" else "exact",
        "backend": "graph" if method == "exact_graph" else "eager",
        "levels": 2 if method == "exact_levels2" else 1,
        "memory_budget": None,  # the least memory: what these tables measure against T
    }
    chain = tbptt.StatefulGRUChain(
        setup["units"],
        head=keras.layers.Dense(setup["labels"]),
        chunk_size=setup["chunk"],
        **kwargs,
    )
    return lambda x, y: chain.value_and_gradients(x, y, l1)[:2]


def synthetic(setup, steps):
    """Deterministic inputs and targets; as ChunkSources for the scale sweep."""
    import numpy as np

    import tbptt

    batch, features, labels = setup["batch"], setup["features"], setup["labels"]

    def window(start, stop, width, phase):
        t = np.arange(start, stop, dtype="float64")[None, :, None]
        b = np.arange(batch)[:, None, None]
        f = np.arange(width)[None, None, :]
        return np.sin(0.01 * t * (1 + f) + b + phase).astype("float32")

    x = tbptt.ChunkSource(lambda a, b: window(a, b, features, 0.0), (batch, steps, features))
    y = tbptt.ChunkSource(lambda a, b: window(a, b, labels, 1.0), (batch, steps, labels))
    return x, y


def worker(sweep: str, method: str, steps: int, repeats: int) -> dict:
    import tensorflow as tf

    setup = SPEED_SETUP if sweep == "speed" else SCALE_SETUP
    if sweep == "speed":
        # Made by TensorFlow directly: a NumPy temporary would raise the RSS high-water mark
        # above what a method's step adds, and hide its growth.
        shape = (setup["batch"], steps)
        x = tf.random.stateless_normal(shape + (setup["features"],), [0, 1])
        y = tf.random.stateless_normal(shape + (setup["labels"],), [0, 2])
    else:
        x, y = synthetic(setup, steps)
        if method == "full_bptt":
            x, y = (tf.constant(s.fetch(0, steps)) for s in (x, y))
    step = make_step(method, setup, steps)
    return dict(measure(lambda: step(x, y), repeats), method=method, T=steps)


def activation_table(rows: list, short: int, long: int) -> str:
    """RSS growth of a step at the long T minus at the short T (fixed costs such as tracing
    cancel out), per method, and its share of full BPTT's."""
    growth = {(r["method"], r["T"]): r["growth_mb"] for r in rows if "growth_mb" in r}
    extra = {
        m: growth[m, long] - growth[m, short]
        for m, _ in growth
        if (m, long) in growth and (m, short) in growth
    }
    lines = [
        f"| method | activation memory, T={short} -> {long} (MB) | x full_bptt |",
        "| --- | ---: | ---: |",
    ]
    for method, value in extra.items():
        share = value / extra["full_bptt"] if extra.get("full_bptt") else float("nan")
        lines.append(f"| {method} | {value:.0f} | {share:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="speed at T = 1000, 2000; scale at T = 16k, 64k (a few minutes)",
    )
    parser.add_argument(
        "--speed",
        type=positive_int,
        nargs="*",
        default=[1000, 2000, 4000, 16_000],
        metavar="T",
        help="sequence lengths of the speed sweep; none skips it (default: %(default)s)",
    )
    parser.add_argument(
        "--scale",
        type=positive_int,
        nargs="*",
        metavar="T",
        default=[16_000, 64_000, 256_000, 1_000_000],
        help="sequence lengths of the scale sweep; none skips it (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="timed steps per row after the warm-up, T < 16k (default: 5)",
    )
    parser.add_argument(
        "--cap-gb",
        type=positive_float,
        default=12.0,
        help="stop a process whose RSS passes this many GB (full BPTT at long T; default: 12)",
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="also put the tables in docs/benchmarks.md and benchmarks/results_*.md",
    )
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sweep, method, steps, repeats = args.worker
        print(json.dumps(worker(sweep, method, int(steps), int(repeats))))
        return
    speed = [1000, 2000] if args.quick else args.speed
    scale = [16_000, 64_000] if args.quick else args.scale
    for sweep, lengths, methods in (("speed", speed, SPEED), ("scale", scale, SCALE)):
        if not lengths:
            continue
        rows = []
        for steps in lengths:
            for method in methods:
                if sweep == "speed" and method == "recompute_grad" and steps > 4000:
                    rows.append(
                        {
                            "method": method,
                            "T": steps,
                            "skipped": "skipped: unrolled trace grows with T",
                        }
                    )
                    continue
                repeats = (args.repeats if steps < 16_000 else 1) if sweep == "speed" else 0
                row = run_worker(__file__, sweep, method, steps, repeats, cap_gb=args.cap_gb)
                rows.append(dict(row, method=method, T=steps))
                print(json.dumps(rows[-1]), flush=True)
        text = markdown_table(rows, "T", "T", "full_bptt")
        if sweep == "speed" and len(lengths) > 1:
            text += "\n\n" + activation_table(rows, min(lengths), max(lengths))
        save(
            rows,
            f"results_{sweep}",
            text,
            "T",
            methods,
            "T",
            xlog=True,
            update_readme=args.update_readme,
        )


if __name__ == "__main__":
    main()
