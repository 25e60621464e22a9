"""``LoggingSink``: events as records of the standard library's ``logging``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

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
from .console import progress_line


class LoggingSink:
    """Bridges events to stdlib logging: iterations at DEBUG, start and finish at INFO, failure at
    ERROR (a finished fit that did not converge logs at WARNING). Uses whatever handlers the
    logger has; each record carries the event as ``record.nlsq_event``.

    >>> import logging
    >>> sink = LoggingSink(logging.getLogger("my.fits"))
    """

    policy: Literal["lossless", "latest"] = "lossless"
    inline = True  # ``write_batch`` runs in the caller's thread (see ConsoleSink)

    def __init__(self, logger: logging.Logger | str = "nlsq_stream.fit") -> None:
        if isinstance(logger, str):
            logger = logging.getLogger(logger)
        if not isinstance(logger, logging.Logger):
            raise TypeError(f"`logger` must be a logging.Logger or a name, got {logger!r:.60}")
        self.logger = logger

    def write_batch(self, events: Sequence[Event]) -> None:
        """Log ``events``; an EventBatch's iterations are skipped unread (no Iteration event built)
        while the logger ignores DEBUG."""
        if isinstance(events, EventBatch) and not self.logger.isEnabledFor(logging.DEBUG):
            events = [*events.head, *events.tail]
        for event in events:
            self.log(event)

    async def send(self, event: Event) -> None:
        self.log(event)

    def log(self, event: Event) -> None:
        """Log one event."""
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
        else:
            _log_batch(log, event, extra)


def _log_batch(log: logging.Logger, event: Event, extra: dict[str, Any]) -> None:
    """A batch's start and end at INFO, its progress at DEBUG (one record per event)."""
    if isinstance(event, BatchStarted):
        log.info(
            "%s started: %d fits, method=%s, %d parameters %s, %d points each",
            event.batch_id,
            event.n_fits,
            event.method,
            event.n_params,
            list(event.param_names),
            event.n_points,
            extra=extra,
        )
    elif isinstance(event, BatchProgress):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", event.batch_id, progress_line(event), extra=extra)
    elif isinstance(event, BatchFinished):
        level = logging.INFO if event.n_converged == event.n_fits else logging.WARNING
        log.log(
            level,
            "%s finished: %d/%d converged in %.3f s, statuses %s",
            event.batch_id,
            event.n_converged,
            event.n_fits,
            event.elapsed,
            event.counts,
            extra=extra,
        )
