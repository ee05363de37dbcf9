"""Calibrated SCANS artifacts shipped for named models (``safesteer calibrate`` outputs).

Each sub-folder is named after a model source and holds ``manifest.json`` + ``tensors.safetensors``;
the manifest's fingerprint is checked against the model on load.
"""

from pathlib import Path

CALIBRATED_DIR = Path(__file__).resolve().parent
