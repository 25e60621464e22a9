"""nlsq_stream: nonlinear least squares in JAX that you can watch while it runs.

Data flows one way, one module per stage: the model and data become a compiled problem
(``_least_squares``/``_curve_fit``), the whole iteration loop runs on the device (``_engine``), its
per-iteration records leave the device in batches (``_emitter``), a thread-safe hub fans them out
(``_hub``) to one memory stream per subscriber, and sinks consume those streams (``sinks``). The
solver never waits for the watchers.
"""

from ._curve_fit import curve_fit as curve_fit
from ._least_squares import least_squares as least_squares
from ._result import OptimizeResult as OptimizeResult
from ._result import OptimizeWarning as OptimizeWarning

__all__ = [
    "OptimizeResult",
    "OptimizeWarning",
    "curve_fit",
    "least_squares",
]

__version__ = "0.1.0"
