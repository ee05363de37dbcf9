"""Calibrated SCANS artifacts shipped for named models (``safesteer calibrate`` outputs).

Each sub-folder is named after a model source and holds ``manifest.json`` + ``tensors.safetensors``;
the manifest's fingerprint is checked against the model on load.

The artifacts shipped so far carry a version-1 fingerprint (config, chat-template hash and weight
checksums with a 2 % tolerance): they load with a warning, after the config, the chat template and
the checksums are checked. Regenerating their exact row hashes needs the real model; rerun
``safesteer calibrate`` (or refit) on it to upgrade them.
"""

from pathlib import Path

CALIBRATED_DIR = Path(__file__).resolve().parent
