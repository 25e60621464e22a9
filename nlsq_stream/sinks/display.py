"""What ``verbose`` shows: the console table, or the notebook widget inside Jupyter."""

from __future__ import annotations

from typing import Any

from .console import ConsoleSink
from .kernel import in_notebook


def default_display() -> Any:
    """The sink ``verbose`` adds: a :class:`~nlsq_stream.notebook.FitWidget` inside a Jupyter
    kernel when the ``notebook`` extra is installed, else :class:`ConsoleSink` (scipy's table).

    >>> type(default_display()).__name__
    'ConsoleSink'
    """
    if in_notebook():
        try:
            # The widget module imports anywidget (the optional ``notebook`` extra), so it is
            # imported only here, where a kernel runs; it is a sink of this package like the rest.
            from .widget import FitWidget
        except ImportError:  # the notebook extra (anywidget, ipywidgets) is not installed
            pass
        else:
            return FitWidget()
    return ConsoleSink()
