"""``ConsoleSink``: scipy's ``verbose=2`` table, then scipy's summary lines, as a sink."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO, Literal

from ..events import Event, FitFailed, FitFinished, FitStarted, Iteration


def _fmt_row(ev: Iteration) -> str:
    red = " " * 15 if ev.cost_reduction is None else f"{ev.cost_reduction:^15.2e}"
    step = " " * 15 if ev.step_norm is None else f"{ev.step_norm:^15.2e}"
    return f"{ev.iteration:^15}{ev.nfev:^15}{ev.cost:^15.4e}{red}{step}{ev.optimality:^15.2e}"


HEADER = "{:^15}{:^15}{:^15}{:^15}{:^15}{:^15}".format(
    "Iteration", "Total nfev", "Cost", "Cost reduction", "Step norm", "Optimality"
)


class ConsoleSink:
    """scipy's ``verbose=2`` table, then scipy's summary lines.

    >>> sink = ConsoleSink()   # prints to sys.stdout; ConsoleSink(file=f) to print elsewhere
    """

    policy: Literal["lossless", "latest"] = "lossless"

    def __init__(self, file: IO[str] | None = None) -> None:
        self._file = file
        self._initial_cost: float | None = None

    @property
    def file(self) -> IO[str]:
        return self._file if self._file is not None else sys.stdout

    async def send_batch(self, events: Sequence[Event]) -> None:
        lines: list[str] = []
        for ev in events:
            lines.extend(self.format(ev))
        if lines:
            self.file.write("\n".join(lines) + "\n")
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
        return []
