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

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from safesteer.core.activations import ChunkTracker, TrackedHooks, hidden_of
from safesteer.core.fingerprint import weight_checksum
from safesteer.core.generation import (
    Generated,
    GenerationConfig,
    generate_ids,
    length_sorted_batches,
)
from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.methods.artifacts import ArtifactError, check_model, load_artifact, save_artifact

Mode = Literal["two-stage", "direct"]
MODES: tuple[Mode, ...] = ("two-stage", "direct")

# SPEC §2.1: the prompt format used for probing, in training and at inference.
SAFESWITCH_SYSTEM_PROMPT = (
    "You are a helpful assistant. You should always respond to the user's query to the best of "
    "your ability."
)
# SPEC §2.3: the safety system prompt of SafeSwitch's "safety prompt" baselines (published text).
SAFESWITCH_SAFETY_PROMPT = (
    "You are a helpful assistant. The following request is likely to contain unsafe intentions. "
    "If you find anything harmful, you must refuse to answer and explain why."
)
DEFAULT_N_DECODE = 3
PROBER_HIDDEN = 64


@dataclass(frozen=True)
class SafeSwitchSettings:
    """Everything that defines a SafeSwitch configuration besides the fitted tensors."""

    mode: Mode = "two-stage"
    layer: int = -1  # decoder layer of stage 1 / the direct prober (stored non-negative)
    n_decode: int = DEFAULT_N_DECODE
    threshold1: float = 0.5  # stage 1 (two-stage) or the direct prober
    threshold2: float | None = 0.5  # stage 2 (two-stage only)
    system_prompt: str | None = SAFESWITCH_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown SafeSwitch mode {self.mode!r}; use two-stage or direct")
        if self.n_decode < 0:
            raise ValueError("n_decode must be at least 0")

    @property
    def switch_step(self) -> int:
        """Generated tokens before the head may switch (0: from the first new token)."""
        return self.n_decode if self.mode == "two-stage" else 0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SafeSwitchSettings:
        """Inverse of :meth:`to_json`."""
        t2 = data.get("threshold2")
        return cls(
            mode=data["mode"],
            layer=int(data["layer"]),
            n_decode=int(data["n_decode"]),
            threshold1=float(data["threshold1"]),
            threshold2=None if t2 is None else float(t2),
            system_prompt=data.get("system_prompt"),
        )


class Prober(nn.Module):
    """``Linear(d, 64) → ReLU → Linear(64, 2)`` on standardised features; outputs logits.

    The per-feature mean and scale come from the training features (residual streams have a few
    huge dimensions; standardising lets one learning rate fit every model and layer).
    """

    def __init__(self, dim: int, hidden: int = PROBER_HIDDEN) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, 2]`` (class 1 = positive) for features ``[n, d]``."""
        mean = self.get_buffer("mean")
        scale = self.get_buffer("scale")
        z = (x.to(mean.dtype) - mean) / scale
        return self.fc2(F.relu(self.fc1(z)))

    @torch.no_grad()
    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """P(class 1) for features ``[n, d]`` (float32, on ``x``'s device)."""
        if x.shape[0] == 0:
            return torch.zeros(0, device=x.device)
        first = self.fc1.weight
        logits = self.forward(x.to(first.device, torch.float32))
        return torch.softmax(logits, dim=-1)[:, 1].to(x.device)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for an artifact, named ``prefix.<name>``."""
        return {f"{prefix}.{k}": v.detach().cpu().float() for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor]) -> Prober:
        """Inverse of :meth:`tensors`."""
        state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if "fc1.weight" not in state:
            raise KeyError(f"{prefix}.fc1.weight")
        hidden, dim = state["fc1.weight"].shape
        prober = cls(int(dim), int(hidden))
        prober.load_state_dict(state)
        return prober.eval()


def output_head(lm: LoadedModel) -> nn.Module:
    """The LM head module (``get_output_embeddings``), whose input is the final-normed state."""
    head = lm.model.get_output_embeddings()
    if not isinstance(head, nn.Module) or not isinstance(
        getattr(head, "weight", None), nn.Parameter
    ):
        raise ValueError(
            f"{type(lm.model).__name__} has no output projection with a weight "
            "(get_output_embeddings); SafeSwitch's refusal head needs one."
        )
    return head


def head_weight(lm: LoadedModel) -> torch.Tensor:
    weight = output_head(lm).weight
    assert isinstance(weight, torch.Tensor)
    return weight


def head_bias(lm: LoadedModel) -> torch.Tensor | None:
    bias = getattr(output_head(lm), "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def head_checksum(lm: LoadedModel) -> list[float]:
    """Checksum of the base LM head (the refusal head is stored as a difference from it)."""
    return weight_checksum(head_weight(lm))


@dataclass
class SafeSwitchArtifact:
    """Fitted SafeSwitch state: prober(s), thresholds and the refusal head's difference."""

    settings: SafeSwitchSettings
    stage1: Prober  # two-stage: "harmful?"; direct: "harmful and will comply?"
    stage2: Prober | None  # two-stage: "will comply?" at the state after n_decode tokens
    head_delta: torch.Tensor  # [vocab, hidden] float16: refusal head minus base head
    model_fingerprint: dict[str, Any]
    base_head_checksum: list[float]
    training: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    _weight_cache: dict[tuple[int, str, str], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.settings.mode == "two-stage" and self.stage2 is None:
            raise ValueError("a two-stage SafeSwitch artifact needs a stage-2 prober")

    def with_settings(self, **changes: Any) -> SafeSwitchArtifact:
        """A copy with some settings replaced (e.g. ``threshold1=0.7``)."""
        return replace(self, settings=replace(self.settings, **changes), _weight_cache={})

    def refusal_weight(self, lm: LoadedModel) -> torch.Tensor:
        """``W_base + delta`` as a new tensor in the head's dtype and device (cached per model).

        The model's own head weight is only read: tied embeddings stay tied and unchanged.
        """
        base = head_weight(lm)
        key = (id(base), str(base.device), str(base.dtype))
        if key not in self._weight_cache:
            if tuple(base.shape) != tuple(self.head_delta.shape):
                raise ArtifactError(
                    f"the refusal head has shape {tuple(self.head_delta.shape)} but the model's "
                    f"LM head is {tuple(base.shape)}"
                )
            with torch.no_grad():
                weight = base.detach().float() + self.head_delta.to(base.device, torch.float32)
            self._weight_cache.clear()
            self._weight_cache[key] = weight.to(base.dtype)
        return self._weight_cache[key]

    def training_hashes(self) -> set[str]:
        """sha256 of every (stripped) training prompt: evaluation excludes these."""
        return set(self.training.get("prompt_sha256", []))

    def save(self, directory: str | Path) -> Path:
        """Write the artifact (safetensors + manifest.json)."""
        tensors = {**self.stage1.tensors("stage1"), "head_delta": self.head_delta.half()}
        if self.stage2 is not None:
            tensors.update(self.stage2.tensors("stage2"))
        manifest = {
            "settings": self.settings.to_json(),
            "model_fingerprint": self.model_fingerprint,
            "base_head_checksum": self.base_head_checksum,
            "head_storage": "delta from the base LM head, float16",
            "training": self.training,
            "report": self.report,
        }
        return save_artifact(directory, "safeswitch", tensors, manifest)

    @classmethod
    def load(cls, directory: str | Path, lm: LoadedModel | None = None) -> SafeSwitchArtifact:
        """Load an artifact; with ``lm``, fail clearly if it was fitted on another model."""
        try:
            manifest, tensors = load_artifact(directory, "safeswitch")
            if lm is not None:
                check_model(manifest, lm, directory)
        except ArtifactError as exc:  # the shared messages name the SCANS fit command
            raise ArtifactError(str(exc).replace("fit scans", "fit safeswitch")) from exc
        try:
            settings = SafeSwitchSettings.from_json(manifest["settings"])
            stage1 = Prober.from_tensors("stage1", tensors)
            stage2 = (
                Prober.from_tensors("stage2", tensors) if settings.mode == "two-stage" else None
            )
            artifact = cls(
                settings=settings,
                stage1=stage1,
                stage2=stage2,
                head_delta=tensors["head_delta"],
                model_fingerprint=manifest["model_fingerprint"],
                base_head_checksum=[float(x) for x in manifest["base_head_checksum"]],
                training=manifest.get("training", {}),
                report=manifest.get("report", {}),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ArtifactError(
                f"{directory} has a malformed SafeSwitch artifact ({exc!r}); refit it with "
                "`safesteer fit safeswitch --out DIR`."
            ) from exc
        if lm is not None:
            want, got = artifact.base_head_checksum, head_checksum(lm)
            scale = max(abs(want[1]), 1e-6)
            if abs(want[1] - got[1]) > 0.02 * scale or abs(want[0] - got[0]) > 0.02 * scale:
                raise ArtifactError(
                    f"The refusal head in {directory} was trained against another LM head "
                    f"(checksum {got} vs {want}); fit SafeSwitch for this model."
                )
        return artifact


def sha256_text(text: str) -> str:
    """sha256 of a stripped prompt text (how training prompts are recorded)."""
    return hashlib.sha256(text.strip().encode()).hexdigest()


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
        self._stage1_state: torch.Tensor | None = None
        self._stage2_state: torch.Tensor | None = None
        self._weight = artifact.refusal_weight(lm) if apply else None
        self._bias = head_bias(lm)
        super().__init__(lm.model)
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
        fired = p1 >= self.settings.threshold1
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
