"""What ``verbose`` shows: the console table, or the notebook widget inside Jupyter."""

from __future__ import annotations

from typing import Any

from .console import ConsoleSink
from .kernel import in_notebook


class DefaultDisplay:
    """Makes the sink ``verbose`` adds: a :class:`~nlsq_stream.notebook.FitWidget` inside a
    Jupyter kernel when the ``notebook`` extra is installed, else :class:`ConsoleSink` (scipy's
    table). ``kind()`` names that sink's class without making one, so that a face can tell
    whether its caller already gave a sink of that kind (a widget made only to be compared would
    still open its model in the notebook's front end).

    >>> type(default_display()).__name__
    'ConsoleSink'
    >>> default_display.kind().__name__
    'ConsoleSink'
    """

    def kind(self) -> type:
        """The class of the sink ``self()`` makes here."""
        if in_notebook():
            try:
                # The widget module imports anywidget (the optional ``notebook`` extra), so it is
                # imported only here, where a kernel runs; it is a sink of this package too.
                from .widget import FitWidget
            except ImportError:  # the notebook extra (anywidget, ipywidgets) is not installed
                pass
            else:
                return FitWidget
        return ConsoleSink

    def __call__(self) -> Any:
        return self.kind()()

    def __repr__(self) -> str:
        return "default_display"


#: The sink ``verbose`` adds, made on call (a ``FitWidget`` in Jupyter, else a ``ConsoleSink``);
#: ``default_display.kind()`` is its class, found without making one.
default_display = DefaultDisplay()
