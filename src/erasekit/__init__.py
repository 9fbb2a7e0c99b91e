"""erasekit: remove concepts from text-to-image diffusion models, red-team the result, measure both.

The public names are imported on first use (PEP 562), so that `import erasekit` (and `erasekit --help`, and a
bad argument) does not import torch and diffusers; `erasekit.load` and the rest read as before."""

from __future__ import annotations

from importlib import import_module

from .errors import UserError

__version__ = "0.1.0"

_LAZY = {"Delta": ".delta", "Encoded": ".model", "Model": ".model", "Prediction": ".model", "load": ".families",
         "judge_factory": ".evaluation.judges"}
__all__ = ["Delta", "Encoded", "Model", "Prediction", "UserError", "judge_factory", "load", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'erasekit' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
