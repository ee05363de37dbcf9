"""Prompt layout: token ids from the chat template, with positions known by construction.

The index of the last prompt token (the end of the assistant header) and of the end of an appended
reply prefix (SCANS' ``Sure``) come from token counts, never from searching for tag strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

PLAIN_TEMPLATE = "{system}User: {query}\nAssistant:"


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one prompt; ``prompt_end`` indexes the last prompt token."""

    input_ids: tuple[int, ...]
    prompt_end: int
    reply_end: int | None = None

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        """The ids up to and including the last prompt token (the generation prompt)."""
        return self.input_ids[: self.prompt_end + 1]


class ChatLayout:
    """Builds generation prompts from a tokenizer's chat template (plain fallback without one)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, query: str) -> str:
        """The prompt text ending right after the assistant header."""
        if not self.has_template:
            system = f"{self.system_prompt}\n\n" if self.system_prompt else ""
            return PLAIN_TEMPLATE.format(system=system, query=query)
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": query})
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return str(text)

    def prompt_ids(self, query: str) -> list[int]:
        """Token ids of the generation prompt for ``query``."""
        text = self.render(query)
        # A chat template writes its own special tokens (BOS included); the plain fallback does not.
        ids = self.tokenizer(text, add_special_tokens=not self.has_template)["input_ids"]
        return [int(i) for i in ids]

    def reply_ids(self, reply: str) -> list[int]:
        """Token ids of a reply prefix as appended after the generation prompt."""
        ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"reply prefix {reply!r} encodes to no tokens")
        return [int(i) for i in ids]

    def encode(self, query: str, reply_prefix: str | None = None) -> EncodedPrompt:
        """Encode ``query``; with ``reply_prefix``, append it and record where it ends."""
        prompt = self.prompt_ids(query)
        if not prompt:
            raise ValueError("the prompt encodes to no tokens")
        if reply_prefix is None:
            return EncodedPrompt(tuple(prompt), len(prompt) - 1)
        reply = self.reply_ids(reply_prefix)
        ids = prompt + reply
        return EncodedPrompt(tuple(ids), len(prompt) - 1, len(ids) - 1)


@dataclass
class Batch:
    """Left-padded token ids with the attention mask and matching position ids."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def width(self) -> int:
        """Padded sequence length."""
        return int(self.input_ids.shape[1])


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> Batch:
    """Left-pad sequences so that every row ends in the same column.

    Position ids count real tokens only, so a padded row sees the same positions as alone.
    """
    if not sequences:
        raise ValueError("cannot build a batch from no sequences")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), positions.to(device))
