"""nlsq_stream: nonlinear least squares in JAX that you can watch while it runs.

Data flows one way, one module per stage: the model and data become a compiled problem
(``_least_squares``/``_curve_fit``), the whole iteration loop runs on the device (``_engine``), its
per-iteration records leave the device in batches (``_emitter``), a thread-safe hub fans them out
(``_hub``) to one memory stream per subscriber, and sinks consume those streams (``sinks``). The
solver never waits for the watchers.
"""

from . import async_logger as async_logger
from . import events as events
from . import sinks as sinks
from ._curve_fit import curve_fit as curve_fit
from ._least_squares import least_squares as least_squares
from ._pipeline import FitError as FitError
from ._pipeline import SinkError as SinkError
from ._pipeline import stop_fit as stop_fit
from ._result import OptimizeResult as OptimizeResult
from ._result import OptimizeWarning as OptimizeWarning
from ._stream import FitStream as FitStream
from ._stream import fit_stream as fit_stream
from ._stream import least_squares_stream as least_squares_stream
from ._stream import subscribe as subscribe
from .events import FitFailed as FitFailed
from .events import FitFinished as FitFinished
from .events import FitStarted as FitStarted
from .events import Iteration as Iteration
from .replay import ReplayWarning as ReplayWarning
from .replay import iter_events as iter_events
from .replay import replay as replay

__all__ = [
    "FitError",
    "FitFailed",
    "FitFinished",
    "FitStarted",
    "FitStream",
    "Iteration",
    "OptimizeResult",
    "OptimizeWarning",
    "ReplayWarning",
    "SinkError",
    "async_logger",
    "curve_fit",
    "events",
    "fit_stream",
    "iter_events",
    "least_squares",
    "least_squares_stream",
    "replay",
    "sinks",
    "stop_fit",
    "subscribe",
]

__version__ = "0.1.0"
