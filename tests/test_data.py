"""Tests for lora.data: loading chat records, splits, batching, and the causal-LM loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lora.data
import lora.phi3
import lora.phi3.chat
from lora.data import (
    IGNORE_INDEX,
    LoadStats,
    Message,
    causal_lm_loss,
    collate,
    collate_packed,
    count_targets,
    length_grouped_batches,
    lm_head_loss,
    load_conversations,
    shuffled_batches,
    split_train_eval,
    to_messages,
)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- loading


def test_each_format(tmp_path: Path) -> None:
    records = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ],
            "extra": 1,
        },
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
        {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},
        {"instruction": "q", "input": "ctx", "output": "a"},
        {"instruction": "q", "input": "", "output": "a"},
        {"instruction": "q", "output": "a"},
    ]
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(r) for r in records])
    conversations, stats = load_conversations(path)
    qa = [Message(role="user", content="q"), Message(role="assistant", content="a")]
    system = [Message(role="system", content="S")]
    assert conversations == [
        system + qa,
        system + qa,
        qa,
        [Message(role="user", content="q\n\nctx"), Message(role="assistant", content="a")],
        qa,
        qa,
    ]
    assert stats == LoadStats(n_lines=6, n_loaded=6, n_malformed=0, n_no_assistant=0)


@pytest.mark.parametrize(
    "bad, why",
    [
        ("{not json", "Expecting"),
        ('["a list"]', "JSON object"),
        ('{"text": "hi"}', "unknown format"),
        ('{"messages": [], "conversations": []}', "unknown format"),
        ('{"messages": "hi"}', "list of objects"),
        ('{"messages": [{"role": "user", "content": 3}]}', "string role and content"),
        ('{"messages": [{"role": "tool", "content": "x"}]}', "unknown role 'tool'"),
        ('{"conversations": [{"from": "bot", "value": "x"}]}', "unknown 'from' 'bot'"),
        ('{"instruction": "q", "input": 3, "output": "a"}', "alpaca"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, why: str) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", bad, good])  # the bad record is on line 3
    with pytest.raises(ValueError, match=f"data.jsonl:3: .*{why}"):
        load_conversations(path)


def test_skip_malformed_and_no_assistant_are_counted(tmp_path: Path) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    no_assistant = json.dumps({"messages": [{"role": "user", "content": "q"}]})
    path = tmp_path / "data.jsonl"
    path.write_bytes(f"{good}\n{{oops\n\n   \n{no_assistant}\n".encode() + b"\xff\xfe\n" + f"{good}\n".encode())
    conversations, stats = load_conversations(path, skip_malformed=True)
    assert len(conversations) == 2
    assert stats == LoadStats(n_lines=5, n_loaded=2, n_malformed=2, n_no_assistant=1)
    with pytest.raises(ValueError, match="data.jsonl:2:"):
        load_conversations(path)


def test_empty_result_names_the_file(tmp_path: Path) -> None:
    for lines in ([""], [json.dumps({"messages": [{"role": "user", "content": "q"}]})]):
        path = write_jsonl(tmp_path / "empty.jsonl", lines)
        with pytest.raises(ValueError, match="empty.jsonl"):
            load_conversations(path)


def test_to_messages_accepts_in_memory_records() -> None:
    assert to_messages({"instruction": "q", "input": None, "output": "a"})[0] == Message(role="user", content="q")


def test_split_train_eval() -> None:
    items = list(range(20))
    train, held = split_train_eval(items, 0.25, seed=3)
    assert (train, held) == split_train_eval(items, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)  # input order kept
    assert split_train_eval(items, 0.25, seed=4)[1] != held
    assert split_train_eval(items, 0.0, seed=0) == (items, [])
    assert len(split_train_eval(items, 0.01, seed=0)[1]) == 1
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="eval_fraction"):
            split_train_eval(items, bad, seed=0)
    with pytest.raises(ValueError, match="no training data"):
        split_train_eval([1], 0.5, seed=0)


# ---------------------------------------------------------------- batching


def test_collate() -> None:
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in out.values())
    with pytest.raises(ValueError, match="non-empty"):
        collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="batch\\[0\\]"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


@given(st.lists(st.integers(1, 500), max_size=300), st.integers(1, 16), st.integers(0, 3), st.integers(0, 3))
def test_length_grouped_batches_is_a_deterministic_partition(
    lengths: list[int], batch_size: int, seed: int, epoch: int
) -> None:
    batches = length_grouped_batches(lengths, batch_size, seed=seed, epoch=epoch, group_batches=4)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert batches == length_grouped_batches(lengths, batch_size, seed=seed, epoch=epoch, group_batches=4)


def test_length_grouped_batches_reduce_padding() -> None:
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(2000)]

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = length_grouped_batches(lengths, 8, seed=0, epoch=0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    plain = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert padding(grouped) < padding(plain) / 10
    assert length_grouped_batches(lengths, 8, seed=0, epoch=1) != grouped  # reshuffled each epoch
    assert length_grouped_batches(lengths, 8, seed=1, epoch=0) != grouped
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_batches(lengths, 0, seed=0, epoch=0)


# ---------------------------------------------------------------- the loss


def _written_out_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Sum over (b, t) with labels[b, t + 1] labelled of -log softmax(logits[b, t])[labels[b, t + 1]], in fp64."""
    total, count = 0.0, 0
    log_probs = logits.double().log_softmax(-1)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != IGNORE_INDEX:
                total -= float(log_probs[b, t, target])
                count += 1
    return total, count


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 7),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_causal_lm_loss_is_the_written_out_sum(batch: int, length: int, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, 11, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 11, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < 0.4] = IGNORE_INDEX
    total, count = _written_out_loss(logits, labels)
    summed = causal_lm_loss(logits, labels, reduction="sum")
    assert summed.dtype == torch.float32 and count_targets(labels) == count
    assert summed.item() == pytest.approx(total, rel=1e-5, abs=1e-5)
    mean = causal_lm_loss(logits, labels)
    if count:
        assert mean.item() == pytest.approx(total / count, rel=1e-5)
    else:
        assert torch.isnan(mean)  # as torch's cross_entropy over no target


def test_causal_lm_loss_gradient_and_arguments() -> None:
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 3, 4], [IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX]])
    (got,) = torch.autograd.grad(causal_lm_loss(logits, labels), logits)
    # the slicing form: positions 0..T-2 predict labels 1..T-1; the last position gets no gradient
    sliced = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    (expected,) = torch.autograd.grad(sliced, logits)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_loss(logits, labels, reduction="none")
    with pytest.raises(ValueError, match="labels shape"):
        causal_lm_loss(logits, labels[:, :4])


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 9),
    chunk=st.sampled_from([1, 2, 3, 5, 7, 64, None]),
    head_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lm_head_loss_is_the_full_computation(
    batch: int, length: int, chunk: int | None, head_grad: bool, seed: int
) -> None:
    """Loss and gradients as causal_lm_loss over the full logits (fp32, 1e-6): rows without any label, scattered
    IGNORE_INDEX, chunk sizes that do not divide the labelled positions, a frozen or trained head."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, 6, generator=gen, requires_grad=True)
    weight = torch.randn(13, 6, generator=gen).requires_grad_(head_grad)
    labels = torch.randint(0, 13, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < 0.4] = IGNORE_INDEX
    labels[0] = IGNORE_INDEX  # a row with nothing to learn
    inputs = (hidden, weight) if head_grad else (hidden,)
    for reduction in ("sum", "mean"):
        expected = causal_lm_loss(hidden @ weight.T, labels, reduction=reduction)
        got = lm_head_loss(hidden, weight, labels, reduction=reduction, chunk_size=chunk)
        if reduction == "mean" and not count_targets(labels):
            assert torch.isnan(got) and torch.isnan(expected)
            continue
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        # a non-unit upstream gradient, as a loss scaled by 1 / (tokens of the whole step) gets
        for g, e in zip(torch.autograd.grad(got * 0.37, inputs), torch.autograd.grad(expected * 0.37, inputs)):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_lm_head_loss_tied_head_bf16_and_no_grad() -> None:
    gen = torch.Generator().manual_seed(0)
    embed = torch.nn.Embedding(17, 8)
    ids = torch.randint(0, 17, (2, 6), generator=gen)
    labels = ids.clone()
    labels[1, :3] = IGNORE_INDEX

    def loss(fn):
        embed.zero_grad()
        hidden = embed(ids) * 2 + 1  # the tied weight is reached twice: through the input and as the head
        out = fn(hidden)
        out.backward()
        return out.detach(), embed.weight.grad.clone()

    expected = loss(lambda h: causal_lm_loss(h @ embed.weight.T, labels))
    got = loss(lambda h: lm_head_loss(h, embed.weight, labels, chunk_size=4))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # the matmul in bf16 as the head's would be, the rest fp32
        expected = loss(lambda h: causal_lm_loss(torch.nn.functional.linear(h, embed.weight), labels))
        got = loss(lambda h: lm_head_loss(h, embed.weight, labels, chunk_size=3))
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=2e-2)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=2e-2)

    with torch.no_grad():
        hidden = embed(ids)
        torch.testing.assert_close(
            lm_head_loss(hidden, embed.weight, labels, chunk_size=5),
            causal_lm_loss(hidden @ embed.weight.T, labels),
            rtol=1e-6,
            atol=1e-6,
        )


def test_lm_head_loss_arguments() -> None:
    hidden, weight = torch.randn(2, 4, 3), torch.randn(5, 3)
    labels = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        lm_head_loss(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="labels shape"):
        lm_head_loss(hidden, weight, labels[:, :3])
    with pytest.raises(ValueError, match="weight shape"):
        lm_head_loss(hidden, weight.T, labels)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"chunk_size must be a positive int, got {bad!r}"):
            lm_head_loss(hidden, weight, labels, chunk_size=bad)
    labels[1, 2] = 5
    with pytest.raises(ValueError, match="label 5 is outside the vocabulary"):
        lm_head_loss(hidden, weight, labels)


def test_phi3_names_are_the_same_objects() -> None:
    for name in ("IGNORE_INDEX", "collate", "length_grouped_batches", "load_conversations", "split_train_eval"):
        assert getattr(lora.phi3, name) is getattr(lora.data, name)
        assert getattr(lora.phi3.chat, name) is getattr(lora.data, name)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=9))
def test_collate_packed_keeps_every_token_once(lengths: list[int]) -> None:
    batch = [
        {"input_ids": [100 * i + t for t in range(n)], "labels": [-(100 * i + t) - 1 for t in range(n)]}
        for i, n in enumerate(lengths)
    ]
    out = collate_packed(batch, pad_token_id=7)
    assert out["input_ids"].shape[1] == max(lengths) and out["input_ids"].shape[0] <= len(lengths)
    for i, item in enumerate(batch):
        where = out["segment_ids"] == i
        assert where.sum() == lengths[i] and out["attention_mask"][where].all()
        assert out["input_ids"][where].tolist() == item["input_ids"]  # contiguous, in order
        assert out["position_ids"][where].tolist() == list(range(lengths[i]))
        assert out["labels"][where].tolist() == [IGNORE_INDEX, *item["labels"][1:]]  # never the previous item's
    pad = out["segment_ids"] == -1
    assert (out["attention_mask"][pad] == 0).all() and (out["input_ids"][pad] == 7).all()
    assert (out["labels"][pad] == IGNORE_INDEX).all()
    assert count_targets(out["labels"]) == count_targets(collate(batch, pad_token_id=7)["labels"])


def test_shuffled_batches_and_packing_arguments() -> None:
    batches = shuffled_batches(10, 4, seed=1, epoch=0)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    assert batches == shuffled_batches(10, 4, seed=1, epoch=0) != shuffled_batches(10, 4, seed=1, epoch=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        shuffled_batches(10, 0, seed=1, epoch=0)
    with pytest.raises(ValueError, match="non-empty"):
        collate_packed([], pad_token_id=0)
    with pytest.raises(ValueError, match=r"batch\[0\] has 2 input_ids but 1 labels"):
        collate_packed([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


def test_lm_head_loss_16_bit_head_as_fp32_gemms_gives_the_16_bit_result(monkeypatch) -> None:
    """On a CPU without bf16 matrix units (lora.functional._gemm_dtype) the head's bf16 products run as fp32 GEMMs
    over the upcast values, a block of the head's rows at a time, rounded back: the bf16 products' values."""
    import lora.data

    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(2, 9, 32, generator=gen)).bfloat16().requires_grad_()
    weight = (torch.randn(50, 32, generator=gen) * 0.3).bfloat16().requires_grad_()
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[0, :4] = IGNORE_INDEX
    monkeypatch.setattr(lora.functional, "_BLOCK_ELEMENTS", 8 * 32)  # blocks of 8 rows: 7 blocks, the last of 2

    def run(gemm):
        monkeypatch.setattr(lora.data, "_gemm_dtype", lambda dtype, device: gemm)
        loss = lm_head_loss(hidden, weight, labels, chunk_size=5)
        return [loss.detach(), *torch.autograd.grad(loss, (hidden, weight))]

    emulated, native = run(torch.float32), run(None)
    for got, want in zip(emulated, native):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-3)
    assert torch.equal(emulated[0], native[0]) or (emulated[0] - native[0]).abs() < 1e-4
    same = (emulated[1] == native[1]).float().mean().item()  # the input's gradient: bf16, summed in fp32 either way
    assert same > 0.9, same
