"""``nlsq-stream demo``: fit a noisy five-peak spectrum and watch the fit live.

The spectrum is three Gaussian and two Lorentzian peaks on a linear baseline, sampled at ``points``
points on [0, 100] with Gaussian noise from a fixed seed (float64, numpy only). The start values are
what a quick look at a plot gives: every peak as tall as the spectrum (12) and as wide as 8, the
centres read off to within 3; amplitudes and widths are kept positive by bounds, each centre within
10 of its guess. ``method="trf"`` takes a dozen or more iterations from there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import jax.numpy as jnp
import numpy as np

from ..faces.sync import curve_fit
from ..sinks import ConsoleSink, JsonlSink

DEFAULT_LOG = "nlsq_stream_demo.jsonl"
DEFAULT_POINTS = 100_000
SEED = 20240611
NOISE = 0.25
X_RANGE = (0.0, 100.0)

# (shape, amplitude, centre, width, centre as guessed from a plot) of each peak, left to right.
PEAKS: tuple[tuple[str, float, float, float, float], ...] = (
    ("gauss", 6.0, 18.0, 2.5, 20.0),
    ("lorentz", 4.0, 36.0, 3.0, 35.0),
    ("gauss", 9.0, 52.0, 1.6, 50.0),
    ("lorentz", 5.0, 57.0, 2.2, 60.0),
    ("gauss", 7.0, 80.0, 4.0, 80.0),
)
BASELINE = (0.8, 0.012)  # offset, slope

PARAM_NAMES: tuple[str, ...] = (
    "offset",
    "slope",
    *(f"{kind}{i + 1}" for i in range(len(PEAKS)) for kind in ("amp", "cen", "wid")),
)
TRUE = np.array([*BASELINE, *(v for _, a, c, w, _ in PEAKS for v in (a, c, w))], dtype=np.float64)
GUESS_AMP, GUESS_WIDTH = 12.0, 8.0
P0 = np.array(
    [0.0, 0.0, *(v for *_, c in PEAKS for v in (GUESS_AMP, c, GUESS_WIDTH))],
    dtype=np.float64,
)


def _bounds() -> tuple[np.ndarray, np.ndarray]:
    lb = np.full(P0.size, -np.inf)
    ub = np.full(P0.size, np.inf)
    for i in range(len(PEAKS)):
        a, c, w = 2 + 3 * i, 3 + 3 * i, 4 + 3 * i
        lb[a] = 0.0
        lb[c], ub[c] = P0[c] - 10.0, P0[c] + 10.0
        lb[w], ub[w] = 0.1, 30.0
    return lb, ub


def _evaluate(xp: Any, x: Any, p: Any) -> Any:
    """The spectrum at ``x`` for parameters ``p`` (a sequence), with ``xp`` numpy or jax.numpy."""
    out = p[0] + p[1] * x
    for i, (kind, *_) in enumerate(PEAKS):
        amp, cen, wid = p[2 + 3 * i], p[3 + 3 * i], p[4 + 3 * i]
        z = (x - cen) / wid
        out = out + (amp * xp.exp(-0.5 * z * z) if kind == "gauss" else amp / (1.0 + z * z))
    return out


def spectrum(
    x: Any,
    offset: Any,
    slope: Any,
    amp1: Any,
    cen1: Any,
    wid1: Any,
    amp2: Any,
    cen2: Any,
    wid2: Any,
    amp3: Any,
    cen3: Any,
    wid3: Any,
    amp4: Any,
    cen4: Any,
    wid4: Any,
    amp5: Any,
    cen5: Any,
    wid5: Any,
) -> Any:
    """Linear baseline plus Gaussian (peaks 1, 3, 5) and Lorentzian (2, 4) peaks, in jax.numpy."""
    baseline = (offset, slope)
    peaks = (amp1, cen1, wid1, amp2, cen2, wid2, amp3, cen3, wid3, amp4, cen4, wid4)
    return _evaluate(jnp, x, (*baseline, *peaks, amp5, cen5, wid5))


def make_data(points: int = DEFAULT_POINTS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The demo's noisy spectrum: ``(x, y)`` as float64 numpy arrays."""
    x = np.linspace(*X_RANGE, points)
    rng = np.random.default_rng(seed)
    y = _evaluate(np, x, TRUE) + NOISE * rng.standard_normal(points)
    return x, y


def run_demo(
    log: str | os.PathLike[str] = DEFAULT_LOG,
    points: int = DEFAULT_POINTS,
    out: IO[str] | None = None,
) -> int:
    """Fit the spectrum with the live table on stdout and a JSONL log; return an exit code."""
    out = out if out is not None else sys.stdout
    if points < 10 * P0.size:
        print(f"--points must be at least {10 * P0.size}, got {points}", file=sys.stderr)
        return 2
    path = Path(log)
    x, y = make_data(points)
    print(
        f"nlsq-stream demo: {len(PEAKS)} peaks on a linear baseline, {points} points, "
        f"{P0.size} parameters, method='trf'",
        file=out,
    )
    print(f"live table below; JSONL log -> {path}", file=out, flush=True)
    t0 = time.perf_counter()
    try:
        popt, pcov, info, _, _ = curve_fit(
            spectrum,
            x,
            y,
            p0=P0,
            bounds=_bounds(),
            method="trf",
            full_output=True,
            verbose=2,
            sinks=[ConsoleSink(file=out), JsonlSink(path, mode="w")],
        )
    except RuntimeError as e:  # did not converge
        print(f"nlsq-stream demo: the fit failed: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    err = np.sqrt(np.clip(np.diag(pcov), 0.0, None))
    print(
        f"\n{info['nit']} iterations, {info['nfev']} evaluations, {elapsed:.2f} s "
        "(compilation included)",
        file=out,
    )
    print(f"{'parameter':<10}{'fitted':>12}{'+/-':>11}{'true':>11}{'start':>11}", file=out)
    for name, v, dv, t, s in zip(PARAM_NAMES, popt, err, TRUE, P0, strict=True):
        print(f"{name:<10}{v:>12.5f}{dv:>11.5f}{t:>11.5f}{s:>11.5f}", file=out)
    with path.open(encoding="utf-8") as f:
        n_lines = sum(1 for _ in f)
    print(f"log: {path.resolve()} ({n_lines} events)", file=out, flush=True)
    return 0
