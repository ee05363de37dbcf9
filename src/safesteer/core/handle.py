"""The model handle: a causal LM with its tokenizer and decoder layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and decoder layers."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layers: list[nn.Module]
    layers_path: str
    name: str
    # Test-set prompts (stripped texts) this model was fine-tuned on, e.g. the organism's AdvBench
    # and TruthfulQA anchors: evaluations must drop them from their test sets for every seed.
    trained_on: frozenset[str] = field(default_factory=frozenset)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream."""
        return int(self._embedding_weight().shape[1])

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where token ids must be sent)."""
        return self._embedding_weight().device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the input embeddings."""
        return self._embedding_weight().dtype

    def _embedding_weight(self) -> torch.Tensor:
        weight = self.model.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def layer_device(self, index: int) -> torch.device:
        """Device of decoder layer ``index`` (differs per layer under ``device_map=auto``)."""
        for param in self.layers[index].parameters():
            return param.device
        return self.device

    def fingerprint(self) -> dict[str, Any]:
        """Config facts, chat-template hash and exact hashes of sampled weight rows (matches a
        bfloat16 or float16 copy of the same weights, never a fine-tune)."""
        from safesteer.core.fingerprint import model_fingerprint

        return model_fingerprint(self)
