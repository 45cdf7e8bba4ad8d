"""The `tbptt` console script."""

import argparse
import os
import sys
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
    return parser


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
