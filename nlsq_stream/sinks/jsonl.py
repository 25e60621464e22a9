"""``JsonlSink``: every event as one JSON line, lossless and replayable (``nlsq_stream.replay``)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ..events import SCHEMA_VERSION, Event, EventBatch


def json_lines(events: Sequence[Event]) -> str:
    """``events`` as JSON lines, each ending in a newline: ``event.to_json()`` of each, except
    that an EventBatch's rows are written as they are, with no Iteration event built (the same
    text; rows holding a NaN or an infinity go through the events, which spell them as JSON
    does)."""
    if not isinstance(events, EventBatch) or events.rows is None:
        return "".join(ev.to_json() + "\n" for ev in events)
    if not np.isfinite(events.rows).all():
        return "".join(ev.to_json() + "\n" for ev in events.events())
    return "".join(
        [
            *(ev.to_json() + "\n" for ev in events.head),
            _iteration_lines(events.fit_id, events.rows, events.time),
            *(ev.to_json() + "\n" for ev in events.tail),
        ]
    )


def _iteration_lines(fit_id: str, rows: np.ndarray, t: float) -> str:
    """Iteration events' JSON lines straight from finite rows: the keys of ``to_json`` in its
    order, numbers as ``json.dumps`` writes them (``repr``)."""
    if not math.isfinite(t):
        raise ValueError(f"an event time must be finite, got {t!r}")
    start = f'{{"schema":{SCHEMA_VERSION},"type":"Iteration","fit_id":{json.dumps(fit_id)},'
    end = f'],"time":{float(t)!r}}}\n'
    out = []
    for it, nfev, cost, red, step, opt, *params in rows.tolist():
        changes = 'null,"step_norm":null' if it == 0 else f'{red!r},"step_norm":{step!r}'
        out.append(
            f'{start}"iteration":{int(it)},"nfev":{int(nfev)},"cost":{cost!r},'
            f'"cost_reduction":{changes},"optimality":{opt!r},"params":['
            f"{','.join(map(repr, params))}{end}"
        )
    return "".join(out)


class JsonlSink:
    """Writes every event as one JSON line (lossless; replay with :func:`nlsq_stream.replay`).

    Each batch is written with a single unbuffered ``write``, so after a crash (even SIGKILL) every
    complete line in the file parses; the file is fsync'ed when the fit ends. An inline sink
    (``inline = True``, see :class:`~nlsq_stream.sinks.ConsoleSink`): ``write_batch`` and
    ``close`` are its synchronous methods, ``send_batch`` and ``aclose`` the same, awaitable.

    >>> sink = JsonlSink("fit.jsonl")   # nothing is opened until the first event
    """

    policy: Literal["lossless", "latest"] = "lossless"
    inline = True

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

    def write_batch(self, events: Sequence[Event]) -> None:
        """Append one line per event, with one ``write``."""
        if not len(events):
            return
        data = json_lines(events).encode("utf-8")
        fd = self._open()
        view = memoryview(data)
        while view:  # a regular file takes it in one write; loop only for safety
            n = os.write(fd, view)
            view = view[n:]
        self.lines_written += len(events)

    def close(self) -> None:
        """Fsync and close the file (the next fit reopens it, appending)."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    async def send_batch(self, events: Sequence[Event]) -> None:
        self.write_batch(events)

    async def send(self, event: Event) -> None:
        self.write_batch([event])

    async def aclose(self) -> None:
        self.close()
