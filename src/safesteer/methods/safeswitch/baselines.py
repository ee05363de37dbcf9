"""SafeSwitch's "prober + safety prompt" baseline (SPEC §2.3).

The probers decide as in SafeSwitch (prompt format of the artifact, stage 2 after ``n_decode``
tokens), but a flagged row is answered again from scratch under the published safety system
prompt instead of switching to the refusal head. Unflagged rows keep the model's own answer.
This is a second generation for flagged rows, as in the paper; it is a baseline, not a fast path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from safesteer.core.generation import GenerationConfig, generate_batched
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
from safesteer.methods.safeswitch.generate import SwitchResult, safeswitch_generate
from safesteer.methods.safeswitch.settings import SAFESWITCH_SAFETY_PROMPT


def prober_prompt_generate(
    lm: LoadedModel,
    artifact: SafeSwitchArtifact,
    queries: Sequence[str],
    config: GenerationConfig,
    *,
    batch_size: int = 16,
    safety_prompt: str = SAFESWITCH_SAFETY_PROMPT,
    on_batch: Callable[[list[int], list[SwitchResult]], None] | None = None,
) -> list[SwitchResult]:
    """Probers decide; flagged rows are regenerated under ``safety_prompt`` (per batch)."""
    layout = ChatLayout(lm.tokenizer, safety_prompt)
    results: list[SwitchResult | None] = [None] * len(queries)

    def regenerate(indices: list[int], batch: list[SwitchResult]) -> None:
        flagged = [k for k, r in enumerate(batch) if r.decision.flagged]
        if flagged:
            encoded = [layout.prompt_ids(batch[k].prompt) for k in flagged]
            texts = generate_batched(lm, encoded, config, batch_size)
            for k, text in zip(flagged, texts, strict=True):
                batch[k].response = text
                batch[k].token_ids = []  # the answer of the safety-prompt pass (text only)
        for i, r in zip(indices, batch, strict=True):
            results[i] = r
        if on_batch is not None:
            on_batch(indices, batch)

    safeswitch_generate(
        lm, artifact, queries, config, batch_size=batch_size, apply=False, on_batch=regenerate
    )
    return [r for r in results if r is not None]
