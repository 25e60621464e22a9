"""Result container and warning class, shaped like scipy's so existing code keeps working."""

from __future__ import annotations

from typing import Any

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
