"""Chat messages → prompt token ids, as the library encodes them, and the context check.

A request of one user message (and optionally one system message) is encoded exactly like the
library's :class:`~safesteer.core.layout.ChatLayout` (so served and library results agree); longer
conversations go through the tokenizer's chat template. A method's own system prompt (an
artifact's ``system_prompt``, e.g. SafeSwitch's probing prompt) is used when the request brings
none.
"""

from __future__ import annotations

from collections.abc import Sequence

from safesteer.core.handle import LoadedModel
from safesteer.core.layout import ChatLayout
from safesteer.serving.protocol import Message


class PromptError(ValueError):
    """Messages that cannot be encoded for this model; the message says why."""


def _role(message: Message) -> str:
    return "system" if message.role == "developer" else message.role


def encode_messages(
    lm: LoadedModel, messages: Sequence[Message], default_system: str | None = None
) -> list[int]:
    """Token ids of the generation prompt (ending after the assistant header)."""
    system = [m.text for m in messages if _role(m) == "system"]
    turns = [m for m in messages if _role(m) != "system"]
    if len(system) > 1 or (system and _role(messages[0]) != "system"):
        raise PromptError("send at most one system message, as the first message")
    system_prompt = system[0] if system else default_system
    if len(turns) == 1 and turns[0].role == "user":
        ids = ChatLayout(lm.tokenizer, system_prompt).prompt_ids(turns[0].text)
    else:
        if not getattr(lm.tokenizer, "chat_template", None):
            raise PromptError(
                "this model has no chat template, so only one user message (and an optional "
                "system message) can be sent"
            )
        chat = [{"role": _role(m), "content": m.text} for m in turns]
        if system_prompt is not None:
            chat.insert(0, {"role": "system", "content": system_prompt})
        text = str(
            lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        )
        ids = [int(i) for i in lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise PromptError("the messages encode to no tokens")
    return ids


def check_fits(prompt_tokens: int, max_tokens: int, extra: int, context: int | None) -> None:
    """Refuse a prompt that cannot fit the model's context with ``max_tokens`` new tokens.

    ``extra``: tokens the method appends during the prefill (SCANS' reply prefix).
    """
    if context is None:
        return
    need = prompt_tokens + max_tokens + extra
    if need > context:
        method = f" + {extra} for the method's decision" if extra else ""
        raise PromptError(
            f"the messages are {prompt_tokens:,} tokens; with max_tokens {max_tokens:,}{method} "
            f"that is {need:,}, over the model's context of {context:,} tokens: shorten the "
            "messages or lower max_tokens"
        )
