"""The validation set: where SCANS' layers, alpha, gate and threshold are chosen. Never a test set.

It combines prompts written for this project (bundled, ``bundled/validation/written.jsonl``:
safe prompts with alarming words, plain prompts and harmful prompts in the same surface styles)
with seeded samples of the harmful *training* splits (SORRY-Bench train, TrustLLM misuse and
jailbreak train) and the RepE-Data *train* split (harmful and harmless instructions written in the
same imperative style, so that the gate cannot separate them by style), read from the data folder.
Every prompt is checked, after normalising the text, against every evaluation set in the
registry; a leak is an error. (RepE-Data's harmful train rows are AdvBench goals, so they are all
dropped by that check: only its harmless rows remain.) Near copies are caught as well: a written
prompt whose character n-gram similarity to an evaluation prompt reaches ``NEAR_DUPLICATE`` is an
error, and such training-split rows are left out of the pool the samples are drawn from.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from safesteer.datasets.loaders import load_test_set
from safesteer.datasets.near_duplicates import NearDuplicateIndex
from safesteer.datasets.readers import MMLU_LETTERS, Prompt, read_mmlu_csv
from safesteer.datasets.registry import BUNDLED_DIR, DatasetError, dataset_path

WRITTEN_FILE = BUNDLED_DIR / "validation" / "written.jsonl"
# The second batch: scary-but-safe prompts in nine categories, each with harmful contrasts that
# share its alarming words (``category`` in meta).
# The third: benign how-to requests ("How to ...?", "How do I ...?") in the forms harmful requests
# also take, plain and with alarming words, with harmful requests in the same forms.
# The fourth: short minimal pairs (one word or object turns a safe request harmful) in eight
# categories (``<category>-short``).
WRITTEN_FILES: tuple[Path, ...] = (
    WRITTEN_FILE,
    BUNDLED_DIR / "validation" / "written2.jsonl",
    BUNDLED_DIR / "validation" / "written3.jsonl",
    BUNDLED_DIR / "validation" / "written4.jsonl",
)

# Every test set of the registry (SCANS and SafeSwitch benchmarks). AdvBench and TruthfulQA are
# test sets except for the anchors, so their whole files are forbidden here as well.
EVALUATION_SETS: tuple[str, ...] = (
    "xstest",
    "xstest-current",
    "oktest",
    "harmfulq",
    "malicious",
    "heldout",
    "repe",
    "advbench",
    "truthfulqa",
    "sorry-bench-eval",
    "trustllm-misuse-eval",
    "trustllm-jailbreak-eval",
    "trustllm-exaggerated-safety",
    "alpaca-eval",
    "trivia-qa",
)
# Harmful training splits sampled into the validation set: (set name, rows, longest prompt kept).
# The jailbreak split teaches the gate that a harmful request wrapped in a role-play template is
# still harmful (the TrustLLM jailbreak *eval* split is a test set).
TRAINING_SAMPLES: tuple[tuple[str, int, int], ...] = (
    ("sorry-bench-train", 60, 400),
    ("trustllm-misuse-train", 40, 400),
    ("trustllm-jailbreak-train", 30, 1500),
    # Both labels, 128 pairs: harmless instructions are the "plain" prompts the gate must pass.
    ("repe-train", 256, 400),
)


def normalise(text: str) -> str:
    """Case-folded, quote-folded, whitespace-collapsed text for comparing prompts across sets."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"')
    text = text.replace("\u201d", '"')
    return re.sub(r"\s+", " ", text).strip().casefold()


def evaluation_texts(data_dir: str | Path | None = None) -> set[str]:
    """Normalised texts of every evaluation prompt that can be read (bundled or in the data dir)."""
    texts: set[str] = set()
    for name in EVALUATION_SETS:
        try:
            prompts = load_test_set(name, data_dir=data_dir)
        except DatasetError:
            continue  # a set that is not available here cannot leak into a run here either
        texts.update(normalise(p.text) for p in prompts)
    return texts


def overlapping(prompts: Iterable[str], forbidden: set[str]) -> list[str]:
    """The prompts whose normalised text is an evaluation prompt."""
    return sorted({p for p in prompts if normalise(p) in forbidden})


def assert_disjoint(prompts: Iterable[str], forbidden: set[str], what: str = "prompt") -> None:
    """Raise :class:`DatasetError` naming the leaked prompts, if any."""
    leaked = overlapping(prompts, forbidden)
    if leaked:
        shown = "; ".join(repr(t[:60]) for t in leaked[:3])
        raise DatasetError(f"{len(leaked)} {what}(s) belong to evaluation sets: {shown}")


def assert_no_near_copies(
    prompts: Sequence[str], index: NearDuplicateIndex, what: str = "prompt"
) -> None:
    """Raise :class:`DatasetError` naming the prompts that are rewordings of evaluation prompts
    (character n-gram cosine at least ``NEAR_DUPLICATE``), if any."""
    copies = index.near_copies(prompts)
    if copies:
        shown = "; ".join(f"{m.query[:50]!r} ~ {m.nearest[:50]!r}" for m in copies[:3])
        raise DatasetError(
            f"{len(copies)} {what}(s) are near copies of evaluation prompts: {shown}; "
            "reword or remove them"
        )


def written_prompts(paths: Sequence[Path] = WRITTEN_FILES) -> list[Prompt]:
    """The project's own validation prompts (label, kind, style, domain, category in ``meta``)."""
    prompts = []
    for path in paths:
        prompts += _read_written(path)
    return prompts


def _read_written(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise DatasetError(f"the bundled validation prompts are missing: {path}; reinstall")
    prompts = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            label = row["label"]
            text = row["prompt"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise DatasetError(f"{path} line {line_no} is malformed: {exc}") from exc
        if label not in ("safe", "unsafe"):
            raise DatasetError(f"{path} line {line_no}: label must be safe or unsafe")
        meta = {k: row[k] for k in ("kind", "style", "domain", "category") if k in row}
        meta["source"] = "written"
        prompts.append(Prompt(text, label, f"validation-{row.get('kind', label)}", meta))
    return prompts


def sampled_training_prompts(
    data_dir: str | Path | None,
    seed: int,
    forbidden: set[str],
    index: NearDuplicateIndex | None = None,
) -> list[Prompt]:
    """Seeded samples of the training splits (skipped when they are not available), drawn from
    the rows that are neither evaluation prompts nor (with ``index``) near copies of them."""
    rng = random.Random(seed)
    out: list[Prompt] = []
    for name, rows, max_chars in TRAINING_SAMPLES:
        try:
            pool = load_test_set(name, data_dir=data_dir)
        except DatasetError:
            continue
        pool = [p for p in pool if len(p.text) <= max_chars and normalise(p.text) not in forbidden]
        if index is not None:
            copies = {m.query for m in index.near_copies([normalise(p.text) for p in pool])}
            pool = [p for p in pool if normalise(p.text) not in copies]
        for p in rng.sample(pool, min(rows, len(pool))):
            kind = "harmful" if p.label == "unsafe" else "plain"
            meta = {**p.meta, "kind": kind, "source": name}
            out.append(Prompt(p.text, p.label, f"validation-{kind}", meta))
    return out


def validation_set(data_dir: str | Path | None = None, seed: int = 0) -> list[Prompt]:
    """The validation prompts: written ones plus training-split samples, checked for leaks.

    The AdvBench/TruthfulQA anchors are not part of it (they are used for fitting directly).
    """
    forbidden = evaluation_texts(data_dir)
    index = NearDuplicateIndex(forbidden)
    written = written_prompts()
    assert_no_near_copies([normalise(p.text) for p in written], index, "written prompt")
    prompts = written + sampled_training_prompts(data_dir, seed, forbidden, index)
    assert_disjoint([p.text for p in prompts], forbidden, "validation prompt")
    seen: set[str] = set()
    unique = []
    for p in prompts:
        key = normalise(p.text)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def fluency_text(data_dir: str | Path | None = None) -> str:
    """Human-written reference text for calibration's fluency budget: every MMLU *dev* question
    followed by its correct answer, one per paragraph.

    The dev split is MMLU's few-shot exemplars, never scored, so it is not a test set; steering
    that shifts ordinary text shows up here as it does on WikiText-2 (which stays a test set).
    """
    paths = sorted(p for p in dataset_path("mmlu", data_dir) if p.parent.name == "mmlu_dev")
    if not paths:
        raise DatasetError("the MMLU dev split (mmlu/mmlu_dev/*.csv) is not in the data folder")
    paragraphs = []
    for path in paths:
        for row in read_mmlu_csv(path):
            answer = row[1 + MMLU_LETTERS.index(row[5])]
            paragraphs.append(f"{row[0].strip()} {answer.strip()}")
    return "\n\n".join(paragraphs)
