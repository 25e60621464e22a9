"""What ``verbose`` shows: the console table, or the notebook widget inside Jupyter."""

from __future__ import annotations

import sys
from typing import Any

from .console import ConsoleSink


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
            # The widget module imports anywidget (the optional ``notebook`` extra), so it is
            # imported only here, where a kernel runs; it is a sink of this package like the rest.
            from .widget import FitWidget
        except ImportError:  # the notebook extra (anywidget, ipywidgets) is not installed
            pass
        else:
            return FitWidget()
    return ConsoleSink()
