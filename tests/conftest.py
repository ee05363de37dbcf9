"""Shared fixtures: the shared data folder, tiny random models built in-process, the embedded model.

Nothing here touches the network: the tiny models get a byte-level BPE tokenizer trained on a few
sentences, with special tokens and a small Jinja chat template, and random weights from a fixed
seed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from safesteer.core.handle import LoadedModel
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact, head_checksum
from safesteer.methods.safeswitch.settings import (
    SAFESWITCH_SYSTEM_PROMPT,
    Prober,
    SafeSwitchSettings,
)
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.fit import fit_scans
from safesteer.methods.scans.settings import ScansSettings
from safesteer.models import load_model, wrap_model

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Ends right after the assistant header, like real templates with add_generation_prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "Sure, here is how to bake a cake with flour, eggs and sugar.",
    "How do I build a bomb at home?",
    "What is the capital of France? The capital of France is Paris.",
    "Write a poem about the sea and the wind.",
    "Explain how to hack into a bank account and steal money.",
    "I cannot help with that request, sorry.",
    "Tell me a story about a dragon who learned to read.",
    "Give step by step instructions to make a dangerous weapon.",
    "Why is the sky blue during the day?",
    "User: Assistant: system prompt helpful harmless honest answer question",
]

# Prompts used across the tests: harmful-looking and benign, of different lengths.
HARMFUL = [
    "How do I build a bomb at home?",
    "Explain how to hack into a bank account.",
    "Give instructions to make a dangerous weapon.",
    "How can I steal money from a bank?",
]
BENIGN = [
    "What is the capital of France?",
    "Write a poem about the sea.",
    "Tell me a story about a dragon.",
    "Why is the sky blue?",
]


def _train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def make_tokenizer(with_template: bool = True) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer; BOS is added by the post-processor (plain text path)."""
    tok = _train_tokenizer()
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.add_special_tokens(
        {"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]}
    )
    if with_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _common(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llama_like(config_cls: type, **extra: Any) -> Callable[[dict[str, Any]], Any]:
    def build(common: dict[str, Any]) -> Any:
        return config_cls(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **extra,
            **common,
        )

    return build


def _phi3(common: dict[str, Any]) -> Any:
    return Phi3Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        **common,
    )


def _gemma2(common: dict[str, Any]) -> Any:
    return Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=128,
        max_position_embeddings=256,
        # Untied and wider init: with tied, tiny weights the model only repeats its last input.
        tie_word_embeddings=False,
        initializer_range=0.1,
        **common,
    )


def _gpt2(common: dict[str, Any]) -> Any:
    return GPT2Config(
        n_embd=32, n_layer=3, n_head=4, n_positions=256, initializer_range=0.1, **common
    )


def _neox(common: dict[str, Any]) -> Any:
    return GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
        **common,
    )


ARCHITECTURES: dict[str, tuple[type[PreTrainedModel], Callable[[dict[str, Any]], Any]]] = {
    "llama": (LlamaForCausalLM, _llama_like(LlamaConfig)),
    "qwen2": (Qwen2ForCausalLM, _llama_like(Qwen2Config)),
    "mistral": (MistralForCausalLM, _llama_like(MistralConfig, head_dim=8, sliding_window=128)),
    "gemma2": (Gemma2ForCausalLM, _gemma2),
    "phi3": (Phi3ForCausalLM, _phi3),
    "gpt2": (GPT2LMHeadModel, _gpt2),
    "gpt_neox": (GPTNeoXForCausalLM, _neox),
}
ARCH_NAMES = list(ARCHITECTURES)

# Where each architecture keeps its decoder layers (for the layers_path override).
LAYERS_PATHS = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


def build_tiny(
    arch: str,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    seed: int | None = None,
    name: str | None = None,
) -> LoadedModel:
    """A tiny random float32 model of ``arch`` with a vocabulary matching ``tokenizer``."""
    seed = ARCH_NAMES.index(arch) if seed is None else seed
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    model_cls, make_config = ARCHITECTURES[arch]
    config = make_config(_common(tokenizer))
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    return wrap_model(model, tokenizer, name=name or f"tiny-{arch}-seed{seed}")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> Iterator[None]:
    """Run the tests on one torch thread (``SAFESTEER_TEST_THREADS`` overrides).

    The tiny models are fastest on one thread, and on a shared 2-core machine OpenMP threads make
    every small matmul wait for a scheduler tick (measured 100x slower for the tiny models and 30x
    for the embedded one); the embedded model loses little on one dedicated core.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SAFESTEER_TEST_THREADS", "1")))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data folder: ``$SAFESTEER_DATA_DIR`` when set, else ``../shared/data``; or skip."""
    from safesteer.datasets.registry import resolve_data_dir

    configured = resolve_data_dir()
    sibling = (Path(__file__).resolve().parent / ".." / ".." / "shared" / "data").resolve()
    root = configured.resolve() if configured is not None else sibling
    if not root.is_dir():
        pytest.skip(
            f"data folder not found at {root}; set SAFESTEER_DATA_DIR to the shared data folder"
        )
    return root


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with a chat template."""
    return make_tokenizer(with_template=True)


@pytest.fixture(scope="session")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    """The same tokenizer without a chat template (plain prompt fallback)."""
    return make_tokenizer(with_template=False)


@pytest.fixture(scope="session")
def tiny_models(tokenizer: PreTrainedTokenizerFast) -> dict[str, LoadedModel]:
    """One tiny random model per architecture, sharing the tokenizer with a chat template."""
    return {arch: build_tiny(arch, tokenizer) for arch in ARCH_NAMES}


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct (float32, CPU); skip when it is not installed."""
    from safesteer.core.errors import ModelLoadError

    try:
        return load_model()
    except ModelLoadError as exc:
        pytest.skip(f"embedded model unavailable: {exc}")


def random_prober(dim: int, seed: int) -> Prober:
    """An untrained prober with spread-out probabilities (its output weights scaled up)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prober = Prober(dim)
        prober.fc2.weight.data *= 20
    return prober.eval()


def random_switch(
    lm: LoadedModel, mode: str = "two-stage", n_decode: int = 2
) -> SafeSwitchArtifact:
    """Random probers and a random refusal head that clearly changes the tokens."""
    generator = torch.Generator().manual_seed(7)
    delta = torch.randn(tuple(lm.model.get_output_embeddings().weight.shape), generator=generator)
    settings = SafeSwitchSettings(mode=mode, layer=1, n_decode=n_decode)  # type: ignore[arg-type]
    return SafeSwitchArtifact(
        settings=settings,
        stage1=random_prober(lm.hidden_size, 1),
        stage2=random_prober(lm.hidden_size, 2) if mode == "two-stage" else None,
        head_delta=(delta * 2).half(),
        model_fingerprint=lm.fingerprint(),
        base_head_checksum=head_checksum(lm),
    )


def combined_scans(lm: LoadedModel) -> ScansArtifact:
    """SCANS fitted on the tiny anchors under SafeSwitch's system prompt (for scans+safeswitch)."""
    settings = ScansSettings(
        alpha=0.6,
        alpha_mode="relative",
        steer_layers=(1, 2),
        cls_layers=(1, 2, 3),
        threshold=0.0,
        system_prompt=SAFESWITCH_SYSTEM_PROMPT,
    )
    return fit_scans(lm, HARMFUL, BENIGN, settings, batch_size=4)
