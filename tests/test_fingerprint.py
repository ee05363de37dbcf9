"""Model fingerprints: exact weight-row hashes and the chat-template hash refuse fine-tunes of the
same base; dtype copies of one model still match; version-1 artifacts load with a warning."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import build_tiny, make_tokenizer
from safesteer.core.fingerprint import fingerprint_mismatch, legacy_checksums
from safesteer.core.handle import LoadedModel
from safesteer.methods.artifacts import ArtifactError, check_model
from safesteer.models import wrap_model


def _copy(lm: LoadedModel, name: str, dtype: torch.dtype | None = None) -> LoadedModel:
    model = copy.deepcopy(lm.model)
    if dtype is not None:
        model = model.to(dtype)
    return wrap_model(model, lm.tokenizer, name=name)


def _fine_tune(lm: LoadedModel, layers: range, scale: float = 1e-3) -> LoadedModel:
    """A copy with a small dense delta on the attention projections of ``layers`` (a LoRA merge)."""
    tuned = _copy(lm, f"{lm.name}-tuned")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in layers:
            for name, param in tuned.layers[i].named_parameters():
                if name.endswith("proj.weight"):
                    param.add_(scale * param.std() * torch.randn(param.shape, generator=generator))
    return tuned


def _legacy_fingerprint(lm: LoadedModel) -> dict[str, Any]:
    """A version-1 fingerprint as artifacts stored it before row hashes existed."""
    current = lm.fingerprint()
    template = getattr(lm.tokenizer, "chat_template", None) or ""
    return {
        "name": lm.name,
        "config": current["config"],
        "config_sha256": current["config_sha256"],
        "checksums": legacy_checksums(lm),
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
    }


@pytest.fixture(scope="module")
def base(tokenizer: PreTrainedTokenizerFast) -> LoadedModel:
    return build_tiny("llama", tokenizer, seed=0, name="tiny-base")


def test_fingerprint_is_json_and_deterministic(base: LoadedModel) -> None:
    fingerprint = base.fingerprint()
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    assert fingerprint == _copy(base, "tiny-base").fingerprint()
    groups = fingerprint["weights"]["hashes"]["bfloat16"]
    assert list(groups) == ["embed", *(f"layer.{i}" for i in range(base.num_layers)), "other"]
    assert fingerprint_mismatch(fingerprint, base.fingerprint()) is None


def test_a_fine_tune_of_the_same_base_is_refused(base: LoadedModel) -> None:
    tuned = _fine_tune(base, range(2, 4))
    expected = base.fingerprint()
    problem = fingerprint_mismatch(expected, tuned.fingerprint())
    assert problem is not None
    assert "decoder layers 2-3" in problem and "embeddings" not in problem
    # The version-1 check (2 % tolerance) let exactly this pass: the reason for the row hashes.
    legacy = _legacy_fingerprint(base)
    assert fingerprint_mismatch(legacy, tuned.fingerprint(), legacy_checksums(tuned)) is None
    with pytest.raises(ArtifactError) as info:
        check_model({"model_fingerprint": expected}, tuned, "ARTIFACT")
    message = str(info.value)
    assert "'tiny-base'" in message and "'tiny-base-tuned'" in message  # both models named
    assert "decoder layers 2-3" in message and "safesteer fit scans" in message  # and the fix
    # ... and the other way round.
    with pytest.raises(ArtifactError, match="decoder layers 2-3"):
        check_model({"model_fingerprint": tuned.fingerprint()}, base, "ARTIFACT")


def test_one_changed_row_outside_the_layers_is_found(base: LoadedModel) -> None:
    tuned = _copy(base, "tiny-embed")
    with torch.no_grad():
        tuned._embedding_weight()[0] += 1e-3
    problem = fingerprint_mismatch(base.fingerprint(), tuned.fingerprint())
    assert problem is not None and "embeddings" in problem


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_dtype_copy_of_the_same_model_matches(base: LoadedModel, dtype: torch.dtype) -> None:
    copy_ = _copy(base, "tiny-base-half", dtype)
    assert fingerprint_mismatch(base.fingerprint(), copy_.fingerprint()) is None
    assert fingerprint_mismatch(copy_.fingerprint(), base.fingerprint()) is None
    check_model({"model_fingerprint": base.fingerprint()}, copy_, "ARTIFACT")


def test_bfloat16_and_float16_copies_do_not_match_each_other(base: LoadedModel) -> None:
    bf16 = _copy(base, "bf16", torch.bfloat16)
    fp16 = _copy(base, "fp16", torch.float16)
    problem = fingerprint_mismatch(bf16.fingerprint(), fp16.fingerprint())
    assert problem is not None and "load it in bfloat16 or float32" in problem


def test_the_chat_template_hash_is_compared(base: LoadedModel) -> None:
    other_template = make_tokenizer(with_template=True)
    other_template.chat_template = "{{ messages[0]['content'] }}"
    same_weights = wrap_model(copy.deepcopy(base.model), other_template, name="tiny-template")
    problem = fingerprint_mismatch(base.fingerprint(), same_weights.fingerprint())
    assert problem is not None and "chat template differs" in problem
    with pytest.raises(ArtifactError, match="chat template differs"):
        check_model({"model_fingerprint": _legacy_fingerprint(base)}, same_weights, "ARTIFACT")


def test_version_1_fingerprints_load_with_a_warning(
    base: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = {"model_fingerprint": _legacy_fingerprint(base)}
    with caplog.at_level(logging.WARNING, logger="safesteer.methods.artifacts"):
        check_model(manifest, _copy(base, "tiny-base"), "OLD")
    assert "version-1 model fingerprint" in caplog.text and "Refit" in caplog.text
    other = build_tiny("llama", base.tokenizer, seed=5, name="tiny-other")  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match="weights differ"):
        check_model(manifest, other, "OLD")


def test_a_fingerprint_without_weights_or_checksums_is_refused(base: LoadedModel) -> None:
    stripped = {k: v for k, v in base.fingerprint().items() if k != "weights"}
    with pytest.raises(ArtifactError, match="neither weight hashes nor checksums"):
        check_model({"model_fingerprint": stripped}, base, "ARTIFACT")


def _shipped_calibrated() -> list[Any]:
    from safesteer.methods.scans.calibrated import CALIBRATED_DIR

    return sorted(p for p in CALIBRATED_DIR.iterdir() if (p / "manifest.json").is_file())


@pytest.mark.slow  # reading a cached GGUF's metadata takes ~10 s
@pytest.mark.parametrize("folder", _shipped_calibrated(), ids=lambda p: p.name)
def test_shipped_calibrated_fingerprints_are_loadable(folder: Any) -> None:
    """Shipped artifacts are version 2, or version 1 with checksums and the template hash (loaded
    with a warning: regenerating them needs the real model, see the calibrated package)."""
    from safesteer.core.fingerprint import is_legacy
    from safesteer.models.sources import get_source, gguf_path

    fingerprint = json.loads((folder / "manifest.json").read_text())["model_fingerprint"]
    assert fingerprint["config"] and len(fingerprint["chat_template_sha256"]) == 64
    assert is_legacy(fingerprint) or "hashes" in fingerprint["weights"]
    # The stored template hash is the GGUF's own template (read from its metadata, no weights).
    source = get_source(folder.name)
    gguf = gguf_path(source) if source is not None else None
    if gguf is None or not gguf.is_file():
        return  # the model is not cached here: the template cannot be checked
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    assert hashlib.sha256(template.encode()).hexdigest() == fingerprint["chat_template_sha256"]
