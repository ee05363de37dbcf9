"""MMLU 5-shot letter accuracy, with an optional steering intervention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from safesteer.core.activations import forward
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import left_pad
from safesteer.core.progress import row_progress
from safesteer.datasets.readers import MMLU_LETTERS, read_mmlu_csv
from safesteer.datasets.registry import DatasetError, dataset_path
from safesteer.evaluation.capability import (
    Intervention,
    _chunks,
    _CoefficientLog,
    _encode,
    _intervention_info,
)

# --------------------------------------------------------------------------------------------
# MMLU
# --------------------------------------------------------------------------------------------


def format_mmlu_example(row: Sequence[str], include_answer: bool = True) -> str:
    """``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` (+ `` X\\n\\n`` with the answer)."""
    text = row[0] + "".join(
        f"\n{letter}. {option}" for letter, option in zip(MMLU_LETTERS, row[1:5], strict=True)
    )
    text += "\nAnswer:"
    if include_answer:
        text += f" {row[5]}\n\n"
    return text


def mmlu_prompt(subject: str, shots: Sequence[Sequence[str]], row: Sequence[str]) -> str:
    """The k-shot prompt of Hendrycks et al. (``k = len(shots)``), ending with ``Answer:``."""
    name = " ".join(subject.split("_"))
    header = f"The following are multiple choice questions (with answers) about {name}.\n\n"
    return header + "".join(format_mmlu_example(s) for s in shots) + format_mmlu_example(row, False)


def mmlu_answer_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], str]:
    """Token ids of the answer letters after ``Answer:`` and the rule that gave them.

    The first token of `` A``..`` D``; when those coincide (a tokenizer that splits off the
    space, e.g. SentencePiece's lone ``▁``), the last token. Raises if they are still not distinct.
    """
    encodings = [_encode(tokenizer, f" {letter}") for letter in MMLU_LETTERS]
    if any(not e for e in encodings):
        raise ValueError("an answer letter encodes to no tokens")
    for rule, pick in (("first token of ' X'", 0), ("last token of ' X'", -1)):
        ids = [e[pick] for e in encodings]
        if len(set(ids)) == len(ids):
            return ids, rule
    raise ValueError(f"the answer letters do not map to distinct tokens: {encodings}")


def mmlu_subjects(data_dir: str | Path | None = None) -> list[str]:
    """The subjects of the MMLU test split, sorted."""
    paths = dataset_path("mmlu", data_dir)
    return sorted(p.name.removesuffix("_test.csv") for p in paths if p.parent.name == "mmlu_test")


def _mmlu_files(data_dir: str | Path | None) -> dict[tuple[str, str], Path]:
    files: dict[tuple[str, str], Path] = {}
    for path in dataset_path("mmlu", data_dir):
        split = path.parent.name.removeprefix("mmlu_")
        files[(path.name.removesuffix(f"_{split}.csv"), split)] = path
    return files


@dataclass
class _MmluItem:
    subject: str
    prompt: list[int]
    text: str
    answer: int
    shots: int
    shots_wanted: int


@torch.inference_mode()
def mmlu(
    lm: LoadedModel,
    *,
    data_dir: str | Path | None = None,
    subjects: Sequence[str] | None = None,
    k_shot: int = 5,
    limit_per_subject: int | None = None,
    batch_size: int = 8,
    intervention: Intervention | None = None,
    max_prompt_tokens: int | None = 2048,
    progress: bool = True,
) -> dict[str, Any]:
    """k-shot MMLU accuracy from the answer letter with the highest next-token logit.

    Few-shot rows come from ``mmlu_dev``; prompts longer than ``max_prompt_tokens`` drop shots from
    the end, as the original evaluation does. ``average`` is the mean of per-subject accuracies
    (the papers' number), ``micro`` the accuracy over all questions. With an intervention the last
    prompt token is steered with a coefficient computed on the full prompt text.
    """
    if not 0 <= k_shot <= 5:
        raise ValueError("k_shot must lie in 0..5 (mmlu_dev has 5 rows per subject)")
    files = _mmlu_files(data_dir)
    available = sorted(s for s, split in files if split == "test")
    chosen = list(subjects) if subjects is not None else available
    unknown = [s for s in chosen if (s, "test") not in files or (s, "dev") not in files]
    if unknown:
        raise DatasetError(f"unknown MMLU subjects {unknown}; known: {', '.join(available)}")
    tokenizer = lm.tokenizer
    answer_ids, answer_rule = mmlu_answer_ids(tokenizer)
    items: list[_MmluItem] = []
    for subject in chosen:
        dev = read_mmlu_csv(files[(subject, "dev")])
        test = read_mmlu_csv(files[(subject, "test")])
        if limit_per_subject is not None:
            test = test[:limit_per_subject]
        for row in test:
            wanted = k = min(k_shot, len(dev))
            text = mmlu_prompt(subject, dev[:k], row)
            ids = _encode(tokenizer, text, special=True)
            while max_prompt_tokens is not None and k > 0 and len(ids) > max_prompt_tokens:
                k -= 1
                text = mmlu_prompt(subject, dev[:k], row)
                ids = _encode(tokenizer, text, special=True)
            items.append(_MmluItem(subject, ids, text, MMLU_LETTERS.index(row[5]), k, wanted))
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt))
    predictions: list[int] = [-1] * len(items)
    log = _CoefficientLog()
    answer_index = torch.tensor(answer_ids)
    with row_progress(enabled=progress) as bar:
        task = bar.add_task("mmlu", total=len(items))
        for chunk in _chunks(len(order), batch_size):
            part = [order[i] for i in chunk]
            batch = left_pad([items[i].prompt for i in part], pad_id, lm.device)
            with log.steer(lm, intervention, [items[i].text for i in part], batch.width - 1):
                logits = forward(lm, batch, use_cache=False).logits[:, -1, :]
            choice = logits.float().cpu()[:, answer_index].argmax(dim=-1)
            for index, pred in zip(part, choice.tolist(), strict=True):
                predictions[index] = int(pred)
            bar.advance(task, len(part))
    per_subject: dict[str, dict[str, Any]] = {}
    for subject in chosen:
        hits = [
            predictions[i] == item.answer for i, item in enumerate(items) if item.subject == subject
        ]
        per_subject[subject] = {
            "n": len(hits),
            "correct": sum(hits),
            "accuracy": 100.0 * sum(hits) / len(hits) if hits else None,
        }
    scored = [v["accuracy"] for v in per_subject.values() if v["accuracy"] is not None]
    correct = sum(int(predictions[i] == item.answer) for i, item in enumerate(items))
    return {
        "task": "mmlu",
        "model": lm.name,
        "k_shot": k_shot,
        "subjects": chosen,
        "limit_per_subject": limit_per_subject,
        "batch_size": batch_size,
        "max_prompt_tokens": max_prompt_tokens,
        "n_questions": len(items),
        "n_shots_reduced": sum(1 for item in items if item.shots < item.shots_wanted),
        "answer_token_ids": answer_ids,
        "answer_tokens": [str(t) for t in tokenizer.convert_ids_to_tokens(answer_ids)],
        "answer_token_rule": answer_rule,
        "average": sum(scored) / len(scored) if scored else None,
        "micro": 100.0 * correct / len(items) if items else None,
        "per_subject": per_subject,
        "scale": "percent",
        "intervention": _intervention_info(intervention, log),
    }
