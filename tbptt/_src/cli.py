"""The `tbptt` console script."""

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tbptt", description=(
        "Exact and truncated back-propagation through time over chunks of long sequences."))
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="exact vs truncated gradients on a delayed echo")
    demo.add_argument("--steps", type=int, default=400, help="training steps per run")
    demo.add_argument("--delay", type=int, default=8, help="echo delay in time steps")
    demo.add_argument("--chunk-size", type=int, default=4, help="time steps per chunk")
    demo.add_argument("--length", type=int, default=48, help="sequence length T")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", default="tbptt-demo.png", help="PNG path ('' for none)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    reproduce = commands.add_parser("reproduce", help="re-run a seed experiment from examples/")
    reproduce.add_argument("experiment", choices=sorted(EXPERIMENTS))
    return parser


# Experiment name -> script in the source tree's examples/ folder. Each runs in a fresh process:
# the TF1 ones must set TF_USE_LEGACY_KERAS before TensorFlow is imported.
EXPERIMENTS = {
    "gru-500-500": "gru_500_500.py",
    "gru-minibatch": "gru_minibatch.py",
    "cnn-split": "cnn_split.py",
}


def _reproduce(experiment: str) -> int:
    examples = Path(__file__).resolve().parents[2] / "examples"
    script = examples / EXPERIMENTS[experiment]
    if not script.is_file():
        print(f"tbptt reproduce: {script} not found. The experiments are scripts in the source "
              "tree's examples/ folder: install from a checkout (pip install -e .).",
              file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, str(script)], cwd=str(examples)).returncode


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "demo":
        from tbptt._src import demo
        if not 0 < args.chunk_size < args.delay < args.length:
            print("tbptt demo: need 0 < --chunk-size < --delay < --length", file=sys.stderr)
            return 2
        demo.run(steps=args.steps, delay=args.delay, chunk_size=args.chunk_size,
                 length=args.length, seed=args.seed, plot_path=args.plot or None,
                 quiet=args.quiet)
    elif args.command == "reproduce":
        return _reproduce(args.experiment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
