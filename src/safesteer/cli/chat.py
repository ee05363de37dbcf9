"""``safesteer chat`` and ``safesteer generate --method safeswitch``: responses with decisions.

The chat REPL reads one user message per line from stdin and answers each on its own (single-turn:
the probers and SCANS were fitted on single-turn prompts). It stops at end of input or ``/quit``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from safesteer.core.generation import GenerationConfig, decode_texts, generate_ids
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.evaluation.run_setup import RunError
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
from safesteer.methods.safeswitch.generate import SwitchDecision, safeswitch_generate

CHAT_METHODS = ("none", "scans", "safeswitch")
QUIT_COMMANDS = frozenset({"/quit", "/exit"})

# A responder maps prompts to (response, decision line or None).
Responder = Callable[[Sequence[str]], list[tuple[str, str | None]]]


def describe_switch(decision: SwitchDecision) -> str:
    """One line: the stage probabilities and whether the refusal head took over."""
    parts = []
    if decision.stage1 is not None:
        parts.append(f"stage1 {decision.stage1:.3f}")
    if decision.stage2 is not None:
        parts.append(f"stage2 {decision.stage2:.3f}")
    verdict = "flagged → refusal head" if decision.flagged else "not flagged → base head"
    return "  ".join([*parts, verdict])


def load_safeswitch(lm: LoadedModel, artifact: str | Path | None) -> SafeSwitchArtifact:
    """The SafeSwitch artifact for ``lm``; a clear error when none is given."""
    if artifact is None:
        raise RunError(
            "SafeSwitch needs a fitted artifact: run `safesteer fit safeswitch --out DIR` "
            "and pass --artifact DIR."
        )
    return SafeSwitchArtifact.load(artifact, lm)


def make_responder(
    lm: LoadedModel,
    method: str,
    artifact: str | Path | None,
    config: GenerationConfig,
    *,
    seed: int = 0,
    multiplier: float | None = None,
) -> Responder:
    """A function answering prompts with ``method`` (none, scans or safeswitch)."""
    if method == "none":
        layout = ChatLayout(lm.tokenizer)

        def plain(prompts: Sequence[str]) -> list[tuple[str, str | None]]:
            encoded = [layout.prompt_ids(p) for p in prompts]
            return [(t, None) for t in decode_texts(lm, generate_ids(lm, encoded, config))]

        return plain
    if method == "scans":
        from safesteer.evaluation.run_setup import RunOptions, fit_or_load
        from safesteer.evaluation.runner import decide_and_generate

        options = RunOptions(
            artifact=None if artifact is None else str(artifact), seed=seed, multiplier=multiplier
        )
        scans = fit_or_load(lm, options, None)

        def steered(prompts: Sequence[str]) -> list[tuple[str, str | None]]:
            out: list[tuple[str, str | None]] = []
            for text, d in decide_and_generate(lm, scans, prompts, config):
                line = None if d is None else f"score {d.score:.4f}  sigma {d.sigma:+d}"
                out.append((text, line))
            return out

        return steered
    if method == "safeswitch":
        switch = load_safeswitch(lm, artifact)

        def switched(prompts: Sequence[str]) -> list[tuple[str, str | None]]:
            results = safeswitch_generate(lm, switch, prompts, config)
            return [(r.response, describe_switch(r.decision)) for r in results]

        return switched
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(CHAT_METHODS)}")


def chat_loop(responder: Responder, stdin: TextIO, stdout: TextIO, prompt: str = "") -> int:
    """Answer each non-empty stdin line until EOF or ``/quit``; returns the number of turns."""
    turns = 0
    while True:
        if prompt:
            stdout.write(prompt)
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in QUIT_COMMANDS:
            break
        response, decision = responder([text])[0]
        if decision is not None:
            stdout.write(f"[{decision}]\n")
        stdout.write(response + "\n\n")
        stdout.flush()
        turns += 1
    return turns
