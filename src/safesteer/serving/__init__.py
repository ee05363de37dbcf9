"""An OpenAI-compatible server that applies a safety method per request, batching requests that
arrive together (``safesteer serve``)."""

from safesteer.serving.app import ServeSettings, create_app
from safesteer.serving.engine import Engine, EngineSettings, Job
from safesteer.serving.loading import load_methods

__all__ = ["Engine", "EngineSettings", "Job", "ServeSettings", "create_app", "load_methods"]
