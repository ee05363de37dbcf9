"""Per-row steering: token scope (with and without KV cache), per-row coefficients, hook removal,
batched == single greedy decoding (tiny in-process models of several architectures)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from conftest import ARCH_NAMES, BENIGN, HARMFUL
from safesteer.core.activations import forward, hidden_of, recording, with_hidden
from safesteer.core.generation import (
    MIN_SHARED_PREFIX,
    Generated,
    GenerationConfig,
    common_prefix_length,
    generate_ids,
)
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout, left_pad
from safesteer.core.steering import Steerer, steering
from safesteer.models import wrap_model


@dataclass
class Collector:
    """Every forward chunk's decoder-layer outputs and the ids / mask the model was called with."""

    layers: list[int]
    outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    input_ids: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)


@contextmanager
def collecting(lm: LoadedModel, layers: Sequence[int]) -> Iterator[Collector]:
    """Hooks registered after any active steering hooks, so they see the steered outputs."""
    col = Collector(list(layers), {layer: [] for layer in layers})

    def pre(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        col.input_ids.append(kwargs["input_ids"].detach().clone())
        col.masks.append(kwargs["attention_mask"].detach().clone())

    def hook_for(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            col.outputs[layer].append(hidden_of(output).detach().float().clone())

        return hook

    handles = [lm.model.register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [lm.layers[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        yield col
    finally:
        for handle in handles:
            handle.remove()


def _prompts(lm: LoadedModel, queries: Sequence[str]) -> list[list[int]]:
    layout = ChatLayout(lm.tokenizer)
    return [layout.prompt_ids(q) for q in queries]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _unit(hidden: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(hidden, generator=gen)
    return v / v.norm()


def _residual_norm(lm: LoadedModel, prompts: list[list[int]], layer: int) -> float:
    batch = left_pad(prompts, int(lm.tokenizer.pad_token_id))
    with torch.inference_mode(), recording(lm, [layer], [batch.width - 1]) as rec:
        forward(lm, batch, use_cache=False)
    return float(rec.states[layer].norm(dim=-1).mean())


def _ours(hooks: dict[int, Any]) -> list[Any]:
    # transformers installs its own persistent capture hooks once output_hidden_states is used
    return [h for h in hooks.values() if not str(getattr(h, "__module__", "")).startswith("transf")]


def _no_hooks_left(lm: LoadedModel) -> bool:
    return not _ours(lm.model._forward_pre_hooks) and all(
        not _ours(layer._forward_hooks) for layer in lm.layers
    )


# ---------------------------------------------------------------------------------------------
# Token scope


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_token_scope_is_last_prompt_token_and_generated_tokens(
    tiny_models: dict[str, LoadedModel], arch: str, use_cache: bool
) -> None:
    lm = tiny_models[arch]
    prompts = _prompts(lm, [HARMFUL[0], BENIGN[3]])  # different lengths: row 1 is left-padded
    width = max(len(p) for p in prompts)
    start = width - 1
    layer, probe = 1, lm.num_layers - 1
    norm = _residual_norm(lm, prompts, layer)
    vector = 0.5 * norm * _unit(lm.hidden_size, seed=1)
    coefficients = torch.tensor([1.0, -2.0])
    config = GenerationConfig(max_new_tokens=4, use_cache=use_cache)

    with steering(lm, {layer: vector}, coefficients, start), collecting(lm, [layer, probe]) as col:
        generate_ids(lm, prompts, config)
    assert _no_hooks_left(lm)
    calls = len(col.input_ids)
    assert calls == config.max_new_tokens  # prefill + one call per further token

    if use_cache:  # a prefill chunk, then length-1 chunks
        assert col.input_ids[0].shape[1] == width
        assert all(ids.shape[1] == 1 for ids in col.input_ids[1:])
        full_ids = torch.cat(col.input_ids, dim=1)
    else:  # the whole sequence every step
        assert [ids.shape[1] for ids in col.input_ids] == list(range(width, width + calls))
        full_ids = col.input_ids[-1]
    mask = col.masks[-1]
    assert full_ids.shape == mask.shape

    # The same tokens, unsteered, in one full forward.
    with torch.inference_mode(), recording(lm, [layer, probe], list(range(mask.shape[1]))) as ref:
        lm.model(input_ids=full_ids, attention_mask=mask, position_ids=_positions(mask))
    real = mask.bool()
    delta = coefficients[:, None] * vector[None, :]

    for index in (layer, probe):
        # With the cache the chunks make one sequence; without it every step must respect the scope.
        chunks = [torch.cat(col.outputs[index], dim=1)] if use_cache else col.outputs[index]
        for steered in chunks:
            w = steered.shape[1]
            unsteered = ref.states[index][:, :w]
            before = real[:, :start]
            torch.testing.assert_close(
                steered[:, :start][before], unsteered[:, :start][before], atol=1e-5, rtol=1e-5
            )
            diff = steered[:, start:] - unsteered[:, start:]
            if index == layer:  # exactly the steering vector from start_column on
                expected = delta[:, None, :].expand_as(diff)
                torch.testing.assert_close(diff, expected, atol=1e-4, rtol=1e-4)
            else:  # later layers differ at every steered column
                assert bool((diff.norm(dim=-1) > 1e-3 * norm).all())
    # The scope reached every generated token.
    if use_cache:
        assert torch.cat(col.outputs[layer], dim=1).shape[1] == width + calls - 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_prefill_changes_only_the_last_prompt_token(
    tiny_models: dict[str, LoadedModel], arch: str
) -> None:
    lm = tiny_models[arch]
    prompts = _prompts(lm, [BENIGN[0], HARMFUL[2], BENIGN[1]])
    batch = left_pad(prompts, int(lm.tokenizer.pad_token_id))
    width = batch.width
    layers = list(range(lm.num_layers))
    columns = list(range(width))
    vectors = {1: _unit(lm.hidden_size, 3), 2: _unit(lm.hidden_size, 4)}
    with torch.inference_mode():
        with recording(lm, layers, columns) as plain:
            forward(lm, batch, use_cache=False)
        with (
            steering(lm, vectors, torch.tensor([1.0, -1.0, 0.5]), width - 1),
            recording(lm, layers, columns) as steered,
        ):
            forward(lm, batch, use_cache=False)
    a, b = plain.stacked(), steered.stacked()  # [rows, layers, columns, hidden]
    real = batch.attention_mask.bool()[:, :-1]
    # Every real earlier token identical, at every layer (causal attention, same shapes).
    for layer in layers:
        assert torch.equal(a[:, layer, :-1][real], b[:, layer, :-1][real])
    # The last prompt token: unchanged before the first steered layer, changed from it on.
    assert torch.equal(a[:, 0, -1], b[:, 0, -1])
    for layer in layers[1:]:
        assert bool(((a[:, layer, -1] - b[:, layer, -1]).norm(dim=-1) > 1e-4).all())


def test_steering_layers_returning_tuples() -> None:
    """Layers that return ``(hidden, extra)`` are steered and keep their extra outputs."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, str]:
            return hidden + self.proj(hidden), "extra"

    class ToyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.layers = nn.ModuleList([Block() for _ in range(3)])
            self.extras: list[str] = []

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.embed(input_ids)
            for layer in self.layers:
                hidden, extra = layer(hidden)
                self.extras.append(extra)
            return hidden

    class Tok:
        pad_token_id = 0
        eos_token = "</s>"

    torch.manual_seed(0)
    toy = ToyLM().eval()
    lm = wrap_model(toy, Tok(), layers_path="layers")  # type: ignore[arg-type]
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    vector = torch.ones(8)
    with torch.no_grad():
        plain = toy(input_ids=ids, attention_mask=mask)
        with steering(lm, {2: vector}, torch.tensor([1.0, -1.0]), start_column=2):
            steered = toy(input_ids=ids, attention_mask=mask)
    diff = steered - plain
    assert torch.equal(diff[:, :2], torch.zeros_like(diff[:, :2]))
    torch.testing.assert_close(diff[0, 2:], torch.ones(2, 8))
    torch.testing.assert_close(diff[1, 2:], -torch.ones(2, 8))
    assert set(toy.extras) == {"extra"}
    assert hidden_of((plain, 1)) is plain
    assert with_hidden((plain, 1), steered)[1] == 1


# ---------------------------------------------------------------------------------------------
# Per-row coefficients


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "phi3"])
def test_per_row_coefficients_equal_rows_alone(
    tiny_models: dict[str, LoadedModel], arch: str
) -> None:
    lm = tiny_models[arch]
    prompts = _prompts(lm, [HARMFUL[1], BENIGN[3], BENIGN[2]])
    assert len({len(p) for p in prompts}) == 3
    steer_layers = [1, 2]
    norm = _residual_norm(lm, prompts, 1)
    vectors = {layer: 0.5 * norm * _unit(lm.hidden_size, 10 + layer) for layer in steer_layers}
    coefficients = [1.0, -1.0, 0.0]
    config = GenerationConfig(max_new_tokens=5)
    width = max(len(p) for p in prompts)
    last = lm.num_layers - 1

    with (
        steering(lm, vectors, torch.tensor(coefficients), width - 1),
        collecting(lm, [last]) as col,
    ):
        batched = generate_ids(lm, prompts, config)
    batched_states = torch.cat(col.outputs[last], dim=1)

    unsteered_ids = []
    for row, (prompt, coefficient) in enumerate(zip(prompts, coefficients, strict=True)):
        with (
            steering(lm, vectors, torch.tensor([coefficient]), len(prompt) - 1),
            collecting(lm, [last]) as single_col,
        ):
            single = generate_ids(lm, [prompt], config)
        assert batched.token_ids[row] == single.token_ids[0]
        assert batched.stopped[row] == single.stopped[0]
        single_states = torch.cat(single_col.outputs[last], dim=1)[0]
        n = single_states.shape[0]
        torch.testing.assert_close(batched_states[row, -n:], single_states, atol=1e-4, rtol=1e-4)

        with collecting(lm, [last]) as plain_col:
            plain = generate_ids(lm, [prompt], config)
        unsteered_ids.append(plain.token_ids[0])
        if coefficient == 0.0:  # a zero row is the unsteered model
            assert single.token_ids[0] == plain.token_ids[0]
            plain_states = torch.cat(plain_col.outputs[last], dim=1)[0]
            torch.testing.assert_close(single_states, plain_states, atol=1e-5, rtol=1e-5)
    # Steering must matter for the signed rows, or this test could not tell rows apart.
    assert batched.token_ids[0] != unsteered_ids[0] or batched.token_ids[1] != unsteered_ids[1]
    assert batched.token_ids[2] == unsteered_ids[2]


def test_coefficients_must_match_the_batch(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["llama"]
    prompts = _prompts(lm, HARMFUL[:3])
    width = max(len(p) for p in prompts)
    with (
        pytest.raises(RuntimeError, match="2 rows"),
        steering(lm, {1: _unit(lm.hidden_size, 0)}, torch.tensor([1.0, 1.0]), width - 1),
    ):
        generate_ids(lm, prompts, GenerationConfig(max_new_tokens=2))
    assert _no_hooks_left(lm)
    with pytest.raises(ValueError, match="1-D"):
        Steerer(lm, {1: _unit(lm.hidden_size, 0)}, torch.ones(2, 1), 0)
    with pytest.raises(ValueError, match="outside"):
        Steerer(lm, {lm.num_layers: _unit(lm.hidden_size, 0)}, torch.ones(1), 0)
    assert _no_hooks_left(lm)


# ---------------------------------------------------------------------------------------------
# Hook removal


def _logits(lm: LoadedModel, prompts: list[list[int]]) -> torch.Tensor:
    batch = left_pad(prompts, int(lm.tokenizer.pad_token_id))
    with torch.inference_mode():
        return forward(lm, batch, last_logits_only=False, use_cache=False).logits.clone()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_hooks_are_removed_after_the_block(tiny_models: dict[str, LoadedModel], arch: str) -> None:
    lm = tiny_models[arch]
    prompts = _prompts(lm, [HARMFUL[0], BENIGN[0]])
    width = max(len(p) for p in prompts)
    vectors = {layer: _unit(lm.hidden_size, layer) for layer in range(lm.num_layers)}
    before = _logits(lm, prompts)

    with steering(lm, vectors, torch.tensor([1.0, -1.0]), width - 1):
        inside = _logits(lm, prompts)
    assert not torch.equal(inside[:, -1], before[:, -1])
    assert _no_hooks_left(lm)
    assert torch.equal(_logits(lm, prompts), before)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), steering(lm, vectors, torch.tensor([1.0, -1.0]), width - 1):
        _logits(lm, prompts)
        raise Boom
    assert _no_hooks_left(lm)
    assert torch.equal(_logits(lm, prompts), before)

    with pytest.raises(Boom), recording(lm, [0, 1], [-1]):
        raise Boom
    assert _no_hooks_left(lm)

    steerer = Steerer(lm, vectors, torch.tensor([1.0, -1.0]), width - 1)
    assert not _no_hooks_left(lm)
    steerer.remove()
    steerer.remove()  # idempotent
    assert _no_hooks_left(lm)
    assert torch.equal(_logits(lm, prompts), before)


# ---------------------------------------------------------------------------------------------
# Batched == single, KV cache == no cache


def _single(lm: LoadedModel, prompts: list[list[int]], config: GenerationConfig) -> Generated:
    rows = [generate_ids(lm, [p], config) for p in prompts]
    return Generated([r.token_ids[0] for r in rows], [r.stopped[0] for r in rows])


@pytest.mark.parametrize("penalty", [1.0, 1.3], ids=["no-penalty", "penalty"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_batched_equals_single_and_cache_equals_no_cache(
    tiny_models: dict[str, LoadedModel], arch: str, penalty: float
) -> None:
    lm = tiny_models[arch]
    prompts = _prompts(lm, [BENIGN[3], HARMFUL[0], BENIGN[1], HARMFUL[3]])
    assert len({len(p) for p in prompts}) > 1
    config = GenerationConfig(max_new_tokens=6, repetition_penalty=penalty)
    batched = generate_ids(lm, prompts, config)
    single = _single(lm, prompts, config)
    assert batched.token_ids == single.token_ids
    assert batched.stopped == single.stopped
    no_cache = generate_ids(lm, prompts, GenerationConfig(6, penalty, use_cache=False))
    assert no_cache.token_ids == batched.token_ids
    for ids, stop in zip(batched.token_ids, batched.stopped, strict=True):
        assert stop or len(ids) == 6


SYSTEM = "You are a careful assistant who answers every question about the sea and the sky."


@pytest.mark.parametrize("penalty", [1.0, 1.3], ids=["no-penalty", "penalty"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_shared_prefix_prefill_equals_the_plain_batch(
    tiny_models: dict[str, LoadedModel], arch: str, penalty: float
) -> None:
    lm = tiny_models[arch]
    layout = ChatLayout(lm.tokenizer, SYSTEM)
    prompts = [layout.prompt_ids(q) for q in [BENIGN[3], HARMFUL[0], BENIGN[1], "Hi"]]
    shared = common_prefix_length(prompts)
    assert shared >= MIN_SHARED_PREFIX and len({len(p) for p in prompts}) > 1
    config = GenerationConfig(max_new_tokens=6, repetition_penalty=penalty)
    steps: list[list[int]] = []

    def on_step(tokens: list[int]) -> list[bool]:
        steps.append(tokens)
        return [False] * len(tokens)

    plain = generate_ids(lm, prompts, config)
    prefixed = generate_ids(lm, prompts, config, on_step, share_prefix=True)
    assert prefixed.token_ids == plain.token_ids
    assert prefixed.stopped == plain.stopped
    assert steps and all(len(tokens) == len(prompts) for tokens in steps)


def test_shared_prefix_is_used_only_where_it_helps(tiny_models: dict[str, LoadedModel]) -> None:
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # a token of each row stays
    assert common_prefix_length([[7, 2], [1, 2]]) == 0
    lm = tiny_models["llama"]
    calls: list[int] = []
    original = lm.model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    layout = ChatLayout(lm.tokenizer, SYSTEM)
    prompts = [layout.prompt_ids(q) for q in BENIGN[:3]]
    config = GenerationConfig(max_new_tokens=1)
    lm.model.forward = counting  # type: ignore[method-assign]
    try:
        generate_ids(lm, prompts, config, share_prefix=True)
        assert calls[:2] == [1, 3]  # the prefix once, then every row's rest
        calls.clear()
        generate_ids(lm, prompts[:1], config, share_prefix=True)  # one row: nothing to share
        generate_ids(lm, _prompts(lm, ["Hi", "Yo"]), config, share_prefix=True)  # short prefix
        assert calls == [1, 2]
    finally:
        del lm.model.forward


def test_repetition_penalty_changes_greedy_output(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["gemma2"]  # repeats itself without a penalty
    prompts = _prompts(lm, [BENIGN[1], HARMFUL[0], HARMFUL[1]])
    plain = generate_ids(lm, prompts, GenerationConfig(max_new_tokens=8))
    penalised = generate_ids(lm, prompts, GenerationConfig(8, repetition_penalty=5.0))
    assert plain.token_ids != penalised.token_ids
    for ids, prompt in zip(penalised.token_ids, prompts, strict=True):
        # A large penalty makes every greedy token new (the vocabulary is much larger than 8).
        assert len(set(ids)) == len(ids)
        assert not set(ids) & set(prompt)
