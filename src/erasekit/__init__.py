"""erasekit: remove concepts from text-to-image diffusion models, red-team the result, measure both."""

from .delta import Delta
from .errors import UserError
from .evaluation.judges import judge_factory
from .families import load
from .model import Encoded, Model, Prediction
from .testbed import vae as _pixel_vae  # noqa: F401  (lets diffusers load exported testbed folders)

__version__ = "0.1.0"
__all__ = ["Delta", "Encoded", "Model", "Prediction", "UserError", "judge_factory", "load", "__version__"]
