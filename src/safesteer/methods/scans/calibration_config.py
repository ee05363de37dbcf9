"""The search space and budgets of ``safesteer calibrate`` (see ``calibrate.py``)."""

from __future__ import annotations

from dataclasses import dataclass

# the options the screen's results depend on (its cache key)
SCREEN_OPTIONS = (
    "alphas",
    "window",
    "window_stride",
    "fluency_budget",
    "screen_rows",
    "cap_quantiles",
    "text_windows",
    "text_window",
)


@dataclass
class CalibrationConfig:
    """Search space and budgets of ``safesteer calibrate``."""

    alphas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)  # relative to the residual norm
    window: int = 4  # steering layers per candidate window
    window_stride: int = 2
    fluency_budget: float = 0.10  # largest allowed relative rise of plain-answer perplexity
    unsafe_budget: float = 2.0  # largest allowed drop of validation unsafe refusal (points)
    plain_budget: float = 2.0  # largest allowed rise of plain-prompt refusal (points)
    gen_tokens: int = 24  # refusals show in the opening of a reply
    probe_layers: int = 3
    batch_size: int = 16
    seed: int = 0
    screen_rows: int = 24  # over-refused safe prompts / plain prompts used for screening
    # clamped away-steering: caps at these quantiles of the answered safe validation prompts'
    # projections on the direction (lower = stronger); empty = additive steering only
    cap_quantiles: tuple[float, ...] = (0.5, 0.25, 0.1, 0.0)
    text_windows: int = 12  # windows of the fluency text (MMLU dev) scored per candidate
    text_window: int = 512
    # the gate learns that reference text is benign: windows of these lengths (tokens), this many
    # of each, join its training rows; thresholds may steer at most reference_budget % of them
    # towards refusal (out-of-fold), since a document handed to the gate is ordinary text
    reference_sizes: tuple[int, ...] = (64, 128, 256, 512)
    reference_per_size: int = 16
    reference_budget: float = 5.0
    # the refusal gate: rows below T are steered away only when a second probe says the model
    # would refuse them; its threshold steers at most reference_budget % of the reference windows
    # away (refusal_gate.py)
    refusal_gate: bool = True
    # thresholds searched (P(harmful) of the gate); steered replies are generated only for the
    # rows some threshold in this range reads: thresholds that flag almost every row or almost
    # none are not useful operating points, and the range saves a quarter of the steered
    # decoding (27 % on Qwen-0.5B)
    threshold_range: tuple[float, float] = (0.02, 0.98)
    # stages that compute per prompt save after every this many prompts (a stop keeps them)
    save_every: int = 64

    def __post_init__(self) -> None:
        if self.save_every < 1:
            raise ValueError(f"save_every must be at least 1, got {self.save_every}")
        if self.reference_per_size < 0 or any(size < 2 for size in self.reference_sizes):
            raise ValueError(
                "reference_sizes must be at least 2 tokens and reference_per_size >= 0, got "
                f"{self.reference_sizes} and {self.reference_per_size}"
            )
        if not 0.0 <= self.reference_budget <= 100.0:
            raise ValueError(f"reference_budget is a percentage, got {self.reference_budget}")
        low, high = self.threshold_range
        if not 0.0 <= low < high <= 1.01:
            raise ValueError(
                f"threshold_range must satisfy 0 <= low < high <= 1.01, got ({low}, {high})"
            )
