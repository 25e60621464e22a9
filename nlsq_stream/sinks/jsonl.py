"""``JsonlSink``: every event as one JSON line, lossless and replayable (``nlsq_stream.replay``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ..events import Event


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
