"""Where we run: ``in_notebook()`` tells a Jupyter kernel from a terminal or a script."""

from __future__ import annotations

import sys


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
