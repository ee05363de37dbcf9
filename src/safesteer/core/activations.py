"""Reading decoder-layer outputs with removable forward hooks.

``h_l(x)[t]`` in the specification is the output of decoder layer ``l``: read it with a hook so
every layer is comparable (``output_hidden_states`` applies the final norm to its last entry).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from safesteer.core.handle import LoadedModel
from safesteer.core.layout import Batch, left_pad


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a decoder layer's output (a tensor or a tuple starting with one)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"unexpected decoder layer output of type {type(output).__name__}")


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


class ChunkTracker:
    """Knows the absolute column where the current forward chunk starts.

    A pre-hook on the whole model reads the attention mask (which covers cached and new tokens) and
    the input width; this works with the KV cache (length-1 decode chunks) and without it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.start = 0
        self.width = 0
        self._handle: RemovableHandle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        if ids is None or mask is None:
            raise RuntimeError(
                "steering needs the attention mask to place tokens: call the model with "
                "input_ids and attention_mask"
            )
        self.width = int(ids.shape[1])
        self.start = int(mask.shape[1]) - self.width

    def remove(self) -> None:
        """Remove the pre-hook."""
        self._handle.remove()


class TrackedHooks:
    """Forward hooks that need to know where each chunk starts; all removed together."""

    def __init__(self, model: nn.Module) -> None:
        self._tracker = ChunkTracker(model)
        self._handles: list[RemovableHandle] = []

    def remove(self) -> None:
        """Remove every hook and the chunk tracker; the model behaves as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tracker.remove()


class Recorder:
    """Records float32 copies of chosen decoder-layer outputs at chosen chunk columns."""

    def __init__(self, lm: LoadedModel, layers: Sequence[int], columns: Sequence[int]) -> None:
        self.layers = list(layers)
        self.columns = list(columns)
        self.states: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        for layer in self.layers:
            self._handles.append(lm.layers[layer].register_forward_hook(self._hook_for(layer)))

    def _hook_for(self, layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = hidden_of(output)
            self.states[layer] = hidden[:, self.columns, :].detach().to("cpu", torch.float32)

        return hook

    def stacked(self) -> torch.Tensor:
        """States as ``[batch, n_layers, n_columns, hidden]``."""
        return torch.stack([self.states[layer] for layer in self.layers], dim=1)

    def remove(self) -> None:
        """Remove all hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextmanager
def recording(lm: LoadedModel, layers: Sequence[int], columns: Sequence[int]) -> Iterator[Recorder]:
    """Context manager around a :class:`Recorder`; hooks are removed on exit, also on errors."""
    recorder = Recorder(lm, layers, columns)
    try:
        yield recorder
    finally:
        recorder.remove()


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    # cached per class: inspect.signature costs ~80 us, too much for every decode step
    kind = type(model)
    if kind not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[kind] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return _LOGITS_TO_KEEP[kind]


def forward(lm: LoadedModel, batch: Batch, *, last_logits_only: bool = True, **kwargs: Any) -> Any:
    """One forward pass of a left-padded batch with explicit position ids.

    With ``last_logits_only`` the LM head runs on the last column only (when the model supports it).
    """
    if last_logits_only and _accepts_logits_to_keep(lm.model):
        kwargs["logits_to_keep"] = 1
    return lm.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        **kwargs,
    )


@torch.inference_mode()
def capture(
    lm: LoadedModel,
    sequences: Sequence[Sequence[int]],
    columns: Sequence[int],
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Decoder-layer outputs at ``columns`` counted from the end (e.g. ``[-1]``), all rows aligned.

    Sequences are left-padded, so column ``-k`` is the k-th last real token of every row. Returns a
    float32 CPU tensor ``[n_sequences, n_layers, n_columns, hidden]``.
    """
    layer_ids = list(range(lm.num_layers)) if layers is None else list(layers)
    if any(c >= 0 for c in columns):
        raise ValueError("columns are counted from the end and must be negative")
    pad_id = int(lm.tokenizer.pad_token_id)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = left_pad([sequences[i] for i in chunk], pad_id, lm.device)
        with recording(lm, layer_ids, columns) as rec:
            forward(lm, batch, use_cache=False)
        states = rec.stacked()
        for row, index in enumerate(chunk):
            out[index] = states[row]
    return torch.stack([t for t in out if t is not None])
