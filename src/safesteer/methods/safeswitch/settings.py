"""SafeSwitch settings, the prompts of SPEC §2 and the prober module."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

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
    # scans+safeswitch steers a row away from refusal only when stage 1's P(harmful) is below
    # this (chosen at fit time on the validation split's harmful rows); None: threshold1.
    steer_below: float | None = None
    # Repetition penalty (CTRL-style) on the refusal head's logits, for the tokens the head has
    # already written in that row; 1.0: none. The head is the LM head alone and can fall into
    # loops ("I'm sorry\n\nI'm sorry ..."); unflagged rows are never penalised.
    head_repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown SafeSwitch mode {self.mode!r}; use two-stage or direct")
        if self.n_decode < 0:
            raise ValueError("n_decode must be at least 0")
        if not self.head_repetition_penalty > 0:
            raise ValueError("head_repetition_penalty must be positive (1.0: no penalty)")

    @property
    def switch_step(self) -> int:
        """Generated tokens before the head may switch (0: from the first new token)."""
        return self.n_decode if self.mode == "two-stage" else 0

    def stage1_flags(self, stage1: torch.Tensor) -> torch.Tensor:
        """Rows stage 1 (or the direct prober) flags: P at or above ``threshold1``."""
        return stage1 >= self.threshold1

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
            steer_below=None if data.get("steer_below") is None else float(data["steer_below"]),
            head_repetition_penalty=float(data.get("head_repetition_penalty", 1.0)),
        )

    @property
    def steering_threshold(self) -> float:
        """P(harmful) under which the combined method steers away from refusal."""
        return self.threshold1 if self.steer_below is None else self.steer_below


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
