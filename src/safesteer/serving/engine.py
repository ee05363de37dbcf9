"""The batching engine: one worker thread runs the model; requests that arrive together share a
batch, each row with its own method and steering coefficient.

A batch is collected from the queue until it holds ``max_batch`` rows or ``max_wait_s`` passed
since its first row arrived. Its rows are split into groups that can share forwards:

- ``scans``: SCANS rows and, when a SCANS artifact is loaded, ``none`` rows (coefficient 0, so
  the decision is still reported). One fused prefill (prompt + reply prefix) decides every row;
  each row's coefficient is the artifact's policy sign times its own ``alpha`` over the
  artifact's. Equal to :func:`~safesteer.methods.scans.scans_generate` (``none``: with
  ``coefficients=unsteered``, the library's baseline).
- ``safeswitch``: SafeSwitch rows, one switched generation
  (:func:`~safesteer.methods.safeswitch.generate.switched_generate_ids`). SafeSwitch cannot share
  SCANS' forward: SCANS prefills the prompt plus its reply prefix and rolls the cache back,
  while SafeSwitch's probers read the last column of a plain prefill and its head switches from
  the n-th generated token; the two sets of hooks assume different prefills.
- ``combined``: ``scans+safeswitch`` rows (both artifacts loaded, SafeSwitch two-stage): one
  :func:`~safesteer.methods.combined.combined_batch`, equal to the library's
  :func:`~safesteer.methods.combined.combined_generate`. It cannot share the SafeSwitch group's
  forward either: it rolls the cache back by one token to steer the rows its gate calls benign.
- ``plain``: ``none`` rows when no SCANS artifact is loaded (plain greedy generation; the
  prefix that every row shares, the chat template's system prompt and header, is prefilled
  once: :func:`~safesteer.core.generation.generate_ids` with ``share_prefix``).

Groups of one batch run one after the other. Tokens reach each row's listener as they are
decoded; a row finishes at a stop token, at its own ``max_tokens`` or when it is cancelled (its
client went away), and the batch ends as soon as every row has finished.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from safesteer.core.generation import GenerationConfig, StepCallback, generate_ids, stop_token_ids
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.methods.combined import check_combinable, combined_batch
from safesteer.methods.combined_gate import CombinedGate
from safesteer.methods.safeswitch.artifact import SafeSwitchArtifact
from safesteer.methods.safeswitch.generate import switching
from safesteer.methods.scans.artifact import ScansArtifact
from safesteer.methods.scans.decide import ScansDecision, policy_coefficients
from safesteer.methods.scans.generate import _fused_batch, check_steerable
from safesteer.serving.loading import available_methods
from safesteer.serving.protocol import Method

log = logging.getLogger(__name__)

Event = tuple[str, Any]  # ("token", id) | ("done", None) | ("error", message)


@dataclass(frozen=True)
class EngineSettings:
    """Batching limits and decoding settings shared by every row."""

    max_batch: int = 16
    max_wait_s: float = 0.01
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("the batch size must be at least 1")
        if not 0 <= self.max_wait_s <= 60:
            raise ValueError("the batch wait must lie in 0..60 s")
        if self.repetition_penalty <= 0:
            raise ValueError("the repetition penalty must be positive (1.0 disables it)")


@dataclass
class Job:
    """One request's row: its prompt, method and limits; filled in by the worker."""

    prompt_ids: list[int]
    method: Method
    max_tokens: int
    alpha: float | None = None
    listener: Callable[[Event], None] | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled | error
    decision: dict[str, Any] = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop decoding this row at the next step (its client went away)."""
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        if self.listener is not None:
            try:
                self.listener(event)
            except RuntimeError:  # the listener's event loop is gone
                self.cancel()


_STOP = object()


class Engine:
    """Owns the model; :meth:`submit` queues a :class:`Job`, the worker thread batches jobs."""

    def __init__(
        self,
        lm: LoadedModel,
        *,
        scans: ScansArtifact | None = None,
        safeswitch: SafeSwitchArtifact | None = None,
        combined_gate: CombinedGate | None = None,
        settings: EngineSettings | None = None,
        step_hook: Callable[[], None] | None = None,
    ) -> None:
        self.lm = lm
        self.scans = scans
        self.safeswitch = safeswitch
        self.combined_gate = combined_gate
        if combined_gate is not None:
            if scans is None or safeswitch is None:
                raise ValueError("a combined gate needs both a SCANS and a SafeSwitch artifact")
            check_combinable(safeswitch, scans, combined_gate)
        self.settings = settings or EngineSettings()
        self.step_hook = step_hook  # called after every decoding step (tests pause here)
        self.batches: deque[tuple[int, dict[str, int]]] = deque(maxlen=1000)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._active: list[Job] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stops = set(stop_token_ids(lm))
        self._reply_ids: list[int] = []
        if scans is not None:
            check_steerable(scans)
            layout = ChatLayout(lm.tokenizer, scans.settings.system_prompt)
            self._reply_ids = layout.reply_ids(scans.settings.reply_prefix)
            alpha = scans.settings.alpha
            self._scans_base = scans if alpha != 0 else scans.with_settings(alpha=1.0)

    # -- what requests need to know ---------------------------------------------------------

    def methods(self) -> list[Method]:
        """The methods this engine can run."""
        return available_methods(self.scans, self.safeswitch)

    def group_of(self, method: Method) -> str:
        """Which forward a row of ``method`` joins: scans, safeswitch, combined or plain."""
        if method == "safeswitch":
            return "safeswitch"
        if method == "scans+safeswitch":
            return "combined"
        return "scans" if self.scans is not None else "plain"

    def system_prompt(self, method: Method) -> str | None:
        """The method's own system prompt, used when a request brings none."""
        group = self.group_of(method)
        if group == "scans" and self.scans is not None:
            return self.scans.settings.system_prompt
        if group in ("safeswitch", "combined") and self.safeswitch is not None:
            return self.safeswitch.settings.system_prompt
        return None

    def extra_tokens(self, method: Method) -> int:
        """Tokens the method's prefill adds after the prompt (SCANS' reply prefix)."""
        return len(self._reply_ids) if self.group_of(method) == "scans" else 0

    def queued(self) -> int:
        """Jobs waiting for a batch."""
        return self._queue.qsize()

    def active(self) -> list[Job]:
        """Jobs in the batch being decoded."""
        with self._lock:
            return list(self._active)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="safesteer-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the current batch, fail what is still queued, and end the worker."""
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue a job; its listener receives ("token", id) events, then ("done"|"error", ...)."""
        if self._thread is None:
            raise RuntimeError("the engine is not running")
        self._queue.put(job)

    # -- the worker ------------------------------------------------------------------------

    def _collect(self) -> tuple[list[Job], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        jobs: list[Job] = [first]
        stopping = False
        deadline = time.monotonic() + self.settings.max_wait_s
        while len(jobs) < self.settings.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                stopping = True
                break
            jobs.append(item)
        return [j for j in jobs if not j.cancelled.is_set()], stopping

    def _run(self) -> None:
        while True:
            jobs, stopping = self._collect()
            if jobs:
                self._run_batch(jobs)
            if stopping:
                break
        while True:  # anything queued after the stop
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Job):
                item.finish_reason = "error"
                item.emit(("error", "the server is shutting down"))

    def _run_batch(self, jobs: list[Job]) -> None:
        groups: dict[str, list[Job]] = {}
        for job in jobs:
            groups.setdefault(self.group_of(job.method), []).append(job)
        self.batches.append((len(jobs), {name: len(rows) for name, rows in groups.items()}))
        with self._lock:
            self._active = list(jobs)
        try:
            for name, rows in groups.items():
                self._run_group(name, rows)
        finally:
            with self._lock:
                self._active = []

    def _run_group(self, name: str, jobs: list[Job]) -> None:
        config = GenerationConfig(
            max_new_tokens=max(j.max_tokens for j in jobs),
            repetition_penalty=self.settings.repetition_penalty,
        )
        prompts = [j.prompt_ids for j in jobs]
        try:
            if name == "scans":
                self._scans_group(jobs, prompts, config)
            elif name == "safeswitch":
                self._safeswitch_group(jobs, prompts, config)
            elif name == "combined":
                self._combined_group(jobs, prompts, config)
            else:
                stepper = self._stepper(jobs, lambda r: {})
                generate_ids(self.lm, prompts, config, stepper, share_prefix=True)
        except Exception as exc:  # a bug or an out-of-memory: fail these rows, keep serving
            log.exception("batch of %d %s rows failed", len(jobs), name)
            for job in jobs:
                if job.finish_reason is None:
                    job.finish_reason = "error"
                    job.emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))
            return
        for job in jobs:  # rows that reached the loop's last step
            if job.finish_reason is None:
                self._finish(job, "length", {})

    def _scans_group(
        self, jobs: list[Job], prompts: list[list[int]], config: GenerationConfig
    ) -> None:
        assert self.scans is not None
        base = self._scans_base
        base_alpha = base.settings.alpha
        default_alpha = self.scans.settings.alpha
        policy = policy_coefficients(self.scans)
        alphas = [default_alpha if j.alpha is None else j.alpha for j in jobs]
        factors = [
            0.0 if j.method == "none" else a / base_alpha for j, a in zip(jobs, alphas, strict=True)
        ]
        seen: dict[str, Any] = {}

        def rule(decisions: list[ScansDecision]) -> torch.Tensor:
            signs = policy(decisions)
            coefficients = signs * torch.tensor(factors, dtype=signs.dtype)
            seen["decisions"], seen["coefficients"] = decisions, coefficients.tolist()
            return coefficients

        def decide(row: int) -> dict[str, Any]:
            d: ScansDecision = seen["decisions"][row]
            return {
                "score": d.score,
                "sigma": d.sigma,
                "transition_score": d.transition_score,
                "refusal_probability": d.refusal_probability,
                "coefficient": float(seen["coefficients"][row]),
                "alpha": alphas[row] if jobs[row].method == "scans" else 0.0,
                "alpha_mode": base.settings.alpha_mode,
                "gate": base.settings.gate,
                "policy": base.settings.policy,
            }

        _fused_batch(
            self.lm, base, prompts, self._reply_ids, config, rule, None, self._stepper(jobs, decide)
        )

    def _safeswitch_group(
        self, jobs: list[Job], prompts: list[list[int]], config: GenerationConfig
    ) -> None:
        assert self.safeswitch is not None
        width = max(len(p) for p in prompts)
        with switching(self.lm, self.safeswitch, width, len(prompts)) as switcher:

            def decide(row: int) -> dict[str, Any]:
                d = switcher.decisions()[row]
                return {"stage1": d.stage1, "stage2": d.stage2, "flagged": d.flagged}

            generate_ids(self.lm, prompts, config, self._stepper(jobs, decide))

    def _combined_group(
        self, jobs: list[Job], prompts: list[list[int]], config: GenerationConfig
    ) -> None:
        assert self.safeswitch is not None and self.scans is not None
        seen: dict[str, Any] = {}

        def decide(row: int) -> dict[str, Any]:
            d, gates = seen["switcher"].decisions()[row], seen["gates"]
            return {
                "stage1": d.stage1,
                "stage2": d.stage2,
                "flagged": d.flagged,
                "steered": gates.steered[row],
                **(
                    {}
                    if self.combined_gate is None
                    else {
                        "gate": gates.gate[row],
                        "towards": gates.towards[row],
                        "released": gates.released[row],
                    }
                ),
            }

        combined_batch(
            self.lm,
            self.safeswitch,
            self.scans,
            prompts,
            config,
            on_step=self._stepper(jobs, decide),
            on_gate=lambda switcher, gates: seen.update(switcher=switcher, gates=gates),
            gate=self.combined_gate,
        )

    def _stepper(
        self, jobs: Sequence[Job], decide: Callable[[int], dict[str, Any]]
    ) -> StepCallback:
        def on_step(tokens: list[int]) -> list[bool]:
            for row, (job, token) in enumerate(zip(jobs, tokens, strict=True)):
                if job.finish_reason is not None:
                    continue
                if job.cancelled.is_set():
                    self._finish(job, "cancelled", {})
                elif token in self._stops:
                    self._finish(job, "stop", decide(row))
                else:
                    job.token_ids.append(token)
                    job.emit(("token", token))
                    if len(job.token_ids) >= job.max_tokens:
                        self._finish(job, "length", decide(row))
            if self.step_hook is not None:
                self.step_hook()
            return [job.finish_reason is not None for job in jobs]

        return on_step

    def _finish(self, job: Job, reason: str, decision: dict[str, Any]) -> None:
        job.finish_reason = reason
        job.decision = {"method": job.method, **decision}
        job.emit(("done", reason))
