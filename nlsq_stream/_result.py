"""Result container and warning class, shaped like scipy's so existing code keeps working."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

STATUS_MESSAGES: dict[int, str] = {
    -3: "Residuals are not finite in the initial point.",
    -2: "The fit was stopped before convergence; x holds the best parameters so far.",
    0: "The maximum number of function evaluations is exceeded.",
    1: "`gtol` termination condition is satisfied.",
    2: "`ftol` termination condition is satisfied.",
    3: "`xtol` termination condition is satisfied.",
    4: "Both `ftol` and `xtol` termination conditions are satisfied.",
}


class OptimizeWarning(UserWarning):
    """The fit finished, but something about its result deserves attention (e.g. no covariance)."""


class OptimizeResult(dict[str, Any]):
    """A dict whose keys are also attributes, like ``scipy.optimize.OptimizeResult``.

    >>> r = OptimizeResult(x=1.0, success=True)
    >>> r.x, r["success"]
    (1.0, True)
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

    def __dir__(self) -> list[str]:
        return list(self.keys())

    def __repr__(self) -> str:
        if not self:
            return f"{type(self).__name__}()"
        width = max(map(len, self.keys())) + 1
        return "\n".join(f"{k.rjust(width)}: {v!r}" for k, v in self.items())


BATCH_STATUS_MESSAGES: dict[int, str] = {
    **STATUS_MESSAGES,
    -3: "Residuals are not finite in the initial point (NaN in the data, or the model is not "
    "finite there).",
    -4: "Fewer data points present than parameters.",
}


@dataclasses.dataclass(frozen=True, eq=False)
class BatchResult:
    """The answers of a batch of fits, one row per fit (fit ``i`` is row ``i``).

    ``popt`` (N, p), ``pcov`` (N, p, p) scaled as scipy scales it, ``perr`` (N, p) the standard
    errors (``sqrt(diag(pcov))``), and per fit ``cost``, ``nfev``, ``nit``, ``status`` and
    ``success``. A fit that failed (status -3 or -4) has NaN parameters; a stopped one (-2) its
    best parameters so far. ``message(i)`` explains fit ``i``'s status.

    >>> r = BatchResult(popt=np.zeros((1, 2)), pcov=np.zeros((1, 2, 2)), cost=np.zeros(1),
    ...                 nfev=np.ones(1, int), nit=np.zeros(1, int), status=np.ones(1, int))
    >>> r.success.tolist(), r.message(0)
    ([True], '`gtol` termination condition is satisfied.')
    """

    popt: np.ndarray
    pcov: np.ndarray
    cost: np.ndarray
    nfev: np.ndarray
    nit: np.ndarray
    status: np.ndarray
    param_names: tuple[str, ...] = ()

    @property
    def success(self) -> np.ndarray:
        return np.asarray(self.status) > 0

    @property
    def perr(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.diagonal(self.pcov, axis1=1, axis2=2))

    def __len__(self) -> int:
        return int(np.shape(self.status)[0])

    def message(self, i: int) -> str:
        """Why fit ``i`` ended, in words."""
        return BATCH_STATUS_MESSAGES.get(int(self.status[i]), f"status {int(self.status[i])}")

    def counts(self) -> dict[int, int]:
        """How many fits ended with each status."""
        values, counts = np.unique(np.asarray(self.status), return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def to_dict(self) -> dict[str, np.ndarray]:
        """Columns for a table: one per parameter (and its error), then cost, nfev, nit, status,
        success."""
        n = int(np.shape(self.popt)[1])
        names = self.param_names if len(self.param_names) == n else tuple(f"p{i}" for i in range(n))
        out: dict[str, np.ndarray] = {}
        perr = self.perr
        for i, name in enumerate(names):
            out[name] = self.popt[:, i]
        for i, name in enumerate(names):
            out[f"{name}_err"] = perr[:, i]
        out.update(cost=self.cost, nfev=self.nfev, nit=self.nit, status=self.status)
        out["success"] = self.success
        return out

    def to_pandas(self) -> Any:
        """``to_dict()`` as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:  # an optional dependency, not a package import
            raise ImportError("BatchResult.to_pandas() needs pandas: pip install pandas") from e
        return pd.DataFrame(self.to_dict())
