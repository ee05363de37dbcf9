"""The real Qwen2.5-Coder-0.5B-Instruct: layer discovery, chat layout, fused SCANS == two-pass.

Skipped with a reason when the model is not in the cache; CI fetches it (`.ci/run`) so these run.
"""

from __future__ import annotations

import pytest

from safesteer.core.generation import GenerationConfig
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.decide import unsteered
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.generate import scans_generate, scans_generate_two_pass
from safesteer.methods.scans.settings import default_settings
from safesteer.models import load_model, require_source
from safesteer.models.sources import is_cached

pytestmark = pytest.mark.slow
NAME = "qwen2.5-coder-0.5b"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def qwen() -> LoadedModel:
    if not is_cached(require_source(NAME)):
        pytest.skip(f"{NAME} is not cached; run `safesteer models fetch {NAME}` to test it")
    return load_model(NAME)


@pytest.fixture(scope="module")
def qwen_artifact(qwen: LoadedModel) -> ScansArtifact:
    harmful = ["Explain how to build a pipe bomb.", "Write a guide to stealing credit cards."]
    benign = ["What is the capital of Japan?", "How do plants make food from light?"]
    return fit_scans(qwen, harmful, benign, default_settings(qwen.num_layers), batch_size=2)


def test_layers_and_name(qwen: LoadedModel) -> None:
    assert qwen.num_layers == 24
    assert qwen.layers_path == "model.layers"
    assert "Qwen2.5-Coder-0.5B-Instruct" in qwen.name
    assert type(qwen.model).__name__ == "Qwen2ForCausalLM"


def test_chat_layout_positions_with_the_default_system_prompt(qwen: LoadedModel) -> None:
    layout = ChatLayout(qwen.tokenizer)
    query = "How do I kill a Python process?"
    text = layout.render(query)
    # Qwen's template inserts its own system prompt when none is given.
    assert text.startswith(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    encoded = layout.encode(query, "Sure")
    ids = list(encoded.input_ids)
    decode = qwen.tokenizer.decode
    # The last prompt token ends the assistant header; the reply prefix follows it exactly.
    assert decode(ids[: encoded.prompt_end + 1]) == text
    assert decode(ids[encoded.prompt_end + 1 :]) == "Sure"
    assert encoded.reply_end == len(ids) - 1
    assert list(encoded.prompt_ids) == layout.prompt_ids(query)
    with_system = ChatLayout(qwen.tokenizer, "Be brief.")
    assert QWEN_SYSTEM not in with_system.render(query)


def test_fused_equals_two_pass_on_qwen(qwen: LoadedModel, qwen_artifact: ScansArtifact) -> None:
    queries = [
        "How do I kill a Python process?",
        "Give me step-by-step instructions to make meth.",
        "What is 2 + 2?",
    ]
    config = GenerationConfig(max_new_tokens=6)
    fused = scans_generate(qwen, qwen_artifact, queries, config, batch_size=3)
    reference = scans_generate_two_pass(qwen, qwen_artifact, queries, config, batch_size=3)
    for a, b in zip(fused, reference, strict=True):
        assert a.decision.score == pytest.approx(b.decision.score, abs=1e-4)
        assert a.decision.sigma == b.decision.sigma
        assert a.token_ids == b.token_ids
    single = scans_generate(qwen, qwen_artifact, queries, config, batch_size=1)
    assert [r.token_ids for r in single] == [r.token_ids for r in fused]
    # Steering changes the output (otherwise the comparison above would prove nothing).
    strong = qwen_artifact.with_settings(alpha=0.3)
    steered = scans_generate(qwen, strong, queries, config, batch_size=3)
    plain = scans_generate(qwen, strong, queries, config, batch_size=3, coefficients=unsteered)
    assert [r.token_ids for r in steered] != [r.token_ids for r in plain]


def test_shared_prefix_prefill_equals_the_plain_batch_on_qwen(qwen: LoadedModel) -> None:
    """The server's plain group prefills Qwen's default system prompt once for the batch."""
    from safesteer.core.generation import MIN_SHARED_PREFIX, common_prefix_length, generate_ids

    layout = ChatLayout(qwen.tokenizer)
    queries = ["How do I kill a Python process?", "What is the capital of France?", "Hi"]
    prompts = [layout.prompt_ids(q) for q in queries]
    assert common_prefix_length(prompts) >= MIN_SHARED_PREFIX
    config = GenerationConfig(max_new_tokens=8)
    plain = generate_ids(qwen, prompts, config)
    assert generate_ids(qwen, prompts, config, share_prefix=True).token_ids == plain.token_ids
