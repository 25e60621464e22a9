"""Compiled solver programs kept on disk and found without tracing the solver.

JAX's persistent cache (:func:`~nlsq_stream.enable_compile_cache`) saves XLA's compile, but its
key is computed from the lowered program, so every new process still traces the whole solver and
lowers it (0.09-0.12 s of a 0.15-0.2 s cached first fit at 1e3 points, measured here). With the
compile cache on, the solver's programs are also written here, serialized, under a key that
needs only the model traced (a few ms):

* the model: the jaxpr of the problem's residuals and Jacobian (the model, the user's Jacobian,
  any custom derivative rule, the weights), with the values of its constants;
* everything else a program depends on: the program, ``Config``, the shapes and dtypes of the
  arguments, this package's source, JAX and jaxlib versions, the backend, the CPU's instruction
  set, ``XLA_FLAGS``, JAX's configuration and the solver's compiler options.

A model whose jaxpr holds a host callback or another effect is not kept (a callback's Python
function is not part of any key), nor anything that fails to trace, serialize or load: those
programs are compiled as usual. A file that cannot be read is compiled again and replaced.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import platform
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np

from .. import _compile_cache

SUBFOLDER = "nlsq_stream-programs"
FORMAT = 1  # bump when what a file holds changes

# What this process did with the folder (read by ``bench cold`` and the tests).
counts = {"loaded": 0, "stored": 0, "not_kept": 0}
LOADED_EVENT = "/nlsq_stream/program_cache/loaded"  # a jax.monitoring event, per program loaded

_serialize_executable: Any
try:
    from jax.experimental import serialize_executable as _serialize_executable
except ImportError:  # pragma: no cover - a JAX without it: no program cache
    _serialize_executable = None

_subjaxprs: Callable[[Any], Iterator[Any]]
try:
    from jax.extend.core import jaxprs_in_params as _subjaxprs
except ImportError:  # pragma: no cover - older jax
    _subjaxprs = jax.core.jaxprs_in_params


def folder() -> Path | None:
    """Where programs are kept: a subfolder of the compile cache's, or None when it is off."""
    base = _compile_cache.enabled_folder()
    if base is None or _serialize_executable is None:
        return None
    return base / SUBFOLDER


class CachedProgram:
    """What ``engine._Program`` calls for one (problem, config) while the compile cache is on:
    the compiled program for the arguments' shapes, loaded from disk or compiled and written,
    else ``jitted`` (a program that cannot be kept).

    The last program is called directly: XLA checks the argument types, and a ``TypeError``
    (other shapes) looks the shapes up.
    """

    def __init__(
        self,
        name: str,
        jitted: Any,
        problem: Any,
        config: Any,
        options: str,
        before_load: Callable[[], None],
    ) -> None:
        self.name = name
        self.jitted = jitted
        self.problem = problem
        self.config = config
        self.options = options  # the compiler options, as text
        self.before_load = before_load  # sets up what loaded programs need (LAPACK)
        self._by_shape: dict[Any, Any] = {}
        self._last: Any = None
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        last = self._last
        if last is not None:
            try:
                return last(*args)
            except TypeError:
                pass
        signature = _signature(args)
        program = self._by_shape.get(signature)
        if program is None:
            with self._lock:
                program = self._by_shape.get(signature)
                if program is None:
                    program = self._load_or_compile(args) or self.jitted
                    self._by_shape[signature] = program
        self._last = program
        return program(*args)

    def _load_or_compile(self, args: tuple[Any, ...]) -> Any:
        where = folder()
        key = None
        if where is not None:
            key = program_key(self.name, self.problem, self.config, self.options, args)
        if where is None or key is None:
            counts["not_kept"] += 1
            return None
        path = where / f"{self.name}-{key}.bin"
        loaded = _load(path, self.before_load)
        if loaded is not None:
            return loaded
        compiled = self.jitted.lower(*args).compile()
        _store(path, compiled)
        return compiled


def program_key(
    name: str, problem: Any, config: Any, options: str, args: tuple[Any, ...]
) -> str | None:
    """The key of a solver program whose arguments start ``(vectors, scalars, data)`` or ``(x,
    scalars, data)``, or None when its model cannot be keyed (see the module's docstring)."""
    model = _model_fingerprint(problem, args)
    if model is None:
        return None
    h = hashlib.sha256()
    parts = (str(FORMAT), _environment(), name, repr(config), options, model, _signature_text(args))
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _model_fingerprint(problem: Any, args: tuple[Any, ...]) -> str | None:
    if len(args) < 3 or np.ndim(args[0]) not in (1, 2):
        return None
    first, data = args[0], args[2]  # (vectors (4, n) or x (n,), scalars, data, ...)
    shape = np.shape(first)
    x = jax.ShapeDtypeStruct(shape[-1:], np.result_type(first))
    spec = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(np.shape(v), _dtype(v)), data)
    try:
        closed = jax.make_jaxpr(problem.residual_and_jt)(x, spec)
    except Exception:
        return None
    if closed.effects or any("callback" in eqn.primitive.name for eqn in _eqns(closed.jaxpr)):
        return None
    h = hashlib.sha256()
    h.update(f"{type(problem).__module__}.{type(problem).__qualname__}".encode())
    h.update(str(closed.jaxpr).encode())
    for const in closed.consts:
        value = np.asarray(const)
        h.update(f"{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def _eqns(jaxpr: Any) -> Iterator[Any]:
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _subjaxprs(eqn.params):
            yield from _eqns(sub)


def _dtype(value: Any) -> np.dtype[Any]:
    dtype = getattr(value, "dtype", None)
    return dtype if isinstance(dtype, np.dtype) else np.result_type(value)


def _signature(args: tuple[Any, ...]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return treedef, tuple((np.shape(leaf), _dtype(leaf).str) for leaf in leaves)


def _signature_text(args: tuple[Any, ...]) -> str:
    treedef, leaves = _signature(args)
    return f"{treedef}{leaves}"


def _environment() -> str:
    """What every program depends on besides its own inputs: the process's fixed facts, and
    JAX's configuration as it is now (it can change during the process)."""
    config = sorted(
        (k, repr(v))
        for k, v in jax.config.values.items()
        if isinstance(v, (bool, int, float, str, type(None))) and "cache" not in k
    )
    return _fixed_environment() + "\n" + repr(config)


@functools.cache
def _fixed_environment() -> str:
    device = jax.devices()[0]
    parts = [
        _package_source_hash(),
        jax.__version__,
        jaxlib.__version__,
        device.client.platform,
        device.client.platform_version,
        device.device_kind,
        platform.machine(),
        _cpu_flags(),
        os.environ.get("XLA_FLAGS", ""),
        sys.version,
    ]
    return "\n".join(parts)


def _package_source_hash() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _cpu_flags() -> str:
    """The CPU's instruction-set flags: a program compiled for one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor()


def _load(path: Path, before_load: Callable[[], None]) -> Any:
    try:
        payload = path.read_bytes()
    except OSError:
        return None
    try:
        serialized, in_tree, out_tree = pickle.loads(payload)
        before_load()
        program = _serialize_executable.deserialize_and_load(serialized, in_tree, out_tree)
        counts["loaded"] += 1
        jax.monitoring.record_event(LOADED_EVENT)
        return program
    except Exception:  # unreadable or from elsewhere: compile again and replace it
        path.unlink(missing_ok=True)
        return None


def _store(path: Path, compiled: Any) -> None:
    try:
        payload = pickle.dumps(_serialize_executable.serialize(compiled))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
        counts["stored"] += 1
    except Exception:  # not serializable, or the folder is not writable: just not kept
        return
