"""SafeSwitch: probers read the model's state, a refusal head takes over for flagged rows (SPEC §2).

Inference (this module):
  - stage 1 (or the direct prober) reads decoder layer ``layer`` at the last prompt token during
    the prefill of an ordinary batched greedy generation;
  - stage 2 reads the last decoder layer at the ``n_decode``-th generated token, in the forward that
    computes the logits of token ``n_decode + 1`` (``n_decode = 0``: the last prompt token);
  - a row is flagged when its probabilities reach the stored thresholds (stage 2 runs only for rows
    where stage 1 fires); from that forward on, a flagged row's logits come from the refusal head,
    ``F.linear(final_hidden, W_base + delta)``, and unflagged rows keep the base head's logits.
The prefix and the pilot tokens are kept: flagged rows continue, nothing is regenerated, and the
model's parameters are never touched (hooks only; removed on exit).

Training lives in :mod:`safesteer.methods.safeswitch.train`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from safesteer.core.activations import ChunkTracker, TrackedHooks, hidden_of
from safesteer.core.generation import (
    Generated,
    GenerationConfig,
    generate_ids,
    length_sorted_batches,
    penalise_seen,
)
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact, head_bias, output_head

# --------------------------------------------------------------------------------------------
# switched generation


@dataclass
class SwitchDecision:
    """What the probers said about one row.

    ``stage1``: P(harmful) (two-stage) or P(harmful and will comply) (direct); ``stage2``:
    P(comply) after ``n_decode`` tokens, only where stage 1 fired (else None); ``flagged``: the
    refusal head produced this row's tokens from the switch point on.
    """

    stage1: float | None
    stage2: float | None
    flagged: bool


def generated_count(tracker: ChunkTracker, prompt_width: int) -> int:
    """Tokens generated and fed to the model so far, for the current forward (prefill: 0)."""
    return tracker.start + tracker.width - prompt_width


class Switcher(TrackedHooks):
    """Per-row head switching inside one batched generation, with removable hooks.

    - a hook on the stage-1 layer records its state at the last column during the prefill;
    - a hook on the last decoder layer records its state at the last column of the forward that
      holds the ``switch_step``-th generated token;
    - a hook on the LM head decides at that forward (stage 1 → stage 2 → flags) and, for flagged
      rows, returns ``F.linear(head_input, W_refusal)`` from then on.

    ``always_on`` flags every row from the first new token without running the probers (the
    "refusal head always on" baseline); ``apply=False`` decides but never switches.
    :meth:`release` vetoes stage 1's flag for some rows before the switch point.
    """

    def __init__(
        self,
        lm: LoadedModel,
        artifact: SafeSwitchArtifact,
        prompt_width: int,
        rows: int,
        *,
        always_on: bool = False,
        apply: bool = True,
    ) -> None:
        self.lm = lm
        self.artifact = artifact
        self.settings = artifact.settings
        self.prompt_width = prompt_width
        self.rows = rows
        self.always_on = always_on
        self.apply = apply
        self.switch_step = 0 if always_on else self.settings.switch_step
        self.layer = self.settings.layer % lm.num_layers
        self.stage1_prob: torch.Tensor | None = None
        self.stage2_prob: torch.Tensor | None = None  # NaN where stage 2 did not run
        self.flagged: torch.Tensor | None = None
        self._released: torch.Tensor | None = None
        self._stage1_state: torch.Tensor | None = None
        self._stage2_state: torch.Tensor | None = None
        self._weight = artifact.refusal_weight(lm) if apply else None
        self._bias = head_bias(lm)
        self._penalty = self.settings.head_repetition_penalty
        self._fed_ids: torch.Tensor | None = None  # token ids of the current forward
        self._head_seen: torch.Tensor | None = None  # [rows, vocab] tokens the head wrote
        super().__init__(lm.model)
        if apply and self._penalty != 1.0:
            self._handles.append(
                lm.model.get_input_embeddings().register_forward_hook(self._ids_hook)
            )
        last = lm.num_layers - 1
        if not always_on:
            for layer in sorted({self.layer, last}):
                self._handles.append(
                    lm.layers[layer].register_forward_hook(self._layer_hook(layer))
                )
        self._handles.append(output_head(lm).register_forward_hook(self._head_hook))

    def _layer_hook(self, layer: int) -> Callable[[nn.Module, Any, Any], None]:
        last = self.lm.num_layers - 1

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            step = generated_count(self._tracker, self.prompt_width)
            hidden = hidden_of(output)
            if layer == self.layer and step == 0 and self._stage1_state is None:
                self._stage1_state = hidden[:, -1, :].detach().float()
            if layer == last and step == self.switch_step and self.flagged is None:
                self._stage2_state = hidden[:, -1, :].detach().float()

        return hook

    def stage1_probabilities(self) -> torch.Tensor:
        """Stage 1's probability per row, from the state recorded during the prefill."""
        if self._stage1_state is None:
            raise RuntimeError("the stage-1 state was not recorded; was the prefill hooked?")
        return self.artifact.stage1.probability(self._stage1_state)

    def release(self, rows: torch.Tensor) -> None:
        """Veto stage 1's flag for ``rows`` (a boolean mask): they are never switched to the
        refusal head. Call it after the prefill and before the switch point."""
        if self.flagged is not None:
            raise RuntimeError("release() after the switch decision has been taken")
        if rows.shape != (self.rows,):
            raise ValueError(f"release() needs a mask of {self.rows} rows, got {tuple(rows.shape)}")
        self._released = rows.bool()

    def _decide(self, device: torch.device) -> None:
        rows = self.rows
        if self.always_on:
            self.flagged = torch.ones(rows, dtype=torch.bool, device=device)
            return
        if self._stage1_state is None:
            raise RuntimeError("the stage-1 state was not recorded; was the prefill hooked?")
        if self._stage1_state.shape[0] != rows:
            raise RuntimeError(f"switcher set up for {rows} rows, batch has a different size")
        p1 = self.artifact.stage1.probability(self._stage1_state).to(device)
        self.stage1_prob = p1
        fired = self.settings.stage1_flags(p1)
        if self._released is not None:
            fired &= ~self._released.to(device)
        if self.settings.mode == "direct":
            self.flagged = fired
            return
        p2 = torch.full((rows,), float("nan"), device=device)
        stage2 = self.artifact.stage2
        threshold2 = self.settings.threshold2
        assert stage2 is not None and threshold2 is not None and self._stage2_state is not None
        if bool(fired.any()):
            p2[fired] = stage2.probability(self._stage2_state[fired.to(self._stage2_state.device)])
        self.stage2_prob = p2
        self.flagged = fired & (p2 >= threshold2)

    def _ids_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._fed_ids = args[0] if args and isinstance(args[0], torch.Tensor) else None

    def _penalise_repeats(self, refusal: torch.Tensor, rows: torch.Tensor, step: int) -> None:
        """Record the token the head wrote last step (fed in this forward) and apply the
        repetition penalty to every token the head has written in each flagged row."""
        if self._head_seen is None:
            self._head_seen = torch.zeros(
                self.rows, refusal.shape[-1], dtype=torch.bool, device=refusal.device
            )
        if step > self.switch_step and self._fed_ids is not None:
            last = self._fed_ids[:, -1].to(refusal.device)
            flagged_rows = rows.nonzero(as_tuple=True)[0].to(refusal.device)
            self._head_seen[flagged_rows, last[flagged_rows]] = True
        seen = self._head_seen[rows.to(refusal.device)]
        refusal.copy_(penalise_seen(refusal, seen, self._penalty))

    def _head_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        step = generated_count(self._tracker, self.prompt_width)
        if step < self.switch_step:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"unexpected LM head output of type {type(output).__name__}")
        if self.flagged is None:
            self._decide(output.device)
        flagged = self.flagged
        assert flagged is not None
        if not self.apply or not bool(flagged.any()):
            return None
        weight = self._weight
        assert weight is not None
        head_input = args[0]
        # (under device_map=auto the hook may see the input before it is moved to the head)
        rows = flagged.to(head_input.device)
        refusal = F.linear(head_input[rows].to(weight.device), weight, self._bias)
        if self._penalty != 1.0:
            self._penalise_repeats(refusal[:, -1, :], rows, step)
        logits = output.clone()
        logits[rows.to(logits.device)] = refusal.to(logits.device, logits.dtype)
        return logits

    def decisions(self) -> list[SwitchDecision]:
        """Per-row decisions; rows that never reached the switch point are not flagged."""
        out: list[SwitchDecision] = []
        for row in range(self.rows):
            p1 = None if self.stage1_prob is None else float(self.stage1_prob[row])
            p2 = None
            if self.stage2_prob is not None:
                value = float(self.stage2_prob[row])
                p2 = None if value != value else value  # NaN: stage 2 did not run
            if p1 is None and self._stage1_state is not None and not self.always_on:
                # generation ended before the switch point: still report stage 1
                p1 = float(self.artifact.stage1.probability(self._stage1_state[row : row + 1])[0])
            flagged = bool(self.flagged[row]) if self.flagged is not None else False
            out.append(SwitchDecision(p1, p2, flagged))
        return out


@contextmanager
def switching(
    lm: LoadedModel,
    artifact: SafeSwitchArtifact,
    prompt_width: int,
    rows: int,
    *,
    always_on: bool = False,
    apply: bool = True,
) -> Iterator[Switcher]:
    """A :class:`Switcher` inside a ``with`` block; hooks are removed on exit, also on errors."""
    switcher = Switcher(lm, artifact, prompt_width, rows, always_on=always_on, apply=apply)
    try:
        yield switcher
    finally:
        switcher.remove()


def switched_generate_ids(
    lm: LoadedModel,
    artifact: SafeSwitchArtifact,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    always_on: bool = False,
    apply: bool = True,
) -> tuple[Generated, list[SwitchDecision]]:
    """Greedy generation of one left-padded batch with per-row head switching."""
    if not prompts:
        return Generated([], []), []
    width = max(len(p) for p in prompts)
    with switching(lm, artifact, width, len(prompts), always_on=always_on, apply=apply) as sw:
        generated = generate_ids(lm, prompts, config)
    return generated, sw.decisions()


@dataclass
class SwitchResult:
    """A decision and the (possibly switched) response for one query."""

    prompt: str
    decision: SwitchDecision
    response: str
    token_ids: list[int]
    stopped: bool


def safeswitch_generate(
    lm: LoadedModel,
    artifact: SafeSwitchArtifact,
    queries: Sequence[str],
    config: GenerationConfig,
    *,
    batch_size: int = 16,
    always_on: bool = False,
    apply: bool = True,
    on_batch: Callable[[list[int], list[SwitchResult]], None] | None = None,
) -> list[SwitchResult]:
    """Decide and generate for ``queries`` in length-sorted batches (prompt format of the artifact).

    ``always_on``: the refusal head for every row (baseline); ``apply=False``: probers only.
    """
    layout = ChatLayout(lm.tokenizer, artifact.settings.system_prompt)
    encoded = [layout.prompt_ids(q) for q in queries]
    results: list[SwitchResult | None] = [None] * len(queries)
    for indices in length_sorted_batches([len(e) for e in encoded], batch_size):
        generated, decisions = switched_generate_ids(
            lm, artifact, [encoded[i] for i in indices], config, always_on=always_on, apply=apply
        )
        batch: list[SwitchResult] = []
        for k, i in enumerate(indices):
            ids = generated.token_ids[k]
            text = str(lm.tokenizer.decode(ids, skip_special_tokens=True)).strip()
            batch.append(SwitchResult(queries[i], decisions[k], text, ids, generated.stopped[k]))
            results[i] = batch[-1]
        if on_batch is not None:
            on_batch(indices, batch)
    return [r for r in results if r is not None]
