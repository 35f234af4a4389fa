"""Command-line interface: ``pycomm <command> ...`` (also ``python -m pycomm``).

Commands:

``pycomm demo``
    Train a small byte-level transformer with DDP under several gradient
    communication methods and print a comparison table (see :mod:`pycomm.demo`).

Each command is a sub-parser added by an ``_add_<command>`` function that sets
``func`` to its handler, so a command group such as ``pycomm bench e2e`` is
added the same way with a nested sub-parser.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from typing import Optional, Sequence

from pycomm.demo import DEFAULT_METHODS, METHODS, DemoConfig, run_demo

__all__ = ["build_parser", "main"]


def _method_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of method names")
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    return names


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    config = replace(DemoConfig(), batch_size=args.batch_size, seed=args.seed)
    run_demo(args.methods, workers=args.workers, steps=args.steps, config=config, json_path=args.json)
    return 0


def _add_demo(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = commands.add_parser(
        "demo",
        help="compare gradient-communication methods on a DDP training run",
        description="Train a byte-level transformer LM on the Python stdlib's source with DDP "
        "(CPU, Gloo) under each method and print losses, bytes sent and step time. Each method "
        "trains with its own optimizer: AdamW, except allreduce-sgd (SGD, momentum 0.9), dgc "
        "(SGD without momentum: DGC applies momentum 0.9 in its hook) and spsa (zeroth-order "
        "pycomm.zo.SPSA: no DDP, no backward pass, one byte per worker per step), shown in the table.",
    )
    parser.add_argument("--workers", type=_positive_int, default=4, help="DDP worker processes (default: 4)")
    parser.add_argument(
        "--steps", type=_positive_int, default=DemoConfig.steps, help=f"steps per method (default: {DemoConfig.steps})"
    )
    parser.add_argument(
        "--methods",
        type=_method_list,
        default=list(DEFAULT_METHODS),
        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)}; known: {','.join(METHODS)})",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DemoConfig.batch_size,
        help=f"sequences per worker per step (default: {DemoConfig.batch_size})",
    )
    parser.add_argument(
        "--seed", type=int, default=DemoConfig.seed, help=f"seed of weights and data (default: {DemoConfig.seed})"
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    parser.set_defaults(func=_run_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``pycomm`` argument parser with all its commands."""
    parser = argparse.ArgumentParser(prog="pycomm", description="pycomm: compressed gradient communication for DDP.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``pycomm`` command line.

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The process exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))
