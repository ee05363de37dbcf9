"""Steering directions for calibration (refusal-vs-compliance and others), the teacher-forced
screen (refusal log-probs and perplexity over layer windows) and the choice among its rows
(additive alpha or a clamp's projection cap)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from safesteer.core.activations import _accepts_logits_to_keep, forward
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import Batch

# --------------------------------------------------------------------------------------------
# helpers


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Each layer's vector scaled to unit norm."""
    return matrix / matrix.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _mean_or_none(states: torch.Tensor, mask: np.ndarray) -> torch.Tensor | None:
    chosen = torch.from_numpy(mask)
    return states[chosen].mean(dim=0) if bool(chosen.any()) else None


def refusal_direction(
    last: torch.Tensor, labels: Sequence[str], refused: Sequence[bool]
) -> torch.Tensor | None:
    """Refused minus complied mean state, averaged within each label (removes the harm axis)."""
    y = np.asarray([lab == "unsafe" for lab in labels])
    r = np.asarray(refused, dtype=bool)
    parts = []
    for label_mask in (y, ~y):
        a = _mean_or_none(last, label_mask & r)
        b = _mean_or_none(last, label_mask & ~r)
        if a is not None and b is not None:
            parts.append(a - b)
    if not parts:
        return None
    return unit_rows(torch.stack(parts).mean(dim=0))


def _teacher_batch(
    prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], pad_id: int
) -> tuple[Batch, int, torch.Tensor]:
    """Prompts left-padded to one width, replies right-padded after them; a reply-token mask."""
    width_p = max(len(p) for p in prompts)
    width_r = max(len(r) for r in replies)
    n = len(prompts)
    ids = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    reply_mask = torch.zeros((n, width_r), dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompts, replies, strict=True)):
        ids[row, width_p - len(p) : width_p] = torch.tensor(list(p))
        mask[row, width_p - len(p) : width_p] = 1
        ids[row, width_p : width_p + len(r)] = torch.tensor(list(r))
        mask[row, width_p : width_p + len(r)] = 1
        reply_mask[row, : len(r)] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, mask, positions), width_p, reply_mask


@torch.inference_mode()
def reply_logprobs(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    replies: Sequence[Sequence[int]],
    vectors: dict[int, torch.Tensor] | None = None,
    coefficient: float = 0.0,
    batch_size: int = 16,
    caps: dict[int, float] | None = None,
) -> np.ndarray:
    """Mean log-probability per token of each reply after its prompt, optionally steered
    (``coefficient * vector`` from the last prompt token on, as in generation; with ``caps``,
    a negative coefficient clamps the projection instead, see :mod:`safesteer.core.steering`)."""
    from safesteer.core.steering import steering

    pad_id = int(lm.tokenizer.pad_token_id)
    out = np.zeros(len(prompts))
    for start in range(0, len(prompts), batch_size):
        rows = list(range(start, min(start + batch_size, len(prompts))))
        batch, width_p, reply_mask = _teacher_batch(
            [prompts[i] for i in rows], [replies[i] for i in rows], pad_id
        )
        batch = Batch(
            *(t.to(lm.device) for t in (batch.input_ids, batch.attention_mask, batch.position_ids))
        )
        coefficients = torch.full((len(rows),), float(coefficient))
        # Only the last width_r + 1 columns' logits are needed (the LM head dominates otherwise).
        keep = reply_mask.shape[1] + 1
        extra = {"logits_to_keep": keep} if _accepts_logits_to_keep(lm.model) else {}
        with steering(lm, vectors or {}, coefficients, width_p - 1, caps):
            logits = forward(lm, batch, last_logits_only=False, use_cache=False, **extra).logits
        logp = torch.log_softmax(logits[:, -keep:-1].float(), dim=-1)
        targets = batch.input_ids[:, width_p:]
        token_lp = logp.gather(-1, targets[..., None])[..., 0].cpu()
        token_lp = token_lp.masked_fill(~reply_mask, 0.0)
        counts = reply_mask.sum(dim=1).clamp_min(1)
        out[rows] = (token_lp.sum(dim=1) / counts).numpy()
    return out


def candidate_directions(
    paper: torch.Tensor, last: torch.Tensor, labels: Sequence[str], refused: np.ndarray
) -> dict[str, torch.Tensor]:
    """The directions calibration screens: the paper's (anchors), style-matched (validation
    unsafe minus safe means at the last prompt token) and, where the model refuses some and
    answers others within a label, its own refusal direction."""
    safe = torch.from_numpy(np.asarray([lab == "safe" for lab in labels]))
    directions = {"paper": paper, "matched": unit_rows(last[~safe].mean(0) - last[safe].mean(0))}
    own = refusal_direction(last, labels, [bool(r) for r in refused])
    if own is not None:
        directions["refusal"] = own
    return directions


def windows(num_layers: int, width: int, stride: int) -> list[tuple[int, ...]]:
    """Candidate steering windows between ~15 % and ~80 % of the depth."""
    lo = max(1, round(0.15 * num_layers))
    hi = round(0.8 * num_layers)
    return [tuple(range(s, s + width)) for s in range(lo, hi - width + 1, stride)]


def projection_cap(states: torch.Tensor, direction: torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of ``states``' projections on the unit ``direction`` (a clamp's cap)."""
    unit = direction.float() / direction.float().norm().clamp_min(1e-12)
    return float(torch.quantile(states.float() @ unit, quantile))


# names the rule of :func:`sweep_pairs`, so a cached screen made under another rule is redone
SWEEP_RULE = "fluent-plain-and-text"


def is_fluent(row: dict[str, Any], budget: float) -> bool:
    """Whether a screened candidate's plain answers and reference text both stay within the
    fluency budget (relative perplexity rise)."""
    limit = 1.0 + budget
    return bool(row["plain_ppl_ratio"] <= limit and row.get("text_ppl_ratio", 1.0) <= limit)


def sweep_pairs(first: list[dict[str, Any]], budget: float, count: int = 2) -> list[dict[str, Any]]:
    """The screened (direction, window) rows whose alphas and caps are swept: fluent ones first,
    by refusal drop, then the rest by refusal drop.

    Fluent means what :func:`choose_steering` requires (plain answers *and* reference text). A
    ranking on plain answers alone picked weak early-layer windows on Qwen-1.5B: they kept plain
    answers fluent at the screen's alpha but broke the reference text, so the stronger middle
    windows were never tried at the lower alphas that keep both fluent.
    """
    ranked = sorted(
        first, key=lambda r: (is_fluent(r, budget), r["refusal_logprob_drop"]), reverse=True
    )
    return ranked[:count]


def choose_steering(screen: list[dict[str, Any]], budget: float) -> tuple[dict[str, Any], float]:
    """The screened candidate with the largest refusal drop whose plain answers *and* reference
    text stay within the fluency budget, and the alpha for steering towards refusal.

    A clamp has no alpha of its own: rows steered towards refusal use the additive alpha of the
    same direction and layers with the largest refusal drop whose plain answers stay fluent
    (those rows should refuse, so reference-text fluency does not bind them).
    """
    limit = 1.0 + budget
    fluent = [r for r in screen if is_fluent(r, budget)]
    if not fluent:
        raise ValueError(
            "no screened candidate keeps plain-answer and reference-text perplexity within the "
            f"fluency budget (+{budget:.0%}); raise --fluency-budget or add lower alphas"
        )
    best = max(fluent, key=lambda r: r["refusal_logprob_drop"])
    if best.get("away_mode", "add") == "add":
        return best, float(best["alpha"])
    same_pair = [
        r
        for r in screen
        if r.get("away_mode", "add") == "add"
        and r["direction"] == best["direction"]
        and r["layers"] == best["layers"]
        and r["plain_ppl_ratio"] <= limit
    ]
    pool = same_pair or [r for r in screen if r.get("away_mode", "add") == "add"]
    toward = max(pool, key=lambda r: (r["plain_ppl_ratio"] <= limit, r["refusal_logprob_drop"]))
    return best, float(toward["alpha"])
