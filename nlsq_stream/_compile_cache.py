"""JAX's persistent compilation cache, the way a library offers it: off unless asked.

A fit's first call compiles its solver (most of a second at 1e3 points). With the cache on, the
compiled program is written to a folder, and a new process that fits the same model, shapes and
options loads it instead of compiling. Turn it on with :func:`enable_compile_cache`, or set the
environment variable ``NLSQ_STREAM_COMPILE_CACHE`` (a folder, or ``1`` for the default one)
before importing ``nlsq_stream``. Both change JAX's process-wide settings (the cache folder, and
a minimum compile time of 0 s, so that programs compiling faster than JAX's default of 1 s are
kept too): every program the process compiles afterwards, ours or not, may be cached.

The solver reads :func:`enabled_folder` to keep its own programs there too
(``solver/program_cache.py``). This module imports nothing of the package.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV_VAR = "NLSQ_STREAM_COMPILE_CACHE"
_OFF = ("", "0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def default_cache_dir() -> Path:
    """The user's cache folder for nlsq_stream's compiled programs.

    ``$XDG_CACHE_HOME/nlsq_stream/jax`` (``~/.cache`` when unset) on Linux and other Unix
    systems, ``~/Library/Caches/nlsq_stream/jax`` on macOS, ``%LOCALAPPDATA%\\nlsq_stream\\jax``
    on Windows.
    """
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nlsq_stream" / "jax"


_enabled: list[Path] = []  # the folder enable_compile_cache set, if it was called


def enabled_folder() -> Path | None:
    """The folder :func:`enable_compile_cache` set in this process, or None."""
    return _enabled[-1] if _enabled else None


def enable_compile_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Turn on JAX's persistent compilation cache, writing to ``path``.

    :param path: the folder for the cache entries (created if missing); default: the user's
        cache folder (:func:`default_cache_dir`). Trust it as you trust your code: a program
        loaded from it runs in your process.
    :returns: the folder, absolute.
    :raises TypeError: ``path`` is not a string or path.
    :raises ValueError: ``path`` is empty, is a file, or cannot be created or written.

    Call it before the first fit whose compile you want to keep; programs compiled earlier in
    the process are not written. It sets JAX's ``jax_compilation_cache_dir`` and
    ``jax_persistent_cache_min_compile_time_secs = 0`` for the whole process. The solver's own
    programs are also kept whole in ``path/nlsq_stream-programs``, under a key for which only
    the model is traced, so that a new process skips tracing and lowering the solver too (see
    ``nlsq_stream.solver.program_cache``).
    """
    folder = _checked_folder(path)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.set_cache_dir(str(folder))
    compilation_cache.reset_cache()  # a folder set earlier in the process is forgotten
    _enabled.append(folder)
    return folder


def _checked_folder(path: str | os.PathLike[str] | None) -> Path:
    if path is None:
        folder = default_cache_dir()
    elif isinstance(path, (str, os.PathLike)):
        text = os.fspath(path)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"`path` must name a folder, got {path!r}")
        folder = Path(text).expanduser()
    else:
        kind = type(path).__name__
        raise TypeError(f"`path` must be a str or os.PathLike (a folder), got {kind}")
    folder = folder.absolute()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`path` must be a folder for the compile cache, but {folder} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"`path`: cannot create the compile-cache folder {folder}: {e}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"`path`: the compile-cache folder {folder} is not writable")
    return folder


def compile_cache_from_environment() -> Path | None:
    """Turn the cache on if ``NLSQ_STREAM_COMPILE_CACHE`` asks for it (``1``/``true``/``yes``/
    ``on``: the default folder; anything else but ``0``/``false``/``no``/``off``/empty: that
    folder). Called when ``nlsq_stream`` is imported. A bad folder leaves the cache off with a
    ``RuntimeWarning`` naming the variable: importing the package does not fail for it."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in _OFF:
        return None
    try:
        return enable_compile_cache(None if value.lower() in _ON else value)
    except ValueError as e:
        warnings.warn(
            f"environment variable {ENV_VAR}={value!r}: {e}; the compile cache stays off",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
