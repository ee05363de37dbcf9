"""Compatibility alias: the model API moved to :mod:`safesteer.models` in 0.2."""

from safesteer.models import *  # noqa: F403
from safesteer.models import __all__  # noqa: F401
