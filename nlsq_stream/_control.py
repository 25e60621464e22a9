"""Stop requests: the one message that travels against the flow, from a watcher to a fit.

The stream stage registers each watched fit's stop flag here (a ``threading.Event`` the fit's
host loop checks between chunks of its compiled loop); anything that knows a fit's id (a
widget's Stop button, a signal handler, the user) sets it with :func:`stop_fit`. This module
imports nothing of the package, so a sink can ask for a stop without knowing the solver or the
stream.
"""

from __future__ import annotations

import threading
import weakref

_FLAGS: weakref.WeakValueDictionary[str, threading.Event] = weakref.WeakValueDictionary()


def register(fit_id: str, flag: threading.Event) -> None:
    """Make ``fit_id`` stoppable: :func:`stop_fit` sets ``flag`` (held weakly)."""
    _FLAGS[fit_id] = flag


def unregister(fit_id: str) -> None:
    """``fit_id`` ended: a later :func:`stop_fit` answers False."""
    _FLAGS.pop(fit_id, None)


def stop_fit(fit_id: str) -> bool:
    """Ask the watched fit ``fit_id`` to stop early; it ends with status -2 and its best parameters.

    This is what a sink's Stop button calls (the fit id is in every event). Safe from any thread.
    Returns False when no such fit is known (it finished, or was never watched).

    >>> stop_fit("no-such-fit")
    False
    """
    if not isinstance(fit_id, str):
        raise TypeError(f"`fit_id` must be a str (an event's fit_id), got {type(fit_id).__name__}")
    flag = _FLAGS.get(fit_id)
    if flag is None:
        return False
    flag.set()
    return True
