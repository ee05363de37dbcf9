"""Capability checks under steering: perplexity, MMLU and XSum (SPEC §1.7).

Each check runs the model with or without an :class:`Intervention` (steering vectors plus a
per-row coefficient rule) and returns a JSON-ready dict with its settings and scores.

* :func:`perplexity`: WikiText-2 (or any text) in non-overlapping windows. ``standard`` scores
  every token of every window; ``chat`` is the SCANS paper's variant, where each window becomes a
  fake chat turn (first half as the user query, second half as the reply) and only the reply is
  scored, with steering from the last prompt token on.
* :func:`mmlu`: k-shot prompts in the format of Hendrycks et al.; the prediction is the answer
  letter with the highest next-token logit.
* :func:`xsum`: greedy summaries of XSum articles in a chat turn, scored with ROUGE-1/2/L F1.

Scales: perplexity is a ratio; MMLU accuracies and ROUGE F1 are percentages (0-100), as in the
papers' tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn import functional as F
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from safesteer.core.activations import forward
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import Batch, ChatLayout
from safesteer.core.progress import row_progress
from safesteer.core.steering import steering
from safesteer.datasets.readers import MMLU_LETTERS
from safesteer.datasets.registry import dataset_path
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.decide import classify, policy_coefficients

__all__ = [
    "MMLU_LETTERS",
    "XSUM_PROMPT",
    "Intervention",
    "perplexity",
    "scans_intervention",
    "wikitext2_text",
]

Variant = Literal["standard", "chat"]
ScansMode = Literal["classify", "safe", "unsafe"]

XSUM_PROMPT = "Document:{document}\nBased on the previous text, provide a brief single summary:"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# --------------------------------------------------------------------------------------------
# Interventions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Intervention:
    """How to steer during a capability check."""

    vectors: dict[int, torch.Tensor]  # layer -> scaled vector (ScansArtifact.steering_vectors())
    coefficient: Callable[[list[str]], torch.Tensor]  # per-row coefficient for a batch of texts
    name: str = "scans"
    caps: dict[int, float] | None = None  # clamped away-steering (ScansArtifact.steering_caps())

    def coefficients(self, texts: Sequence[str]) -> torch.Tensor:
        """The coefficient of every text as a float32 CPU tensor, checked for shape."""
        values = torch.as_tensor(self.coefficient(list(texts))).detach()
        values = values.to("cpu", torch.float32).reshape(-1)
        if values.shape[0] != len(texts):
            raise ValueError(
                f"intervention {self.name!r} returned {values.shape[0]} coefficients for "
                f"{len(texts)} texts"
            )
        return values

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: name, steered layers and how rows are steered away."""
        return {
            "name": self.name,
            "layers": sorted(int(layer) for layer in self.vectors),
            "away": "clamp" if self.caps else "add",
        }


def scans_intervention(
    lm: LoadedModel,
    artifact: ScansArtifact,
    mode: ScansMode = "classify",
    *,
    batch_size: int = 16,
) -> Intervention:
    """SCANS steering: ``classify`` applies the artifact's steering policy (signed, away-only or
    banded, as in generation) to :func:`classify` on each text taken as a user query; ``safe``
    steers every row with -1, ``unsafe`` with +1."""
    vectors, caps = artifact.steering_vectors(), artifact.steering_caps()
    if mode == "classify":
        rule = policy_coefficients(artifact)

        def by_classifier(texts: list[str]) -> torch.Tensor:
            return rule(classify(lm, artifact, texts, batch_size=batch_size))

        return Intervention(vectors, by_classifier, "scans", caps)
    if mode not in ("safe", "unsafe"):
        raise ValueError(f"unknown SCANS mode {mode!r}; use classify, safe or unsafe")
    value = -1.0 if mode == "safe" else 1.0

    def constant(texts: list[str]) -> torch.Tensor:
        return torch.full((len(texts),), value)

    return Intervention(vectors, constant, f"scans-{mode}", caps)


class _CoefficientLog:
    """Collects the coefficients used per row, summarised in the result."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def steer(
        self,
        lm: LoadedModel,
        intervention: Intervention | None,
        texts: Sequence[str],
        start_column: int,
    ) -> AbstractContextManager[Any]:
        """A steering context for one batch, or a no-op without an intervention."""
        if intervention is None:
            return nullcontext()
        coefficients = intervention.coefficients(texts)
        self.values.extend(float(c) for c in coefficients)
        return steering(lm, intervention.vectors, coefficients, start_column, intervention.caps)

    def summary(self) -> dict[str, Any] | None:
        if not self.values:
            return None
        return {
            "n": len(self.values),
            "mean": sum(self.values) / len(self.values),
            "n_positive": sum(1 for v in self.values if v > 0),
            "n_negative": sum(1 for v in self.values if v < 0),
            "n_zero": sum(1 for v in self.values if v == 0),
        }


def _intervention_info(
    intervention: Intervention | None, log: _CoefficientLog
) -> dict[str, Any] | None:
    if intervention is None:
        return None
    return {**intervention.describe(), "coefficients": log.summary()}


def _chunks(n: int, size: int) -> Iterator[range]:
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool = False) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]
    return [int(i) for i in ids]


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


def wikitext2_text(data_dir: str | Path | None = None) -> str:
    """WikiText-2 raw test text: the file's lines (CR stripped) joined with ``"\\n\\n"``."""
    path = dataset_path("wikitext2", data_dir)[0]
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n\n".join(lines)


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[bos]`` when the tokenizer itself starts plain text with BOS (Llama), else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = _encode(tokenizer, "a", special=True)
    return [int(bos)] if probe and probe[0] == bos else []


def _context_target_batch(
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
) -> tuple[Batch, int, torch.Tensor]:
    """Rows ``context + target`` with contexts left-padded and targets right-padded.

    Every row's last context token then sits in the same column ``C - 1`` (so one steering start
    column fits all rows), and target token ``j`` is predicted by the logits at ``C - 1 + j``.
    Returns the batch, ``C`` and the target ids ``[rows, T]`` with -100 on padding.
    """
    if any(not c for c in contexts) or any(not t for t in targets):
        raise ValueError("every row needs at least one context and one target token")
    c_width = max(len(c) for c in contexts)
    t_width = max(len(t) for t in targets)
    rows = len(contexts)
    ids = torch.full((rows, c_width + t_width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((rows, t_width), -100, dtype=torch.long)
    for row, (context, target) in enumerate(zip(contexts, targets, strict=True)):
        ids[row, c_width - len(context) : c_width] = torch.tensor(list(context))
        ids[row, c_width : c_width + len(target)] = torch.tensor(list(target))
        mask[row, c_width - len(context) : c_width + len(target)] = 1
        labels[row, : len(target)] = torch.tensor(list(target))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = Batch(ids.to(device), mask.to(device), positions.to(device))
    return batch, c_width, labels


def _target_nll(
    lm: LoadedModel, batch: Batch, c_width: int, labels: torch.Tensor
) -> tuple[float, int]:
    """Summed NLL (nats) and count of the target tokens of a context/target batch."""
    logits = forward(lm, batch, last_logits_only=False, use_cache=False).logits
    t_width = labels.shape[1]
    total = 0.0
    for row in range(labels.shape[0]):  # row by row: a float32 copy of all logits can be large
        scores = logits[row, c_width - 1 : c_width - 1 + t_width, :].float()
        nll = F.cross_entropy(
            scores, labels[row].to(scores.device), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
    return total, int((labels != -100).sum())


@dataclass
class _PplRow:
    context: list[int]
    target: list[int]
    steer_text: str


def _standard_rows(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], window: int
) -> tuple[list[_PplRow], dict[str, Any]]:
    prefix = _bos_prefix(tokenizer)
    span = window - len(prefix)
    rows: list[_PplRow] = []
    for start in range(0, len(ids), span):
        chunk = ids[start : start + span]
        if prefix:
            rows.append(_PplRow(list(prefix), chunk, _decode(tokenizer, chunk)))
        elif len(chunk) >= 2:  # the first token is context only
            rows.append(_PplRow(chunk[:1], chunk[1:], _decode(tokenizer, chunk)))
    info = {
        "window_text_tokens": span,
        "prefix": "bos" if prefix else "none (first token of each window is context only)",
    }
    return rows, info


def _chat_rows(
    lm: LoadedModel, ids: list[int], window: int, system_prompt: str | None
) -> tuple[list[_PplRow], dict[str, Any]]:
    tokenizer = lm.tokenizer
    layout = ChatLayout(tokenizer, system_prompt)
    rows: list[_PplRow] = []
    skipped = 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        half = len(chunk) // 2
        if half < 1:
            skipped += 1
            continue
        user = _decode(tokenizer, chunk[:half])
        reply = _encode(tokenizer, _decode(tokenizer, chunk[half:]))
        if not reply:
            skipped += 1
            continue
        rows.append(_PplRow(layout.prompt_ids(user), reply, user))
    info = {
        "note": (
            "SCANS-paper variant: each window's first half is decoded into the user turn of the "
            "chat template and its second half (re-tokenized) is the assistant reply; only reply "
            "tokens are scored; steering starts at the last prompt token; the coefficient is "
            "computed on the user-turn text"
        ),
        "n_windows_skipped": skipped,
        "system_prompt": system_prompt,
    }
    return rows, info


@torch.inference_mode()
def perplexity(
    lm: LoadedModel,
    text: str | None = None,
    *,
    data_dir: str | Path | None = None,
    window: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    intervention: Intervention | None = None,
    variant: Variant = "standard",
    system_prompt: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of ``text`` (default: the WikiText-2 test set) in non-overlapping windows.

    ``standard``: the text's tokens are cut into consecutive windows of ``window`` model
    positions. When the tokenizer starts plain text with BOS, every window is ``[BOS] + (window -
    1) text tokens`` and every text token is scored exactly once; otherwise the first token of each
    window is context only. ``ppl = exp(mean NLL)`` over all scored tokens. With an intervention
    every position is steered (start column 0) with a coefficient computed on the window's text.

    ``chat``: the SCANS paper's variant (see :func:`_chat_rows`); ``window`` counts text tokens.
    """
    if variant not in ("standard", "chat"):
        raise ValueError(f"unknown perplexity variant {variant!r}; use standard or chat")
    if window < (2 if variant == "standard" else 4):
        raise ValueError(f"window {window} is too short for the {variant} variant")
    source = "text" if text is not None else "wikitext2 (wiki.test.raw, lines joined by \\n\\n)"
    if text is None:
        text = wikitext2_text(data_dir)
    tokenizer = lm.tokenizer
    ids = _encode(tokenizer, text)
    if variant == "standard":
        rows, info = _standard_rows(tokenizer, ids, window)
    else:
        rows, info = _chat_rows(lm, ids, window, system_prompt)
    if max_windows is not None:
        rows = rows[:max_windows]
    if not rows:
        raise ValueError("the text is too short to score a single window")
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    log = _CoefficientLog()
    total_nll, n_tokens = 0.0, 0
    with row_progress(enabled=progress) as bar:
        task = bar.add_task(f"perplexity ({variant})", total=len(rows))
        for chunk in _chunks(len(rows), batch_size):
            part = [rows[i] for i in chunk]
            batch, c_width, labels = _context_target_batch(
                [r.context for r in part], [r.target for r in part], pad_id, lm.device
            )
            start_column = 0 if variant == "standard" else c_width - 1
            with log.steer(lm, intervention, [r.steer_text for r in part], start_column):
                nll, count = _target_nll(lm, batch, c_width, labels)
            total_nll += nll
            n_tokens += count
            bar.advance(task, len(part))
    mean_nll = total_nll / n_tokens
    return {
        "task": "perplexity",
        "variant": variant,
        "model": lm.name,
        "source": source,
        "window": window,
        "max_windows": max_windows,
        "batch_size": batch_size,
        "n_text_tokens": len(ids),
        "n_windows": len(rows),
        "n_tokens": n_tokens,
        "nll_mean": mean_nll,
        "perplexity": math.exp(mean_nll),
        **info,
        "intervention": _intervention_info(intervention, log),
    }
