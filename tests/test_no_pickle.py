"""No pickle anywhere: artifacts are safetensors + JSON, and loading any kind of artifact runs
no unpickler (pickle / torch.load are made to fail while loading)."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import BENIGN, HARMFUL, build_tiny
from safesteer.core.handle import LoadedModel
from safesteer.methods.artifacts import MANIFEST, TENSORS, ArtifactError
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact, head_checksum
from safesteer.methods.safeswitch.probe import Prober
from safesteer.methods.safeswitch.settings import SafeSwitchSettings
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.calibrated import CALIBRATED_DIR
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.settings import ScansSettings

ROOT = Path(__file__).resolve().parent.parent
# Calls that unpickle (torch.load without weights_only included) or write pickles.
PICKLE_CALLS = re.compile(
    r"\b(import pickle|from pickle|cPickle|dill|joblib|torch\.load\(|torch\.save\(|"
    r"pickle\.loads?\(|allow_pickle|read_pickle|to_pickle)"
)


def test_no_code_unpickles_or_pickles() -> None:
    offenders = []
    for folder in ("src", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if PICKLE_CALLS.search(line) and "weights_only=True" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "pickle use found:\n" + "\n".join(offenders)


class _Unpickled(AssertionError):
    pass


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise _Unpickled("an unpickler ran while loading an artifact")


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every way to unpickle fail (pickle, its C module, torch.load, numpy's pickles)."""
    import _pickle

    import numpy as np

    for module in (pickle, _pickle):
        monkeypatch.setattr(module, "load", _refuse)
        monkeypatch.setattr(module, "loads", _refuse)
        monkeypatch.setattr(module, "Unpickler", _refuse)
    monkeypatch.setattr(torch, "load", _refuse)
    monkeypatch.setattr(torch.serialization, "load", _refuse)
    monkeypatch.setattr(np, "load", _refuse)
    yield


def _only_data_files(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, TENSORS])
    json.loads((folder / MANIFEST).read_text())  # plain JSON
    header_len = int.from_bytes((folder / TENSORS).read_bytes()[:8], "little")
    header = json.loads((folder / TENSORS).read_bytes()[8 : 8 + header_len])  # safetensors
    assert header


@pytest.fixture(scope="module")
def lm(tokenizer: PreTrainedTokenizerFast) -> LoadedModel:
    return build_tiny("llama", tokenizer, seed=0)


def test_scans_artifact_loads_without_unpickling(
    lm: LoadedModel, tmp_path: Path, no_unpickling: None
) -> None:
    settings = ScansSettings(0.5, "relative", (1, 2), (1, 2, 3), None)
    artifact = fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=4)
    artifact.save(tmp_path / "scans")
    _only_data_files(tmp_path / "scans")
    loaded = ScansArtifact.load(tmp_path / "scans", lm)
    assert torch.equal(loaded.vectors, artifact.vectors)


def test_safeswitch_artifact_loads_without_unpickling(
    lm: LoadedModel, tmp_path: Path, no_unpickling: None
) -> None:
    head = lm.model.get_output_embeddings().weight
    artifact = SafeSwitchArtifact(
        settings=SafeSwitchSettings(mode="two-stage", layer=1, n_decode=2),
        stage1=Prober(lm.hidden_size).eval(),
        stage2=Prober(lm.hidden_size).eval(),
        head_delta=torch.zeros(tuple(head.shape)).half(),
        model_fingerprint=lm.fingerprint(),
        base_head_checksum=head_checksum(lm),
    )
    artifact.save(tmp_path / "switch")
    _only_data_files(tmp_path / "switch")
    loaded = SafeSwitchArtifact.load(tmp_path / "switch", lm)
    assert torch.equal(loaded.head_delta, artifact.head_delta)


@pytest.mark.parametrize(
    "folder",
    sorted(p for p in CALIBRATED_DIR.iterdir() if (p / MANIFEST).is_file()),
    ids=lambda p: p.name,
)
def test_shipped_calibrated_artifact_loads_without_unpickling(
    folder: Path, no_unpickling: None
) -> None:
    _only_data_files(folder)
    artifact = ScansArtifact.load(folder)
    assert artifact.settings.recipe == "calibrated"


class _Payload:
    """Unpickling this would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickle_in_place_of_the_tensors_is_refused_unexecuted(
    lm: LoadedModel, tmp_path: Path
) -> None:
    settings = ScansSettings(0.5, "relative", (1, 2), (1, 2, 3), None)
    folder = fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=4).save(tmp_path / "scans")
    marker = tmp_path / "executed"
    (folder / TENSORS).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        ScansArtifact.load(folder, lm)
    assert not marker.exists()


def test_the_guard_catches_unpickling(tmp_path: Path, no_unpickling: None) -> None:
    with pytest.raises(_Unpickled):
        pickle.loads(b"\x80\x04K\x01.")
    with pytest.raises(_Unpickled):
        torch.load(tmp_path / "x.pt")
