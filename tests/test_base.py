"""lora.base: the contract every layer kind fulfils (tested once, over every kind), and the merge semantics they
share: bounded undo records, merged state dicts, overflow, casts while merged. lora._merge's arithmetic is tested
through them and in test_merge.py."""

import warnings

import pytest
import torch
import torch.nn as nn

import lora
from lora.layers import KINDS, kind_for

# One small layer per kind, with the options that shape its contract (slices, groups, padding mode, ...).
MAKE = {
    "Linear": lambda **kw: lora.Linear(6, 5, **kw),
    "MergedLinear": lambda **kw: lora.MergedLinear(6, 12, enable_lora=[True, False, True], split_sizes=(8, 2, 2), **kw),
    "Embedding": lambda **kw: lora.Embedding(7, 5, padding_idx=0, **kw),
    "Conv1d": lambda **kw: lora.Conv1d(4, 6, 3, groups=2, padding=2, dilation=2, padding_mode="circular", **kw),
    "Conv2d": lambda **kw: lora.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1, **kw),
    "Conv3d": lambda **kw: lora.Conv3d(2, 4, (1, 2, 3), groups=2, padding=(0, 1, 1), **kw),
}
INPUT = {
    "Linear": lambda: torch.randn(3, 6),
    "MergedLinear": lambda: torch.randn(2, 3, 6),
    "Embedding": lambda: torch.tensor([[0, 3, 6], [1, 1, 2]]),
    "Conv1d": lambda: torch.randn(2, 4, 9),
    "Conv2d": lambda: torch.randn(2, 3, 7, 6),
    "Conv3d": lambda: torch.randn(1, 2, 3, 4, 5),
}


def test_every_kind_is_covered_here():
    assert set(MAKE) == set(KINDS)


def build(kind, dtype=torch.float32, seed=0, std=0.5, **kw):
    torch.manual_seed(seed)
    layer = MAKE[kind](r=2, lora_alpha=4, dtype=dtype, **kw)
    with torch.no_grad():
        layer.lora_A.normal_(0, std)
        layer.lora_B.normal_(0, std)
    x = INPUT[kind]()
    return layer, (x if x.dtype == torch.long else x.to(dtype))


def bits(t):
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


# ---------------------------------------------------------------------------------------------------------------
# The contract


@pytest.mark.parametrize("kind", KINDS)
def test_contract_round_trip_through_the_plain_layer(kind):
    layer, x = build(kind)
    cls = KINDS[kind]
    plain = layer.to_plain()
    assert type(plain) is cls.adapts and plain.weight is layer.weight
    assert getattr(plain, "bias", None) is getattr(layer, "bias", None)
    # the kind is found again from the plain layer and the layer's own fields
    fields = {f: getattr(layer, f) for f in cls.lora_fields}
    assert kind_for(plain, fields) is cls
    # rebuilt from its description: the same shapes, and (with the same tensors) the same output
    info = layer.describe()
    rebuilt = cls.from_module(plain, **cls.rebuild_kwargs(info))
    assert rebuilt.weight is layer.weight
    assert {n: tuple(p.shape) for n, p in rebuilt.named_parameters()} == {
        n: tuple(p.shape) for n, p in layer.named_parameters()
    }
    assert cls.lora_shapes(info["base_shape"], info["r"], **{f: info[f] for f in cls.lora_fields}) == {
        n: tuple(getattr(layer, n).shape) for n in layer.lora_param_names()
    }
    rebuilt.load_state_dict(layer.state_dict())
    assert torch.equal(rebuilt(x), layer(x)) and rebuilt.mismatches(info) == []


@pytest.mark.parametrize("kind", KINDS)
def test_contract_delta_weight_is_what_the_forward_adds(kind):
    layer, x = build(kind, dtype=torch.float64)
    plain = layer.to_plain()
    with torch.no_grad():
        base_out = plain(x)
        plain.weight += layer.delta_weight()  # the merged weight, computed apart from merge()
        merged_out = plain(x)
        plain.weight -= layer.delta_weight()
    torch.testing.assert_close(layer(x), merged_out, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(base_out, merged_out)
    assert layer.delta_weight().shape == layer.weight.shape and layer.delta_weight().is_contiguous()


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("Conv1d", "Conv3d")])  # PEFT: no groups/modes
def test_contract_peft_tensors_have_peft_shapes_and_load_back(kind):
    layer, x = build(kind)
    cls = KINDS[kind]
    cls.check_peft_compatible("m", layer)
    rank = layer.lora_A.shape[0] + 1  # zero padded one above its own
    tensors = layer.peft_tensors(rank)
    shape_a, shape_b = cls.peft_shapes(layer.to_plain(), rank)
    assert [tuple(t.shape) for t in tensors.values()] == [shape_a, shape_b] and list(tensors) == list(cls.peft_keys)
    if kind != "MergedLinear":  # a MergedLinear exports as one LoRA over the fused matrix (tested in test_peft_format)
        twin = cls.from_module(layer.to_plain(), r=rank, lora_alpha=layer.scaling * rank)
        twin.load_peft(*tensors.values())
        torch.testing.assert_close(twin(x), layer(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [float("inf"), float("-inf"), float("nan"), 0, -1])
def test_non_finite_or_non_positive_alpha_is_refused(kind, alpha):
    with pytest.raises(ValueError, match="lora_alpha"):
        MAKE[kind](r=2, lora_alpha=alpha)


# ---------------------------------------------------------------------------------------------------------------
# Merged state dicts: always the unmerged weight, so loading never applies the adapter twice


@pytest.mark.parametrize("kind", KINDS)
def test_merged_state_dict_loads_into_a_fresh_layer_without_applying_lora_twice(kind):
    layer, x = build(kind)
    want = layer(x).detach()
    w0 = bits(layer.weight)
    layer.merge()
    state = layer.state_dict()
    assert torch.equal(bits(state["weight"]), w0)  # the unmerged weight, bit for bit
    fresh, _ = build(kind, seed=1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), want)
    assert layer.merged  # saving did not unmerge


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_state_dict_loads_into_a_merged_layer(kind):
    source, x = build(kind, seed=1)
    want = source(x).detach()
    layer, _ = build(kind)
    layer.merge()
    layer.load_state_dict(source.state_dict())
    assert layer.merged  # still merged, now with the loaded adapter folded in
    torch.testing.assert_close(layer(x), want)
    layer.unmerge()
    assert torch.equal(bits(layer.weight), bits(source.weight))
    torch.testing.assert_close(layer(x), want)


def test_merged_model_state_dict_round_trip_issue_example():
    # The issue's reproduction: m = Sequential(Linear(4, 3, r=2)), B non-zero, merge, load into a fresh model.
    torch.manual_seed(0)
    m = nn.Sequential(lora.Linear(4, 3, r=2))
    with torch.no_grad():
        m[0].lora_B.normal_()
    x = torch.randn(5, 4)
    want = m(x).detach()
    lora.merge_lora(m)
    torch.manual_seed(1)
    fresh = nn.Sequential(lora.Linear(4, 3, r=2))
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x), want)


# ---------------------------------------------------------------------------------------------------------------
# Overflow, casts while merged


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_an_overflowing_sum_of_finite_parts(kind):
    layer, _ = build(kind, dtype=torch.float16)
    with torch.no_grad():
        layer.weight.fill_(65000.0)
        layer.lora_A.fill_(20.0)  # delta = 2 * (2 * 20 * 20) = 1600: finite, but past fp16's 65504 when added
        layer.lora_B.fill_(20.0)
    assert torch.isfinite(layer.delta_weight()).all()
    w0 = bits(layer.weight)
    model = nn.Sequential(layer)
    for merge in (lora.merge_lora, lora.merge_and_unload, lambda m: m[0].merge()):
        with pytest.raises(ValueError, match="not finite"):
            merge(model)
        assert model[0] is layer and not layer.merged and torch.equal(bits(layer.weight), w0)


def test_safe_merge_and_unload_is_all_or_nothing_across_layers():
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(4, 4, r=2, dtype=torch.float16), lora.Linear(4, 4, r=2, dtype=torch.float16))
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[1].weight.fill_(65000.0)
        model[1].lora_A.fill_(30.0)  # delta = 0.5 * (2 * 30 * 30) = 900
        model[1].lora_B.fill_(30.0)
    w0 = [bits(m.weight) for m in model]
    with pytest.raises(ValueError, match="1: its merged weight is not finite"):
        lora.merge_and_unload(model)
    assert all(isinstance(m, lora.Linear) and not m.merged for m in model)
    assert all(torch.equal(bits(m.weight), w) for m, w in zip(model, w0))


def test_unmerge_after_a_dtype_round_trip_while_merged_does_not_use_a_stale_record():
    # The issue's reproduction: merge in fp32, .bfloat16(), .float(), unmerge; a weight of 1e-20 came back -2.8e12.
    torch.manual_seed(0)
    layer = lora.Linear(16, 16, r=2)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.weight[0, 0] = 1e-20
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.bfloat16().float()
    layer.unmerge()
    # subtraction after a bf16 round trip: within bf16 rounding of the merged weight
    bound = 2**-8 * (w0.abs() + layer.delta_weight().abs()).max()
    assert (layer.weight - w0).abs().max() <= bound and abs(float(layer.weight[0, 0])) <= bound


def test_a_write_while_merged_invalidates_the_record():
    torch.manual_seed(0)
    layer, _ = build("Linear", std=2.0)
    layer.merge()
    with torch.no_grad():
        layer.weight.data[0, 0] += 1.0  # .data: not even the autograd version counter sees this
    layer.unmerge()
    want = torch.empty_like(layer.weight)
    assert torch.isfinite(layer.weight).all() and not torch.equal(layer.weight, want.fill_(float("nan")))


# ---------------------------------------------------------------------------------------------------------------
# Bounded undo records


def test_realistic_bf16_merge_keeps_at_most_one_byte_per_weight_and_unmerges_exactly():
    # The issue's measurement: Linear(1024, 1024, r=16, bf16), weights and adapter of trained magnitude (std 0.02);
    # the old record was int64, 4x the weight's bytes.
    torch.manual_seed(0)
    layer = lora.Linear(1024, 1024, r=16, lora_alpha=32, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
        layer.lora_A.normal_(0, 0.02)
        layer.lora_B.normal_(0, 0.02)
    w0 = bits(layer.weight)
    layer.merge()
    record = layer._merge_record
    assert record is not None and record.escape_index.numel() > 0  # some weights are swamped: a real test
    assert record.nbytes <= layer.weight.numel()  # <= 1 byte per weight
    naive = (layer.weight.float() - layer.delta_weight()).bfloat16()
    assert not torch.equal(bits(naive), w0)
    layer.unmerge()
    assert torch.equal(bits(layer.weight), w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_update_that_swamps_the_weights_keeps_no_record_and_says_so(dtype):
    torch.manual_seed(0)
    layer = lora.Linear(256, 256, r=4, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 1e-6)
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    w0 = layer.weight.detach().float().clone()
    with pytest.warns(UserWarning, match="no exact undo record"):
        layer.merge()
    assert layer._merge_record is None
    layer.unmerge()  # by subtraction: within one rounding of the merged weight
    merged_scale = float(layer.delta_weight().detach().abs().max())
    assert (layer.weight.float() - w0).abs().max() <= merged_scale * (2**-7 if dtype == torch.bfloat16 else 2**-22)


def test_two_bf16_merge_unmerge_cycles_are_bit_identical():
    torch.manual_seed(0)
    layer, _ = build("MergedLinear", dtype=torch.bfloat16)
    w0 = bits(layer.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within budget: no warning
        for _ in range(2):
            layer.merge()
            layer.unmerge()
    assert torch.equal(bits(layer.weight), w0)


def test_merge_and_unload_keeps_no_record_and_shares_the_weight():
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(8, 8, r=2), nn.ReLU(), lora.Embedding(5, 8, r=2))
    w = model[0].weight
    lora.merge_lora(model)  # a record from an earlier merge is dropped too
    out = lora.merge_and_unload(model)
    assert type(out[0]) is nn.Linear and type(out[2]) is nn.Embedding and out[0].weight is w
    assert not any(isinstance(m, lora.LoRABase) for m in out.modules())
