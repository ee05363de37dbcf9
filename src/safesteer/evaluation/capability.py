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

import csv
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.nn import functional as F
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from safesteer.core.activations import forward
from safesteer.core.generation import GenerationConfig, generate_ids
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import Batch, ChatLayout, left_pad
from safesteer.core.steering import steering
from safesteer.datasets.registry import DatasetError, dataset_path
from safesteer.methods.scans.method import ScansArtifact, classify

__all__ = [
    "MMLU_LETTERS",
    "XSUM_PROMPT",
    "Intervention",
    "format_mmlu_example",
    "mmlu",
    "mmlu_answer_ids",
    "mmlu_prompt",
    "mmlu_subjects",
    "perplexity",
    "read_mmlu_csv",
    "rouge_f1",
    "scans_intervention",
    "wikitext2_text",
    "xsum",
    "xsum_prompt",
]

Variant = Literal["standard", "chat"]
ScansMode = Literal["classify", "safe", "unsafe"]

MMLU_LETTERS = ("A", "B", "C", "D")
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
        """JSON-ready description: name and steered layers."""
        return {"name": self.name, "layers": sorted(int(layer) for layer in self.vectors)}


def scans_intervention(
    lm: LoadedModel,
    artifact: ScansArtifact,
    mode: ScansMode = "classify",
    *,
    batch_size: int = 16,
) -> Intervention:
    """SCANS steering: ``classify`` uses sigma of :func:`classify` on each text taken as a user
    query (+1 unsafe, -1 safe); ``safe`` steers every row with -1, ``unsafe`` with +1."""
    vectors = artifact.steering_vectors()
    if mode == "classify":

        def by_classifier(texts: list[str]) -> torch.Tensor:
            decisions = classify(lm, artifact, texts, batch_size=batch_size)
            return torch.tensor([float(d.sigma) for d in decisions])

        return Intervention(vectors, by_classifier, "scans")
    if mode not in ("safe", "unsafe"):
        raise ValueError(f"unknown SCANS mode {mode!r}; use classify, safe or unsafe")
    value = -1.0 if mode == "safe" else 1.0

    def constant(texts: list[str]) -> torch.Tensor:
        return torch.full((len(texts),), value)

    return Intervention(vectors, constant, f"scans-{mode}")


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
        return steering(lm, intervention.vectors, coefficients, start_column)

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


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
    )


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
    with _progress(progress) as bar:
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


# --------------------------------------------------------------------------------------------
# MMLU
# --------------------------------------------------------------------------------------------

MmluRow = tuple[str, str, str, str, str, str]


def read_mmlu_csv(path: Path) -> list[MmluRow]:
    """Rows ``(question, A, B, C, D, answer)`` of a headerless MMLU CSV file."""
    rows: list[MmluRow] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for number, record in enumerate(csv.reader(handle), start=1):
            if not record:
                continue
            if len(record) != 6 or record[5].strip() not in MMLU_LETTERS:
                raise DatasetError(
                    f"{path}:{number}: expected 6 columns (question, A, B, C, D, answer letter), "
                    f"got {record!r}"
                )
            q, a, b, c, d, answer = record
            rows.append((q, a, b, c, d, answer.strip()))
    return rows


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
    with _progress(progress) as bar:
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
    with _progress(progress) as bar:
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
