"""Phi3ForCausalLM against transformers' Phi3ForCausalLM on the same weights (fp32, tiny, seeded), plus config
parsing, checkpoint files, the KV cache, generation and gradient checkpointing."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora.phi3.config import LongRoPEScaling, Phi3Config
from lora.phi3.model import CausalLMOutput, Phi3ForCausalLM, _attention_mask, _KVBuffer

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
VOCAB, HIDDEN, HEADS = 128, 64, 4
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": HEADS,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.1,  # larger than Phi-3's 0.02 so that logits differ visibly between positions
}
# LongRoPE with a short original context so that tiny sequences cross it. head_dim 16 -> 8 factors.
LONGROPE = {
    "max_position_embeddings": 64,
    "original_max_position_embeddings": 16,
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.5 * i for i in range(8)],
    },
}
CASES = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    "longrope": {"num_key_value_heads": 2, **LONGROPE},
    "sliding_window": {"sliding_window": 5},
    "partial_rotary": {"partial_rotary_factor": 0.5, "rope_scaling": None},
    "tied": {"tie_word_embeddings": True},
}


def hf_model(attn_implementation: str = "sdpa", **overrides):
    # deepcopy: transformers writes rope_theta etc. into the rope_scaling dict it is given.
    config = transformers.Phi3Config(**copy.deepcopy({**TINY, **overrides}), attn_implementation=attn_implementation)
    return transformers.Phi3ForCausalLM(config).eval()


def pair(seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """transformers' model and ours, same config (read from transformers' to_dict) and same weights."""
    torch.manual_seed(seed)
    hf = hf_model(attn_implementation, **overrides)
    ours = Phi3ForCausalLM(Phi3Config.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def token_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    # Ids from 3 up: no pad (0), bos (1) or eos (2) inside the prompt.
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("length", [10, 24])
def test_logits_match_transformers(case: str, length: int) -> None:
    # length 10 < original_max_position_embeddings=16 <= 24: LongRoPE's short factors, then its long ones.
    hf, ours = pair(**CASES[case])
    ids = token_ids(2, length)
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids).logits
    assert max_diff(got, expected) <= ATOL


def test_sliding_window_matches_eager_transformers_and_matters() -> None:
    hf, ours = pair(attn_implementation="eager", sliding_window=5)
    unwindowed = Phi3ForCausalLM(Phi3Config.from_dict({**hf.config.to_dict(), "sliding_window": None})).eval()
    unwindowed.load_state_dict(hf.state_dict())
    ids = token_ids(2, 16)
    with torch.no_grad():
        expected, got, full = hf(ids).logits, ours(ids).logits, unwindowed(ids).logits
    assert max_diff(got, expected) <= ATOL
    assert max_diff(got[:, :5], full[:, :5]) <= ATOL  # the first 5 queries see at most 5 keys either way
    assert max_diff(got[:, 5:], full[:, 5:]) > 1e-2  # query 5 no longer sees key 0: window of 5 counts itself


@pytest.mark.parametrize("case", ["gqa", "sliding_window", "longrope"])
def test_padding_matches_transformers(case: str) -> None:
    hf, ours = pair(**CASES[case])
    ids = token_ids(3, 20)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    mask[1, 15:] = 0  # right padding
    with torch.no_grad():
        expected, got = hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    # Padding positions too: a left-padding query attends to nothing and gets zeros, as in transformers' "sdpa".
    # They matter, since the last padding position's logits predict the first real token.
    assert max_diff(got, expected) <= ATOL


def test_loss_and_gradients_match_transformers() -> None:
    hf, ours = pair(**CASES["longrope"])
    hf.train()
    ours.train()
    ids = token_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 7] = -100
    expected = hf(ids, attention_mask=mask, labels=labels)
    got = ours(ids, attention_mask=mask, labels=labels)
    assert got.loss.dtype == torch.float32
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5
    expected.loss.backward()
    got.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        assert max_diff(param.grad, hf_params[name].grad) <= 1e-5, name


def test_state_dict_round_trips_strictly() -> None:
    hf, ours = pair(**CASES["longrope"])
    assert list(ours.state_dict()) == list(hf.state_dict())  # no persistent buffers beyond transformers'
    hf.load_state_dict(ours.state_dict(), strict=True)
    for name in ("model.layers.1.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"):
        assert type(ours.get_submodule(name)) is nn.Linear
    assert ours.get_submodule("model.layers.0.self_attn.qkv_proj").out_features == (4 + 2 * 2) * 16


def test_tied_head_is_the_embedding() -> None:
    _, ours = pair(**CASES["tied"])
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.num_parameters() == sum(p.numel() for p in ours.parameters())


def test_rotary_frequencies_stay_fp32_through_to_dtype() -> None:
    _, ours = pair(**CASES["longrope"])
    rotary = ours.model.rotary_emb
    short, long = rotary.inv_freq.clone(), rotary.long_inv_freq.clone()
    ours.to(torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(rotary.inv_freq, short) and torch.equal(rotary.long_inv_freq, long)


def test_projections_are_called_as_modules() -> None:
    # A LoRA injector swaps the projections for nn.Linear subclasses; the forward must go through them.
    class Counting(nn.Linear):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Counting.calls += 1
            return super().forward(x)

    _, ours = pair()
    for layer in ours.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for parent, name in ((attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")):
            old = getattr(parent, name)
            new = Counting(old.in_features, old.out_features, bias=False)
            new.weight = old.weight
            setattr(parent, name, new)
    ours(token_ids(1, 4))
    assert Counting.calls == 4 * TINY["num_hidden_layers"]


# --------------------------------------------------------------------------- attention mask


@settings(max_examples=40, deadline=None)
@given(
    past=st.integers(0, 6),
    q_len=st.integers(1, 6),
    window=st.one_of(st.none(), st.integers(1, 8)),
    left_pad=st.integers(0, 3),
    data=st.data(),
)
def test_attention_mask_matches_definition(past: int, q_len: int, window: int | None, left_pad: int, data) -> None:
    kv_len = past + q_len
    padding = torch.ones(2, kv_len, dtype=torch.long)
    padding[1, : min(left_pad, kv_len)] = 0
    attention_mask = data.draw(st.sampled_from([None, padding]))
    mask, is_causal = _attention_mask(attention_mask, past, q_len, window, torch.device("cpu"))
    if mask is None:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool)
        if is_causal:
            mask = mask.tril()
    mask = mask.expand(2, 1, q_len, kv_len)
    for b in range(2):
        for i in range(q_len):
            q = past + i
            for j in range(kv_len):
                real_key = attention_mask is None or bool(attention_mask[b, j])
                real_query = attention_mask is None or bool(attention_mask[b, q])
                allowed = j <= q and (window is None or q - j < window) and real_key
                if real_query:  # padding queries may see anything (their outputs are never used)
                    assert bool(mask[b, 0, i, j]) == allowed, (b, i, j)


# --------------------------------------------------------------------------- KV cache and generation


@pytest.mark.parametrize("case", ["gqa", "sliding_window", "longrope"])
def test_cache_steps_match_full_forward(case: str) -> None:
    _, ours = pair(**CASES[case])
    ids = token_ids(2, 12)  # 12 < 16: LongRoPE stays on its short factors in every step, as in the full pass
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :7], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(7, 12):
            out = ours(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert cache[0][0].shape == (2, ours.config.num_key_value_heads, 12, ours.config.head_dim)
    assert max_diff(torch.cat(steps, dim=1), full) <= ATOL


@pytest.mark.parametrize("case", ["gqa", "sliding_window", "longrope"])
def test_greedy_generate_matches_transformers(case: str) -> None:
    # longrope: 10 prompt + 10 new tokens cross original_max_position_embeddings=16 mid-generation.
    hf, ours = pair(**CASES[case])
    ids = token_ids(2, 10)
    expected = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    cached = ours.generate(ids, max_new_tokens=10, eos_token_id=[])
    uncached = ours.generate(ids, max_new_tokens=10, eos_token_id=[], use_cache=False)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)


def test_greedy_generate_left_padded_matches_transformers() -> None:
    hf, ours = pair(**CASES["gqa"])
    ids = token_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids = ids.masked_fill(mask == 0, TINY["pad_token_id"])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(ours.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[]), expected)
    assert torch.equal(
        ours.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[], use_cache=False), expected
    )


def test_generate_stops_at_eos_and_streams() -> None:
    _, ours = pair()
    ids = token_ids(2, 5)
    free = ours.generate(ids, max_new_tokens=6, eos_token_id=[])[:, 5:]  # (2, 6) new tokens, no end token
    eos = int(free[0, 1])
    # Expected: each row follows `free` up to its first eos, then pads; generation stops once every row ended.
    expected, ends = free.clone(), []
    for row in range(2):
        hits = (free[row] == eos).nonzero()
        ends.append(int(hits[0]) + 1 if len(hits) else 6)
        expected[row, ends[-1] :] = TINY["pad_token_id"]
    streamed: list[torch.Tensor] = []
    out = ours.generate(ids, max_new_tokens=6, eos_token_id=eos, streamer=streamed.append)
    assert torch.equal(out[:, :5], ids)
    assert torch.equal(out[:, 5:], expected[:, : max(ends)])
    assert torch.equal(torch.stack(streamed, dim=1), out[:, 5:])


def test_generate_cache_is_written_in_place_and_equals_the_concatenated_one() -> None:
    """generate's cache (_KVBuffer: views of buffers allocated once) gives exactly the logits of the public cache
    (tuples grown by concatenation), prefill then one token at a time with left padding, and every step writes
    into the same two buffers per layer instead of copying the cache."""
    _, ours = pair(**CASES["gqa"])
    ids = token_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        grown, buffered = None, tuple(_KVBuffer(12) for _ in ours.model.layers)
        storages = None
        for start, stop in [(0, 8), (8, 9), (9, 10), (10, 12)]:
            kw = dict(attention_mask=mask[:, :stop], use_cache=True)
            a = ours(ids[:, start:stop], past_key_values=grown, **kw)
            b = ours(ids[:, start:stop], past_key_values=buffered, **kw)
            grown, buffered = a.past_key_values, b.past_key_values
            assert torch.equal(a.logits, b.logits)
            assert all(torch.equal(x, y) for g, c in zip(grown, buffered) for x, y in zip(g, c))
            pointers = [t.untyped_storage().data_ptr() for layer in buffered for t in layer]
            assert storages is None or pointers == storages  # the same buffers, written in place
            storages = pointers
    assert isinstance(buffered[0], _KVBuffer) and buffered[0][0].shape[2] == 12
    with pytest.raises(RuntimeError, match="cannot hold 13"):
        buffered[0].extend(*(t[:, :, :1] for t in buffered[0]))


def test_generate_with_compiled_layers_matches_eager() -> None:
    """compile_layers, then generate (as the example's evaluation does with --compile): the same tokens as eager,
    without a graph break at the in-place cache writes."""
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounter

    _, ours = pair(**CASES["gqa"])
    ids = token_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    eager = ours.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    counter = CompileCounter()
    ours.compile_layers(backend=counter)
    torch._dynamo.utils.counters.clear()
    assert torch.equal(ours.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[]), eager)
    assert counter.frame_count >= 1 and not torch._dynamo.utils.counters["graph_break"]


def test_sampling_is_seeded_and_tiny_top_p_is_greedy() -> None:
    _, ours = pair()
    ids = token_ids(2, 5)

    def sample(seed: int, **kw) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return ours.generate(ids, max_new_tokens=5, temperature=1.0, generator=generator, eos_token_id=[], **kw)

    assert torch.equal(sample(0), sample(0))
    assert torch.equal(sample(0, top_p=1e-6), ours.generate(ids, max_new_tokens=5, eos_token_id=[]))


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"max_new_tokens": -1}])
def test_generate_rejects_bad_arguments(kwargs: dict) -> None:
    _, ours = pair()
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ours.generate(token_ids(1, 3), **{"max_new_tokens": 2, **kwargs})


# --------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_gives_same_gradients() -> None:
    _, ours = pair(**CASES["gqa"])
    ours.train()
    ids = token_ids(2, 12)

    def grads() -> dict[str, torch.Tensor]:
        ours.zero_grad()
        ours(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain = grads()
    ours.gradient_checkpointing_enable()
    assert ours.is_gradient_checkpointing
    checkpointed = grads()
    ours.gradient_checkpointing_disable()
    for name in plain:
        assert max_diff(checkpointed[name], plain[name]) <= 1e-6, name


def test_compiled_layers_give_the_eager_loss_and_gradients_with_checkpointing() -> None:
    """compile_layers with LoRA inside each layer, with and without gradient checkpointing. The test compiles with
    backend="aot_eager" (dynamo's capture and AOT autograd, as the default "inductor" backend, without its C++
    code generation, which took 120 s on this 2-core CPU for this tiny model; the example's --compile uses it)."""
    import lora

    _, ours = pair(**CASES["gqa"])
    lora.phi3.inject(ours, r=4, lora_alpha=8, lora_dropout=0.0)
    for name, p in ours.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.1)  # B = 0 at init would hide a LoRA branch the graph dropped
    lora.mark_only_lora_as_trainable(ours)
    ours.train()
    ids = token_ids(2, 9)

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ours.zero_grad()
        loss = ours(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}

    keys = list(ours.state_dict())
    eager = loss_and_grads()
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    ours.compile_layers(backend=counter)
    assert list(ours.state_dict()) == keys  # files and adapters see the same names
    for checkpointing in (False, True):
        if checkpointing:
            ours.gradient_checkpointing_enable()
        loss, grads = loss_and_grads()
        torch.testing.assert_close(loss, eager[0], rtol=1e-6, atol=1e-6)
        for name, grad in eager[1].items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert counter.frame_count >= 1 and counter.op_count > 0  # the layers did run compiled
    torch._dynamo.reset()


def _recording_backend(graphs: dict[str, list]):
    """aot_eager that keeps AOT autograd's forward and backward graphs (the ATen ops the compiled code calls)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(kind: str):
        def compiler(gm: torch.fx.GraphModule, _inputs) -> object:
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def test_compiled_layers_with_lora_dropout_draw_the_eager_masks_and_keep_the_fused_op() -> None:
    """LoRA dropout 0.3 under compile_layers (torch's defaults, as --compile): no graph break, every adapted
    projection one lora::fused_lora_linear node in the forward graph and one lora::fused_lora_linear_backward node
    in the backward (no dropout op of the compiler's), and, from the same seed, the compiled model's loss and LoRA
    gradients equal eager's, with and without gradient checkpointing: the op draws the eager random stream, in
    eager's order, and the checkpoint's recompute draws the forward's positions again (else the recompute fails its
    check or A's gradients differ). aot_eager, as the test above; tests/test_functional.py compiles the op with
    inductor."""
    from torch._dynamo.utils import counters

    import lora

    _, ours = pair(**CASES["gqa"])
    lora.phi3.inject(ours, r=4, lora_alpha=8, lora_dropout=0.3)
    for name, p in ours.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.1)
    lora.mark_only_lora_as_trainable(ours)
    ours.train()

    def loss_and_grads(seed: int = 5, length: int = 9) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ours.zero_grad()
        torch.manual_seed(seed)
        ids = token_ids(2, length)
        loss = ours(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}

    eager = {length: loss_and_grads(length=length) for length in (9, 13)}
    assert not torch.equal(loss_and_grads(seed=6)[0], eager[9][0])  # another seed, other masks: the dropout is live
    torch._dynamo.reset()
    counters.clear()
    graphs: dict[str, list] = {"forward": [], "backward": []}
    ours.compile_layers(backend=_recording_backend(graphs))
    # the second length recompiles with a symbolic sequence length, as the example's batches do
    for checkpointing, length in ((False, 9), (True, 9), (True, 13)):
        if checkpointing:
            ours.gradient_checkpointing_enable()
        loss, grads = loss_and_grads(length=length)
        torch.testing.assert_close(loss, eager[length][0], rtol=1e-6, atol=1e-6)
        for name, grad in eager[length][1].items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    ours.gradient_checkpointing_disable()
    assert not counters["graph_break"], dict(counters["graph_break"])
    hidden_inputs = [  # each graph's (batch, length, hidden) input
        next(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta["val"], torch.Tensor))
        for gm in graphs["forward"]
    ]
    assert any(isinstance(t.shape[1], torch.SymInt) for t in hidden_inputs)  # a graph for any length was traced
    assert graphs["forward"] and graphs["backward"]

    def targets(kind: str) -> list[object]:
        return [node.target for gm in graphs[kind] for node in gm.graph.nodes if node.op == "call_function"]

    adapted = 4  # qkv_proj, o_proj, gate_up_proj, down_proj per layer
    for gm_targets in ([node.target for node in gm.graph.nodes] for gm in graphs["forward"]):
        assert gm_targets.count(torch.ops.lora.fused_lora_linear.default) == adapted
    for gm_targets in ([node.target for node in gm.graph.nodes] for gm in graphs["backward"]):
        assert gm_targets.count(torch.ops.lora.fused_lora_linear_backward.default) == adapted
    random_ops = {torch.ops.aten.native_dropout.default, torch.ops.aten.bernoulli.p, torch.ops.aten.rand.default}
    assert not random_ops & set(targets("forward"))
    torch._dynamo.reset()


def test_a_decoder_layer_with_lora_dropout_compiles_as_one_graph() -> None:
    """fullgraph=True on one decoder layer (LoRA dropout 0.3 in every projection): dynamo captures it whole, and its
    output and LoRA gradients equal eager's from the same seed."""
    import lora

    _, ours = pair(**CASES["gqa"])
    lora.phi3.inject(ours, r=4, lora_alpha=8, lora_dropout=0.3)
    ours.train()
    layer = ours.model.layers[1]
    x = torch.randn(2, 7, HIDDEN, requires_grad=True)
    cos, sin = ours.model.rotary_emb(torch.arange(7)[None], x.dtype, 6)

    def run(fn) -> list[torch.Tensor]:
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(3)
        out, _ = fn(x, cos, sin, None, True, None, False)
        out.square().sum().backward()
        return [
            out.detach(),
            x.grad,
            *(p.grad for n, p in layer.named_parameters() if n.endswith(("lora_A", "lora_B"))),
        ]

    eager = run(layer)
    torch._dynamo.reset()
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    torch._dynamo.reset()
    assert len(compiled) == 2 + 8
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("case", ["mha", "gqa", "sliding_window", "longrope"])
def test_packed_batch_gives_the_unpacked_loss_and_gradients(case: str) -> None:
    """Conversations packed into shared rows (collate_packed: positions restart, block-diagonal causal mask) train
    exactly as the padded batch: the summed loss and every gradient within 1e-5 (fp32)."""
    from lora.data import IGNORE_INDEX, collate, collate_packed, lm_head_loss

    _, ours = pair(**CASES[case])
    ours.train()
    gen = torch.Generator().manual_seed(3)
    items = []
    for n in (11, 3, 7, 4, 2, 9, 1):
        ids = torch.randint(3, VOCAB, (n,), generator=gen)
        labels = ids.clone()
        labels[: n // 3] = IGNORE_INDEX  # a "prompt" without labels, as a chat's user turn
        items.append({"input_ids": ids.tolist(), "labels": labels.tolist()})

    def loss_and_grads(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ours.zero_grad()
        extra = {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}
        hidden, _ = ours.model(batch["input_ids"], batch["attention_mask"], **extra)
        loss = lm_head_loss(hidden, ours.lm_head.weight, batch["labels"], reduction="sum")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}

    padded, packed = collate(items, pad_token_id=0), collate_packed(items, pad_token_id=0)
    assert packed["input_ids"].shape == (4, 11)  # 7 conversations in 4 rows of the longest one's length
    assert sorted(packed["segment_ids"][packed["segment_ids"] >= 0].bincount().tolist()) == [1, 2, 3, 4, 7, 9, 11]
    expected, expected_grads = loss_and_grads(padded)
    got, got_grads = loss_and_grads(packed)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)

    # the model's labels= path takes the packed row as well (mean over the same targets)
    out = ours(
        packed["input_ids"],
        packed["attention_mask"],
        packed["position_ids"],
        labels=packed["labels"],
        segment_ids=packed["segment_ids"],
    )
    n = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(out.loss * n, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="segment_ids must be"):
        ours(packed["input_ids"], segment_ids=packed["segment_ids"][:, :-1])


# --------------------------------------------------------------------------- config


def test_config_reads_hub_layout_and_round_trips() -> None:
    hub = {**TINY, "num_key_value_heads": 2, "rope_theta": 5000.0, "architectures": ["Phi3ForCausalLM"], **LONGROPE}
    hub["rope_scaling"] = {**hub["rope_scaling"], "type": "su"}  # the old name for LongRoPE
    hub["eos_token_id"] = [2, 5]
    hub["some_unknown_field"] = 1
    before = copy.deepcopy(hub)
    config = Phi3Config.from_dict(hub)
    assert hub == before  # never mutated
    assert config.rope_theta == 5000.0 and config.num_key_value_heads == 2 and config.head_dim == 16
    assert config.eos_token_ids == (2, 5)
    assert config.rope_scaling == LongRoPEScaling(
        short_factor=tuple(LONGROPE["rope_scaling"]["short_factor"]),
        long_factor=tuple(LONGROPE["rope_scaling"]["long_factor"]),
    )
    written = config.to_dict()
    assert written["model_type"] == "phi3" and written["architectures"] == ["Phi3ForCausalLM"]
    assert written["rope_scaling"]["type"] == "longrope" and written["rope_theta"] == 5000.0
    assert Phi3Config.from_dict(written) == config
    # transformers reads what we write, and derives the same LongRoPE attention factor.
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config.from_dict(written))
    assert hf.model.rotary_emb.attention_scaling == pytest.approx(config.rope_attention_factor, rel=1e-12)
    assert config.rope_attention_factor > 1.0


def test_config_reads_transformers5_layout(tmp_path) -> None:
    overrides = {**TINY, "num_key_value_heads": 2, "partial_rotary_factor": 0.5, "sliding_window": 7, **LONGROPE}
    overrides["rope_scaling"] = {
        "type": "longrope",
        "short_factor": [1.0, 1.5, 2.0, 2.5],
        "long_factor": [3.0, 3.5, 4.0, 4.5],
    }
    transformers.Phi3Config(**overrides).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_scaling" not in saved
    config = Phi3Config.from_json_file(tmp_path / "config.json")
    assert config.rotary_dim == 8 and config.sliding_window == 7
    assert config.rope_scaling.long_factor == (3.0, 3.5, 4.0, 4.5)
    assert config.original_max_position_embeddings == 16 and config.rope_theta == 10000.0

    transformers.Phi3Config(**TINY).save_pretrained(tmp_path)  # rope_parameters {"rope_type": "default", ...}
    assert Phi3Config.from_json_file(tmp_path / "config.json").rope_scaling is None


@settings(max_examples=30, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4, 8]),
    groups=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 16]),
    rotary=st.sampled_from([0.5, 1.0]),
    longrope=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 4096)),
    eos=st.one_of(st.integers(0, 99), st.lists(st.integers(0, 99), min_size=1, max_size=3)),
    tied=st.booleans(),
)
def test_config_round_trips(heads, groups, head_dim, rotary, longrope, window, eos, tied) -> None:
    n = int(head_dim * rotary) // 2
    config = Phi3Config(
        vocab_size=100,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // groups),
        partial_rotary_factor=rotary,
        rope_scaling=LongRoPEScaling(tuple(range(1, n + 1)), tuple([2.5] * n)) if longrope else None,
        max_position_embeddings=8192,
        sliding_window=window,
        eos_token_id=eos,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    assert Phi3Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"hidden_size": 66}, "num_attention_heads=4"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"attention_bias": True}, "attention_bias"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"pad_token_id": 500}, "pad_token_id=500"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_parameters": {"rope_type": "yarn2"}}, "yarn2"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8}}, "short_factor"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 9}}, "long_factor"),
        ({"rope_theta": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 2.0}}, "rope_theta"),
    ],
)
def test_config_rejects_bad_values(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Phi3Config.from_dict({**TINY, **overrides})


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("writer", ["transformers", "ours"])
def test_sharded_checkpoint_loads_like_transformers(tmp_path, writer: str) -> None:
    hf, ours = pair(**CASES["longrope"])
    (hf if writer == "transformers" else ours).save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in hf.parameters())
    loaded = Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    hf_loaded = transformers.Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.rotary_emb.long_inv_freq.device.type == "cpu"  # rebuilt off the meta device
    ids = token_ids(2, 20)
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, hf_loaded(ids).logits) <= ATOL


def test_single_file_tied_checkpoint_and_dtype(tmp_path) -> None:
    hf, _ = pair(**CASES["tied"])
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.model.norm.weight, hf.model.norm.weight.to(torch.bfloat16))


def test_resave_as_single_file_removes_stale_shards(tmp_path) -> None:
    _, ours = pair()
    ours.save_pretrained(tmp_path, max_shard_size="200KB")
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def _edit_shard(path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_checkpoint_errors(tmp_path) -> None:
    _, ours = pair()
    ours.save_pretrained(tmp_path, max_shard_size="200KB")
    first, second = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k, v in weight_map.items() if v == second.name)

    second.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=rf"{second.name}.*{key}"):
        Phi3ForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "moved").rename(second)

    _edit_shard(second, lambda t: t.update({key: torch.zeros(3, 3)}))
    with pytest.raises(ValueError, match=rf"{second.name}.*{key}.*\(3, 3\)"):
        Phi3ForCausalLM.from_pretrained(tmp_path)

    _edit_shard(second, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"lacks.*{key}"):
        Phi3ForCausalLM.from_pretrained(tmp_path)

    _edit_shard(first, lambda t: t.update({"model.extra.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match=rf"model\.extra\.weight.*{first.name}"):
        Phi3ForCausalLM.from_pretrained(tmp_path)

    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Phi3ForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Phi3ForCausalLM.from_pretrained(tmp_path)


def test_output_is_a_dataclass_with_cache() -> None:
    _, ours = pair()
    out = ours(token_ids(1, 3), use_cache=True)
    assert isinstance(out, CausalLMOutput) and out.loss is None and len(out.past_key_values) == 2
