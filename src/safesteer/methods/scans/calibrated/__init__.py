"""Calibrated SCANS artifacts shipped for named models (``safesteer calibrate`` outputs).

Each sub-folder is named after a model source and holds ``manifest.json`` + ``tensors.safetensors``;
the manifest's fingerprint is checked against the model on load.

``qwen2.5-coder-0.5b`` is the second calibration (issue 10: RepE-Data harmless instructions in the
validation set, banded policy, plain-prompt budget; report in docs/results/qwen05-calibration/) and
carries a version-2 fingerprint (exact row hashes). A version-1 fingerprint (config, chat-template
hash and weight checksums with a 2 % tolerance) still loads, with a warning.
"""

from pathlib import Path

CALIBRATED_DIR = Path(__file__).resolve().parent
