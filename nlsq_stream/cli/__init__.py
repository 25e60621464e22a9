"""The ``nlsq-stream`` command: ``demo`` (a live multi-peak fit), ``bench`` (ratios),
``replay FILE`` (the table again from a JSONL log) and ``summary FILE`` (the result of a log).

Run ``nlsq-stream --help`` or ``nlsq-stream COMMAND --help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax

from .._compile_cache import ENV_VAR, enable_compile_cache
from ..benchmarks import BenchOptions, run_bench
from ..events import FitFailed, FitFinished, FitStarted
from ..replay import iter_events
from ..sinks import ConsoleSink
from .demo import run_demo

BENCHES = ("solver", "emit", "batch", "cold", "stop", "slow", "dask", "all")


def _positive_int(text: str) -> int:
    """An integer >= 1, written plainly or as 1e5."""
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not (number >= 1 and number.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(number)


def _sizes(text: str) -> tuple[int, ...]:
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected sizes such as 1000 or 1e3,1e5")
    return tuple(_positive_int(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands ``demo``, ``bench``, ``replay`` and ``summary``)."""
    parser = argparse.ArgumentParser(
        prog="nlsq-stream",
        description="nlsq_stream: JAX nonlinear least squares you can watch while it runs.",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{demo,bench,replay,summary}", required=True
    )

    demo = sub.add_parser(
        "demo",
        help="fit a noisy multi-peak spectrum with the live table and a JSONL log",
        description="Fit a built-in noisy five-peak spectrum (method='trf', float64), showing "
        "scipy's verbose=2 table live and writing every event to a JSONL log.",
    )
    demo.add_argument(
        "--log",
        default="nlsq_stream_demo.jsonl",
        metavar="PATH",
        help="JSONL event log to write (overwritten; default: %(default)s)",
    )
    demo.add_argument(
        "--points",
        type=_positive_int,
        default=100_000,
        metavar="N",
        help="number of data points (default: %(default)s)",
    )
    demo.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="keep the compiled solver in JAX's persistent compilation cache in DIR, so that the "
        "next demo starts sooner (default: the user's cache folder, unless "
        "NLSQ_STREAM_COMPILE_CACHE=0)",
    )
    demo.add_argument(
        "--no-compile-cache", action="store_true", help="compile without the persistent cache"
    )

    bench = sub.add_parser(
        "bench",
        help="measure speed against scipy, emission overhead, batched fits, stream and stop "
        "latency, slow consumers",
        description="Benchmarks measured side by side in one process (medians of repeats after "
        "a warm-up), each printed with its target and PASS or MISS.",
    )
    bench.add_argument(
        "which",
        nargs="?",
        default="all",
        choices=BENCHES,
        help="which benchmark to run (default: %(default)s)",
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        metavar="R",
        help="timed repeats for every measurement (default: tuned per problem size)",
    )
    bench.add_argument(
        "--quick", action="store_true", help="fewer repeats and shorter fits (about a minute)"
    )
    bench.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        metavar="N[,N...]",
        help="problem sizes: points per fit for solver and emit (default: 1e3,1e5,1e6); "
        "fits for batch (default: 1e2,1e3,1e4,1e5; --quick: 1e2,1e3), dask (2e5; --quick: 2e4)",
    )
    for name, text in (
        ("replay", "print scipy's verbose=2 table again from a JSONL event log"),
        ("summary", "print the result of each fit in a JSONL event log"),
    ):
        cmd = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        cmd.add_argument("file", metavar="FILE", help="a log written by JsonlSink")
    return parser


def _replay(path: str) -> int:
    """Print the console table of every event in ``path``; bad lines warn on stderr."""
    sink = ConsoleSink(file=sys.stdout)
    lines = [line for ev in iter_events(path) for line in sink.format(ev)]
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _summary(path: str) -> int:
    """One block per fit in ``path``: id, method, status, message, nfev, cost, parameters."""
    started: dict[str, FitStarted] = {}
    seen = 0
    for ev in iter_events(path):
        if isinstance(ev, FitStarted):
            started[ev.fit_id] = ev
        elif isinstance(ev, (FitFinished, FitFailed)):
            seen += 1
            head = started.get(ev.fit_id)
            method = head.method if head else "?"
            print(f"fit {ev.fit_id} ({method})")
            if isinstance(ev, FitFailed):
                print(f"  failed: {ev.error_type}: {ev.message}")
                continue
            r = ev.result
            print(f"  status {r.get('status')}: {r.get('message')}")
            cost, opt = r.get("cost", float("nan")), r.get("optimality", float("nan"))
            print(
                f"  nfev {r.get('nfev')}, nit {r.get('nit')}, cost {cost:.6e}, optimality {opt:.2e}"
            )
            names = head.param_names if head else ()
            for i, v in enumerate(r.get("x", [])):
                name = names[i] if i < len(names) else f"p{i}"
                print(f"  {name:>12} = {v:.10g}")
    if not seen:
        print(f"no finished fit in {path}", file=sys.stderr)
        return 1
    return 0


def _cache_turned_off() -> bool:
    """Whether ``NLSQ_STREAM_COMPILE_CACHE`` says 0/false/no/off (unset is not off here)."""
    value = os.environ.get(ENV_VAR)
    return value is not None and value.strip().lower() in ("", "0", "false", "no", "off")


def _enable_x64() -> None:
    jax.config.update("jax_enable_x64", True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nlsq-stream``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command in ("replay", "summary"):
        try:
            return _replay(args.file) if args.command == "replay" else _summary(args.file)
        except FileNotFoundError as e:
            print(f"nlsq-stream {args.command}: {e}", file=sys.stderr)
            return 2
    _enable_x64()
    if args.command == "demo":
        asked = args.compile_cache is not None and not args.no_compile_cache
        if asked or not (args.no_compile_cache or _cache_turned_off()):
            try:
                enable_compile_cache(args.compile_cache)
            except (TypeError, ValueError) as e:
                print(f"nlsq-stream demo: --compile-cache: {e}", file=sys.stderr)
                return 2
        return run_demo(log=args.log, points=args.points)
    opts = BenchOptions(quick=args.quick, repeats=args.repeats, sizes=args.sizes)
    return run_bench(args.which, opts)
