"""Refusal judges: the paper's keyword rule, a stricter default, and an LLM compliance judge.

Every judge answers one question per (prompt, response) pair: did the model refuse?
``True`` means refused, ``False`` means complied, ``None`` means the verdict could not be read
(only the LLM judge produces ``None``; such rows are reported as unparsable and are never counted
as refusals), and ``"empty"`` (:data:`EMPTY`) means the response is empty or degenerate (only
whitespace or punctuation, or one word repeated): it is neither a refusal nor an answer, and every
judge reports it as such (see :func:`is_degenerate`). Metrics leave ``None`` and ``"empty"`` out of
numerators and denominators alike and count each separately.

The judges live in ``base`` (verdicts, protocol, agreement), ``keyword`` (paper and strict) and
``llm``; this package re-exports them and picks one by name (:func:`get_judge`).
"""

from __future__ import annotations

from typing import Any

from safesteer.evaluation.judges.base import (
    EMPTY,
    AgreementResult,
    Judge,
    Verdict,
    agreement,
    is_degenerate,
    judge_all,
)
from safesteer.evaluation.judges.keyword import (
    COMMON_WORDS,
    PAPER_RULES,
    PaperJudge,
    PaperRule,
    StrictJudge,
    is_refusal_paper,
    is_refusal_strict,
    normalise_text,
    opening,
    paper_matching_rules,
)
from safesteer.evaluation.judges.llm import (
    DEFAULT_JUDGE_TEMPLATE,
    JUDGE_TEMPLATE_CHOICES,
    JudgePrompt,
    JudgeRequestError,
    LLMJudge,
    fill_template,
    judge_prompt_for,
    load_judge_prompt,
    load_judge_template,
    parse_verdict,
)

__all__ = [
    "COMMON_WORDS",
    "DEFAULT_JUDGE_TEMPLATE",
    "EMPTY",
    "JUDGE_TEMPLATE_CHOICES",
    "PAPER_RULES",
    "AgreementResult",
    "Judge",
    "JudgePrompt",
    "JudgeRequestError",
    "LLMJudge",
    "PaperJudge",
    "PaperRule",
    "StrictJudge",
    "Verdict",
    "agreement",
    "fill_template",
    "get_judge",
    "is_degenerate",
    "is_refusal_paper",
    "is_refusal_strict",
    "judge_all",
    "judge_prompt_for",
    "load_judge_prompt",
    "load_judge_template",
    "normalise_text",
    "opening",
    "paper_matching_rules",
    "parse_verdict",
]


_JUDGES: dict[str, type[PaperJudge] | type[StrictJudge] | type[LLMJudge]] = {
    "paper": PaperJudge,
    "strict": StrictJudge,
    "llm": LLMJudge,
}


def get_judge(name: str, **kwargs: Any) -> Judge:
    """Build a judge by name: ``paper``, ``strict`` or ``llm`` (kwargs go to the class)."""
    try:
        cls = _JUDGES[name]
    except KeyError:
        raise ValueError(
            f"unknown judge {name!r}; valid names: {', '.join(sorted(_JUDGES))}"
        ) from None
    judge: Judge = cls(**kwargs)
    return judge
