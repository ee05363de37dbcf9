"""llama.cpp control vectors (GGUF): export SCANS' steering vectors, import vectors as directions.

The format (llama.cpp's ``--control-vector``, also what repeng writes): a GGUF file whose
``general.architecture`` is ``controlvector``, with ``controlvector.model_hint`` (the model's
llama.cpp architecture) and ``controlvector.layer_count``, and one float32 tensor
``direction.N`` of the residual width per steered layer. llama.cpp adds ``direction.N`` (times
the ``--control-vector-scaled`` strength) to the output of decoder layer N, counted from 0 like
``LoadedModel.layers``; ``direction.0`` is invalid there (layer 0's output cannot be steered).

llama.cpp adds the vector to every token of every request: the per-query decision of SCANS
(steer away from refusal for safe queries, towards it for harmful ones) cannot be expressed in
this format, so an export carries one fixed sign.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from safesteer.methods.scans.artifact import ScansArtifact

ARCHITECTURE = "controlvector"
Sign = Literal["away", "toward"]
SIGNS: dict[str, float] = {"away": -1.0, "toward": 1.0}

# Hugging Face model_type → llama.cpp architecture name, where they differ.
LLAMA_CPP_ARCH = {"mistral": "llama", "gpt_neox": "gptneox", "mixtral": "llama"}


class ControlVectorError(ValueError):
    """A file or artifact that cannot be turned into a control vector; the message says why."""


@dataclass
class ControlVector:
    """Per-layer vectors (what is added to each decoder layer's output) and the model hint."""

    directions: dict[int, torch.Tensor]
    model_hint: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        """The residual width of the vectors."""
        return int(next(iter(self.directions.values())).shape[0])

    def unit_direction(self, num_layers: int) -> torch.Tensor:
        """``[num_layers, hidden]`` with each stored layer's vector at unit norm, zeros elsewhere
        (the shape of ``ScansArtifact.vectors`` and of ``scans_generate(direction=...)``)."""
        out = torch.zeros(num_layers, self.hidden_size)
        for layer, vector in self.directions.items():
            if layer >= num_layers:
                raise ControlVectorError(
                    f"the control vector has direction.{layer}, but the model has only "
                    f"{num_layers} layers (0..{num_layers - 1})"
                )
            norm = float(vector.norm())
            if norm > 0:
                out[layer] = vector.float() / norm
        return out


def model_hint(artifact: ScansArtifact) -> str:
    """The llama.cpp architecture of the model the artifact was fitted on."""
    config = artifact.model_fingerprint.get("config", {})
    model_type = str(config.get("model_type") or "")
    if not model_type:
        raise ControlVectorError(
            "the artifact does not record its model's type; pass --model-hint (e.g. llama, qwen2)"
        )
    return LLAMA_CPP_ARCH.get(model_type, model_type)


def from_scans(
    artifact: ScansArtifact,
    sign: Sign,
    layers: Sequence[int] | None = None,
    hint: str | None = None,
) -> ControlVector:
    """SCANS' steering vectors ``sign * alpha_l * v_l`` for its steering layers (or ``layers``).

    ``away`` (-1) is SCANS' branch for queries judged safe (fewer refusals), ``toward`` (+1) its
    branch for harmful ones (more refusals).
    """
    if sign not in SIGNS:
        raise ControlVectorError(f"sign {sign!r} must be away or toward")
    if sign == "away" and artifact.settings.away_mode == "clamp":
        raise ControlVectorError(
            "this artifact steers away from refusal by clamping the projection on its vectors "
            "(away_mode clamp), which a llama.cpp control vector (a fixed addition) cannot "
            "express; export the toward sign, or an artifact with away_mode add"
        )
    chosen = list(artifact.settings.steer_layers if layers is None else layers)
    num_layers = int(artifact.vectors.shape[0])
    bad = [layer for layer in chosen if not 0 <= layer < num_layers]
    if bad:
        raise ControlVectorError(f"layers {bad} lie outside the model's 0..{num_layers - 1}")
    if 0 in chosen:
        raise ControlVectorError(
            "llama.cpp cannot steer layer 0 (direction.0 is invalid in its format); choose "
            "steering layers from 1 with --layers"
        )
    if not chosen:
        raise ControlVectorError("no layers to export")
    factor = SIGNS[sign]
    directions = {
        layer: (factor * artifact.layer_alpha(layer) * artifact.vectors[layer]).float()
        for layer in sorted(set(chosen))
    }
    if not all(bool(torch.isfinite(v).all()) for v in directions.values()):
        raise ControlVectorError("the artifact's vectors hold non-finite values; refit it")
    metadata = {
        "safesteer.method": "scans",
        "safesteer.sign": sign,
        "safesteer.alpha": str(artifact.settings.alpha),
        "safesteer.alpha_mode": artifact.settings.alpha_mode,
    }
    return ControlVector(directions, hint or model_hint(artifact), metadata)


def write_gguf(vector: ControlVector, path: str | Path) -> Path:
    """Write ``vector`` in llama.cpp's control-vector format."""
    import gguf

    out = Path(path)
    if out.is_dir():
        raise ControlVectorError(f"{out} is a folder; name the .gguf file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.model_hint", vector.model_hint)
    writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(vector.directions))
    for key, value in vector.metadata.items():
        writer.add_string(key, value)
    for layer, direction in sorted(vector.directions.items()):
        writer.add_tensor(f"direction.{layer}", direction.detach().cpu().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _string(field_: object) -> str:
    parts = getattr(field_, "parts", None)
    data = getattr(field_, "data", None)
    if parts is None or not data:
        return ""
    return bytes(parts[data[0]]).decode("utf-8", "replace")


def read_gguf(path: str | Path) -> ControlVector:
    """Read a llama.cpp / repeng control vector (``direction.N`` tensors)."""
    import gguf

    source = Path(path)
    if not source.is_file():
        raise ControlVectorError(f"{source} does not exist")
    try:
        reader = gguf.GGUFReader(str(source))
    except (ValueError, OSError) as exc:
        raise ControlVectorError(f"{source} is not a GGUF file ({exc})") from None
    arch = _string(reader.fields.get("general.architecture"))
    if arch != ARCHITECTURE:
        raise ControlVectorError(
            f"{source} is a GGUF file of architecture {arch or 'unknown'!r}, not a control "
            f"vector ({ARCHITECTURE!r})"
        )
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = str(tensor.name)
        if not name.startswith("direction."):
            continue
        suffix = name.removeprefix("direction.")
        if not suffix.isdigit() or int(suffix) == 0:
            raise ControlVectorError(
                f"{source}: tensor {name!r} is not direction.N with N >= 1 (llama.cpp's rule)"
            )
        values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        if not np.isfinite(values).all():
            raise ControlVectorError(f"{source}: {name} holds non-finite values")
        directions[int(suffix)] = torch.from_numpy(values.copy())
    if not directions:
        raise ControlVectorError(f"{source} holds no direction.N tensors")
    widths = {int(v.shape[0]) for v in directions.values()}
    if len(widths) != 1:
        raise ControlVectorError(f"{source}: the directions have different widths {widths}")
    hint = _string(reader.fields.get(f"{ARCHITECTURE}.model_hint"))
    metadata = {
        key: _string(value) for key, value in reader.fields.items() if key.startswith("safesteer.")
    }
    return ControlVector(directions, hint, metadata)


def into_scans(
    vector: ControlVector, artifact: ScansArtifact, negate: bool = False
) -> ScansArtifact:
    """``artifact`` steering along the file's directions: its refusal vectors at the file's layers
    replaced by the (unit) directions, and the steering layers set to the file's layers.

    SCANS' decision (reference transitions, threshold) is kept, so an imported vector is applied
    conditionally: towards it for queries judged harmful, away from it for safe ones (``negate``
    when the file's vector points away from refusal).
    """
    num_layers, hidden = (int(n) for n in artifact.vectors.shape)
    if vector.hidden_size != hidden:
        raise ControlVectorError(
            f"the control vector is {vector.hidden_size} wide, the artifact's model {hidden}"
        )
    unit = vector.unit_direction(num_layers)
    layers = tuple(sorted(vector.directions))
    vectors = artifact.vectors.clone()
    vectors[list(layers)] = -unit[list(layers)] if negate else unit[list(layers)]
    settings = replace(artifact.settings, steer_layers=layers)
    calibration = {**artifact.calibration, "imported_direction": dict(vector.metadata)}
    return replace(artifact, vectors=vectors, settings=settings, calibration=calibration)
