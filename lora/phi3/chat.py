"""Phi-3 chat data: load conversations from JSONL, format them with Phi-3's template, tokenize with a loss mask, batch.

Phi-3's chat template (microsoft/Phi-3-mini-4k-instruct, ``tokenizer_config.json``), for every message::

    <|{role}|>\\n{content}<|end|>\\n

then ``<|endoftext|>`` when the text is a whole training conversation, or ``<|assistant|>\\n`` when it is a prompt
for generation.

Loss mask. The model learns only what the assistant says: each assistant turn's content tokens and the ``<|end|>``
that closes it (so it learns to stop). Everything else is ``-100`` (:data:`IGNORE_INDEX`): system and user messages,
every ``<|role|>\\n`` header, the ``"\\n"`` after ``<|end|>``, and the final ``<|endoftext|>``, which generation
never reaches because it stops at ``<|end|>``. (Microsoft's sample_finetune.py trains on the whole text instead.)

Tokenization is segment by segment, as torchtune does: each header, content and ``<|end|>\\n`` is encoded on its
own and the ids concatenated, so every mask boundary is exact. For :class:`~lora.phi3.tokenizer.ByteTokenizer` this
equals encoding :func:`format_chat`'s string. For Phi-3's SentencePiece tokenizer it equals it too when a content
has no leading or trailing whitespace: Phi-3 splits its text at special tokens, strips the whitespace after
``<|user|>``, ``<|end|>`` etc. (``rstrip``) and prepends ``"▁"`` to each span, and encoding a segment alone does
the same. A content that starts with whitespace keeps it here, where the whole-string encoding would drop it.
Message content is encoded with ``allow_special=False``: a ``"<|end|>"`` typed by a user is text, not a token.
Prompts for generation go through :func:`encode_prompt`, which uses the same segments, so training and inference
see the same ids.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, TypedDict, TypeVar

import torch

from lora.phi3.tokenizer import ChatTokenizer

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "Message",
    "LoadStats",
    "TokenizedConversation",
    "to_messages",
    "load_conversations",
    "split_train_eval",
    "format_chat",
    "parse_chat",
    "tokenize_conversation",
    "encode_prompt",
    "collate",
    "length_grouped_batches",
]

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
ROLES: tuple[str, ...] = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

_T = TypeVar("_T")


class Message(TypedDict):
    """One chat message: ``role`` is one of :data:`ROLES`."""

    role: str
    content: str


@dataclass(frozen=True)
class LoadStats:
    """What :func:`load_conversations` read.

    Attributes:
        n_lines: non-blank lines in the file.
        n_loaded: conversations returned.
        n_malformed: lines skipped as malformed (only with ``skip_malformed=True``).
        n_no_assistant: well-formed conversations skipped because no message is from the assistant.
    """

    n_lines: int
    n_loaded: int
    n_malformed: int
    n_no_assistant: int


# ---------------------------------------------------------------- loading


def _message(role: object, content: object, where: str) -> Message:
    if not isinstance(role, str) or not isinstance(content, str):
        kinds = f"{type(role).__name__} and {type(content).__name__}"
        raise ValueError(f"{where} needs a string role and content, got {kinds}")
    return Message(role=role, content=content)


def _message_list(obj: object, key: str) -> list:
    if not isinstance(obj, list) or not all(isinstance(m, dict) for m in obj):
        raise ValueError(f"{key!r} must be a list of objects, got {type(obj).__name__}")
    return obj


def to_messages(record: object) -> list[Message]:
    """One JSON record in any of the three formats -> ``[{"role", "content"}, ...]``; ``ValueError`` if malformed.

    * OpenAI / TRL: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
    * ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt"|"user"|"assistant", "value": str}, ...]}``
    * Alpaca: ``{"instruction": str, "input": str (optional), "output": str}`` -> a user message (the
      instruction, plus ``"\\n\\n" + input`` when input is non-empty) and an assistant message (the output).

    Other keys are ignored.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    candidates = {"messages": ("messages",), "conversations": ("conversations",), "alpaca": ("instruction", "output")}
    formats = [name for name, keys in candidates.items() if all(k in record for k in keys)]
    if len(formats) != 1:
        found = " and ".join(formats) or "none"
        raise ValueError(
            "unknown format: expected exactly one of 'messages', 'conversations' or 'instruction'+'output', "
            f"found {found} (keys {sorted(record)})"
        )

    if formats[0] == "messages":
        messages = []
        for i, turn in enumerate(_message_list(record["messages"], "messages")):
            m = _message(turn.get("role"), turn.get("content"), f"messages[{i}]")
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{i}] has unknown role {m['role']!r} (expected one of {list(ROLES)})")
            messages.append(m)
        return messages

    if formats[0] == "conversations":
        messages = []
        for i, turn in enumerate(_message_list(record["conversations"], "conversations")):
            m = _message(turn.get("from"), turn.get("value"), f"conversations[{i}]")
            if m["role"] not in _SHAREGPT_ROLES:
                expected = list(_SHAREGPT_ROLES)
                raise ValueError(f"conversations[{i}] has unknown 'from' {m['role']!r} (expected one of {expected})")
            messages.append(Message(role=_SHAREGPT_ROLES[m["role"]], content=m["content"]))
        return messages

    instruction, output, extra = record["instruction"], record["output"], record.get("input")
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, (str, type(None))):
        raise ValueError("alpaca record needs string 'instruction' and 'output', and 'input' a string or absent")
    user = instruction + "\n\n" + extra if extra else instruction
    return [Message(role="user", content=user), Message(role="assistant", content=output)]


def load_conversations(path: str | Path, skip_malformed: bool = False) -> tuple[list[list[Message]], LoadStats]:
    """Read a JSONL file of conversations (one record per line, any format :func:`to_messages` takes).

    Blank lines are ignored. A malformed line (bad JSON or UTF-8, unknown format, wrong types, unknown role)
    raises ``ValueError("<path>:<line>: <why>")`` (1-based line), or with ``skip_malformed`` is skipped and
    counted. A conversation without an assistant message is skipped and counted: it has nothing to learn.

    Returns:
        ``(conversations, stats)``; ``ValueError`` naming the file if no conversation is left.
    """
    path = Path(path)
    conversations: list[list[Message]] = []
    n_lines = n_malformed = n_no_assistant = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            n_lines += 1
            try:
                # utf-8-sig on the first line drops the byte-order mark some editors write.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                messages = to_messages(json.loads(line))
            except ValueError as err:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
                if not skip_malformed:
                    raise ValueError(f"{path}:{lineno}: {err}") from err
                n_malformed += 1
                continue
            if not any(m["role"] == "assistant" for m in messages):
                n_no_assistant += 1
                continue
            conversations.append(messages)
    stats = LoadStats(n_lines, len(conversations), n_malformed, n_no_assistant)
    if not conversations:
        raise ValueError(f"{path}: no conversations with an assistant message ({stats})")
    return conversations, stats


def split_train_eval(conversations: Sequence[_T], eval_fraction: float, seed: int) -> tuple[list[_T], list[_T]]:
    """Split conversations (or any items) into ``(train, eval)`` by a seeded shuffle; each part keeps the input
    order.

    ``round(len(conversations) * eval_fraction)`` go to eval, at least one when ``eval_fraction > 0``, and at least
    one must be left for training. Same ``(conversations, eval_fraction, seed)`` -> same split.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(conversations)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0:
        n_eval = max(n_eval, 1)
    if n_eval >= n:
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training data out of {n} conversations")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in eval_idx]
    held = [c for i, c in enumerate(conversations) if i in eval_idx]
    return train, held


# ---------------------------------------------------------------- the template


def _role(message: Mapping) -> str:
    role = message["role"]
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (expected one of {list(ROLES)})")
    return role


def format_chat(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """Phi-3's chat template as a string: ``<|role|>\\n{content}<|end|>\\n`` per message, then
    ``<|assistant|>\\n`` if ``add_generation_prompt`` else ``<|endoftext|>``."""
    text = "".join(f"<|{_role(m)}|>\n{m['content']}<|end|>\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "<|endoftext|>")


_MESSAGE_RE = re.compile(r"<\|(system|user|assistant)\|>\n(.*?)<\|end\|>\n", re.DOTALL)


def parse_chat(text: str) -> list[Message]:
    """Inverse of :func:`format_chat`: the messages of a formatted conversation (a trailing ``<|endoftext|>`` or
    generation prompt is dropped). ``ValueError`` where the text does not follow the template."""
    messages: list[Message] = []
    pos = 0
    while match := _MESSAGE_RE.match(text, pos):
        messages.append(Message(role=match.group(1), content=match.group(2)))
        pos = match.end()
    if text[pos:] not in ("", "<|endoftext|>", "<|assistant|>\n"):
        raise ValueError(f"text does not follow Phi-3's chat template at character {pos}: {text[pos:pos + 40]!r}")
    return messages


# ---------------------------------------------------------------- tokenization


class TokenizedConversation(TypedDict):
    """``input_ids`` and ``labels`` have one entry per token; ``labels[i]`` is ``input_ids[i]`` where the loss
    applies, else :data:`IGNORE_INDEX` (the shift to next-token targets happens in the loss, as in HF)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def _encode_special(tokenizer: ChatTokenizer, text: str, first: str) -> list[int]:
    """Encode template text that must start with the special token ``first`` as a single id."""
    ids = tokenizer.encode(text, allow_special=True)
    if not ids or ids[0] != tokenizer.special_tokens.get(first):
        raise ValueError(f"{tokenizer!r} does not encode {first!r} as its special token (got {ids[:3]})")
    return ids


def _encode_segments(
    messages: Sequence[Message], tokenizer: ChatTokenizer, add_generation_prompt: bool
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of ``format_chat(messages, add_generation_prompt)``, one segment at a time."""
    footer = _encode_special(tokenizer, "<|end|>\n", "<|end|>")  # [<|end|>, ...ids of "\n", if any]
    footer_labels = [footer[0]] + [IGNORE_INDEX] * (len(footer) - 1)
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        role = _role(m)
        header = _encode_special(tokenizer, f"<|{role}|>\n", f"<|{role}|>")
        content = tokenizer.encode(m["content"], allow_special=False)
        ids += header + content + footer
        labels += [IGNORE_INDEX] * len(header)
        if role == "assistant":
            labels += content + footer_labels
        else:
            labels += [IGNORE_INDEX] * (len(content) + len(footer))
    if add_generation_prompt:
        tail = _encode_special(tokenizer, "<|assistant|>\n", "<|assistant|>")
    else:
        tail = _encode_special(tokenizer, "<|endoftext|>", "<|endoftext|>")
    return ids + tail, labels + [IGNORE_INDEX] * len(tail)


def tokenize_conversation(
    messages: Sequence[Message], tokenizer: ChatTokenizer, max_length: int
) -> TokenizedConversation:
    """Tokenize a training conversation (template + ``<|endoftext|>``) with labels on assistant tokens only.

    Labels are the token ids of every assistant content and of the ``<|end|>`` after it; everywhere else
    :data:`IGNORE_INDEX` (see the module docstring). Sequences longer than ``max_length`` keep their first
    ``max_length`` tokens and report ``truncated=True``; a truncation can leave no labelled token at all.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    ids, labels = _encode_segments(messages, tokenizer, add_generation_prompt=False)
    truncated = len(ids) > max_length
    return TokenizedConversation(input_ids=ids[:max_length], labels=labels[:max_length], truncated=truncated)


def encode_prompt(messages: Sequence[Message], tokenizer: ChatTokenizer) -> list[int]:
    """Ids of ``format_chat(messages, add_generation_prompt=True)``, segment by segment exactly as in training:
    the prompt from which to generate the assistant's next reply."""
    ids, _ = _encode_segments(messages, tokenizer, add_generation_prompt=True)
    return ids


# ---------------------------------------------------------------- batching


def collate(batch: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``{"input_ids", "labels"}`` to the longest one.

    Returns:
        ``input_ids``: (B, T) long, padded with ``pad_token_id``; ``labels``: (B, T) long, padded with
        :data:`IGNORE_INDEX`; ``attention_mask``: (B, T) long, 1 on real tokens, 0 on padding.
    """
    if not batch:
        raise ValueError("collate needs a non-empty batch")
    for b, item in enumerate(batch):
        if len(item["input_ids"]) != len(item["labels"]):
            raise ValueError(f"batch[{b}] has {len(item['input_ids'])} input_ids but {len(item['labels'])} labels")
    T = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for b, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[b, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_batches: int = 50
) -> list[list[int]]:
    """Batches of indices into ``lengths`` whose members have similar lengths, so little is spent on padding.

    As Hugging Face's LengthGroupedSampler: shuffle all indices, cut them into groups of
    ``batch_size * group_batches``, sort each group by length (longest first), cut it into batches, then shuffle
    the batches. Every index appears exactly once; only the last batch of a group may be smaller. The result
    depends only on ``(lengths, batch_size, seed, epoch, group_batches)``; a new epoch gives a new order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if group_batches < 1:
        raise ValueError(f"group_batches must be >= 1, got {group_batches}")
    rng = random.Random(f"length_grouped_batches:{seed}:{epoch}")  # str seeds are hashed stably (sha512)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches += [group[j : j + batch_size] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches
