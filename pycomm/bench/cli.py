"""Command-line interface: ``pycomm <command> ...`` (also ``python -m pycomm``).

Commands:

``pycomm demo``
    The end-to-end comparison on the demo's small byte-level transformer, over a
    1 Gbit shaped link where allowed (see :mod:`pycomm.bench.demo`).

``pycomm bench e2e``
    The end-to-end benchmark: any model, methods, worker count and link
    (see :mod:`pycomm.bench.e2e`); also ``python -m pycomm.bench e2e``.

``pycomm bench tta`` (also ``pycomm bench e2e --tta``)
    Time to accuracy: steps and seconds to a target loss per method and link
    bandwidth (see :mod:`pycomm.bench.tta`).

Each command is a sub-parser added by an ``_add_<command>`` function that sets
``func`` to its handler; ``bench`` is a group with a nested sub-parser.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

from pycomm.bench.config import HIERARCHIES, MODELS, PARALLELS, BenchConfig
from pycomm.bench.demo import DEMO_BANDWIDTH, DEMO_METHODS, DEMO_STEPS
from pycomm.bench.e2e import run_e2e
from pycomm.bench.methods import DEFAULT_METHODS, DEFAULT_METHODS_BY_PARALLEL, METHODS, check_parallel
from pycomm.bench.netns import parse_delay, parse_rate
from pycomm.bench.tta import DEFAULT_BANDWIDTHS, DEFAULT_FRACTION, DEFAULT_TIMING_STEPS, run_tta

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


def _checked_by(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that keeps the text but rejects what ``parse`` rejects, with its message."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
        return text

    return check


#: Worker processes when --workers is not given (and --nodes is not).
DEFAULT_WORKERS: int = 4

_rate = _checked_by(parse_rate)
_delay = _checked_by(parse_delay)


def _add_run_options(parser: argparse.ArgumentParser, *, methods: Sequence[str], steps: Optional[int],
                     bandwidth: Optional[str]) -> None:
    steps_default = None if steps is not None else f"{BenchConfig.steps}; {TTA_STEPS} with --tta"
    _add_common_options(parser, methods=methods, steps=steps, steps_default=steps_default)
    parser.add_argument("--bandwidth", type=_rate, default=bandwidth,
                        help="shape the link to this rate (tc syntax: 100mbit, 1gbit) where allowed (root on "
                        f"Linux); otherwise run unshaped and estimate the link time (default: {bandwidth or 'none'})")
    parser.add_argument("--delay", type=_delay, default=None,
                        help="per-packet delay on the shaped link (tc syntax: 1ms; needs the kernel's netem)")
    parser.add_argument("--no-shape", action="store_true",
                        help="do not shape even where allowed: run unshaped and only estimate the link time")
    _add_process_options(parser)
    parser.add_argument("--json", "--out", dest="json", metavar="PATH", default=None,
                        help="write the report as JSON to PATH")
    parser.add_argument("--markdown", metavar="PATH", default=None, help="write the table as Markdown to PATH")
    parser.add_argument("--plot", metavar="PREFIX", default=None,
                        help="write PREFIX_loss_vs_time.png and PREFIX_loss_vs_bytes.png (needs matplotlib; "
                        "default: next to --json)")


def _add_common_options(parser: argparse.ArgumentParser, *, methods: Sequence[str], steps: Optional[int],
                        steps_help: str = "steps per method", steps_default: Optional[str] = None) -> None:
    """The options that say what is trained, shared by every command."""
    parser.add_argument("--workers", type=_positive_int, default=DEFAULT_WORKERS,
                        help=f"DDP worker processes (default: {DEFAULT_WORKERS})")
    parser.add_argument("--steps", type=_positive_int, default=steps,
                        help=f"{steps_help} (default: {steps_default or steps})")
    parser.add_argument("--methods", type=_method_list, default=list(methods),
                        help=f"comma-separated methods (default: {','.join(methods)}; known: {','.join(METHODS)})")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="sequences per worker per step (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")


def _add_node_options(parser: argparse.ArgumentParser) -> None:
    """The multi-node options of ``e2e``: emulated nodes, each running its processes under torchrun."""
    group = parser.add_argument_group("emulated nodes")
    group.add_argument("--nodes", type=_positive_int, default=None,
                       help="emulate N nodes (network namespaces on a bridge, root on Linux), one torchrun each with "
                       "a c10d rendezvous; --bandwidth and --delay shape each node's uplink; without root, run all "
                       "workers on one machine and say so")
    group.add_argument("--nproc-per-node", type=_positive_int, default=None,
                       help="processes per node (default: --workers / --nodes, or 1); --workers becomes "
                       "nodes x nproc-per-node")
    group.add_argument("--hierarchy", choices=HIERARCHIES, default=None,
                       help="pass hierarchy=VALUE to every pycomm method's pycomm.register (default: not passed, "
                       "the method's flat default); PyTorch's own hooks are unaffected")


def _resolve_workers(args: argparse.Namespace) -> tuple[int, Optional[int]]:
    """``(workers, nodes)`` from --workers, --nodes and --nproc-per-node.

    Raises:
        ValueError: when they disagree (with both numbers).
    """
    nodes, nproc = getattr(args, "nodes", None), getattr(args, "nproc_per_node", None)
    if nodes is None:
        if nproc is not None:
            raise ValueError("--nproc-per-node needs --nodes")
        return args.workers or DEFAULT_WORKERS, None
    if nproc is None:
        if args.workers is not None and args.workers % nodes:
            raise ValueError(f"--workers {args.workers} is not a multiple of --nodes {nodes}")
        nproc = args.workers // nodes if args.workers is not None else 1
    if args.workers is not None and args.workers != nodes * nproc:
        raise ValueError(f"--workers {args.workers} disagrees with --nodes {nodes} x --nproc-per-node {nproc} "
                         f"= {nodes * nproc} (give one or the other)")
    return nodes * nproc, nodes


def _add_process_options(parser: argparse.ArgumentParser) -> None:
    """The options of the worker processes, shared by ``e2e`` and ``tta``."""
    parser.add_argument("--stall-timeout", type=float, default=BenchConfig.stall_timeout_s,
                        help="kill a method whose steps stop for this many seconds (or 3x its mean step time) "
                        f"and report it failed (default: {BenchConfig.stall_timeout_s:g})")
    parser.add_argument("--start-timeout", type=float, default=BenchConfig.start_timeout_s,
                        help=f"longest wait for a method's first step (default: {BenchConfig.start_timeout_s:g})")
    parser.add_argument("--gloo-threads", type=_positive_int, default=None,
                        help="worker threads per Gloo process group (default: PyTorch's, 2)")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="gloo (CPU) or nccl (one GPU per worker); auto: nccl when there is a GPU per worker")


def _config(args: argparse.Namespace, model: str) -> BenchConfig:
    workers, nodes = _resolve_workers(args)
    return BenchConfig(workers=workers, nodes=nodes, hierarchy=getattr(args, "hierarchy", None), steps=args.steps,
                       model=model, batch_size=args.batch_size, seed=args.seed, bandwidth=args.bandwidth,
                       delay=args.delay, shape=not args.no_shape, stall_timeout_s=args.stall_timeout,
                       start_timeout_s=args.start_timeout, backend=args.backend, gloo_threads=args.gloo_threads,
                       parallel=getattr(args, "parallel", "ddp"), replicas=getattr(args, "replicas", None))


def _run(args: argparse.Namespace, model: str, title: str) -> int:
    try:
        config = _config(args, model)
        config.resolved_backend  # e.g. NCCL with fewer GPUs than workers: say so before starting anything
        check_parallel(((name, METHODS[name]) for name in args.methods), config.parallel)
    except ValueError as e:
        print(f"{title}: error: {e}", file=sys.stderr)
        return 2
    plot = args.plot
    if plot is None and args.json:
        plot = args.json[:-5] if args.json.endswith(".json") else args.json
    run_e2e(args.methods, config, json_path=args.json, markdown_path=args.markdown,
            plot_prefix=plot, title=title)
    return 0


def _add_demo(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = commands.add_parser(
        "demo",
        help="compare gradient-communication methods on the demo's small LM (a 1 Gbit shaped link where allowed)",
        description="Train a byte-level transformer LM on the Python stdlib's source with DDP (CPU, Gloo) under "
        f"each method, over a {DEMO_BANDWIDTH} link shaped in a network namespace where allowed (root on Linux; "
        "unshaped otherwise), and print losses, bytes sent and step time. The same as "
        "`pycomm bench e2e --model lm` with the demo's methods and steps.",
    )
    _add_run_options(parser, methods=DEMO_METHODS, steps=DEMO_STEPS, bandwidth=DEMO_BANDWIDTH)
    parser.set_defaults(func=lambda args: _run(args, "lm", "pycomm demo"))


def _add_bench(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks.")
    group = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    e2e = group.add_parser(
        "e2e",
        help="end-to-end: train with each method over a shaped link and compare",
        description="Train a model with DDP under each method (fresh workers per method; a method that crashes "
        "or hangs is reported as failed), over a link shaped by tc in a network namespace where allowed, and "
        "report median step time, bytes per worker per step (counted at the process-group level; also the "
        "wire bytes when shaped), compression vs fp32 all-reduce and final loss as a table, JSON and plots. "
        "With --tta it is `pycomm bench tta` (time to accuracy per bandwidth) with the same options.",
    )
    _add_model_option(e2e)
    _add_run_options(e2e, methods=DEFAULT_METHODS, steps=None, bandwidth=None)
    _add_node_options(e2e)
    _add_parallel_options(e2e)
    # None: not given, so that --nodes x --nproc-per-node can be checked against an explicit --workers
    e2e.set_defaults(workers=None, methods=None)  # methods None: the --parallel kind's defaults
    tta_options = e2e.add_argument_group("time to accuracy (with --tta)")
    tta_options.add_argument("--tta", action="store_true",
                             help="run the time-to-accuracy mode (`pycomm bench tta`): curves unshaped, s/step per "
                             f"--bandwidths; --steps defaults to {TTA_STEPS}, --no-shape means --estimate")
    _add_tta_options(tta_options)
    e2e.set_defaults(func=_run_e2e_or_tta)
    _add_tta(group)


def _add_parallel_options(parser: argparse.ArgumentParser) -> None:
    """``--parallel`` and ``--replicas`` of ``e2e``: DDP, or the model sharded with FSDP2 (FSDP or HSDP)."""
    group = parser.add_argument_group("sharded data parallelism")
    group.add_argument("--parallel", choices=PARALLELS, default="ddp",
                       help="ddp: a full replica per worker (the DDP methods); fsdp: FSDP2 fully_shard over all "
                       f"workers (methods {','.join(DEFAULT_METHODS_BY_PARALLEL['fsdp'])}); hsdp: --replicas "
                       "replicas, each sharded over workers/replicas ranks (methods "
                       f"{','.join(DEFAULT_METHODS_BY_PARALLEL['hsdp'])}); the default --methods follow it "
                       "(default: ddp)")
    group.add_argument("--replicas", type=_positive_int, default=None,
                       help="replicas of --parallel hsdp (at least 2, dividing --workers into shard groups of at "
                       "least 2; default: --nodes if given, else 2)")


def _add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(MODELS), default="lm",
                        help="lm: the demo's transformer; large: a ~26M-parameter MLP where communication dominates")


def _rate_list(text: str) -> list[str]:
    rates = [rate.strip() for rate in text.split(",") if rate.strip()]
    if not rates:
        raise argparse.ArgumentTypeError("expected a comma-separated list of rates, e.g. 100mbit,1gbit")
    return [_rate(rate) for rate in rates]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


#: Steps per method of ``pycomm bench tta`` when not given: enough for a target at 90% of the run to mean something.
TTA_STEPS: int = 200


def _run_e2e_or_tta(args: argparse.Namespace) -> int:
    if args.methods is None:
        args.methods = list(DEFAULT_METHODS_BY_PARALLEL[args.parallel])
    if args.tta and (args.parallel != "ddp" or args.replicas is not None):
        print("pycomm bench e2e --tta: error: --parallel and --replicas are for e2e runs, not --tta",
              file=sys.stderr)
        return 2
    if not args.tta:
        if args.steps is None:
            args.steps = BenchConfig.steps
        return _run(args, args.model, "pycomm bench e2e")
    if args.nodes is not None or args.nproc_per_node is not None or args.hierarchy is not None:
        print("pycomm bench e2e --tta: error: --nodes, --nproc-per-node and --hierarchy are for e2e runs, not --tta",
              file=sys.stderr)
        return 2
    if args.bandwidth is not None:
        print("pycomm bench e2e --tta: error: --tta times every rate of --bandwidths; --bandwidth is for a single "
              "shaped run", file=sys.stderr)
        return 2
    if args.steps is None:
        args.steps = TTA_STEPS
    args.estimate = args.estimate or args.no_shape
    return _run_tta(args, "pycomm bench e2e --tta")


def _run_tta(args: argparse.Namespace, title: str = "pycomm bench tta") -> int:
    config = BenchConfig(workers=args.workers or DEFAULT_WORKERS, steps=args.steps, model=args.model,
                         batch_size=args.batch_size, seed=args.seed, delay=args.delay,
                         stall_timeout_s=args.stall_timeout, start_timeout_s=args.start_timeout,
                         backend=args.backend, gloo_threads=args.gloo_threads)
    plot = args.plot
    if plot is None and args.json:
        plot = (args.json[:-5] if args.json.endswith(".json") else args.json) + "_loss_vs_time.png"
    try:
        config.resolved_backend
        check_parallel(((name, METHODS[name]) for name in args.methods), config.parallel)
        run_tta(args.methods, config, bandwidths=args.bandwidths, target_loss=args.target_loss,
                fraction=args.fraction, window=args.window, estimate=args.estimate,
                shared_link=not args.per_worker_links, timing_steps=args.timing_steps, json_path=args.json,
                markdown_path=args.markdown, plot_path=plot)
    except ValueError as e:
        print(f"{title}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_tta_options(parser: "argparse._ActionsContainer") -> None:
    """The options that only time to accuracy has, shared by ``tta`` and ``e2e --tta``."""
    parser.add_argument("--bandwidths", type=_rate_list, default=list(DEFAULT_BANDWIDTHS),
                        help=f"comma-separated link rates, tc syntax (default: {','.join(DEFAULT_BANDWIDTHS)})")
    parser.add_argument("--estimate", action="store_true",
                        help="do not shape: estimate each bandwidth's s/step as unshaped s/step + link time of the "
                        "counted bytes (labelled as an estimate in the JSON and the table)")
    parser.add_argument("--per-worker-links", action="store_true",
                        help="estimates assume a link of that rate per worker (default: one link shared by all "
                        "workers, as the shaped runs have it)")
    parser.add_argument("--timing-steps", type=_positive_int, default=DEFAULT_TIMING_STEPS,
                        help=f"steps per method of each shaped timing run (default: {DEFAULT_TIMING_STEPS})")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="the target training loss (default: the allreduce baseline's smoothed loss at "
                        "--fraction of its run)")
    parser.add_argument("--fraction", type=_fraction, default=DEFAULT_FRACTION,
                        help=f"where in the baseline's run the default target is taken (default: {DEFAULT_FRACTION})")
    parser.add_argument("--window", type=_positive_int, default=None,
                        help="losses are smoothed by a trailing mean of this many steps (default: 10%% of --steps, "
                        "1 to 20)")


def _add_tta(group: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    tta = group.add_parser(
        "tta",
        help="time to accuracy: which method reaches a target loss first on each link bandwidth",
        description="Train each method's whole curve once, unshaped (a synchronous method's loss after step s does "
        "not depend on the link's speed), then time a few steps per method on a link shaped to each bandwidth "
        "where allowed (root on Linux), or with --estimate (or where shaping is not allowed) estimate the "
        "shaped s/step as the unshaped s/step plus the link time of the counted bytes. Reports steps to target, "
        "time to target = steps to target x s/step per bandwidth, final loss and bytes per worker per step. "
        "Also reachable as `pycomm bench e2e --tta`.",
    )
    _add_model_option(tta)
    _add_common_options(tta, methods=DEFAULT_METHODS, steps=TTA_STEPS,
                        steps_help="steps of each method's curve (allreduce is added to --methods when --target-loss "
                        "is not given)")
    _add_tta_options(tta)
    tta.add_argument("--delay", type=_delay, default=None,
                     help="per-packet delay on the shaped links (tc syntax: 1ms; needs the kernel's netem)")
    _add_process_options(tta)
    tta.add_argument("--out", "--json", dest="json", metavar="PATH", default=None,
                     help="write the report as JSON to PATH")
    tta.add_argument("--markdown", metavar="PATH", default=None, help="write the table as Markdown to PATH")
    tta.add_argument("--plot", metavar="PATH", default=None,
                     help="write a PNG of loss against estimated wall-clock time per bandwidth (needs matplotlib; "
                     "default: next to --out)")
    tta.set_defaults(func=_run_tta)


def build_parser() -> argparse.ArgumentParser:
    """The ``pycomm`` argument parser with all its commands."""
    parser = argparse.ArgumentParser(prog="pycomm", description="pycomm: compressed gradient communication for DDP.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(commands)
    _add_bench(commands)
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
