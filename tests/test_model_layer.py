"""Decoder-layer discovery, chat layout positions and left padding (tiny in-process models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from conftest import ARCH_NAMES, BENIGN, HARMFUL, LAYERS_PATHS, build_tiny
from safesteer.core.activations import forward
from safesteer.core.errors import ModelLoadError
from safesteer.core.handle import LoadedModel
from safesteer.core.layers import find_decoder_layers
from safesteer.core.layout import PLAIN_TEMPLATE, ChatLayout, EncodedPrompt, left_pad
from safesteer.models import wrap_model

# ---------------------------------------------------------------------------------------------
# Decoder-layer discovery


def _expected_layers(lm: LoadedModel) -> int:
    config = lm.model.config
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_discovery_finds_every_decoder_layer(
    tiny_models: dict[str, LoadedModel], arch: str
) -> None:
    lm = tiny_models[arch]
    path, layers = find_decoder_layers(lm.model)
    assert len(layers) == _expected_layers(lm)
    assert path == LAYERS_PATHS[arch]
    # The very modules of the model, in order (hooks on them must reach the forward pass).
    listed = lm.model.get_submodule(LAYERS_PATHS[arch])
    assert all(a is b for a, b in zip(layers, listed, strict=True))
    assert lm.num_layers == len(layers)
    assert lm.layers_path == path


def test_tiny_architectures_are_distinct(tiny_models: dict[str, LoadedModel]) -> None:
    classes = {type(lm.model).__name__ for lm in tiny_models.values()}
    assert len(classes) >= 6
    for lm in tiny_models.values():
        assert lm.model.config.vocab_size == len(lm.tokenizer)
        assert lm.dtype == torch.float32


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_layers_path_override(tiny_models: dict[str, LoadedModel], arch: str) -> None:
    lm = tiny_models[arch]
    path, layers = find_decoder_layers(lm.model, LAYERS_PATHS[arch])
    assert path == LAYERS_PATHS[arch]
    assert len(layers) == lm.num_layers
    wrapped = wrap_model(lm.model, lm.tokenizer, layers_path=LAYERS_PATHS[arch])
    assert wrapped.layers_path == LAYERS_PATHS[arch]


def test_wrong_layers_path_names_the_model(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["llama"]
    with pytest.raises(ModelLoadError, match="LlamaForCausalLM") as info:
        find_decoder_layers(lm.model, "transformer.h")
    assert "transformer.h" in str(info.value)
    # A path that exists but is not a list of layers.
    with pytest.raises(ModelLoadError, match="LlamaForCausalLM"):
        find_decoder_layers(lm.model, "model.embed_tokens")
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        wrap_model(tiny_models["gpt2"].model, lm.tokenizer, layers_path="model.layers")


def test_module_without_module_list_gives_clear_error() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(ModelLoadError, match=r"Sequential.*layers-path"):
        find_decoder_layers(model)


def test_discovery_prefers_the_list_matching_the_config() -> None:
    class Config:
        num_hidden_layers = 3

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = Config()
            self.heads = nn.ModuleList([nn.Linear(2, 2) for _ in range(5)])
            self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    path, layers = find_decoder_layers(Toy())
    assert path == "blocks"
    assert len(layers) == 3


# ---------------------------------------------------------------------------------------------
# Chat layout


def test_template_prompt_end_is_the_end_of_the_generation_prompt(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    layout = ChatLayout(tokenizer)
    assert layout.has_template
    query = HARMFUL[0]
    assert layout.render(query) == f"<s><|user|>{query}<|end|><|assistant|>"
    encoded = layout.encode(query)
    assert isinstance(encoded, EncodedPrompt)
    assert encoded.prompt_end == len(encoded.input_ids) - 1
    assert encoded.prompt_end == len(encoded.prompt_ids) - 1
    assert encoded.reply_end is None
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert encoded.input_ids[encoded.prompt_end] == assistant
    # The template writes BOS itself: it must not be doubled by the tokenizer.
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("query", [HARMFUL[1], BENIGN[0], "Sure?"])
def test_reply_prefix_positions(tokenizer: PreTrainedTokenizerFast, query: str) -> None:
    layout = ChatLayout(tokenizer)
    plain = layout.encode(query)
    encoded = layout.encode(query, "Sure")
    sure = tokenizer("Sure", add_special_tokens=False)["input_ids"]
    assert len(sure) >= 2  # the BPE splits it, so the reply end is not the first reply token
    assert encoded.prompt_end == plain.prompt_end
    assert encoded.prompt_ids == plain.input_ids
    assert encoded.reply_end == len(encoded.input_ids) - 1
    assert encoded.reply_end == encoded.prompt_end + len(sure)
    assert list(encoded.input_ids[encoded.prompt_end + 1 :]) == sure
    assert encoded.input_ids[encoded.prompt_end] == tokenizer.convert_tokens_to_ids("<|assistant|>")


@pytest.mark.parametrize("query", [*HARMFUL[:2], *BENIGN[:2]])
def test_positions_match_a_direct_tokenizer_call(
    tokenizer: PreTrainedTokenizerFast, query: str
) -> None:
    layout = ChatLayout(tokenizer)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": query}], add_generation_prompt=True, tokenize=False
    )
    direct = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert layout.prompt_ids(query) == direct
    encoded = layout.encode(query, "Sure")
    assert encoded.prompt_end == len(direct) - 1
    assert list(encoded.prompt_ids) == direct


def test_plain_fallback_without_template(plain_tokenizer: PreTrainedTokenizerFast) -> None:
    layout = ChatLayout(plain_tokenizer)
    assert not layout.has_template
    query = BENIGN[1]
    text = layout.render(query)
    assert text == PLAIN_TEMPLATE.format(system="", query=query)
    assert text == f"User: {query}\nAssistant:"
    ids = layout.prompt_ids(query)
    # Without a template the tokenizer's own special tokens (BOS here) are added.
    assert ids == plain_tokenizer(text)["input_ids"]
    assert ids[0] == plain_tokenizer.bos_token_id
    encoded = layout.encode(query, "Sure")
    assert encoded.prompt_end == len(ids) - 1
    assert list(encoded.prompt_ids) == ids


def test_system_prompt_included(
    tokenizer: PreTrainedTokenizerFast, plain_tokenizer: PreTrainedTokenizerFast
) -> None:
    system = "Be helpful and honest."
    with_system = ChatLayout(tokenizer, system_prompt=system)
    without = ChatLayout(tokenizer)
    query = BENIGN[2]
    assert with_system.render(query) == (
        f"<s><|system|>{system}<|end|><|user|>{query}<|end|><|assistant|>"
    )
    assert system not in without.render(query)
    system_token = tokenizer.convert_tokens_to_ids("<|system|>")
    assert system_token in with_system.prompt_ids(query)
    assert system_token not in without.prompt_ids(query)
    encoded = with_system.encode(query, "Sure")
    assert encoded.prompt_end == len(with_system.prompt_ids(query)) - 1

    plain = ChatLayout(plain_tokenizer, system_prompt=system)
    assert plain.render(query) == f"{system}\n\nUser: {query}\nAssistant:"


def test_empty_reply_prefix_is_rejected(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="no tokens"):
        ChatLayout(tokenizer).encode("hi", "")


# ---------------------------------------------------------------------------------------------
# Left padding


def test_left_pad_positions_match_the_row_alone() -> None:
    rows = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    batch = left_pad(rows, pad_id=0)
    assert batch.width == 5
    for i, row in enumerate(rows):
        real = batch.attention_mask[i].bool()
        assert batch.input_ids[i, real].tolist() == row
        assert batch.attention_mask[i, -len(row) :].tolist() == [1] * len(row)
        assert batch.attention_mask[i, : 5 - len(row)].sum() == 0
        alone = left_pad([row], pad_id=0)
        assert batch.position_ids[i, real].tolist() == alone.position_ids[0].tolist()
        assert alone.position_ids[0].tolist() == list(range(len(row)))
    with pytest.raises(ValueError):
        left_pad([], pad_id=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_padded_row_logits_equal_row_alone(tiny_models: dict[str, LoadedModel], arch: str) -> None:
    lm = tiny_models[arch]
    layout = ChatLayout(lm.tokenizer)
    prompts = [layout.prompt_ids(q) for q in (BENIGN[3], HARMFUL[1], BENIGN[0])]
    assert len({len(p) for p in prompts}) == 3
    pad = int(lm.tokenizer.pad_token_id)
    with torch.inference_mode():
        batched = forward(lm, left_pad(prompts, pad), use_cache=False).logits[:, -1]
        for i, prompt in enumerate(prompts):
            alone = forward(lm, left_pad([prompt], pad), use_cache=False).logits[0, -1]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-4)


def test_fingerprint_differs_between_models(tokenizer: PreTrainedTokenizerFast) -> None:
    a = build_tiny("llama", tokenizer, seed=0)
    b = build_tiny("llama", tokenizer, seed=1)
    assert a.fingerprint()["config"] == b.fingerprint()["config"]
    assert a.fingerprint()["weights"] != b.fingerprint()["weights"]
    assert a.fingerprint() == build_tiny("llama", tokenizer, seed=0).fingerprint()
