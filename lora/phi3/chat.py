"""Phi-3 chat data: conversations formatted with the checkpoint's chat template and tokenized with a loss mask.

The template is the tokenizer's (``tokenizer.chat_template``: the checkpoint's own jinja2 template, e.g. Phi-4-mini's
``<|user|>{content}<|end|><|assistant|>``), or, when it has none, Phi-3's (:class:`~lora.phi3.template.Phi3Template`)::

    <|{role}|>\\n{content}<|end|>\\n   per message, then <|endoftext|> (training) or <|assistant|>\\n (prompt)

Loss mask. The model learns only what the assistant says: each assistant message's content tokens and the end token
that closes it (``<|end|>``, so it learns to stop): in the template text right after an assistant's content, the
tokens up to and including the first stop token (``tokenizer.stop_token_ids``). Everything else is ``-100``
(:data:`~lora.data.IGNORE_INDEX`): system and user messages, role headers, the ``"\\n"`` after ``<|end|>``, and the
final ``<|endoftext|>``, which generation never reaches because it stops at ``<|end|>``. (Microsoft's
sample_finetune.py trains on the whole text instead.) A template that closes an assistant message with no stop token
is refused: the model could never learn to stop.

Tokenization is segment by segment, as torchtune does: the template text between two contents and each content are
encoded on their own and the ids concatenated, so every mask boundary is exact. Template text is encoded with its
special tokens; message content with ``allow_special=False``, so a ``"<|end|>"`` typed by a user is text, not a
token. For :class:`~lora.phi3.tokenizer.ByteTokenizer` this equals encoding the rendered string. For a real
tokenizer.json it does too whenever special tokens separate the contents (they split the text before anything else
runs) and a content has no leading or trailing whitespace: Phi-3's tokenizer strips the whitespace after
``<|user|>``, ``<|end|>`` etc. (``rstrip``), so a content that starts with whitespace keeps it here where the
whole-string encoding would drop it. Prompts for generation go through :func:`encode_prompt`, which uses the same
segments, so training and inference see the same ids.

The model-independent data code (loading JSONL, splits, batching, the loss) is in :mod:`lora.data`; its names are
re-exported here for older imports.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypedDict

from lora.data import (
    IGNORE_INDEX,
    ROLES,
    LoadStats,
    Message,
    collate,
    length_grouped_batches,
    load_conversations,
    split_train_eval,
    to_messages,
)
from lora.phi3.template import ChatTemplate, Phi3Template
from lora.phi3.tokenizer import ChatTokenizer

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "LoadStats",
    "Message",
    "TokenizedConversation",
    "collate",
    "encode_prompt",
    "format_chat",
    "length_grouped_batches",
    "load_conversations",
    "parse_chat",
    "split_train_eval",
    "to_messages",
    "tokenize_conversation",
]

_BUILTIN = Phi3Template()


def _template(tokenizer: ChatTokenizer | None) -> ChatTemplate:
    return getattr(tokenizer, "chat_template", None) or _BUILTIN


def format_chat(
    messages: Sequence[Message], add_generation_prompt: bool = False, template: ChatTemplate | None = None
) -> str:
    """The conversation as text, by ``template`` (default: Phi-3's, ``<|role|>\\n{content}<|end|>\\n`` per
    message, then ``<|assistant|>\\n`` if ``add_generation_prompt`` else ``<|endoftext|>``)."""
    segments = (template or _BUILTIN).segments(messages, add_generation_prompt)
    return "".join(text for text, _ in segments)


_MESSAGE_RE = re.compile(r"<\|(system|user|assistant)\|>\n(.*?)<\|end\|>\n", re.DOTALL)


def parse_chat(text: str) -> list[Message]:
    """Inverse of :func:`format_chat` with Phi-3's template: the messages of a formatted conversation (a trailing
    ``<|endoftext|>`` or generation prompt is dropped). ``ValueError`` where the text does not follow it."""
    messages: list[Message] = []
    pos = 0
    while match := _MESSAGE_RE.match(text, pos):
        messages.append(Message(role=match.group(1), content=match.group(2)))
        pos = match.end()
    if text[pos:] not in ("", "<|endoftext|>", "<|assistant|>\n"):
        raise ValueError(f"text does not follow Phi-3's chat template at character {pos}: {text[pos : pos + 40]!r}")
    return messages


# ---------------------------------------------------------------- tokenization


class TokenizedConversation(TypedDict):
    """``input_ids`` and ``labels`` have one entry per token; ``labels[i]`` is ``input_ids[i]`` where the loss
    applies, else :data:`IGNORE_INDEX` (the shift to next-token targets happens in the loss, as in HF)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def _encode_segments(
    messages: Sequence[Message], tokenizer: ChatTokenizer, add_generation_prompt: bool
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the templated conversation, one segment at a time (see the module docstring)."""
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {m['role']!r} (expected one of {list(ROLES)})")
    stops = set(tokenizer.stop_token_ids)
    ids: list[int] = []
    labels: list[int] = []
    closing = False  # the previous segment was an assistant's content
    for text, role in _template(tokenizer).segments(messages, add_generation_prompt):
        if role is None:
            piece = tokenizer.encode(text, allow_special=True)
            n_labelled = 0
            if closing:
                n_labelled = next((j + 1 for j, t in enumerate(piece) if t in stops), 0)
                if not n_labelled:
                    raise ValueError(
                        f"the chat template closes an assistant message with {text!r}, which has no stop "
                        f"token {sorted(stops)}: the model could not learn to end its reply"
                    )
            labels += piece[:n_labelled] + [IGNORE_INDEX] * (len(piece) - n_labelled)
        else:
            piece = tokenizer.encode(text, allow_special=False)
            labels += piece if role == "assistant" else [IGNORE_INDEX] * len(piece)
        ids += piece
        closing = role == "assistant"
    if closing:
        raise ValueError("the chat template ends right after an assistant's content, with no stop token after it")
    return ids, labels


def tokenize_conversation(
    messages: Sequence[Message], tokenizer: ChatTokenizer, max_length: int
) -> TokenizedConversation:
    """Tokenize a training conversation (``add_generation_prompt=False``) with labels on assistant tokens only.

    Labels are the token ids of every assistant content and of the stop token after it (``<|end|>``); everywhere
    else :data:`IGNORE_INDEX` (see the module docstring). Sequences longer than ``max_length`` keep their first
    ``max_length`` tokens and report ``truncated=True``; a truncation can leave no labelled token at all.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    ids, labels = _encode_segments(messages, tokenizer, add_generation_prompt=False)
    truncated = len(ids) > max_length
    return TokenizedConversation(input_ids=ids[:max_length], labels=labels[:max_length], truncated=truncated)


def encode_prompt(messages: Sequence[Message], tokenizer: ChatTokenizer) -> list[int]:
    """Ids of the templated ``messages`` with the generation prompt, segment by segment exactly as in training:
    the prompt from which to generate the assistant's next reply."""
    ids, _ = _encode_segments(messages, tokenizer, add_generation_prompt=True)
    return ids
