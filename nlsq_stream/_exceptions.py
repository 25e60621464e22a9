"""The package's errors and warnings, in one tree (each defined where its stage lives)::

    Exception
    ├── RuntimeError
    │   └── FitError ............ the fit itself raised (the model failed); here
    ├── ValueError
    │   └── EventDecodeError .... a line of a JSONL log is not an event (``events``)
    └── Warning
        ├── UserWarning
        │   ├── OptimizeWarning . the fit finished but its result needs a look (``_result``)
        │   └── ReplayWarning ... a log line was skipped on replay (``replay``)
        └── RuntimeWarning
            └── SinkError ....... a sink raised and was detached; the fit went on; here

Bad arguments raise plain ``TypeError`` and ``ValueError`` naming the argument, before anything
starts. This module imports nothing of the package.
"""

from __future__ import annotations


class SinkError(RuntimeWarning):
    """A sink raised; it was detached and the fit and the other sinks went on."""


class FitError(RuntimeError):
    """The fit itself raised (for example the model failed); ``__cause__`` is the original."""
