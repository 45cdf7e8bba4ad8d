"""The `tbptt` console script.

Arguments are parsed before TensorFlow is imported, so `--help` and `--version` answer at once;
TensorFlow's start-up log lines are silenced unless `--verbose` is given.
"""

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    import tbptt  # the package's __init__ imports no TensorFlow

    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="tbptt",
        formatter_class=defaults,
        description=(
            "Exact and truncated back-propagation through time over chunks of long sequences."
        ),
    )
    parser.add_argument("--version", action="version", version=f"tbptt {tbptt.__version__}")
    parser.add_argument(
        "--verbose", action="store_true", help="show TensorFlow's start-up log lines"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(
        commands.add_parser(
            "demo", formatter_class=defaults, help="exact vs truncated gradients on a delayed echo"
        )
    )
    _add_diagnose(
        commands.add_parser(
            "diagnose",
            formatter_class=defaults,
            help="how much gradient truncation loses, on the demo's model",
        )
    )
    reproduce = commands.add_parser(
        "reproduce",
        help="re-run one of the experiments the library grew from",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="experiments (scripts in the source tree's examples/ folder):\n"
        + "\n".join(f"  {name:15} {about}" for name, (_, about) in sorted(EXPERIMENTS.items())),
    )
    reproduce.add_argument("experiment", choices=sorted(EXPERIMENTS))
    return parser


def _add_demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--steps", type=positive_int, default=400, help="training steps per run")
    demo.add_argument("--delay", type=positive_int, default=8, help="echo delay in time steps")
    demo.add_argument("--chunk-size", type=positive_int, default=4, help="time steps per chunk")
    _add_common(demo, "tbptt-demo.png", quiet="no progress bars")


def _add_diagnose(diagnose: argparse.ArgumentParser) -> None:
    diagnose.add_argument(
        "--train-steps",
        type=non_negative_int,
        default=200,
        help="exact training steps before measuring (0: untrained)",
    )
    diagnose.add_argument("--delay", type=positive_int, default=8, help="echo delay in time steps")
    diagnose.add_argument(
        "--chunk-sizes",
        type=_ints,
        default=(2, 4, 8),
        help="comma-separated chunk sizes K to compare",
    )
    diagnose.add_argument(
        "--backprop-chunks",
        type=_ints,
        default=(1, 2, 3, 4),
        help="comma-separated truncation depths m (TBPTT(K, mK))",
    )
    _add_common(diagnose, "tbptt-diagnose.png", quiet="no progress bar")


def _add_common(command: argparse.ArgumentParser, plot: str, quiet: str) -> None:
    command.add_argument("--length", type=positive_int, default=48, help="sequence length T")
    command.add_argument(
        "--seed", type=non_negative_int, default=0, help="random seed of weights and data"
    )
    command.add_argument("--plot", default=plot, help="PNG path ('' for none)")
    command.add_argument("--quiet", action="store_true", help=quiet)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1, or the option's error naming what came."""
    return _whole(text, 1)


def non_negative_int(text: str) -> int:
    return _whole(text, 0)


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
    return value


def _ints(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive ints separated by commas, got {text!r}"
        )
    return values


# Experiment name -> script in the source tree's examples/ folder. Each runs in a fresh process:
# the TF1 ones must set TF_USE_LEGACY_KERAS before TensorFlow is imported.
EXPERIMENTS = {
    "gru-500-500": (
        "gru_500_500.py",
        "TF1 graph: dLoss/d(initial state) of a 1,000-step GRU "
        "cut into two 500-step halves, chunked vs one tf.gradients",
    ),
    "gru-minibatch": (
        "gru_minibatch.py",
        "TF1 graph: GRU 64+32 over mini-batches, the "
        "gradient carried from one mini-batch into the one before",
    ),
    "cnn-split": (
        "cnn_split.py",
        "a CNN cut into two models trained with separate tapes, "
        "equal to the joined model (vs the Jacobian method)",
    ),
}


def _reproduce(experiment: str) -> int:
    examples = Path(__file__).resolve().parents[2] / "examples"
    script = examples / EXPERIMENTS[experiment][0]
    if not script.is_file():
        print(
            f"tbptt reproduce: {script} not found. The experiments are scripts in the source "
            "tree's examples/ folder: install from a checkout (pip install -e .).",
            file=sys.stderr,
        )
        return 2
    return subprocess.run([sys.executable, str(script)], cwd=str(examples)).returncode


@contextlib.contextmanager
def _quiet_stderr(quiet: bool):
    """Standard error sent to /dev/null (TensorFlow's C++ start-up lines bypass Python)."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.command in ("demo", "diagnose"):
        with _quiet_stderr(not args.verbose):
            import tensorflow as tf

            from tbptt._src import demo

            tf.config.list_logical_devices()  # device set-up logs here (cuInit, say)
    if args.command == "demo":
        if not 0 < args.chunk_size < args.delay < args.length:
            print("tbptt demo: need 0 < --chunk-size < --delay < --length", file=sys.stderr)
            return 2
        demo.run(
            steps=args.steps,
            delay=args.delay,
            chunk_size=args.chunk_size,
            length=args.length,
            seed=args.seed,
            plot_path=args.plot or None,
            quiet=args.quiet,
        )
    elif args.command == "diagnose":
        if args.train_steps < 0 or not 0 < args.delay < args.length:
            print(
                "tbptt diagnose: need --train-steps >= 0 and 0 < --delay < --length",
                file=sys.stderr,
            )
            return 2
        demo.diagnose(
            train_steps=args.train_steps,
            delay=args.delay,
            chunk_sizes=args.chunk_sizes,
            backprop_chunks=args.backprop_chunks,
            length=args.length,
            seed=args.seed,
            plot_path=args.plot or None,
            quiet=args.quiet,
        )
    elif args.command == "reproduce":
        return _reproduce(args.experiment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
