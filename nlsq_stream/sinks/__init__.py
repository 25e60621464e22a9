"""Stage three, the end of the flow: sinks, the consumers of events.

A sink is anything with an ``async def send(self, event)`` method, or a plain ``async def
sink(event)`` function. Optionally it has:

* ``async def send_batch(self, events)``: called instead of ``send`` with every event that is
  ready at once (a sink that writes files uses it to do one write per batch);
* ``async def aclose(self)``: called once after the terminal event (or when detached);
* ``policy``: ``"lossless"`` (default, sees every event) or ``"latest"`` (may skip Iteration
  events when it falls behind, never FitStarted or the terminal event).

Each sink reads its own stream in a background event loop, so a slow sink never slows the fit or
another sink, and a sink that raises is detached and reported (``result.sink_errors`` and a
``SinkError`` warning) while the fit goes on.

An *inline* sink can also run in the caller's thread: it declares ``inline = True`` and has a
synchronous ``write_batch(self, events)`` (and optionally ``close(self)``). When every sink of a
``curve_fit``/``least_squares`` call is inline, the sync face calls them directly, between the
fit's chunks, with no hub, thread or event loop; ``events`` may then be an
:class:`~nlsq_stream.events.EventBatch`, whose ``rows`` a sink can read without building the
Iteration events. The console table, the JSON lines and the logging bridge are inline sinks; a
subclass that overrides their ``send``/``send_batch`` should override ``write_batch`` too (or
set ``inline = False``). A ten-line sink::

    class PrintCost:
        async def send(self, event):
            if isinstance(event, Iteration):
                print(event.iteration, event.cost)

    curve_fit(model, x, y, p0=p0, sinks=[PrintCost()])

The package holds the console table (``console``), the JSON-lines log (``jsonl``), the logging
bridge (``log``), what ``verbose`` shows (``display``, ``kernel``) and the Jupyter widget
(``widget``, which needs the ``notebook`` extra; its public home is ``nlsq_stream.notebook``).
Sinks may import the events and ``_control`` (the widget's Stop button); they know nothing of
the solver or the stream.
"""

from __future__ import annotations

from .console import HEADER as HEADER
from .console import ConsoleSink as ConsoleSink
from .display import default_display as default_display
from .jsonl import JsonlSink as JsonlSink
from .kernel import in_notebook as in_notebook
from .log import LoggingSink as LoggingSink

__all__ = ["ConsoleSink", "JsonlSink", "LoggingSink", "default_display", "in_notebook"]
