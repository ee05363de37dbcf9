"""Per-row activation steering with removable forward hooks.

Each steered layer adds ``coefficient[row] * vector_l`` to its output at every column from
``start_column`` on: the last prompt token during prefill and every generated token while decoding.
Rows of one batch can carry different coefficients (SCANS: -1 for safe, +1 for unsafe queries).

With ``caps`` (a projection ceiling per layer), rows with a negative coefficient are *clamped*
instead of shifted: the part of the state's projection on the unit direction above the cap is
removed, ``h - |c| * u * max(0, h.u - cap)``. A state already below the cap (ordinary text, on
a refusal direction) is left as it is, so the clamp only acts where the direction is active.
Rows with a positive coefficient are still shifted by ``c * vector``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from safesteer.core.activations import TrackedHooks, hidden_of, with_hidden
from safesteer.core.handle import LoadedModel


class Steerer(TrackedHooks):
    """Adds per-row steering vectors to decoder-layer outputs until :meth:`remove` is called."""

    def __init__(
        self,
        lm: LoadedModel,
        vectors: Mapping[int, torch.Tensor],
        coefficients: torch.Tensor,
        start_column: int,
        caps: Mapping[int, float] | None = None,
    ) -> None:
        if coefficients.dim() != 1:
            raise ValueError("coefficients must be a 1-D tensor with one value per batch row")
        self.start_column = start_column
        self.batch_size = int(coefficients.shape[0])
        caps = dict(caps or {})
        super().__init__(lm.model)
        for layer, vector in vectors.items():
            if not 0 <= layer < lm.num_layers:
                self.remove()
                raise ValueError(f"steering layer {layer} outside 0..{lm.num_layers - 1}")
            device, dtype = lm.layer_device(layer), lm.dtype
            coef = coefficients.to(device, torch.float32)
            clamp = None
            if layer in caps:
                unit = vector.to(device, torch.float32)
                unit = unit / unit.norm().clamp_min(1e-12)
                clamp = _Clamp(unit.to(dtype), float(caps[layer]), (-coef).clamp_min(0).to(dtype))
                coef = coef.clamp_min(0)
            # [batch, 1, hidden], built once: the decode hot path is a single broadcast add.
            delta = coef[:, None, None] * vector.to(device, torch.float32)[None, None, :]
            hook = self._hook_for(delta.to(dtype), clamp)
            self._handles.append(lm.layers[layer].register_forward_hook(hook))

    def _hook_for(self, delta: torch.Tensor, clamp: _Clamp | None = None) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = hidden_of(output)
            start = self._tracker.start
            width = hidden.shape[1]
            if start + width <= self.start_column:
                return output
            if hidden.shape[0] != self.batch_size:
                raise RuntimeError(
                    f"steering was set up for {self.batch_size} rows but the batch has "
                    f"{hidden.shape[0]}"
                )
            change = delta if clamp is None else delta + clamp.change(hidden)
            if start >= self.start_column:
                return with_hidden(output, hidden + change)
            columns = torch.arange(start, start + width, device=hidden.device)
            scope = (columns >= self.start_column).to(hidden.dtype)[None, :, None]
            return with_hidden(output, hidden + change * scope)

        return hook


class _Clamp:
    """The clamp of one layer: unit direction, projection cap and per-row weight (|c|, or 0)."""

    def __init__(self, unit: torch.Tensor, cap: float, weight: torch.Tensor) -> None:
        self.unit = unit
        self.cap = cap
        self.weight = weight[:, None]  # [batch, 1]

    def change(self, hidden: torch.Tensor) -> torch.Tensor:
        """``-w * u * max(0, h.u - cap)`` for every row and column of ``hidden``."""
        excess = (hidden @ self.unit - self.cap).clamp_min(0) * self.weight
        return -excess[..., None] * self.unit


@contextmanager
def steering(
    lm: LoadedModel,
    vectors: Mapping[int, torch.Tensor],
    coefficients: torch.Tensor,
    start_column: int,
    caps: Mapping[int, float] | None = None,
) -> Iterator[Steerer]:
    """Steer inside a ``with`` block; hooks are removed on exit, also after an error."""
    steerer = Steerer(lm, vectors, coefficients, start_column, caps)
    try:
        yield steerer
    finally:
        steerer.remove()
