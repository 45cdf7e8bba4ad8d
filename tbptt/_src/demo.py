"""`tbptt demo`: a delayed echo that exact chunked gradients learn and truncated ones cannot.

The task: a stream of random bits x_t in {-1, +1}; the target at step t is the bit from
`delay` steps back. With `chunk_size < delay`, truncated BPTT (Keras `stateful=True`) never sees
a gradient that spans the delay, so it stays at chance; the exact chunked gradient is that of full
BPTT and learns the task, with the memory of one chunk.
"""

import sys
import time
from typing import NamedTuple

import numpy as np

from tbptt._src.core import compat
from tbptt._src.recurrent.chain import StatefulGRUChain

keras = compat.keras


class Curve(NamedTuple):
    steps: list
    losses: list
    accuracies: list
    seconds: float


def echo_batch(rng: np.random.RandomState, batch: int, steps: int, delay: int):
    """(inputs [B, T, 1] of +-1 bits, targets [B, T, 1] of 0/1, weights [B, T])."""
    bits = rng.randint(0, 2, size=(batch, steps, 1)).astype("float32")
    targets = np.zeros_like(bits)
    targets[:, delay:] = bits[:, :-delay]
    weights = np.zeros((batch, steps), "float32")
    weights[:, delay:] = 1.0  # the first `delay` steps have nothing to echo
    return 2.0 * bits - 1.0, targets, weights


def accuracy(chain, inputs, targets, weights) -> float:
    outputs, _ = chain(inputs)
    correct = (outputs.numpy()[..., 0] > 0) == (targets[..., 0] > 0.5)
    return float(np.sum(correct * weights) / np.sum(weights))


LOSS = keras.losses.BinaryCrossentropy(from_logits=True)


def make_chain(mode: str, *, chunk_size: int, units: int, seed: int) -> StatefulGRUChain:
    """The demo's model: one GRU layer and a Dense logit, whole-sequence mean loss."""
    keras.utils.set_random_seed(seed)
    return StatefulGRUChain(
        units, head=keras.layers.Dense(1), chunk_size=chunk_size, mode=mode, reduction="mean"
    )


def train(
    mode: str,
    *,
    steps: int,
    delay: int,
    chunk_size: int,
    length: int,
    batch: int,
    units: int,
    eval_every: int,
    seed: int,
    progress: str | None,
):
    """Trains one GRU on the echo task; returns its learning curve on a held-out batch and the
    trained chain."""
    chain = make_chain(mode, chunk_size=chunk_size, units=units, seed=seed)
    loss_fn = LOSS
    optimizer = keras.optimizers.Adam(1e-2)
    rng = np.random.RandomState(seed)
    held_out = echo_batch(np.random.RandomState(seed + 1), 256, length, delay)
    # verbose=2 writes one line at the end instead of redrawing when stdout is not a terminal.
    bar = (
        keras.utils.Progbar(
            steps, stateful_metrics=["loss"], verbose=1 if sys.stdout.isatty() else 2
        )
        if progress
        else None
    )
    if progress:
        print(progress)
    curve, start = Curve([], [], [], 0.0), time.perf_counter()
    for step in range(1, steps + 1):
        inputs, targets, weights = echo_batch(rng, batch, length, delay)
        result = chain.value_and_gradients(inputs, targets, loss_fn, sample_weight=weights)
        optimizer.apply_gradients(zip(result.grads, chain.trainable_variables))
        if step % eval_every == 0 or step == 1:
            curve.steps.append(step)
            curve.losses.append(float(result.loss))
            curve.accuracies.append(accuracy(chain, *held_out))
        if bar is not None:
            bar.update(step, [("loss", float(result.loss))])
    return curve._replace(seconds=time.perf_counter() - start), chain


def print_curves(exact: Curve, truncated: Curve, delay: int, chunk_size: int) -> None:
    print(
        f"\nTraining loss and held-out accuracy on the {delay}-step echo (chance = 0.50), "
        f"chunk_size={chunk_size}"
    )
    print(f"{'':>6} | {'exact':^27} | {'truncated':^27}")
    print(
        f"{'step':>6} | {'train loss':>10} {'held-out acc':>16} | {'train loss':>10} "
        f"{'held-out acc':>16}"
    )
    print("-" * 65)
    for i, step in enumerate(exact.steps):
        print(
            f"{step:>6} | {exact.losses[i]:>10.4f} {exact.accuracies[i]:>16.2f} | "
            f"{truncated.losses[i]:>10.4f} {truncated.accuracies[i]:>16.2f}"
        )
    print(f"time: exact {exact.seconds:.1f} s, truncated {truncated.seconds:.1f} s")


def plot(exact: Curve, truncated: Curve, path: str, delay: int, chunk_size: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'tbptt[demo]').")
        return False
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for curve, label in [
        (exact, "exact (chunked full BPTT)"),
        (truncated, "truncated (backprop_chunks=1)"),
    ]:
        axes[0].plot(curve.steps, curve.losses, label=label)
        axes[1].plot(curve.steps, curve.accuracies, label=label)
    axes[0].set(xlabel="training step", ylabel="training loss (BCE)", yscale="log")
    axes[1].set(xlabel="training step", ylabel="held-out accuracy", ylim=(0.4, 1.02))
    axes[1].axhline(0.5, color="gray", linestyle=":", label="chance")
    axes[1].legend()
    figure.suptitle(f"{delay}-step delayed echo, GRU over chunks of {chunk_size} steps")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"plot written to {path}")
    return True


def run(
    *,
    steps: int = 400,
    delay: int = 8,
    chunk_size: int = 4,
    length: int = 48,
    batch: int = 32,
    units: int = 32,
    seed: int = 0,
    plot_path: str | None = "tbptt-demo.png",
    quiet: bool = False,
) -> dict:
    """Trains exact and truncated side by side, prints both curves, writes the plot."""
    settings = dict(
        steps=steps,
        delay=delay,
        chunk_size=chunk_size,
        length=length,
        batch=batch,
        units=units,
        eval_every=max(1, steps // 8),
        seed=seed,
    )
    curves = {}
    for mode in ("exact", "truncated"):
        header = None if quiet else f"[{mode}] training {steps} steps"
        curves[mode], _ = train(mode, progress=header, **settings)
    print_curves(curves["exact"], curves["truncated"], delay, chunk_size)
    if plot_path:
        plot(curves["exact"], curves["truncated"], plot_path, delay, chunk_size)
    final = {mode: curve.accuracies[-1] for mode, curve in curves.items()}
    print(
        f"\nexact chunked gradients: accuracy {final['exact']:.2f}; "
        f"truncated: {final['truncated']:.2f}. The dependency ({delay} steps) is longer than "
        f"a chunk ({chunk_size} steps): only the exact gradient crosses the cut."
    )
    return final


def _diagnosed_chain(train_steps, delay, chunk_size, length, units, seed, quiet):
    """The demo's model, trained exactly for `train_steps` first (so that it uses its
    memory)."""
    if not train_steps:
        return make_chain("exact", chunk_size=chunk_size, units=units, seed=seed)
    header = None if quiet else f"training the demo model exactly for {train_steps} steps"
    settings = dict(delay=delay, chunk_size=chunk_size, length=length, batch=32, units=units)
    every = max(1, train_steps // 4)
    _, chain = train(
        "exact", steps=train_steps, seed=seed, progress=header, eval_every=every, **settings
    )
    return chain


def diagnose(
    *,
    train_steps: int = 200,
    delay: int = 8,
    chunk_sizes=(2, 4, 8),
    backprop_chunks=(1, 2, 3, 4),
    length: int = 48,
    batch: int = 64,
    units: int = 32,
    seed: int = 0,
    plot_path: str | None = "tbptt-diagnose.png",
    quiet: bool = False,
):
    """`tbptt diagnose`: the truncation report on the demo's model, trained exactly first (so
    that it uses its memory), measured on a fresh batch of the echo task."""
    from tbptt._src.diagnostics import truncation_report

    chain = _diagnosed_chain(train_steps, delay, chunk_sizes[0], length, units, seed, quiet)
    inputs, targets, weights = echo_batch(np.random.RandomState(seed + 2), batch, length, delay)
    settings: dict = dict(chunk_sizes=list(chunk_sizes), backprop_chunks=list(backprop_chunks))
    report = truncation_report(
        chain, inputs, targets, LOSS, sample_weight=weights, verbose=0 if quiet else 1, **settings
    )
    print(f"\n{delay}-step delayed echo, GRU {units}, trained {train_steps} steps\n")
    print(report.table())
    if plot_path:
        try:
            report.plot(plot_path)
            print(f"\nplot written to {plot_path}")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'tbptt[demo]').")
    return report
