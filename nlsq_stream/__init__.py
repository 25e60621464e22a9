"""nlsq_stream: nonlinear least squares in JAX that you can watch while it runs.

Data flows one way, and the folders are its stages: the model and data become a compiled problem
whose whole iteration loop runs on the device (``solver/``); a watched fit's per-iteration
records leave the device in batches, become events, and a thread-safe hub fans them out to one
memory stream per subscriber (``stream/``); sinks consume those streams (``sinks/``). The public
calls (``faces/``) sit on top and drive the stages; ``events`` is the vocabulary the stream and
the sinks share. Imports only go down the flow (``tests/test_layout.py`` enforces it), and the
solver never waits for the watchers. See ``docs/architecture.rst``.
"""

from . import async_logger as async_logger
from . import events as events
from . import sinks as sinks
from ._compile_cache import compile_cache_from_environment as _compile_cache_from_environment
from ._compile_cache import enable_compile_cache as enable_compile_cache
from ._control import stop_fit as stop_fit
from ._dispatch import enable_inline_dispatch as enable_inline_dispatch
from ._exceptions import FitError as FitError
from ._exceptions import SinkError as SinkError
from ._result import BatchResult as BatchResult
from ._result import OptimizeResult as OptimizeResult
from ._result import OptimizeWarning as OptimizeWarning
from .events import BatchFinished as BatchFinished
from .events import BatchProgress as BatchProgress
from .events import BatchStarted as BatchStarted
from .events import FitFailed as FitFailed
from .events import FitFinished as FitFinished
from .events import FitStarted as FitStarted
from .events import Iteration as Iteration
from .faces.batch import curve_fit_batch as curve_fit_batch
from .faces.batch import fit_stream_batch as fit_stream_batch
from .faces.batch import least_squares_batch as least_squares_batch
from .faces.streaming import fit_stream as fit_stream
from .faces.streaming import least_squares_stream as least_squares_stream
from .faces.sync import curve_fit as curve_fit
from .faces.sync import least_squares as least_squares
from .replay import ReplayWarning as ReplayWarning
from .replay import iter_events as iter_events
from .replay import replay as replay
from .stream.fit_stream import FitStream as FitStream
from .stream.fit_stream import subscribe as subscribe

__all__ = [
    "BatchFinished",
    "BatchProgress",
    "BatchResult",
    "BatchStarted",
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
    "curve_fit_batch",
    "enable_compile_cache",
    "enable_inline_dispatch",
    "events",
    "fit_stream",
    "fit_stream_batch",
    "iter_events",
    "least_squares",
    "least_squares_batch",
    "least_squares_stream",
    "replay",
    "sinks",
    "stop_fit",
    "subscribe",
]

__version__ = "0.1.0"

_compile_cache_from_environment()
