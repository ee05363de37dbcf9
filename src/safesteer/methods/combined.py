"""``scans+safeswitch``: SafeSwitch's prober is the gate, and both methods act in one batch.

Per row, in one batched greedy generation with one prefill:
  - the prompt (SafeSwitch's prompt format) is prefilled unsteered; the stage-1 prober reads its
    layer at the last prompt token;
  - rows that stage 1 calls clearly benign (P(harmful) below the artifact's steering threshold,
    chosen at fit time so that at most a budget of the validation split's harmful prompts fall
    under it; old artifacts: stage 1's threshold) are steered away from refusal with the SCANS
    artifact's vectors (coefficient -1 at its steering layers, from the last prompt token on):
    these are the rows where a refusal would be a false one. With a second gate
    (:mod:`safesteer.methods.combined_gate`, read from the same prefill) a row is steered only
    when that gate calls it benign too;
  - with a gate that has a towards threshold, rows stage 1 does not flag but the gate finds
    harmful enough are steered towards refusal (coefficient +1), as SCANS steers the rows it
    calls harmful;
  - with a gate that has a release threshold, rows stage 1 flags but the gate finds clearly
    benign are released: the refusal head never takes them over (and a fitted artifact's
    steering threshold lies under its flag threshold, so they are not steered either);
  - the other rows stay unsteered; after ``n_decode`` tokens stage 2 asks whether
    the model is about to comply, and if so the refusal head takes over (as in SafeSwitch).
To steer the last prompt token the cache is rolled back by one token after the prefill and that
token is run again with the steering on: one extra token per row, no second prefill.
Only the two-stage SafeSwitch configuration can gate this: a direct prober's "no" also covers
harmful prompts that the model refuses, which must not be steered away from refusal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import NamedTuple

import torch

from safesteer.core.activations import forward, recording
from safesteer.core.generation import (
    Generated,
    GenerationConfig,
    StepCallback,
    decode_loop,
    length_sorted_batches,
    new_cache,
    rollback,
)
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import Batch, ChatLayout, left_pad
from safesteer.core.steering import steering
from safesteer.methods.combined_gate import CombinedGate, require_two_stage
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
from safesteer.methods.safeswitch.generate import SwitchDecision, Switcher, switching
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.generate import check_steerable


@dataclass
class CombinedResult:
    """SafeSwitch's decision, whether the row was steered away from refusal, and the response."""

    prompt: str
    decision: SwitchDecision
    steered: bool
    response: str
    token_ids: list[int]
    stopped: bool
    gate: float | None = None  # the second gate's P(harmful), when one is used
    towards: bool = False  # steered towards refusal (a gate with a towards threshold)
    released: bool = False  # stage 1's flag vetoed by the gate (a gate with a release threshold)


class GateDecisions(NamedTuple):
    """Per row of a batch: steered away from refusal, steered towards it, the second gate's
    P(harmful) (None without a gate), and stage 1's flag vetoed by the gate."""

    steered: list[bool]
    towards: list[bool]
    gate: list[float | None]
    released: list[bool]


class CombinedBatch(NamedTuple):
    """One batch's generation, SafeSwitch's decisions and the steering decisions."""

    generated: Generated
    decisions: list[SwitchDecision]
    gates: GateDecisions


def check_combinable(
    switch: SafeSwitchArtifact, scans: ScansArtifact, gate: CombinedGate | None = None
) -> None:
    """Refuse a SafeSwitch configuration that cannot gate the steering, broken SCANS tensors, or
    a second gate fitted under another prompt format."""
    require_two_stage(switch)
    check_steerable(scans)
    if gate is not None:
        gate.check_layout(switch)


@torch.inference_mode()
def combined_batch(
    lm: LoadedModel,
    switch: SafeSwitchArtifact,
    scans: ScansArtifact,
    encoded: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    on_step: StepCallback | None = None,
    on_gate: Callable[[Switcher, GateDecisions], None] | None = None,
    gate: CombinedGate | None = None,
) -> CombinedBatch:
    """Gate, steer and switch one batch of encoded prompts (see the module docstring).

    ``on_step``: see :data:`~safesteer.core.generation.StepCallback`. ``on_gate(switcher,
    gates)`` is called once the gates have decided, before decoding (a server reads each row's
    decision from ``switcher`` as the row finishes)."""
    if not encoded:
        return CombinedBatch(Generated([], []), [], GateDecisions([], [], [], []))
    batch = left_pad(encoded, int(lm.tokenizer.pad_token_id), lm.device)
    width = batch.width
    cache = new_cache(lm, rollback=True)
    with switching(lm, switch, width, len(encoded)) as switcher:
        with ExitStack() as hooks:
            second = None if gate is None else hooks.enter_context(recording(lm, gate.layers, [-1]))
            forward(lm, batch, past_key_values=cache, use_cache=True)
        p1 = switcher.stage1_probabilities()
        benign = p1 < switch.settings.steering_threshold
        towards = torch.zeros_like(benign)
        released = torch.zeros_like(benign)
        p_gate: list[float | None] = [None] * len(encoded)
        if gate is not None and second is not None:
            probabilities = gate.probabilities(second.stacked())
            p_gate = [float(p) for p in probabilities.tolist()]
            benign &= (probabilities < gate.threshold).to(benign.device)
            flagged = switch.settings.stage1_flags(p1)
            towards = gate.towards(probabilities, flagged) & ~benign
            released = gate.released(probabilities, flagged)
            switcher.release(released)
        gates = GateDecisions(
            [bool(b) for b in benign.tolist()],
            [bool(t) for t in towards.tolist()],
            p_gate,
            [bool(r) for r in released.tolist()],
        )
        if on_gate is not None:
            on_gate(switcher, gates)
        coefficients = torch.where(benign, -1.0, torch.where(towards, 1.0, 0.0)).cpu()
        rollback(cache, 1)
        step = Batch(batch.input_ids[:, -1:], batch.attention_mask, batch.position_ids[:, -1:])
        with steering(lm, scans.steering_vectors(), coefficients, width - 1, scans.steering_caps()):
            out = forward(lm, step, past_key_values=cache, use_cache=True)
            first = out.logits[:, -1, :].float()
            generated = decode_loop(lm, batch, first, cache, config, on_step)
        decisions = switcher.decisions()
    return CombinedBatch(generated, decisions, gates)


def combined_generate(
    lm: LoadedModel,
    switch: SafeSwitchArtifact,
    scans: ScansArtifact,
    queries: Sequence[str],
    config: GenerationConfig,
    *,
    batch_size: int = 16,
    on_batch: Callable[[list[int], list[CombinedResult]], None] | None = None,
    gate: CombinedGate | None = None,
) -> list[CombinedResult]:
    """Generate for ``queries`` with the combined method, in length-sorted batches.

    ``on_batch(indices, results)`` is called after every batch (e.g. to write results as they
    come). ``gate``: the optional second gate on steering (``safesteer fit combined-gate``).
    """
    check_combinable(switch, scans, gate)
    if not config.use_cache:
        raise ValueError("scans+safeswitch needs the KV cache (it steers from a rolled-back cache)")
    layout = ChatLayout(lm.tokenizer, switch.settings.system_prompt)
    encoded = [layout.prompt_ids(q) for q in queries]
    results: list[CombinedResult | None] = [None] * len(queries)
    for indices in length_sorted_batches([len(e) for e in encoded], batch_size):
        generated, decisions, gates = combined_batch(
            lm, switch, scans, [encoded[i] for i in indices], config, gate=gate
        )
        batch: list[CombinedResult] = []
        for k, i in enumerate(indices):
            ids = generated.token_ids[k]
            text = str(lm.tokenizer.decode(ids, skip_special_tokens=True)).strip()
            result = CombinedResult(
                queries[i],
                decisions[k],
                gates.steered[k],
                text,
                ids,
                generated.stopped[k],
                gates.gate[k],
                gates.towards[k],
                gates.released[k],
            )
            batch.append(result)
            results[i] = result
        if on_batch is not None:
            on_batch(indices, batch)
    return [r for r in results if r is not None]
