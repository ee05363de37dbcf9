"""GGUF control vectors: SCANS' vectors exported in llama.cpp's format (read back with the gguf
package's own reader), imported again as a SCANS steering direction, and repeng-style files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from conftest import BENIGN, HARMFUL, build_tiny
from safesteer.cli.main import app
from safesteer.core.generation import GenerationConfig
from safesteer.core.handle import LoadedModel
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.control_vectors import (
    ControlVectorError,
    from_scans,
    into_scans,
    read_gguf,
    write_gguf,
)
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.generate import scans_generate
from safesteer.methods.scans.settings import ScansSettings


@pytest.fixture(scope="module")
def lm(tokenizer: PreTrainedTokenizerFast) -> LoadedModel:
    return build_tiny("qwen2", tokenizer)


@pytest.fixture(scope="module")
def scans(lm: LoadedModel) -> ScansArtifact:
    settings = ScansSettings(
        alpha=0.5, alpha_mode="relative", steer_layers=(1, 2), cls_layers=(1, 2, 3), threshold=0.0
    )
    return fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=4)


def _field(reader: gguf.GGUFReader, key: str) -> object:
    value = reader.fields[key]
    raw = value.parts[value.data[0]]
    return bytes(raw).decode() if value.types[0] == gguf.GGUFValueType.STRING else int(raw[0])


def test_export_is_llama_cpp_format(scans: ScansArtifact, tmp_path: Path) -> None:
    path = write_gguf(from_scans(scans, "away"), tmp_path / "scans.gguf")
    reader = gguf.GGUFReader(str(path))
    assert _field(reader, "general.architecture") == "controlvector"
    assert _field(reader, "controlvector.model_hint") == "qwen2"
    assert _field(reader, "controlvector.layer_count") == 2
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]
    for layer in (1, 2):
        tensor = tensors[f"direction.{layer}"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        want = -scans.layer_alpha(layer) * scans.vectors[layer].numpy()
        np.testing.assert_allclose(np.asarray(tensor.data), want, rtol=1e-6)


def test_round_trip_and_import_as_scans_direction(
    lm: LoadedModel, scans: ScansArtifact, tmp_path: Path
) -> None:
    exported = from_scans(scans, "toward")
    back = read_gguf(write_gguf(exported, tmp_path / "v.gguf"))
    assert back.model_hint == "qwen2" and back.metadata["safesteer.sign"] == "toward"
    assert sorted(back.directions) == [1, 2]
    for layer, vector in exported.directions.items():
        torch.testing.assert_close(back.directions[layer], vector)
    imported = into_scans(back, scans)
    torch.testing.assert_close(imported.vectors, scans.vectors)
    assert imported.settings.steer_layers == scans.settings.steer_layers
    config = GenerationConfig(max_new_tokens=6)
    queries = [HARMFUL[0], BENIGN[0]]
    assert [r.response for r in scans_generate(lm, imported, queries, config)] == [
        r.response for r in scans_generate(lm, scans, queries, config)
    ]
    flipped = into_scans(
        read_gguf(write_gguf(from_scans(scans, "away"), tmp_path / "a.gguf")), scans, negate=True
    )
    torch.testing.assert_close(flipped.vectors[[1, 2]], scans.vectors[[1, 2]])


def test_repeng_style_file(scans: ScansArtifact, tmp_path: Path) -> None:
    """A file written the way repeng exports (architecture, hint, layer count, directions)."""
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "qwen2")
    writer.add_uint32("controlvector.layer_count", 2)
    generator = torch.Generator().manual_seed(0)
    vectors = {layer: torch.randn(32, generator=generator) * 3 for layer in (2, 3)}
    for layer, vector in vectors.items():
        writer.add_tensor(f"direction.{layer}", vector.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vector = read_gguf(path)
    assert sorted(vector.directions) == [2, 3]
    imported = into_scans(vector, scans)
    assert imported.settings.steer_layers == (2, 3)
    for layer, raw in vectors.items():
        torch.testing.assert_close(imported.vectors[layer], raw / raw.norm())
    torch.testing.assert_close(imported.vectors[1], scans.vectors[1])  # untouched elsewhere


def test_refusals(scans: ScansArtifact, tmp_path: Path) -> None:
    with pytest.raises(ControlVectorError, match="layer 0"):
        from_scans(scans, "away", layers=[0, 1])
    with pytest.raises(ControlVectorError, match="away or toward"):
        from_scans(scans, "sideways")  # type: ignore[arg-type]
    model_file = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(model_file), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ControlVectorError, match="architecture 'llama', not a control vector"):
        read_gguf(model_file)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(ControlVectorError, match="not a GGUF file"):
        read_gguf(tmp_path / "text.gguf")
    with pytest.raises(ControlVectorError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")
    vector = from_scans(scans, "away")
    vector.directions = {k: torch.cat([v, v]) for k, v in vector.directions.items()}
    with pytest.raises(ControlVectorError, match="64 wide"):
        into_scans(vector, scans)


def test_cli_export_and_import(scans: ScansArtifact, tmp_path: Path) -> None:
    folder = scans.save(tmp_path / "scans")
    runner = CliRunner()
    out = tmp_path / "v.gguf"
    result = runner.invoke(app, ["export", "gguf", str(folder), str(out), "--sign", "away"])
    assert result.exit_code == 0, result.output
    assert "--control-vector-layer-range 1 2" in result.output
    result = runner.invoke(
        app, ["import", "gguf", str(out), "--artifact", str(folder), "--out", str(tmp_path / "n")]
    )
    assert result.exit_code == 0, result.output
    assert "2 directions at layers 1..2" in result.output
    imported = ScansArtifact.load(tmp_path / "n")
    torch.testing.assert_close(imported.vectors[[1, 2]], -scans.vectors[[1, 2]])
    bad = runner.invoke(
        app, ["export", "gguf", str(folder), str(out), "--sign", "away", "--layers", "0-2"]
    )
    text = " ".join(bad.output.split())  # rich wraps long lines
    assert bad.exit_code == 1 and "cannot steer layer 0" in text and "Traceback" not in text
    bad = runner.invoke(app, ["import", "gguf", str(tmp_path / "nope.gguf")])
    assert bad.exit_code == 1 and "does not exist" in " ".join(bad.output.split())
