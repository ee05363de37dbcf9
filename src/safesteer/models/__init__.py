"""Model sources and loading: named models, verified fetches, layer discovery, fingerprints.

Everything that turns a model name or path into a :class:`LoadedModel` lives here; the rest of
safesteer only sees the handle.
"""

from safesteer.core.errors import ModelLoadError
from safesteer.core.fingerprint import (
    fingerprint_mismatch,
    legacy_checksums,
    model_fingerprint,
    weight_checksum,
    weight_hashes,
)
from safesteer.core.handle import LoadedModel
from safesteer.core.layers import find_decoder_layers
from safesteer.models.fetch import FetchError, SplitWheelFile
from safesteer.models.loading import load_model, wrap_model
from safesteer.models.sources import (
    SOURCES,
    ModelSource,
    cache_root,
    fetch_model,
    get_source,
    require_source,
)

EMBEDDED_ID = SOURCES[0].display

__all__ = [
    "EMBEDDED_ID",
    "SOURCES",
    "FetchError",
    "LoadedModel",
    "ModelLoadError",
    "ModelSource",
    "SplitWheelFile",
    "cache_root",
    "fetch_model",
    "find_decoder_layers",
    "fingerprint_mismatch",
    "get_source",
    "legacy_checksums",
    "load_model",
    "model_fingerprint",
    "require_source",
    "weight_checksum",
    "weight_hashes",
    "wrap_model",
]
