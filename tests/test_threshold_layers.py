"""The threshold T belongs to the classification layers it was calibrated on (issue 13, bug 3):
``--cls-layers`` recalibrates T on the artifact's anchors, or is refused without them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import BENIGN, HARMFUL
from safesteer.core.handle import LoadedModel
from safesteer.evaluation.run_setup import RunOptions, apply_overrides
from safesteer.methods.artifacts import ArtifactError
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.settings import ScansSettings


@pytest.fixture
def lm(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["llama"]


def _settings(cls_layers: tuple[int, ...]) -> ScansSettings:
    return ScansSettings(0.5, "relative", (1, 2), cls_layers, None)


def _fit(lm: LoadedModel, cls_layers: tuple[int, ...]) -> ScansArtifact:
    return fit_scans(lm, HARMFUL, BENIGN, _settings(cls_layers), seed=3, batch_size=4)


def test_fit_records_the_layers_of_the_threshold(lm: LoadedModel, tmp_path: Path) -> None:
    artifact = _fit(lm, (1, 2, 3))
    assert artifact.settings.threshold_layers == (1, 2, 3)
    artifact.save(tmp_path / "a")
    loaded = ScansArtifact.load(tmp_path / "a", lm)
    assert loaded.settings.threshold_layers == (1, 2, 3)
    assert loaded.settings.to_json()["threshold_layers"] == [1, 2, 3]


def test_cls_layers_override_recalibrates_the_threshold(lm: LoadedModel) -> None:
    default = _fit(lm, (1, 2, 3))
    direct = _fit(lm, (0, 1))  # what T is when calibrated on layers 0..1 from the start
    assert direct.settings.threshold != default.settings.threshold
    overridden = apply_overrides(default, lm, RunOptions(cls_layers="0-1", batch_size=4))
    assert overridden.settings.cls_layers == (0, 1)
    assert overridden.settings.threshold_layers == (0, 1)
    assert overridden.settings.threshold == pytest.approx(direct.settings.threshold, abs=1e-5)
    assert overridden.calibration["recalibrated_for_cls_layers"] == [0, 1]


def test_cls_layers_with_a_threshold_keeps_the_given_threshold(lm: LoadedModel) -> None:
    default = _fit(lm, (1, 2, 3))
    options = RunOptions(cls_layers="0-1", threshold=0.25)
    overridden = apply_overrides(default, lm, options)
    assert overridden.settings.threshold == 0.25
    assert overridden.settings.threshold_layers == (0, 1)


def test_cls_layers_without_anchors_is_refused(lm: LoadedModel) -> None:
    default = _fit(lm, (1, 2, 3))
    bare = dataclasses.replace(default, anchors={"seed": 3})
    with pytest.raises(ArtifactError, match=r"cannot be recalibrated .*--threshold"):
        apply_overrides(bare, lm, RunOptions(cls_layers="0-1"))


def test_library_refuses_new_layers_under_an_old_threshold(lm: LoadedModel) -> None:
    default = _fit(lm, (1, 2, 3))
    with pytest.raises(ValueError, match=r"calibrated on classification layers 1\.\.3"):
        default.with_settings(cls_layers=(0, 1))
    assert default.with_settings(cls_layers=(0, 1), threshold=0.1).settings.threshold == 0.1
    same = apply_overrides(default, lm, RunOptions(cls_layers="1-3"))
    assert same.settings.threshold == default.settings.threshold  # nothing to recalibrate


def test_fitting_with_cls_layers_calibrates_on_them(lm: LoadedModel, tmp_path: Path) -> None:
    from safesteer.evaluation.run_setup import fit_or_load

    options = RunOptions(cls_layers="0-1", anchor_size=4, recipe="paper", batch_size=4)
    artifact = fit_or_load(lm, options, None)
    assert artifact.settings.cls_layers == (0, 1)
    assert artifact.settings.threshold_layers == (0, 1)
    assert "recalibrated_for_cls_layers" not in artifact.calibration  # calibrated at fit time
