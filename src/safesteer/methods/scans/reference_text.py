"""Reference text for calibration: ordinary human-written text (MMLU dev questions with their
answers, never a test set) cut into token windows.

It serves twice:

* the fluency budget scores steered perplexity on its first windows (``screen_windows``);
* the gate learns that such text is benign: windows of several lengths, spread over the whole
  text, join its training rows as benign prompts (``gate_prompts``), and the threshold is chosen
  so that few of them are steered towards refusal. A capability check that hands each window of
  a document to the gate (WikiText-2 perplexity) meets the same kind of text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def screen_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, size: int, limit: int
) -> tuple[list[list[int]], list[list[int]]]:
    """The first ``limit`` consecutive windows of ``size`` tokens as (first token, rest) pairs
    (windows shorter than two tokens are dropped)."""
    ids = _ids(tokenizer, text)
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)][:limit]
    chunks = [c for c in chunks if len(c) >= 2]
    return [c[:1] for c in chunks], [c[1:] for c in chunks]


def gate_prompts(
    tokenizer: PreTrainedTokenizerBase, text: str, sizes: Sequence[int], per_size: int
) -> list[str]:
    """``per_size`` windows of each length in ``sizes`` (tokens), their starts spread evenly over
    the text, decoded back to strings (the gate reads them as user queries)."""
    if per_size < 0 or any(size < 1 for size in sizes):
        raise ValueError(
            f"window sizes must be positive and per_size >= 0, got {sizes}, {per_size}"
        )
    ids = _ids(tokenizer, text)
    prompts: list[str] = []
    for size in sizes:
        room = len(ids) - size
        if room < 0 or per_size == 0:
            continue
        count = min(per_size, room + 1)
        starts = sorted({round(k * room / max(count - 1, 1)) for k in range(count)})
        for start in starts:
            window = tokenizer.decode(ids[start : start + size], skip_special_tokens=True)
            prompts.append(str(window).strip())
    return list(dict.fromkeys(p for p in prompts if p))


def reference_info(probabilities: np.ndarray, sizes: Sequence[int]) -> dict[str, Any]:
    """What the gate makes of the reference windows (out-of-fold P(harmful)), for the report."""
    if probabilities.size == 0:
        return {"reference_windows": 0}
    return {
        "reference_windows": int(probabilities.size),
        "reference_sizes": [int(s) for s in sizes],
        "reference_mean_probability": float(probabilities.mean()),
        "reference_max_probability": float(probabilities.max()),
        "reference_flagged_at_half": float((probabilities >= 0.5).mean() * 100),
    }
