"""The training engine; it lives in :mod:`icnn.training` (config, engine, checkpoint, distributed)."""

from .training import *  # noqa: F401,F403
from .training import __all__  # noqa: F401
