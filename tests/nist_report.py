"""Print a Markdown report of NIST StRD accuracy: ours (trf, lm) against scipy's trf.

Run as ``python tests/nist_report.py [--nist-dir DIR]``. Every fit starts from NIST's Start 1 and
Start 2 with ftol = xtol = gtol = 1e-15 and max_nfev = 10000; LRE is the number of correct
significant digits against NIST's certified values (capped at 11).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)  # before any array exists

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nist  # noqa: E402
from conftest import NIST_DIR  # noqa: E402

SOLVERS = ("ours-trf", "ours-lm", "scipy-trf")


def _fmt(result: nist.FitResult) -> str:
    """Min parameter LRE, "no conv" for a fit that raised, and a star when below the bar."""
    if not result.converged:
        return "no conv *"
    star = "" if result.solved else " *"
    return f"{result.min_lre:.1f}{star}"


def _lres(values: np.ndarray) -> str:
    return " ".join(f"{v:4.1f}" for v in values)


def run(nist_dir: Path) -> int:
    problems = nist.load_all(nist_dir)
    results: dict[tuple[str, int], dict[str, nist.FitResult]] = {}
    t0 = time.perf_counter()
    for p in problems.values():
        for start in (1, 2):
            results[p.name, start] = {
                "ours-trf": nist.fit_ours(p, start, "trf"),
                "ours-lm": nist.fit_ours(p, start, "lm"),
                "scipy-trf": nist.fit_scipy(p, start),
            }
    elapsed = time.perf_counter() - t0

    print("# NIST StRD nonlinear regression: minimum LRE over the parameters\n")
    print(
        f"ftol = xtol = gtol = {nist.TOLERANCES['ftol']:g}, max_nfev = {nist.MAX_NFEV}; ours use "
        "autodiff Jacobians, scipy its default 2-point finite differences. `*` marks a case "
        f"where some parameter has LRE < {nist.SOLVED_LRE:g} or the fit raised (no conv). "
        "SD LRE compares ours-trf's sqrt(diag(pcov)) with NIST's certified standard deviations.\n"
    )
    print("| problem | difficulty | start | ours-trf | ours-lm | scipy-trf | ours-trf SD |")
    print("|---|---|---|---|---|---|---|")
    for (name, start), by in results.items():
        ours = by["ours-trf"]
        sd = f"{ours.min_sd_lre:.1f}" if ours.converged else "-"
        print(
            f"| {name} | {problems[name].difficulty} | {start} | {_fmt(ours)} | "
            f"{_fmt(by['ours-lm'])} | {_fmt(by['scipy-trf'])} | {sd} |"
        )
    total = len(results)
    counts = {s: sum(by[s].solved for by in results.values()) for s in SOLVERS}
    print()
    print(
        "; ".join(f"{s.replace('-', ' ')}: {counts[s]}/{total}" for s in SOLVERS)
        + f" cases with every parameter LRE >= {nist.SOLVED_LRE:g}"
    )
    for start in (1, 2):
        per = {
            s: sum(by[s].solved for (_, st), by in results.items() if st == start) for s in SOLVERS
        }
        n = sum(1 for (_, st) in results if st == start)
        print(f"  Start {start}: " + ", ".join(f"{s} {per[s]}/{n}" for s in SOLVERS))

    print("\n## Per-parameter LREs (b1 b2 ...), RSS LRE and nfev\n")
    print("```")
    for (name, start), by in results.items():
        for s in SOLVERS:
            r = by[s]
            if r.converged:
                detail = f"[{_lres(r.param_lre)}]  RSS {r.rss_lre:4.1f}  nfev {r.nfev}"
            else:
                detail = f"raised: {r.message}"
            print(f"{name:9s} s{start} {s:9s} {detail}")
        ours = by["ours-trf"]
        if ours.converged:
            print(f"{name:9s} s{start} {'SD trf':9s} [{_lres(ours.sd_lre)}]")
    print("```")

    failures = [r for by in results.values() for r in by.values() if not r.solved]
    if failures:
        print("\n## Cases not solved\n")
        for r in failures:
            print(f"- {r.describe()}")
    print(f"\n({len(results) * len(SOLVERS)} fits in {elapsed:.1f} s, compilation included)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nist-dir", type=Path, default=NIST_DIR, help="NIST's .dat files")
    args = parser.parse_args(argv)
    if not args.nist_dir.is_dir():
        print(f"NIST StRD files not found at {args.nist_dir}", file=sys.stderr)
        return 2
    return run(args.nist_dir)


if __name__ == "__main__":
    sys.exit(main())
