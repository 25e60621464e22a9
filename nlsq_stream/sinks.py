"""Stage five: sinks, the consumers at the end of the pipeline.

A sink is anything with an ``async def send(self, event)`` method, or a plain ``async def
sink(event)`` function. Optionally it has:

* ``async def send_batch(self, events)``: called instead of ``send`` with every event that is
  ready at once (a sink that writes files uses it to do one write per batch);
* ``async def aclose(self)``: called once after the terminal event (or when detached);
* ``policy``: ``"lossless"`` (default, sees every event) or ``"latest"`` (may skip Iteration
  events when it falls behind, never FitStarted or the terminal event).

Each sink reads its own stream in a background event loop, so a slow sink never slows the fit or
another sink, and a sink that raises is detached and reported (``result.sink_errors`` and a
``SinkError`` warning) while the fit goes on. A ten-line sink::

    class PrintCost:
        async def send(self, event):
            if isinstance(event, Iteration):
                print(event.iteration, event.cost)

    curve_fit(model, x, y, p0=p0, sinks=[PrintCost()])
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal

from .events import Event, FitFailed, FitFinished, FitStarted, Iteration

__all__ = ["ConsoleSink", "JsonlSink", "LoggingSink", "default_display", "in_notebook"]


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


class JsonlSink:
    """Writes every event as one JSON line (lossless; replay with :func:`nlsq_stream.replay`).

    Each batch is written with a single unbuffered ``write``, so after a crash (even SIGKILL) every
    complete line in the file parses; the file is fsync'ed when the fit ends.

    >>> sink = JsonlSink("fit.jsonl")   # nothing is opened until the first event
    """

    policy: Literal["lossless", "latest"] = "lossless"

    def __init__(self, path: str | os.PathLike[str], mode: Literal["a", "w"] = "a") -> None:
        if mode not in ("a", "w"):
            raise ValueError(f"`mode` must be 'a' or 'w', got {mode!r}")
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise IsADirectoryError(f"`path` is a directory: {self.path}")
        self._mode = mode
        self._fd: int | None = None
        self.lines_written = 0

    def _open(self) -> int:
        if self._fd is None:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if self._mode == "a" else os.O_TRUNC)
            self._fd = os.open(self.path, flags, 0o644)
            self._mode = "a"  # a reused sink appends after its first fit
        return self._fd

    async def send_batch(self, events: Sequence[Event]) -> None:
        if not events:
            return
        data = "".join(ev.to_json() + "\n" for ev in events).encode("utf-8")
        fd = self._open()
        view = memoryview(data)
        while view:  # a regular file takes it in one write; loop only for safety
            n = os.write(fd, view)
            view = view[n:]
        self.lines_written += len(events)

    async def send(self, event: Event) -> None:
        await self.send_batch([event])

    async def aclose(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


class LoggingSink:
    """Bridges events to stdlib logging: iterations at DEBUG, start and finish at INFO, failure at
    ERROR (a finished fit that did not converge logs at WARNING). Uses whatever handlers the
    logger has; each record carries the event as ``record.nlsq_event``.

    >>> import logging
    >>> sink = LoggingSink(logging.getLogger("my.fits"))
    """

    policy: Literal["lossless", "latest"] = "lossless"

    def __init__(self, logger: logging.Logger | str = "nlsq_stream.fit") -> None:
        if isinstance(logger, str):
            logger = logging.getLogger(logger)
        if not isinstance(logger, logging.Logger):
            raise TypeError(f"`logger` must be a logging.Logger or a name, got {logger!r:.60}")
        self.logger = logger

    async def send(self, event: Event) -> None:
        log = self.logger
        extra = {"nlsq_event": event}
        if isinstance(event, Iteration):
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s iteration %d: nfev=%d cost=%.6e optimality=%.2e",
                    event.fit_id,
                    event.iteration,
                    event.nfev,
                    event.cost,
                    event.optimality,
                    extra=extra,
                )
        elif isinstance(event, FitStarted):
            log.info(
                "%s started: method=%s, %d parameters %s, %d residuals",
                event.fit_id,
                event.method,
                event.n_params,
                list(event.param_names),
                event.n_residuals,
                extra=extra,
            )
        elif isinstance(event, FitFinished):
            r = event.result
            level = logging.INFO if r.get("success", True) else logging.WARNING
            log.log(
                level,
                "%s finished (status %s): %s cost=%.6e nfev=%s",
                event.fit_id,
                r.get("status"),
                r.get("message"),
                r.get("cost", float("nan")),
                r.get("nfev"),
                extra=extra,
            )
        elif isinstance(event, FitFailed):
            log.error(
                "%s failed: %s: %s", event.fit_id, event.error_type, event.message, extra=extra
            )


def in_notebook() -> bool:
    """True inside a Jupyter kernel (the way ``tqdm.auto`` tells): IPython is running, as
    ``ZMQInteractiveShell``, under an ``IPKernelApp``. Imports nothing that is not loaded yet.

    >>> in_notebook()
    False
    """
    ipython_mod = sys.modules.get("IPython")
    if ipython_mod is None:  # no kernel runs without IPython already imported
        return False
    try:
        shell = ipython_mod.get_ipython()
    except Exception:
        return False
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False
    try:
        return "IPKernelApp" in shell.config
    except Exception:
        return False


def default_display() -> Any:
    """The sink ``verbose`` adds: a :class:`~nlsq_stream.notebook.FitWidget` inside a Jupyter
    kernel when the ``notebook`` extra is installed, else :class:`ConsoleSink` (scipy's table).

    >>> type(default_display()).__name__
    'ConsoleSink'
    """
    if in_notebook():
        try:
            from .notebook import FitWidget
        except ImportError:  # the notebook extra (anywidget, ipywidgets) is not installed
            pass
        else:
            return FitWidget()
    return ConsoleSink()
