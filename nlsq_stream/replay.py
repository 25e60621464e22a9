"""Read a JSON-lines fit log back as events.

Replay only ever parses JSON (never pickle, never eval). A bad line -- garbage, wrong types, an
unknown event type, JSON nested too deeply, a line over the size limit -- is reported with a
:class:`ReplayWarning` naming the file, the line number and the reason, and skipped; the good
lines still come through. A torn last line (a crash mid-write) is reported the same way.

>>> import anyio, os, tempfile
>>> from nlsq_stream.events import FitFailed
>>> async def show(path):
...     async for event in replay(path):
...         print(type(event).__name__, event.message)
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = os.path.join(tmp, "fit.jsonl")
...     with open(path, "w") as f:
...         print(FitFailed("fit-1", "ValueError", "bad model", 0.0).to_json(), file=f)
...     anyio.run(show, path)
FitFailed bad model
"""

from __future__ import annotations

import os
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import IO

import anyio.lowlevel

from .events import MAX_LINE_BYTES, Event, EventDecodeError, event_from_json

__all__ = ["ReplayWarning", "iter_events", "replay"]

_CHUNK = 1 << 20


class ReplayWarning(UserWarning):
    """A line of a fit log could not be read; it was skipped."""


def _lines(f: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None, bool, str]]:
    """(line number, content or None if too long, ends with newline, note) for each line."""
    lineno = 0
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            # Too long: skip to the end of this line without holding it in memory.
            size = len(line)
            while True:
                more = f.readline(_CHUNK)
                size += len(more)
                if not more or more.endswith(b"\n"):
                    break
            yield lineno, None, True, f"line is {size} bytes, over the {max_bytes}-byte limit"
            continue
        yield lineno, line, line.endswith(b"\n"), ""


def iter_events(
    path: str | os.PathLike[str], max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[Event]:
    """The events of a log, synchronously (see :func:`replay` for the async form)."""
    with open(path, "rb") as f:
        for lineno, line, complete, note in _lines(f, max_line_bytes):
            if line is None:
                warnings.warn(f"{path}:{lineno}: skipped: {note}", ReplayWarning, stacklevel=2)
                continue
            if not line.strip():
                continue
            try:
                yield event_from_json(line)
            except EventDecodeError as e:
                what = "torn last line (the writer stopped mid-line)" if not complete else "skipped"
                warnings.warn(f"{path}:{lineno}: {what}: {e}", ReplayWarning, stacklevel=2)


async def replay(
    path: str | os.PathLike[str], max_line_bytes: int = MAX_LINE_BYTES
) -> AsyncIterator[Event]:
    """Yield the events of a JSON-lines log written by :class:`~nlsq_stream.sinks.JsonlSink`.

    Works on asyncio and trio; it yields control to the event loop between lines.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"`path` does not exist: {path}")
    for ev in iter_events(path, max_line_bytes):
        yield ev
        await anyio.lowlevel.checkpoint()
