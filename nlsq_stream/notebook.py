"""The Jupyter widget's public home: ``from nlsq_stream.notebook import FitWidget``.

The widget is a sink like the others and lives with them (``nlsq_stream/sinks/widget.py``, which
explains how its Stop button works while a cell blocks). Importing this module needs the
``notebook`` extra (``pip install "nlsq_stream[notebook]"``).
"""

from __future__ import annotations

from .sinks.widget import MAX_POINTS as MAX_POINTS
from .sinks.widget import FitWidget as FitWidget
from .sinks.widget import in_notebook as in_notebook

__all__ = ["MAX_POINTS", "FitWidget", "in_notebook"]
