"""``ConsoleSink``: scipy's ``verbose=2`` table, then scipy's summary lines, as a sink."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO, Literal

from ..events import (
    BatchFinished,
    BatchProgress,
    BatchStarted,
    Event,
    FitFailed,
    FitFinished,
    FitStarted,
    Iteration,
)


def _fmt_row(ev: Iteration) -> str:
    red = " " * 15 if ev.cost_reduction is None else f"{ev.cost_reduction:^15.2e}"
    step = " " * 15 if ev.step_norm is None else f"{ev.step_norm:^15.2e}"
    return f"{ev.iteration:^15}{ev.nfev:^15}{ev.cost:^15.4e}{red}{step}{ev.optimality:^15.2e}"


HEADER = "{:^15}{:^15}{:^15}{:^15}{:^15}{:^15}".format(
    "Iteration", "Total nfev", "Cost", "Cost reduction", "Step norm", "Optimality"
)


def progress_line(ev: BatchProgress) -> str:
    """A batch's progress in one line: converged k/N, failed, running, fits a second, cost
    median, ETA."""
    eta = ev.eta
    median = ev.cost_quantiles[2]
    return (
        f"converged {ev.n_converged}/{ev.n_fits}, failed {ev.n_failed}, running {ev.n_running}"
        f" | {ev.fits_per_second:,.0f} fits/s | cost median {median:.4e}"
        f" | ETA {'?' if eta is None else f'{eta:.1f} s'}"
    )


def _batch_lines(ev: Event) -> list[str]:
    if isinstance(ev, BatchStarted):
        return [
            f"Batch {ev.batch_id}: {ev.n_fits} fits of {ev.model or 'a model'} "
            f"({ev.n_params} parameters, {ev.n_points} points each, method {ev.method})"
        ]
    if isinstance(ev, BatchProgress):
        return [progress_line(ev)]
    if isinstance(ev, BatchFinished):
        counts = ", ".join(f"status {k}: {v}" for k, v in sorted(ev.counts.items()))
        rate = ev.n_fits / ev.elapsed if ev.elapsed > 0 else 0.0
        return [
            f"Batch finished: {ev.n_converged}/{ev.n_fits} converged in {ev.elapsed:.2f} s "
            f"({rate:,.0f} fits/s); {counts}."
        ]
    return []


class ConsoleSink:
    """scipy's ``verbose=2`` table, then scipy's summary lines; for a batch, a progress line.

    On a terminal a batch's progress line is redrawn in place; a file gets one line per
    ``BatchProgress`` event.

    >>> sink = ConsoleSink()   # prints to sys.stdout; ConsoleSink(file=f) to print elsewhere
    """

    policy: Literal["lossless", "latest"] = "lossless"

    def __init__(self, file: IO[str] | None = None) -> None:
        self._file = file
        self._initial_cost: float | None = None
        self._redrawing = False  # a progress line is on the terminal, without its newline
        self._batches: set[str] = set()  # batches seen: their per-fit results are not printed

    @property
    def file(self) -> IO[str]:
        return self._file if self._file is not None else sys.stdout

    async def send_batch(self, events: Sequence[Event]) -> None:
        if any(isinstance(ev, BatchProgress) for ev in events) and _isatty(self.file):
            self._redraw(events)
            return
        lines: list[str] = []
        for ev in events:
            lines.extend(self.format(ev))
        if lines:
            self.file.write("\n".join(lines) + "\n")
            self.file.flush()

    def _redraw(self, events: Sequence[Event]) -> None:
        """On a terminal: the latest progress line replaces the previous one."""
        out: list[str] = []
        for ev in events:
            if isinstance(ev, BatchProgress):
                out.append("\r" + progress_line(ev) + "\x1b[K")
                self._redrawing = True
                continue
            lines = self.format(ev)
            if lines:
                out.append(("\n" if self._redrawing else "") + "\n".join(lines) + "\n")
                self._redrawing = False
        self.file.write("".join(out))
        self.file.flush()

    async def send(self, event: Event) -> None:
        await self.send_batch([event])

    def format(self, ev: Event) -> list[str]:
        """The lines this sink prints for one event."""
        if isinstance(ev, FitStarted):
            self._initial_cost = None
            return [HEADER]
        if isinstance(ev, Iteration):
            if self._initial_cost is None:
                self._initial_cost = ev.cost
            return [_fmt_row(ev)]
        if isinstance(ev, BatchStarted):
            self._batches.add(ev.batch_id)
        if isinstance(ev, FitFinished) and ev.fit_id.rpartition("/")[0] in self._batches:
            return []  # one fit of a watched batch (per_fit_events): the batch line says it all
        if isinstance(ev, FitFinished):
            r = ev.result
            init = self._initial_cost if self._initial_cost is not None else float("nan")
            return [
                str(r.get("message", "")),
                f"Function evaluations {r.get('nfev')}, initial cost {init:.4e}, final cost "
                f"{r.get('cost', float('nan')):.4e}, first-order optimality "
                f"{r.get('optimality', float('nan')):.2e}.",
            ]
        if isinstance(ev, FitFailed):
            return [f"Fit failed: {ev.error_type}: {ev.message}"]
        return _batch_lines(ev)


def _isatty(file: IO[str]) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
