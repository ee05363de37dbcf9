"""Batched greedy decoding with left padding, a KV cache and an optional repetition penalty.

A small loop of its own (rather than ``model.generate``) so that methods can start decoding from a
cache they prefilled themselves (SCANS' shared prefix) and keep per-row state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from safesteer.core.activations import forward
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import Batch, left_pad


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. The paper decodes greedily with repetition penalty 1.1."""

    max_new_tokens: int = 64
    repetition_penalty: float = 1.0
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be positive (1.0 disables it)")


@dataclass
class Generated:
    """Generated token ids per row (stop token excluded) and whether each row stopped by itself."""

    token_ids: list[list[int]]
    stopped: list[bool]
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# Called after every decoding step with each row's new token (pad for finished rows); may return
# one flag per row to finish those rows early (a streaming server: per-row limits, disconnects).
StepCallback = Callable[[list[int]], Sequence[bool] | None]


def stop_token_ids(lm: LoadedModel) -> list[int]:
    """End-of-sequence / end-of-turn ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    config_eos = getattr(lm.model.generation_config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list | tuple):
        ids.update(int(i) for i in config_eos)
    if lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    return sorted(ids)


def penalise_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty as in CTRL / transformers: divide positive, multiply negative logits."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def decode_loop(
    lm: LoadedModel,
    batch: Batch,
    first_logits: torch.Tensor,
    cache: Any,
    config: GenerationConfig,
    on_step: StepCallback | None = None,
) -> Generated:
    """Decode greedily from logits for the first new token of every row of ``batch``.

    ``cache`` holds the keys/values of all of ``batch`` (ignored when ``config.use_cache`` is off,
    in which case every step reruns the whole sequence). ``on_step``: see :data:`StepCallback`.
    """
    rows = batch.input_ids.shape[0]
    device = first_logits.device
    stops = torch.tensor(stop_token_ids(lm), device=device)
    pad_id = int(lm.tokenizer.pad_token_id)
    seen: torch.Tensor | None = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros_like(first_logits, dtype=torch.bool)
        row_idx, col_idx = batch.attention_mask.nonzero(as_tuple=True)
        seen[row_idx.to(device), batch.input_ids[row_idx, col_idx].to(device)] = True
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    stopped_by_eos = torch.zeros(rows, dtype=torch.bool, device=device)
    ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
    next_position = positions[:, -1:] + 1
    logits = first_logits
    steps: list[torch.Tensor] = []
    for step in range(config.max_new_tokens):
        if seen is not None:
            logits = penalise_seen(logits, seen, config.repetition_penalty)
        token = logits.argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        steps.append(token)
        is_stop = torch.isin(token, stops) & ~finished
        stopped_by_eos |= is_stop
        finished |= is_stop
        if on_step is not None:
            done = on_step([int(t) for t in token.tolist()])
            if done is not None:
                finished |= torch.tensor(list(done), dtype=torch.bool, device=device)
        if bool(finished.all()) or step == config.max_new_tokens - 1:
            break
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        token_in = token[:, None].to(ids.device)
        mask = torch.cat([mask, torch.ones_like(token_in)], dim=1)
        if config.use_cache:
            step_batch = Batch(token_in, mask, next_position)
            out = forward(lm, step_batch, past_key_values=cache, use_cache=True)
        else:
            ids = torch.cat([ids, token_in], dim=1)
            positions = torch.cat([positions, next_position], dim=1)
            out = forward(lm, Batch(ids, mask, positions), use_cache=False)
        next_position = next_position + 1
        logits = out.logits[:, -1, :].float()
    generated = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(rows)]
    stop_set = set(stop_token_ids(lm))
    token_ids: list[list[int]] = []
    for row in generated:
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        token_ids.append(row[:cut])
    return Generated(token_ids, stopped_by_eos.tolist(), steps=len(steps))


class CacheRollbackError(RuntimeError):
    """A KV cache cannot drop its last positions (e.g. a sliding-window cache past its window)."""


def new_cache(lm: LoadedModel, *, rollback: bool = False) -> DynamicCache:
    """An empty dynamic KV cache for ``lm``.

    ``rollback=True`` makes sliding-window layers keep the positions they would drop until the
    next :func:`rollback`, so that the cache can be rolled back once (SCANS' shared prefill).
    """
    cache = DynamicCache(config=lm.model.config)
    if rollback and hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    return cache


def _stop_recording(cache: Any) -> None:
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "record_past", False):
            layer.record_past = False


def rollback(cache: Any, tokens: int) -> None:
    """Drop the last ``tokens`` positions from a KV cache (and stop sliding-window recording).

    transformers 5 takes a negative count; older releases took the absolute length to keep.
    Raises :class:`CacheRollbackError` when the cache cannot do it: a sliding-window cache whose
    window was exceeded, unless it was made with ``new_cache(lm, rollback=True)``.
    """
    if tokens <= 0:
        return
    length = cache.get_seq_length()
    keep = length - tokens
    try:
        try:
            cache.crop(-tokens)
        except ValueError:
            cache.crop(keep)
    except (RuntimeError, ValueError) as exc:
        raise CacheRollbackError(_rollback_message(cache, tokens, length)) from exc
    if cache.get_seq_length() != keep:
        raise CacheRollbackError(_rollback_message(cache, tokens, length))
    _stop_recording(cache)


def _rollback_message(cache: Any, tokens: int, length: int) -> str:
    windows = sorted(
        {int(w) for w in (getattr(layer, "sliding_window", None) for layer in cache.layers) if w}
        if hasattr(cache, "layers")
        else set()
    )
    why = (
        f"its sliding-window layers (window {', '.join(map(str, windows))}) already dropped "
        f"positions of the {length} cached"
        if windows
        else f"the cache ({type(cache).__name__}, {length} positions) does not support cropping"
    )
    return (
        f"Cannot roll the KV cache back by {tokens} tokens: {why}. Make the cache with "
        "`new_cache(lm, rollback=True)` (SCANS does), or use the two-pass path "
        "(`scans_generate_two_pass`), which needs no rollback."
    )


MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a separate prefill


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens that every prompt starts with, leaving at least one token of each prompt after."""
    if not prompts:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def _window_holds(lm: LoadedModel, width: int) -> bool:
    """Whether every sliding-window layer sees all of ``width`` columns (then pads in the middle
    of a row cannot push its real tokens out of the window)."""
    config = lm.model.config
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False or not window:
        return True
    return width <= int(window)


@torch.inference_mode()
def generate_ids(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    on_step: StepCallback | None = None,
    *,
    share_prefix: bool = False,
) -> Generated:
    """Greedy generation for already-encoded prompts in one left-padded batch.

    ``share_prefix``: when the rows start with the same tokens (a chat template's system prompt
    and header), that prefix is prefilled once and its keys/values are copied to every row; the
    rest of each prompt is left-padded after it (the pads sit between prefix and suffix, masked
    out, with position ids counting real tokens). The same tokens up to float rounding, with
    less prefill compute for a long shared prefix.
    """
    pad_id = int(lm.tokenizer.pad_token_id)
    shared = common_prefix_length(prompts) if share_prefix and config.use_cache else 0
    longest = max((len(p) for p in prompts), default=0) + config.max_new_tokens
    if shared < MIN_SHARED_PREFIX or len(prompts) < 2 or not _window_holds(lm, longest):
        batch = left_pad(prompts, pad_id, lm.device)
        cache = new_cache(lm) if config.use_cache else None
        out = forward(lm, batch, past_key_values=cache, use_cache=config.use_cache)
        return decode_loop(lm, batch, out.logits[:, -1, :].float(), cache, config, on_step)
    rows = len(prompts)
    cache = new_cache(lm)
    prefix = left_pad([prompts[0][:shared]], pad_id, lm.device)
    forward(lm, prefix, past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(rows)
    rest = left_pad([p[shared:] for p in prompts], pad_id, lm.device)
    mask = torch.cat([prefix.attention_mask.expand(rows, -1), rest.attention_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids = torch.cat([prefix.input_ids.expand(rows, -1), rest.input_ids], dim=1)
    batch = Batch(ids, mask, positions)
    step = Batch(rest.input_ids, mask, positions[:, shared:])
    out = forward(lm, step, past_key_values=cache, use_cache=True)
    return decode_loop(lm, batch, out.logits[:, -1, :].float(), cache, config, on_step)


def decode_texts(lm: LoadedModel, generated: Generated) -> list[str]:
    """Detokenise generated ids, dropping special tokens."""
    return [
        str(lm.tokenizer.decode(ids, skip_special_tokens=True)).strip()
        for ids in generated.token_ids
    ]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), shortest first."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_batched(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    batch_size: int = 16,
    on_batch: Callable[[list[int], list[str]], None] | None = None,
) -> list[str]:
    """Plain greedy generation over many encoded prompts in length-sorted batches."""
    texts: list[str] = [""] * len(prompts)
    for indices in length_sorted_batches([len(p) for p in prompts], batch_size):
        batch_texts = decode_texts(lm, generate_ids(lm, [prompts[i] for i in indices], config))
        for i, text in zip(indices, batch_texts, strict=True):
            texts[i] = text
        if on_batch is not None:
            on_batch(indices, batch_texts)
    return texts
