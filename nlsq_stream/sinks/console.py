"""``ConsoleSink``: scipy's ``verbose=2`` table, then scipy's summary lines, as a sink."""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Sequence
from typing import IO, Literal

import numpy as np

from ..events import (
    BatchFinished,
    BatchProgress,
    BatchStarted,
    Event,
    EventBatch,
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
# The table's rows straight from an EventBatch's rows, the same text as ``_fmt_row``: the
# numbers are formatted with ``%`` (``%.2e`` is ``{:.2e}``; the iteration and nfev columns hold
# whole numbers, which ``%.0f`` prints as ``int`` would), then centred by one ``str.format``:
# ``{:^15.2e}`` does both at once but took 1.6 times as long.
_NUMBERS = "%.0f\x00%.0f\x00%.4e\x00%.2e\x00%.2e\x00%.2e"
_NUMBERS0 = "%.0f\x00%.0f\x00%.4e\x00%.2e"  # iteration 0: no reduction, no step
_CENTRED = "{:^15}" * 6
_CENTRED0 = "{:^15}{:^15}{:^15}" + " " * 30 + "{:^15}"


def table_rows(rows: np.ndarray) -> list[str]:
    """The table rows of record rows ``[iteration, nfev, cost, reduction, step_norm,
    optimality, ...]`` in one pass (one ``tolist``, then one ``%`` and one ``str.format`` for all
    rows but iteration 0): the same lines as formatting each row's Iteration event."""
    values = rows[:, :6].tolist()
    out: list[str] = []
    if values[0][0] == 0:
        it, nfev, cost, _, _, opt = values.pop(0)
        out.append(_CENTRED0.format(*(_NUMBERS0 % (it, nfev, cost, opt)).split("\x00")))
    if values:
        numbers_template, centred_template = _templates(len(values))
        numbers = (numbers_template % tuple(itertools.chain.from_iterable(values))).split("\x00")
        out += centred_template.format(*numbers).split("\n")
    return out


@functools.lru_cache(maxsize=64)
def _templates(k: int) -> tuple[str, str]:
    """The ``%`` and ``str.format`` templates of ``k`` table rows."""
    return "\x00".join([_NUMBERS] * k), "\n".join([_CENTRED] * k)


def progress_line(ev: BatchProgress) -> str:
    """A batch's progress in one line: converged k/N, failed, running, fits a second, cost
    median, ETA."""
    eta = ev.eta
    median = ev.cost_quantiles[2]
    b = ev.blocks
    blocks = (
        ""
        if b is None
        else f"blocks {b.get('done', 0)}/{b.get('total', 0)} (running {b.get('running', 0)}"
        f", retried {b.get('retried', 0)}) | "
    )
    return (
        f"{blocks}converged {ev.n_converged}/{ev.n_fits}, failed {ev.n_failed}"
        f", running {ev.n_running}"
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

    An inline sink (``inline = True``): the sync face calls ``write_batch`` in the caller's
    thread, between the fit's chunks, with no thread or event loop; ``fit_stream`` and a fit that
    also has async sinks use ``send_batch``, which does the same.

    >>> sink = ConsoleSink()   # prints to sys.stdout; ConsoleSink(file=f) to print elsewhere
    """

    policy: Literal["lossless", "latest"] = "lossless"
    inline = True

    def __init__(self, file: IO[str] | None = None) -> None:
        self._file = file
        self._initial_cost: float | None = None
        self._redrawing = False  # a progress line is on the terminal, without its newline
        self._batches: set[str] = set()  # batches seen: their per-fit results are not printed

    @property
    def file(self) -> IO[str]:
        return self._file if self._file is not None else sys.stdout

    def write_batch(self, events: Sequence[Event]) -> None:
        """Print the lines of ``events`` (one write and one flush); on a terminal a batch's
        progress line is redrawn in place."""
        if (not isinstance(events, EventBatch) or events.rows is None) and _isatty(self.file):
            if any(isinstance(ev, BatchProgress) for ev in events):
                self._redraw(events)
                return
        lines = self.lines(events)
        if lines:
            file = self.file
            file.write("\n".join(lines) + "\n")
            file.flush()

    async def send_batch(self, events: Sequence[Event]) -> None:
        self.write_batch(events)

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
        self.write_batch([event])

    def lines(self, events: Sequence[Event]) -> list[str]:
        """The lines this sink prints for ``events``; an EventBatch's rows are formatted as they
        are, with no Iteration event built."""
        if not isinstance(events, EventBatch) or events.rows is None:
            return [line for ev in events for line in self.format(ev)]
        out = [line for ev in events.head for line in self.format(ev)]
        if self._initial_cost is None:
            self._initial_cost = float(events.rows[0, 2])
        out += table_rows(events.rows)
        out += [line for ev in events.tail for line in self.format(ev)]
        return out

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
