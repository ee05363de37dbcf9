"""SafeSwitch's refusal head: a separately trained copy of the LM head (SPEC §2.2).

Only the output projection is trained, as ``W_refusal = W_base + delta``: ``delta`` is a new tensor,
so the model's parameters (and a tied input embedding) are never modified. Training is cheap
because the body is frozen: the final-normed hidden states (the LM head's input) of every target
token are computed once, one forward per batch without gradients, and ``delta`` is then fitted on
those cached features alone.

Examples: ``[chat prompt][optional pilot tokens][refusal][end of turn]``; the loss covers the
refusal and the end-of-turn token only (the original masks the end-of-turn token when pad = eos, so
its head never learns to stop). Pilot tokens are the first ``n_decode`` tokens of the model's own
answer: with two-stage switching a flagged row continues after them, so part of the examples
teach the head to refuse from there.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F

from safesteer.core.activations import forward
from safesteer.core.generation import length_sorted_batches, stop_token_ids
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout, left_pad
from safesteer.datasets.refusals import refusal_for
from safesteer.methods.safeswitch.artifact import head_bias, head_weight, output_head

IGNORE_INDEX = -100
PILOT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class HeadConfig:
    """Refusal-head training settings (see docs/safeswitch.md for the defaults)."""

    prompts: int = 256  # harmful training prompts used (a documented subset)
    epochs: int = 2
    lr: float = 2e-3
    weight_decay: float = 0.02  # on delta, i.e. towards the base head
    token_batch: int = 256
    pilot_fraction: float = 0.5  # share of examples that continue after the model's pilot tokens
    feature_batch: int = 8
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class HeadExample:
    """Token ids and labels aligned with them (``IGNORE_INDEX`` on prompt and pilot tokens)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def end_of_turn_id(lm: LoadedModel) -> int:
    """The token that ends an assistant turn and stops generation.

    The token the chat template writes right after an assistant message when it is a stop token
    (``<|im_end|>``, ``<|eot_id|>``), else the first stop token (eos).
    """
    stops = stop_token_ids(lm)
    if not stops:
        raise ValueError("the model has no end-of-sequence token; cannot teach the head to stop")
    tokenizer = lm.tokenizer
    if getattr(tokenizer, "chat_template", None):
        content = "Refusal text ends here."
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]
        try:
            text = str(tokenizer.apply_chat_template(messages, tokenize=False))
        except Exception:  # templates that reject this conversation: fall back to eos
            text = ""
        if content in text:
            rest = text.split(content, 1)[1]
            ids = tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
            if ids and int(ids[0]) in stops:
                return int(ids[0])
    eos = tokenizer.eos_token_id
    return int(eos) if eos is not None and int(eos) in stops else stops[0]


def build_head_example(
    prompt_ids: Sequence[int],
    target_ids: Sequence[int],
    eot_id: int,
    pilot_ids: Sequence[int] = (),
) -> HeadExample:
    """``prompt + pilot + target + [eot]`` with labels only on ``target + [eot]``."""
    if not target_ids:
        raise ValueError("an empty refusal target")
    context = [*prompt_ids, *pilot_ids]
    response = [*target_ids, eot_id]
    return HeadExample(
        tuple(int(i) for i in context + response),
        tuple([IGNORE_INDEX] * len(context) + [int(i) for i in response]),
    )


def make_head_examples(
    lm: LoadedModel,
    layout: ChatLayout,
    prompts: Sequence[str],
    categories: Sequence[str | None],
    pilots: Sequence[Sequence[int]] | None,
    config: HeadConfig,
) -> tuple[list[HeadExample], list[str]]:
    """One example per prompt with a refusal from the bank; ``pilot_fraction`` of them (seeded)
    continue after the prompt's pilot tokens. Returns the examples and the target texts."""
    rng = random.Random(config.seed)
    eot = end_of_turn_id(lm)
    examples: list[HeadExample] = []
    texts: list[str] = []
    for i, (prompt, category) in enumerate(zip(prompts, categories, strict=True)):
        target = refusal_for(category, rng)
        pilot: Sequence[int] = ()
        if pilots is not None and pilots[i] and rng.random() < config.pilot_fraction:
            pilot = pilots[i]
            target = PILOT_SEPARATOR + target
        target_ids = layout.reply_ids(target)
        examples.append(build_head_example(layout.prompt_ids(prompt), target_ids, eot, pilot))
        texts.append(target)
    return examples, texts


class _HeadInputCaptured(Exception):
    """Raised by the pre-hook on the LM head to stop the forward once its input is known."""


@torch.inference_mode()
def final_hidden_states(lm: LoadedModel, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """The LM head's input (the final-normed state) at every column of a left-padded batch.

    A pre-hook on the head records its input and aborts the forward, so the vocabulary-sized
    logits are never computed. Returns ``[rows, width, hidden]`` on the model's device.
    """
    box: dict[str, torch.Tensor] = {}

    def pre(module: Any, args: tuple[Any, ...]) -> None:
        box["hidden"] = args[0].detach()
        raise _HeadInputCaptured

    batch = left_pad(sequences, int(lm.tokenizer.pad_token_id), lm.device)
    handle = output_head(lm).register_forward_pre_hook(pre)
    try:
        forward(lm, batch, last_logits_only=False, use_cache=False)
    except _HeadInputCaptured:
        pass
    finally:
        handle.remove()
    if "hidden" not in box:
        raise RuntimeError("the LM head was not called; cannot read its input")
    return box["hidden"]


def head_features(
    lm: LoadedModel, examples: Sequence[HeadExample], batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached training data: the head input predicting each labelled token, and that token.

    Returns float32 CPU ``features [n_tokens, hidden]`` and ``targets [n_tokens]``.
    """
    feats: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    for indices in length_sorted_batches([len(e.input_ids) for e in examples], batch_size):
        chunk = [examples[i] for i in indices]
        hidden = final_hidden_states(lm, [e.input_ids for e in chunk])
        width = hidden.shape[1]
        for row, example in enumerate(chunk):
            offset = width - len(example.input_ids)
            labels = torch.tensor(example.labels)
            where = (labels != IGNORE_INDEX).nonzero().squeeze(1)
            if bool((where == 0).any()):
                raise ValueError("the first token cannot be a label (nothing predicts it)")
            columns = (where - 1 + offset).to(hidden.device)
            feats.append(hidden[row, columns].float().cpu().clone())
            targets.append(labels[where])
    return torch.cat(feats), torch.cat(targets)


def _softcap(lm: LoadedModel) -> float | None:
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def head_logits(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor:
    """Logits as the model computes them from the head input (with its logit soft-capping)."""
    logits = F.linear(features, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def train_refusal_head(
    lm: LoadedModel,
    features: torch.Tensor,
    targets: torch.Tensor,
    config: HeadConfig,
    progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Fit ``delta`` (AdamW, linear decay) on cached features; returns float16 ``delta`` on CPU
    and a history. The model's head is read, never written."""
    if features.shape[0] == 0:
        raise ValueError("no target tokens to train the refusal head on")
    base = head_weight(lm)
    device = base.device
    w0 = base.detach().float().clone()
    bias = head_bias(lm)
    b0 = None if bias is None else bias.detach().float().clone()
    cap = _softcap(lm)
    delta = torch.zeros_like(w0, requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=config.lr, weight_decay=config.weight_decay)
    n = features.shape[0]
    steps_per_epoch = math.ceil(n / config.token_batch)
    total = max(1, steps_per_epoch * config.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
    generator = torch.Generator().manual_seed(config.seed)
    x_all = features.to(device)
    y_all = targets.to(device)

    def mean_loss(weight: torch.Tensor) -> float:
        with torch.no_grad():
            losses = [
                F.cross_entropy(
                    head_logits(x_all[i : i + 1024], weight, b0, cap),
                    y_all[i : i + 1024],
                    reduction="sum",
                )
                for i in range(0, n, 1024)
            ]
            return float(torch.stack(losses).sum()) / n

    start = time.perf_counter()
    history: dict[str, Any] = {"tokens": n, "loss_before": mean_loss(w0), "epoch_loss": []}
    with torch.enable_grad():
        for epoch in range(config.epochs):
            order = torch.randperm(n, generator=generator).to(device)
            running = 0.0
            for s in range(steps_per_epoch):
                idx = order[s * config.token_batch : (s + 1) * config.token_batch]
                logits = head_logits(x_all[idx], w0 + delta, b0, cap)
                loss = F.cross_entropy(logits, y_all[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                running += float(loss.detach()) * idx.numel()
            history["epoch_loss"].append(running / n)
            if progress is not None:
                progress(f"refusal head epoch {epoch + 1}/{config.epochs}: loss {running / n:.4f}")
    stored = delta.detach().half()
    history["loss_after"] = mean_loss(w0 + stored.float())
    history["steps"] = total
    history["seconds"] = round(time.perf_counter() - start, 2)
    history["delta_abs_max"] = float(stored.float().abs().max())
    return stored.cpu(), history
