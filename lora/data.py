"""Model-independent data code for causal-LM fine-tuning: chat records, splits, batches and the loss.

* :func:`load_conversations` reads JSONL chats in OpenAI/TRL ``messages``, ShareGPT ``conversations`` or Alpaca
  ``instruction/input/output`` form into ``[{"role", "content"}, ...]`` lists (:func:`to_messages` for one record).
* :func:`split_train_eval` holds out a seeded fraction; :func:`length_grouped_batches` groups similar lengths;
  :func:`collate` right-pads a batch;
  :func:`shuffled_batches` with :func:`collate_packed` packs conversations of any lengths into few rows instead.
* :func:`causal_lm_loss` is the next-token cross-entropy every causal LM here is trained with, and
  :data:`IGNORE_INDEX` the label value it skips; :func:`lm_head_loss` is the same loss from the final hidden states
  and the LM head weight, computed on the labelled positions only and in chunks, so the (tokens, vocab) logits never
  exist at once.

How a conversation becomes token ids and labels depends on the model's chat template: that lives with the model
(:mod:`lora.phi3.chat` for Phi-3).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, TypeVar

import torch
import torch.nn.functional as F

from .functional import _gemm_dtype, _row_blocks

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "LoadStats",
    "Message",
    "causal_lm_loss",
    "collate",
    "collate_packed",
    "count_targets",
    "length_grouped_batches",
    "lm_head_loss",
    "load_conversations",
    "shuffled_batches",
    "split_train_eval",
    "to_messages",
]

IGNORE_INDEX = -100  # the label value the loss skips: torch's cross_entropy default ignore_index, as transformers
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


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """``range(n)`` shuffled and cut into batches of ``batch_size`` (the last may be smaller), for packing: no
    grouping by length is needed when :func:`collate_packed` removes the padding. Depends only on the arguments."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(n))
    random.Random(f"shuffled_batches:{seed}:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def collate_packed(batch: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pack a batch of ``{"input_ids", "labels"}`` into as few rows as first-fit decreasing finds, each row no
    longer than the batch's longest item, so that attention costs no more than :func:`collate`'s padded batch.

    Returns :func:`collate`'s ``input_ids``, ``labels`` and ``attention_mask`` (R, T) and, per token,
    ``position_ids`` (R, T) restarting at 0 with each item and ``segment_ids`` (R, T): the item's index in ``batch``
    (-1 on padding), for a block-diagonal causal mask. Each item's first label is set to :data:`IGNORE_INDEX`: it
    would be the previous item's last token's target, which the unpacked batch does not have.
    """
    if not batch:
        raise ValueError("collate_packed needs a non-empty batch")
    lengths = []
    for b, item in enumerate(batch):
        if len(item["input_ids"]) != len(item["labels"]):
            raise ValueError(f"batch[{b}] has {len(item['input_ids'])} input_ids but {len(item['labels'])} labels")
        lengths.append(len(item["input_ids"]))
    capacity = max(lengths)
    rows: list[list[int]] = []  # item indices per row
    room: list[int] = []
    for i in sorted(range(len(batch)), key=lambda i: lengths[i], reverse=True):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    T = max(capacity - free for free in room)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    segment_ids = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            end = start + lengths[i]
            input_ids[r, start:end] = torch.as_tensor(batch[i]["input_ids"], dtype=torch.long)
            labels[r, start + 1 : end] = torch.as_tensor(batch[i]["labels"][1:], dtype=torch.long)
            attention_mask[r, start:end] = 1
            position_ids[r, start:end] = torch.arange(lengths[i])
            segment_ids[r, start:end] = i
            start = end
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
    }


# ---------------------------------------------------------------- the loss


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32: position ``t``'s logits predict ``labels[:, t + 1]``.

    Args:
        logits: (B, T, vocab), any float dtype (upcast to fp32 here).
        labels: (B, T) token ids, :data:`IGNORE_INDEX` where no loss applies (unshifted, as in transformers).
        reduction: ``"mean"`` over the labelled targets (NaN when there are none, as torch's), or ``"sum"``
            (pair it with :func:`count_targets` to normalise over several batches).

    Returns:
        A 0-d fp32 tensor. The labels are padded on the right instead of slicing the logits, so the (B, T, vocab)
        tensor is not copied before the fp32 cast.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be logits shape {tuple(logits.shape)} minus vocab")
    targets = F.pad(labels.to(logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): labels[:, t + 1]
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def count_targets(labels: torch.Tensor) -> int:
    """How many next-token targets :func:`causal_lm_loss` counts in ``labels: (B, T)``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# Positions per chunk of lm_head_loss by default: a chunk's fp32 logits are then at most 2**26 floats (256 MiB) for
# any vocabulary: 2,092 positions of Phi-3's 32,064 words, 335 of Phi-4-mini's 200,064.
_CHUNK_ELEMENTS = 2**26


def lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`causal_lm_loss` of ``logits = hidden @ weight.T``, without the (B, T, vocab) logits.

    Only the positions with a next-token label (``labels[:, t + 1] != IGNORE_INDEX``) go through the LM head, and
    those in chunks of ``chunk_size`` positions (default: as many as keep a chunk's fp32 logits at 2**26 floats).
    When a gradient is needed, each chunk's gradient with respect to its hidden states (and to ``weight``, if it
    requires one) is computed right after its loss, from the same chunk of logits, and kept for the backward pass:
    neither pass ever holds more than one chunk of logits, and the logits are computed once.

    Args:
        hidden: (B, T, hidden) final hidden states (after the final norm).
        weight: (vocab, hidden) the LM head's weight (no bias, as Phi-3's).
        labels: (B, T) token ids, :data:`IGNORE_INDEX` where no loss applies (unshifted, as in transformers).
        reduction: ``"mean"`` over the labelled targets (NaN when there are none, as torch's) or ``"sum"``.
        chunk_size: positions per chunk, >= 1.

    Under autocast the matmuls run in the autocast dtype (as ``lm_head(hidden)`` would); the log-softmax, the loss
    and ``weight``'s gradient accumulate in fp32. Returns a 0-d fp32 tensor.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be hidden shape {tuple(hidden.shape)} minus hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight shape {tuple(weight.shape)} must be (vocab, {hidden.shape[2]})")
    vocab = weight.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // vocab)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    targets = F.pad(labels.to(hidden.device), (0, 1), value=IGNORE_INDEX)[:, 1:].flatten()  # (B*T,): labels[:, t+1]
    where = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (N,) flat positions that have a target
    targets = targets[where]
    if targets.numel() and not bool(((targets >= 0) & (targets < vocab)).all()):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(f"label {bad} is outside the vocabulary [0, {vocab}) (use {IGNORE_INDEX} to ignore)")
    selected = hidden.flatten(0, 1).index_select(0, where)  # (N, hidden)

    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
    if torch.is_grad_enabled() and (selected.requires_grad or weight.requires_grad):
        total = _ChunkedLMHeadLoss.apply(selected, weight, targets, chunk_size, dtype)
    else:
        total = _chunked_loss(
            selected, weight, targets, chunk_size, dtype, want_hidden_grad=False, want_weight_grad=False
        )[0]
    return total if reduction == "sum" else total / targets.numel()


def _chunked_loss(
    selected: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    dtype: torch.dtype | None,
    want_hidden_grad: bool,
    want_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed cross-entropy of ``selected: (N, hidden) @ weight.T`` against ``targets: (N,)``, chunk by chunk, and
    the gradients of that sum with respect to ``selected`` and ``weight`` (fp32) where asked for."""
    compute = dtype if dtype is not None else torch.promote_types(selected.dtype, weight.dtype)
    gemm = _gemm_dtype(compute, selected.device)  # fp32 where this CPU would emulate compute's products
    w = weight.detach().to(compute)
    total = torch.zeros((), dtype=torch.float32, device=selected.device)
    grad_hidden = torch.empty_like(selected) if want_hidden_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
    with torch.autocast(selected.device.type, enabled=False):
        for start in range(0, targets.numel(), chunk_size):
            h = selected[start : start + chunk_size].detach().to(compute)  # (n, hidden)
            t = targets[start : start + chunk_size]
            logits = _head_logits(h, w, gemm)  # (n, hidden) @ (hidden, vocab) -> (n, vocab), fp32
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (want_hidden_grad or want_weight_grad):
                continue
            # d(sum of -log softmax[target]) / d logits = softmax - one_hot(target), written into the logits' memory
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(t.numel(), device=t.device), t] -= 1.0
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = _head_input_grad(grad, w, gemm)  # (n, hidden)
            if grad_weight is not None:
                grad_weight += grad.T @ h.float()  # (vocab, n) @ (n, hidden) -> (vocab, hidden)
    return total, grad_hidden, grad_weight


def _head_logits(h: torch.Tensor, w: torch.Tensor, gemm: torch.dtype | None) -> torch.Tensor:
    """``h: (n, hidden) @ w.T: (hidden, vocab)`` as fp32 ``(n, vocab)``, with the values of the product in ``h``'s
    dtype. With ``gemm`` (fp32 over 16-bit operands, see :func:`lora.functional._gemm_dtype`) a block of the head's
    rows is upcast at a time, so no fp32 copy of the whole head exists, and the product is rounded to the 16-bit
    dtype as the 16-bit GEMM's would be."""
    if gemm is None:
        return (h @ w.T).float()
    out = torch.empty(h.shape[0], w.shape[0], dtype=gemm, device=h.device)
    hg = h.to(gemm)
    for v in _row_blocks(*w.shape):
        block = out[:, v]
        torch.mm(hg, w[v].to(gemm).T, out=block)  # (n, hidden) @ (hidden, block)
        block.copy_(block.to(h.dtype))  # rounded as the 16-bit product is, a block at a time (in cache)
    return out.float()


def _head_input_grad(grad: torch.Tensor, w: torch.Tensor, gemm: torch.dtype | None) -> torch.Tensor:
    """``grad: (n, vocab) @ w: (vocab, hidden)`` in ``w``'s dtype, from the gradient rounded to it (as the 16-bit
    product takes it); with ``gemm``, over the head's rows a block at a time, summed in fp32."""
    if gemm is None:
        return grad.to(w.dtype) @ w
    out = torch.zeros(grad.shape[0], w.shape[1], dtype=gemm, device=grad.device)
    for v in _row_blocks(*w.shape):
        g = grad[:, v].to(w.dtype).to(gemm)  # (n, block), rounded to the head's dtype
        out.addmm_(g, w[v].to(gemm))  # (n, block) @ (block, hidden)
    return out.to(w.dtype)


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """The summed loss of :func:`_chunked_loss`; its gradients are computed in the forward pass (one pass over the
    logits) and scaled by the incoming gradient in the backward pass."""

    @staticmethod
    def forward(ctx, selected, weight, targets, chunk_size, dtype):  # noqa: ANN001, ANN205 (autograd's signature)
        total, grad_hidden, grad_weight = _chunked_loss(
            selected, weight, targets, chunk_size, dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None
