"""XSum summaries scored by ROUGE F1, with an optional steering intervention."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from safesteer.core.generation import GenerationConfig, generate_ids
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.core.progress import row_progress
from safesteer.datasets.registry import DatasetError, dataset_path
from safesteer.evaluation.capability import (
    ROUGE_TYPES,
    XSUM_PROMPT,
    Intervention,
    _chunks,
    _CoefficientLog,
    _decode,
    _encode,
    _intervention_info,
)

# --------------------------------------------------------------------------------------------
# XSum
# --------------------------------------------------------------------------------------------


def xsum_prompt(document: str) -> str:
    """The SCANS paper's summarisation instruction (SPEC §1.7)."""
    return XSUM_PROMPT.format(document=document)


def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError("XSum scoring needs `pip install rouge-score==0.1.2`") from exc
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_f1(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Mean ROUGE-1/2/L F1 in percent (rouge_score, Porter stemmer) and the per-pair values."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    scorer = _rouge_scorer()
    per_pair: list[dict[str, float]] = []
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        per_pair.append({k: 100.0 * float(scores[k].fmeasure) for k in ROUGE_TYPES})
    n = len(per_pair)
    means = {k: (sum(p[k] for p in per_pair) / n if n else None) for k in ROUGE_TYPES}
    return {**means, "per_pair": per_pair}


def _read_xsum(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("document"), str) or not isinstance(
                record.get("summary"), str
            ):
                raise DatasetError(f"{path}:{number}: expected string fields document and summary")
            records.append(record)
    return records


@torch.inference_mode()
def xsum(
    lm: LoadedModel,
    *,
    data_dir: str | Path | None = None,
    limit: int = 100,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    intervention: Intervention | None = None,
    seed: int = 0,
    max_document_tokens: int | None = 768,
    repetition_penalty: float = 1.0,
    system_prompt: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """ROUGE-1/2/L F1 of greedy summaries of a seeded sample of ``limit`` XSum test articles.

    Documents longer than ``max_document_tokens`` are cut to that many tokens (counted in the
    result). The prompt is the user turn of the chat template; with an intervention, steering
    starts at the last prompt token with a coefficient computed on the user-turn text.
    """
    records = _read_xsum(dataset_path("xsum", data_dir)[0])
    if limit < 1:
        raise ValueError("limit must be at least 1")
    picked = sorted(random.Random(seed).sample(range(len(records)), min(limit, len(records))))
    tokenizer = lm.tokenizer
    layout = ChatLayout(tokenizer, system_prompt)
    queries: list[str] = []
    prompts: list[list[int]] = []
    truncated: list[bool] = []
    for index in picked:
        document = records[index]["document"]
        cut = False
        if max_document_tokens is not None:
            doc_ids = _encode(tokenizer, document)
            if len(doc_ids) > max_document_tokens:
                document = _decode(tokenizer, doc_ids[:max_document_tokens])
                cut = True
        query = xsum_prompt(document)
        queries.append(query)
        prompts.append(layout.prompt_ids(query))
        truncated.append(cut)
    config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    summaries: list[str] = [""] * len(prompts)
    log = _CoefficientLog()
    with row_progress(enabled=progress) as bar:
        task = bar.add_task("xsum", total=len(prompts))
        for chunk in _chunks(len(order), batch_size):
            part = [order[i] for i in chunk]
            width = max(len(prompts[i]) for i in part)
            with log.steer(lm, intervention, [queries[i] for i in part], width - 1):
                generated = generate_ids(lm, [prompts[i] for i in part], config)
            for index, ids in zip(part, generated.token_ids, strict=True):
                summaries[index] = _decode(tokenizer, ids).strip()
            bar.advance(task, len(part))
    references = [str(records[i]["summary"]) for i in picked]
    rouge = rouge_f1(summaries, references)
    samples = [
        {
            "index": index,
            "id": records[index].get("id"),
            "summary": summary,
            "reference": reference,
            "document_truncated": cut,
            **scores,
        }
        for index, summary, reference, cut, scores in zip(
            picked, summaries, references, truncated, rouge["per_pair"], strict=True
        )
    ]
    return {
        "task": "xsum",
        "model": lm.name,
        "limit": limit,
        "seed": seed,
        "n": len(picked),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "repetition_penalty": repetition_penalty,
        "decoding": "greedy",
        "system_prompt": system_prompt,
        "prompt_template": XSUM_PROMPT,
        "max_document_tokens": max_document_tokens,
        "n_documents_truncated": sum(truncated),
        "rouge1": rouge["rouge1"],
        "rouge2": rouge["rouge2"],
        "rougeL": rouge["rougeL"],
        "scale": "percent (F1, rouge_score with Porter stemmer)",
        "samples": samples,
        "intervention": _intervention_info(intervention, log),
    }
