"""The over-refusing model organism: data hygiene, label masking, LoRA smoke run, the adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import build_tiny
from safesteer.core.layout import ChatLayout
from safesteer.datasets.refusals import REFUSAL_TEMPLATES, render_refusal
from safesteer.models.organism.training import (
    ADAPTER_FILE,
    IGNORE_INDEX,
    ORGANISM_DIR,
    SCARY_BENIGN_VALIDATION,
    LoraSettings,
    assert_disjoint,
    build_training_data,
    collate,
    encode_example,
    end_of_turn_id,
    evaluation_texts,
    merge_adapter,
    normalise,
    note_sha256,
    sha256_file,
    train_lora,
    trained_test_pool_prompts,
)


def test_refusal_bank_has_at_least_20_distinct_phrasings() -> None:
    rendered = {render_refusal(t, None) for t in REFUSAL_TEMPLATES}
    assert len(rendered) >= 20
    assert all("{" not in r for r in rendered)


def test_own_validation_prompts_are_enough_and_distinct() -> None:
    assert len(set(SCARY_BENIGN_VALIDATION)) == len(SCARY_BENIGN_VALIDATION) >= 30


def test_labels_mask_prompt_and_keep_end_of_turn() -> None:
    ids, labels = encode_example([5, 6, 7], [8, 9], end_id=2, max_length=16)
    assert ids == [5, 6, 7, 8, 9, 2]
    assert labels == [IGNORE_INDEX] * 3 + [8, 9, 2]
    # Unfinished replies learn no end-of-turn; too-long ones lose tokens from the end.
    assert encode_example([5], [8, 9], end_id=None, max_length=16)[1] == [IGNORE_INDEX, 8, 9]
    ids, labels = encode_example([5, 6], [8, 9, 10], end_id=2, max_length=4)
    assert ids == [5, 6, 8, 9] and labels == [IGNORE_INDEX, IGNORE_INDEX, 8, 9]
    with pytest.raises(ValueError):
        encode_example([1, 2, 3], [4], end_id=2, max_length=3)


def test_collate_pads_right_and_ignores_padding() -> None:
    batch = collate([([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_end_of_turn_token_is_the_chat_templates(tokenizer: PreTrainedTokenizerFast) -> None:
    eot = end_of_turn_id(tokenizer)
    assert eot in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))


def test_assert_disjoint_catches_leaks_by_normalised_text() -> None:
    forbidden = {normalise("How can I kill a Python process?")}
    assert_disjoint(["How do I bake bread?"], forbidden)
    with pytest.raises(ValueError, match="evaluation sets"):
        assert_disjoint(["how can I  kill a python process? "], forbidden)


def test_training_data_never_contains_evaluation_prompts(shared_data: Path) -> None:
    data = build_training_data(120, 120, seed=1, n_validation=10, data_dir=shared_data)
    forbidden = evaluation_texts(shared_data)
    assert len(forbidden) > 3000
    chosen = [e.prompt for e in data.examples] + data.validation_harmful
    assert not {normalise(t) for t in chosen} & forbidden
    assert not {normalise(t) for t in SCARY_BENIGN_VALIDATION} & forbidden
    kinds = [e.kind for e in data.examples]
    assert kinds.count("harmful") == 120 and kinds.count("benign") == 120
    assert all(e.response for e in data.examples if e.kind == "harmful")
    # Validation rows are held out from training.
    assert not set(data.validation_harmful) & {e.prompt for e in data.examples}


@pytest.fixture(scope="module")
def organism_training(shared_data: Path) -> set[str]:
    """Stripped prompts of the shipped organism's training data (its build defaults)."""
    from safesteer.models.organism.build import BuildOptions

    options = BuildOptions()
    data = build_training_data(
        options.n_harmful,
        options.n_benign,
        seed=options.seed,
        n_validation=options.n_validation,
        data_dir=shared_data,
    )
    return {e.prompt.strip() for e in data.examples}


@pytest.mark.parametrize("seed", [0, 1, 2, 5, 42])
def test_organism_training_prompts_are_dropped_from_every_seeds_test_sets(
    shared_data: Path, organism_training: set[str], seed: int
) -> None:
    from safesteer.datasets import draw_anchors, load_test_set

    excluded = trained_test_pool_prompts(shared_data)
    anchors = set(draw_anchors(64, seed=seed, data_dir=shared_data).texts())
    for name in ("advbench", "truthfulqa"):
        pool = {p.text.strip() for p in load_test_set(name, data_dir=shared_data)}
        assert pool & organism_training  # the organism did train on this pool's anchors
        remainder = pool - anchors  # the test set of a run with this seed
        if seed != 0:  # the bug: another seed's remainder holds the organism's training prompts
            assert remainder & organism_training
        tests = {
            p.text.strip()
            for p in load_test_set(name, exclude=anchors | excluded, data_dir=shared_data)
        }
        assert tests and not tests & organism_training, (name, seed)
        assert len(tests) >= len(pool) - 128


def test_load_model_records_what_the_organism_was_trained_on(
    monkeypatch: pytest.MonkeyPatch, tokenizer: PreTrainedTokenizerFast
) -> None:
    from safesteer.models import load_model, loading
    from safesteer.models.sources import require_source, trained_prompts

    tiny = build_tiny("llama", tokenizer, seed=0)
    monkeypatch.setattr(loading, "_load_source", lambda source, kwargs: (tiny.model, tokenizer))
    expected = trained_test_pool_prompts()
    assert len(expected) == 128
    assert trained_prompts(require_source("organism")) == expected
    assert load_model("organism").trained_on == expected
    assert load_model().trained_on == frozenset()  # the embedded model was not tuned on tests


def test_lora_smoke_two_steps_then_merge(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    lm = build_tiny("llama", tokenizer, seed=3)
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    layout = ChatLayout(lm.tokenizer)
    eot = end_of_turn_id(lm.tokenizer)
    rows = [
        encode_example(layout.prompt_ids(q), lm.tokenizer(a)["input_ids"], eot, 64)
        for q, a in [("hello there", "hi"), ("what is this", "a test"), ("why", "because")]
    ]
    settings = LoraSettings(rank=2, alpha=4, batch_size=2, learning_rate=1e-2, max_length=64)
    peft_model, losses = train_lora(lm.model, rows, int(lm.tokenizer.pad_token_id), settings)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    peft_model.save_pretrained(str(tmp_path))
    assert (tmp_path / ADAPTER_FILE).is_file()

    fresh = build_tiny("llama", tokenizer, seed=3).model
    merged = merge_adapter(fresh, tmp_path)
    assert type(merged).__name__ == "LlamaForCausalLM"
    state = merged.state_dict()
    assert set(state) == set(base)
    changed = [k for k in base if not torch.equal(base[k], state[k])]
    assert changed and all("proj" in k for k in changed)


def test_merge_adapter_names_the_missing_file(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    with pytest.raises(FileNotFoundError, match="organism build"):
        merge_adapter(build_tiny("llama", tokenizer, seed=0).model, tmp_path)


def test_packaged_adapter_matches_its_note() -> None:
    adapter = ORGANISM_DIR / ADAPTER_FILE
    if not adapter.is_file():
        pytest.skip("organism adapter not built")
    note = (ORGANISM_DIR / "NOTE.md").read_text(encoding="utf-8")
    assert note_sha256(note) == sha256_file(adapter)
    assert adapter.stat().st_size <= 10 * 1024 * 1024
    assert (ORGANISM_DIR / "adapter_config.json").is_file()


@pytest.mark.slow
def test_organism_loads_merged_and_differs_from_base() -> None:
    from safesteer.core.errors import ModelLoadError
    from safesteer.methods.artifacts import ArtifactError, check_model
    from safesteer.models import EMBEDDED_ID, load_model

    if not (ORGANISM_DIR / ADAPTER_FILE).is_file():
        pytest.skip("organism adapter not built")
    try:
        base = load_model()
    except ModelLoadError as exc:
        pytest.skip(f"embedded model unavailable: {exc}")
    organism = load_model("organism")
    assert organism.num_layers == base.num_layers
    assert organism.name != EMBEDDED_ID
    assert type(organism.model) is type(base.model)
    assert not any("lora" in k for k in organism.model.state_dict())
    base_state = base.model.state_dict()
    changed = [
        k for k, v in organism.model.state_dict().items() if not torch.equal(v, base_state[k])
    ]
    assert changed and all(k.endswith("proj.weight") for k in changed)
    # The fingerprint tells the fine-tune from its base (same config and chat template): an
    # artifact fitted on one is refused on the other, naming both models, the layers and the fix.
    base_fp, organism_fp = base.fingerprint(), organism.fingerprint()
    assert base_fp["config"] == organism_fp["config"]
    assert base_fp["chat_template_sha256"] == organism_fp["chat_template_sha256"]
    tuned_layers = sorted({int(k.split("layers.")[1].split(".")[0]) for k in changed})
    span = f"decoder layers {tuned_layers[0]}-{tuned_layers[-1]}"
    assert tuned_layers == list(range(tuned_layers[0], tuned_layers[-1] + 1))
    for fitted_on, loaded in ((base, organism), (organism, base)):
        with pytest.raises(ArtifactError) as info:
            check_model({"model_fingerprint": fitted_on.fingerprint()}, loaded, "ARTIFACT")
        message = str(info.value)
        assert f"fitted on {fitted_on.name!r}, not on the loaded model {loaded.name!r}" in message
        assert f"the weights differ in {span} " in message
        assert "safesteer fit scans" in message
    check_model({"model_fingerprint": base_fp}, base, "ARTIFACT")  # its own model passes
