"""LAPACK for the solver's programs without importing all of ``scipy.linalg``.

On CPU, jaxlib's QR and SVD call LAPACK, and the first program that uses either sets it up by
importing ``scipy.linalg.cython_blas`` and ``scipy.linalg.cython_lapack`` for their function
pointers. Importing those the usual way runs ``scipy.linalg/__init__.py`` first, which imports a
good part of scipy: 0.27-0.30 s here, a third of a fresh process's first fit (0.7 s with the
compile), and most of a second process's first fit when the compiled program comes from the
persistent cache (0.4 s). :func:`preload` loads just the two extension modules (0.07-0.08 s, the
top-level ``scipy`` package included), so jaxlib finds them in ``sys.modules``.

Nothing else changes for the rest of the process: when ``scipy.linalg`` itself is imported later,
a one-time import hook binds the two preloaded modules to it as attributes, as a normal import
would have (``scipy.linalg.cython_lapack`` then works). Where scipy is laid out differently, or
``scipy.linalg`` is already imported, :func:`preload` does nothing and jaxlib imports as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

_jaxlib_lapack: Any
try:
    from jaxlib.cpu import _lapack  # private: what sets LAPACK up for XLA

    _jaxlib_lapack = _lapack
except ImportError:  # pragma: no cover - a jaxlib without it
    _jaxlib_lapack = None

PACKAGE = "scipy.linalg"
MODULES = ("cython_blas", "cython_lapack")  # the order jaxlib's LAPACK set-up imports them

_lock = threading.Lock()
_done = False


def preload() -> None:
    """Load scipy's ``cython_blas`` and ``cython_lapack`` alone, once per process (see above)."""
    global _done
    if _done:
        return
    with _lock:
        if not _done:
            try:
                _preload()
            finally:
                _done = True


def _preload() -> None:
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec("scipy")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = Path(next(iter(spec.submodule_search_locations))) / "linalg"
    files = {name: _extension(folder, name) for name in MODULES}
    if any(path is None for path in files.values()):
        return
    loaded: list[str] = []
    for name, path in files.items():
        full = f"{PACKAGE}.{name}"
        if full in sys.modules:
            continue
        loader = importlib.machinery.ExtensionFileLoader(full, str(path))
        module_spec = importlib.util.spec_from_file_location(full, str(path), loader=loader)
        if module_spec is None:
            break
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[full] = module
        try:
            loader.exec_module(module)
        except Exception:  # leave it to jaxlib's own import
            del sys.modules[full]
            break
        loaded.append(full)
    if loaded:
        sys.meta_path.insert(0, _BindOnImport(loaded))


def _extension(folder: Path, name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


class _BindOnImport(importlib.abc.MetaPathFinder):
    """Waits for ``scipy.linalg``'s real import, then sets the preloaded modules on it as its
    attributes (what importing a submodule does) and removes itself."""

    def __init__(self, modules: list[str]) -> None:
        self.modules = modules

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != PACKAGE:
            return None
        self._remove()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Binding(spec.loader, self.modules)
        return spec

    def _remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


class _Binding(importlib.abc.Loader):
    def __init__(self, loader: Any, modules: list[str]) -> None:
        self.loader = loader
        self.modules = modules

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        for full in self.modules:
            preloaded = sys.modules.get(full)
            if preloaded is not None:
                setattr(module, full.rpartition(".")[2], preloaded)
        self.loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_filename, is_package, ... for importlib
        return getattr(self.loader, name)


def initialize() -> None:
    """Set up jaxlib's LAPACK kernels now (after :func:`preload`): a program loaded already
    compiled is never lowered, so nothing else would, and its LAPACK calls would find no
    functions."""
    preload()
    if _jaxlib_lapack is not None:
        _jaxlib_lapack.initialize()
