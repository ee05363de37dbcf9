"""Calibrated SCANS artifacts shipped for named models (``safesteer calibrate`` outputs).

Each sub-folder is named after a model source and holds ``manifest.json`` + ``tensors.safetensors``;
the manifest's fingerprint is checked against the model on load.

``qwen2.5-coder-0.5b`` is calibration v7 (issue 10; report in
docs/results/qwen05-calibration-v7/): the reviewed validation set (datasets/bundled/validation/
README.md), with reference-text windows among the gate's benign rows and the refusal gate (rows
are steered away only where the model would refuse). ``qwen2.5-coder-1.5b`` is v3: calibration v2
(report in docs/results/qwen15/calibration-v2/, the same reviewed set) without its refusal gate
(``ScansArtifact.without_refusal_gate``), the row v2's report measured better on validation; the
manifest's ``refusal_gate_removed`` says why. Each calibration was committed before any steered
test reply of it was read (v3 was chosen after v2's XSTest miss: docs/results.md), and both
carry version-2 fingerprints (exact row hashes). A version-1 fingerprint (config, chat-template
hash and weight checksums with a 2 % tolerance) still loads, with a warning.
"""

from pathlib import Path

CALIBRATED_DIR = Path(__file__).resolve().parent
