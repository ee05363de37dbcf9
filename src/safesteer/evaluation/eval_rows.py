"""Rows of ``safesteer eval``: prompts per suite, judges, one row per (method, prompt), and the
resumable ``responses.jsonl``."""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

from safesteer.datasets import Prompt, load_test_set, stratified_sample
from safesteer.evaluation.eval_options import EvalOptions, MethodOutput
from safesteer.evaluation.judges import get_judge
from safesteer.evaluation.judges.base import Judge, judge_all
from safesteer.evaluation.judges.llm import LLMJudge, judge_prompt_for
from safesteer.evaluation.run_setup import (
    RunError,
)
from safesteer.evaluation.suites import Suite, answer_correct, benchmark_of

# --------------------------------------------------------------------------------------------
# prompts, judges, rows


def load_suite_prompts(suite: Suite, data_dir: str | None) -> list[Prompt]:
    """All prompts of a suite (anchors not yet removed)."""
    prompts: list[Prompt] = []
    for part in suite.parts:
        prompts.extend(load_test_set(part, data_dir=data_dir))
    return prompts


def _meta_values(prompt: Prompt, fields: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(str(prompt.meta[f]) for f in fields)


def sample_per_subset(
    prompts: Sequence[Prompt], limit: int | None, seed: int, stratify: Sequence[str] = ()
) -> list[Prompt]:
    """``limit`` prompts per subset (seeded), in the original order.

    ``stratify`` names ``Prompt.meta`` fields (SORRY-Bench's ``category``, ``prompt_style``):
    a subset whose rows all carry them is sampled keeping each value's share; a subset whose
    rows carry none is sampled as usual. Raises :class:`RunError` when no row, or only part of a
    subset, carries them.
    """
    groups: dict[str, list[Prompt]] = defaultdict(list)
    for p in prompts:
        groups[p.subset].append(p)
    fields = tuple(stratify)
    chosen: set[int] = set()
    stratified = []
    for subset, group in groups.items():
        carrying = sum(all(f in p.meta for f in fields) for p in group)
        key: Callable[[Prompt], Hashable] | None = None
        if fields and carrying == len(group):
            stratified.append(subset)
            key = functools.partial(_meta_values, fields=fields)
        elif fields and carrying:
            raise RunError(
                f"--stratify {','.join(fields)}: only {carrying} of the {len(group)} prompts of "
                f"{subset} carry these fields; stratify by fields every prompt has"
            )
        chosen |= {id(p) for p in stratified_sample(group, limit, seed, key)}
    if fields and not stratified:
        raise RunError(
            f"--stratify {','.join(fields)}: no subset of this suite has these fields (SORRY-Bench "
            "eval has `category` and `prompt_style` when safeswitch/sorry-bench.jsonl is in the "
            "data folder)"
        )
    return [p for p in prompts if id(p) in chosen]


def build_judges(options: EvalOptions) -> dict[str, Judge]:
    """The requested judges by name; the LLM judge needs --judge-url and --judge-model."""
    judges: dict[str, Judge] = {}
    for name in options.judges:
        if name == "llm":
            prompt = judge_prompt_for(options.judge_template, options.data_dir)
            judges[name] = LLMJudge(
                base_url=options.judge_url,
                model=options.judge_model,
                template=prompt.template,
                system_prompt=prompt.system_prompt,
                max_workers=options.judge_workers,
                timeout=options.judge_timeout,
            )
        else:
            judges[name] = get_judge(name)
    return judges


def judge_outputs(
    judges: dict[str, Judge], prompts: Sequence[Prompt], outputs: Sequence[MethodOutput]
) -> list[dict[str, Any]]:
    """Every judge's verdict on each (prompt, output), one batch per judge (an llm judge with
    ``max_workers > 1`` sends a batch's requests concurrently)."""
    pairs = [(p.text, o.response) for p, o in zip(prompts, outputs, strict=True)]
    by_judge = {name: judge_all(judge, pairs) for name, judge in judges.items()}
    return [{name: verdicts[k] for name, verdicts in by_judge.items()} for k in range(len(pairs))]


def make_row(
    method: str,
    index: int,
    prompt: Prompt,
    output: MethodOutput,
    verdicts: dict[str, Any],
) -> dict[str, Any]:
    """An output row with its judges' verdicts (the format evaluation.report reads)."""
    decision = output.decision
    aliases = prompt.meta.get("answer")
    correct = (
        answer_correct(output.response, [str(a) for a in aliases])
        if isinstance(aliases, list)
        else None
    )
    return {
        "method": method,
        "id": index,
        "subset": prompt.subset,
        "benchmark": benchmark_of(prompt.subset),
        "label": prompt.label,
        "prompt": prompt.text,
        "response": output.response,
        "score": None if decision is None else round(decision.score, 6),
        "stage1": output.stage1,
        "stage2": output.stage2,
        "flagged": output.flagged,
        "steered": output.steered,
        "gate": output.gate,
        "towards": output.towards,
        "released": output.released,
        "sigma": None if decision is None else decision.sigma,
        # the refusal gate's P(the model refuses), when the SCANS artifact has one
        "refusal_probability": None
        if decision is None or decision.refusal_probability is None
        else round(decision.refusal_probability, 6),
        "layer_cosines": None
        if decision is None
        else [round(c, 5) for c in decision.layer_cosines],
        "judges": verdicts,
        "correct": correct,
    }


def read_rows(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Rows already written, keyed by (method, id); a truncated last line is dropped."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[(row["method"], int(row["id"]))] = row
    return rows


def check_resumed_rows(
    rows: dict[tuple[str, int], dict[str, Any]], prompts: Sequence[Prompt], out: Path
) -> None:
    """Refuse rows whose prompt is not the prompt of that index now: methods would otherwise be
    compared on different prompts (e.g. the data file changed, or a SafeSwitch artifact added on
    resume excludes its training prompts and shifts the list)."""
    wrong = [
        key
        for key, row in rows.items()
        if not (0 <= key[1] < len(prompts) and row.get("prompt") == prompts[key[1]].text)
    ]
    if wrong:
        method, index = min(wrong)
        raise RunError(
            f"{out} holds {len(wrong)} row(s) whose prompt differs from this run's prompt list "
            f"(first: method {method!r}, id {index}); the prompts changed since they were "
            "written (test data edited, or a SafeSwitch artifact that excludes its training "
            "prompts). Use another --output-dir, or delete the folder to start over."
        )


def forget_verdicts(
    rows: dict[tuple[str, int], dict[str, Any]], judges: Iterable[str], methods: Sequence[str]
) -> None:
    """Drop the stored verdicts of ``judges`` on the rows of ``methods``, so that
    :func:`add_missing_verdicts` judges them again (``eval --rejudge``)."""
    names = set(judges)
    for (method, _), row in rows.items():
        if method not in methods:
            continue
        for name in names & set(row.get("judges", {})):
            del row["judges"][name]


def add_missing_verdicts(
    rows: dict[tuple[str, int], dict[str, Any]], judges: dict[str, Judge], methods: Sequence[str]
) -> dict[str, int]:
    """Judge rows written before a judge was added (on resume); returns rows judged per judge."""
    added: dict[str, int] = {}
    for name, judge in judges.items():
        missing = [
            row
            for (method, _), row in sorted(rows.items())
            if method in methods and name not in row.get("judges", {})
        ]
        if not missing:
            continue
        verdicts = judge_all(judge, [(r["prompt"], r["response"]) for r in missing])
        for row, verdict in zip(missing, verdicts, strict=True):
            row.setdefault("judges", {})[name] = verdict
        added[name] = len(missing)
    return added


def write_rows(
    path: Path, rows: dict[tuple[str, int], dict[str, Any]], methods: Sequence[str]
) -> list[dict[str, Any]]:
    """Rewrite ``responses.jsonl`` atomically, in method then prompt order; returns the rows."""
    ordered = sorted(
        rows.values(),
        key=lambda r: (methods.index(r["method"]) if r["method"] in methods else 99, r["id"]),
    )
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    tmp.replace(path)
    return ordered
