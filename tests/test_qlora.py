"""lora.qlora: LoRA over NF4 base weights. Oracles: the same layer over the dequantized weight in fp32/fp64 (what a
4-bit base means), bitsandbytes' CPU Linear4bit, and adapter files/PEFT exports read back over a full-precision
base. The Phi-3 oracle (transformers + bitsandbytes + PEFT) is in tests/phi3/test_qlora.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lora
import lora.functional
from lora import nf4
from lora.qlora import Linear4bit, Weight4bit, linear4bit


def model(seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128, bias=bias), nn.GELU(), nn.Linear(128, 64, bias=bias), nn.GELU(), nn.Linear(64, 32, bias=bias)
    )


def randomize_adapters(m: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def dequantized_copy(m: nn.Module) -> nn.Module:
    """The same model with every 4-bit weight dequantized (fp32), sharing nothing with ``m``."""
    import copy

    return lora.dequantize(copy.deepcopy(m))


# -- the frozen 4-bit linear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_is_the_linear_of_the_dequantized_weight(dtype):
    torch.manual_seed(0)
    base = nn.Linear(128, 96).to(dtype)
    q = Linear4bit.from_linear(base)
    w = q.weight.dequantize()
    assert w.dtype == dtype and isinstance(q, nn.Linear)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = q(x), nn.functional.linear(x_ref, w, q.bias.detach())
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    assert q.bias.grad is not None and torch.allclose(q.bias.grad, g.sum(dim=(0, 1)))
    assert not any(p.requires_grad for n, p in q.named_parameters() if n != "bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantizing_a_chunk_of_rows_at_a_time_gives_the_same_product(dtype, monkeypatch):
    """On the CPU the weight is dequantized in chunks of rows (never whole): the output rows are the same products,
    and the input gradient sums the chunks' products (the same values up to fp32 summation order)."""
    import lora.qlora

    torch.manual_seed(0)
    base = nn.Linear(128, 200).to(dtype)  # 200 rows: chunks of 64, 64, 64 and a last one of 8
    q = Linear4bit.from_linear(base)
    w = q.weight.dequantize()
    monkeypatch.setattr(lora.functional, "_BLOCK_ELEMENTS", 64 * 128)
    assert [(c.start, c.stop) for c in lora.qlora._row_chunks(q.weight.nf4(), torch.device("cpu"))] == [
        (0, 64),
        (64, 128),
        (128, 192),
        (192, 200),
    ]
    dequantized = []
    real = nf4.NF4Weight.dequantize
    monkeypatch.setattr(nf4.NF4Weight, "dequantize", lambda self, *a, **k: dequantized.append(k) or real(self, *a, **k))
    x = torch.randn(3, 7, 128, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = q(x)
    y_ref = nn.functional.linear(x_ref.float(), w.float(), q.bias.detach().float())
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.float())
    assert len(dequantized) == 8 and all(k["rows"].stop - k["rows"].start <= 64 for k in dequantized)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_products_as_fp32_gemms_give_the_16_bit_result(dtype, monkeypatch):
    """On a CPU without 16-bit matrix units (lora.functional._gemm_dtype) the 4-bit linear multiplies the exactly
    upcast 16-bit operands in fp32 and rounds back: the values of the 16-bit GEMM, up to fp32 accumulation order."""
    import lora.qlora

    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(192, 160).to(dtype))
    x = torch.randn(3, 40, 192, dtype=dtype, requires_grad=True)

    def run(gemm_dtype):
        x.grad = q.bias.grad = None
        chosen = []
        monkeypatch.setattr(lora.qlora, "_gemm_dtype", lambda dt, dev: chosen.append(dt) or gemm_dtype)
        y = q(x)
        y.float().square().sum().backward()
        assert chosen == [dtype]
        return y.detach(), x.grad.clone(), q.bias.grad.clone()

    emulated, native = run(torch.float32), run(None)
    ulp = torch.finfo(dtype).eps
    for got, want in zip(emulated, native):
        assert got.dtype == want.dtype == dtype
        assert (got == want).float().mean().item() > 0.95  # bit for bit but where the fp32 sums round otherwise
        torch.testing.assert_close(got, want, rtol=2 * ulp, atol=2 * ulp * float(want.abs().max()))


def test_backward_saves_no_full_precision_weight():
    torch.manual_seed(0)
    layer = lora.Linear(256, 512, r=4)
    assert lora.quantize(layer) == [""] and isinstance(layer.weight, Weight4bit)  # a bare LoRA layer: in place
    x = torch.randn(2, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert y.grad_fn is not None
    assert max(saved) < 256 * 512 // 8, saved  # the input, adapter factors and (…, r) activations, never (512, 256)


def test_matches_bitsandbytes_linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = nn.Linear(128, 64)
    theirs = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    theirs.load_state_dict(base.state_dict())
    theirs = theirs.to("cpu")  # quantizes
    ours = Linear4bit.from_linear(base)
    assert torch.equal(ours.weight.packed, theirs.weight.data.reshape(-1))
    x = torch.randn(7, 128)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


# -- LoRA layers over a 4-bit base -----------------------------------------------------------------------------


def adapted_64_to_96(kind: str) -> nn.Module:
    """A seeded Linear (or a MergedLinear adapting slices 0 and 2 of 3) 64 -> 96, r=4, with non-zero adapters."""
    torch.manual_seed(0)
    if kind == "Linear":
        layer = lora.Linear(64, 96, r=4, lora_alpha=8)
    else:
        layer = lora.MergedLinear(64, 96, r=4, lora_alpha=8, enable_lora=[True, False, True])
    randomize_adapters(layer)
    return layer


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("kind", ["Linear", "MergedLinear"])
def test_lora_over_nf4_equals_lora_over_the_dequantized_weight(kind, chunked, monkeypatch):
    """Also with the weight dequantized in chunks of rows (a MergedLinear adds its slices into that output)."""
    if chunked:
        monkeypatch.setattr(lora.functional, "_BLOCK_ELEMENTS", 64 * 64)  # 96 rows: chunks of 64 and 32
    layer = adapted_64_to_96(kind)
    holder = nn.Sequential(layer)
    assert lora.quantize(holder) == ["0"]
    assert type(holder[0]) is type(layer) and isinstance(layer, nn.Linear) and isinstance(layer.weight, Weight4bit)
    reference = dequantized_copy(holder).double()
    x = torch.randn(4, 64, requires_grad=True)
    y = holder(x)
    x_ref = x.detach().double().requires_grad_()
    y_ref = reference(x_ref)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    torch.testing.assert_close(x.grad, x_ref.grad.float(), rtol=1e-5, atol=1e-5)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(
            getattr(layer, name).grad, getattr(reference[0], name).grad.float(), rtol=1e-5, atol=1e-5
        )
    assert layer.delta_weight().shape == layer.weight.shape


@pytest.mark.parametrize("kind", ["Linear", "MergedLinear"])
def test_bf16_lora_over_nf4_multiplies_in_fp32_where_bf16_is_emulated(kind, monkeypatch):
    """On a CPU without bf16 matrix units (lora.functional._gemm_dtype) no product of a bf16 LoRA layer over NF4 runs
    in bf16 (torch would emulate it, many times slower): the 4-bit product and the adapter's run in fp32 over the
    bf16 values; the output and the gradients stay bf16, close to the fp64 reference."""
    monkeypatch.setattr(lora.functional, "_cpu_has_16bit_gemm", lambda dt: False)
    monkeypatch.setattr(lora.functional, "_BLOCK_ELEMENTS", 64 * 64)
    layer = adapted_64_to_96(kind)
    layer.to(torch.bfloat16)
    lora.quantize(layer)
    reference = dequantized_copy(nn.Sequential(layer)).double()
    products = (F.linear, torch.mm, torch.matmul, torch.addmm, torch.Tensor.__matmul__, torch.Tensor.addmm_)
    seen = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in products:
                seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    with Record():
        y = layer(x)
    assert seen and all(dtypes == {torch.float32} for dtypes in seen), seen
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference(x.detach().double()), rtol=2e-2, atol=2e-2)


def test_inject_into_quantized_model_and_train_only_adapters():
    m = model()
    names = lora.quantize(m)
    assert names == ["0", "2", "4"]
    lora.inject(m, ["0", "2"], r=4)
    assert [type(m[i]) for i in (0, 2, 4)] == [lora.Linear, lora.Linear, Linear4bit]
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    packed = m[0].weight.packed.clone()
    x = torch.randn(8, 64)
    losses = []
    for _ in range(3):
        loss = m(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and torch.equal(m[0].weight.packed, packed)


def test_quantizing_after_injection_equals_injecting_after_quantization():
    a, b = model(), model()
    lora.inject(a, ["0", "2"], r=4)
    lora.quantize(a)
    lora.quantize(b)
    lora.inject(b, ["0", "2"], r=4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))


def test_state_dict_is_safetensors_and_round_trips(tmp_path):
    m, other = model(0), model(1)
    for x in (m, other):
        lora.quantize(x, targets=["0", "4"])
        lora.inject(x, ["0"], r=4)
    randomize_adapters(m)
    sd = m.state_dict()
    assert {"0.weight.packed", "0.weight.absmax_codes", "4.weight.absmax_offset", "2.weight"} <= set(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    other.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(3, 64)
    assert torch.equal(m(x), other(x))


def test_moving_and_casting_keep_the_4bit_tensors():
    m = model()
    lora.quantize(m)
    q = m[0].weight
    packed, codes, offset = q.packed, q.absmax_codes, q.absmax_offset
    m.to(torch.bfloat16)
    assert q.packed.dtype == torch.uint8 and q.absmax_offset.dtype == torch.float32
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax_codes, codes) and torch.equal(q.absmax_offset, offset)
    assert m[0].bias.dtype == torch.bfloat16
    assert m(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_autocast_computes_in_its_dtype():
    m = model()
    lora.quantize(m)
    lora.inject(m, ["0"], r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(2, 64))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m[0].lora_A.grad is not None


# -- merging, unloading, adapter files ---------------------------------------------------------------------------


def test_merge_into_4bit_is_refused_and_merge_and_unload_dequantizes():
    m = model()
    lora.quantize(m)
    lora.inject(m, ["0", "2"], r=4)
    randomize_adapters(m)
    x = torch.randn(5, 64)
    before = m(x)
    packed = m[0].weight.packed.clone()
    with pytest.raises(ValueError, match="4-bit.*dequantize"):
        lora.merge_lora(m)
    assert not m[0].merged and torch.equal(m[0].weight.packed, packed) and torch.equal(m(x), before)
    lora.merge_and_unload(m)
    assert type(m[0]) is nn.Linear and type(m[2]) is nn.Linear and type(m[4]) is Linear4bit
    assert m[0].weight.dtype == torch.float32
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_into_bf16_after_dequantizing():
    m = model()
    lora.quantize(m)
    lora.inject(m, ["0"], r=4)
    randomize_adapters(m)
    x = torch.randn(5, 64)
    before = m(x)
    lora.dequantize(m, dtype=torch.bfloat16)
    assert not any(lora.qlora.is_quantized(x) for x in m.modules())
    lora.merge_and_unload(m)
    assert type(m[0]) is nn.Linear and m[0].weight.dtype == torch.bfloat16
    m.to(torch.bfloat16)
    torch.testing.assert_close(m(x.bfloat16()).float(), before, rtol=0.05, atol=0.05)  # bf16 rounding only


def test_to_plain_keeps_the_4bit_weight():
    layer = nn.Sequential(lora.Linear(64, 64, r=2))
    lora.quantize(layer)
    plain = layer[0].to_plain()
    assert type(plain) is Linear4bit and plain.weight is layer[0].weight


def test_adapter_file_is_an_ordinary_lora_adapter(tmp_path):
    q = model()
    lora.quantize(q)
    lora.inject(q, ["0", "2"], r=4)
    randomize_adapters(q)
    lora.save_lora(q, tmp_path / "a.safetensors")
    # over the dequantized base (full precision): the same function
    full = model()
    with torch.no_grad():
        for i in (0, 2, 4):
            full[i].weight.copy_(lora.qlora.dequantize_layer(q[i]).weight if i == 4 else q[i].weight.dequantize())
    lora.load_lora(full, tmp_path / "a.safetensors")
    x = torch.randn(3, 64)
    torch.testing.assert_close(full(x), q(x), rtol=1e-5, atol=1e-6)
    # and over a fresh 4-bit base
    again = model()
    lora.quantize(again)
    lora.load_lora(again, tmp_path / "a.safetensors")
    assert torch.equal(again(x), q(x))


def test_peft_export_round_trips(tmp_path):
    q = model(bias=False)
    lora.quantize(q)
    lora.inject(q, ["0", "2"], r=4)
    randomize_adapters(q)
    lora.export_peft(q, tmp_path / "peft")
    back = model(bias=False)
    lora.quantize(back)
    lora.import_peft(back, tmp_path / "peft")
    x = torch.randn(3, 64)
    torch.testing.assert_close(back(x), q(x), rtol=1e-6, atol=1e-6)


# -- bad input ---------------------------------------------------------------------------------------------------


def test_quantize_rejects_bad_input_and_leaves_the_model_alone():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="'nope' matched no module"):
        lora.quantize(m, targets=["0", "nope"])
    with pytest.raises(ValueError, match="GELU"):
        lora.quantize(m, targets=["1"])
    with pytest.raises(TypeError, match="string"):
        lora.quantize(m, targets="0")
    with pytest.raises(ValueError, match="block_size"):
        lora.quantize(m, block_size=48)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())

    tied = nn.Module()
    tied.embed = nn.Embedding(10, 8)
    tied.head = nn.Linear(8, 10, bias=False)
    tied.head.weight = tied.embed.weight
    with pytest.raises(ValueError, match="shared with"):
        lora.quantize(tied)

    merged = nn.Sequential(lora.Linear(8, 8, r=2))
    randomize_adapters(merged)
    lora.merge_lora(merged)
    with pytest.raises(ValueError, match="merged"):
        lora.quantize(merged)

    gpt2 = nn.Sequential(lora.Linear(8, 8, r=2, fan_in_fan_out=True))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        lora.quantize(gpt2)

    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        lora.quantize(nn.Sequential(nn.Linear(8, 8).double()))

    with pytest.raises(ValueError, match="meta"):
        lora.quantize(nn.Sequential(nn.Linear(8, 8, device="meta")))

    with pytest.raises(ValueError, match="dtype"):
        lora.dequantize(m, dtype=torch.int8)
    with pytest.raises(ValueError, match="Linear4bit.from_linear"):
        lora.quantize(nn.Linear(8, 8))


def test_4bit_weight_cannot_train():
    q = Weight4bit.quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match="frozen"):
        q.requires_grad_(True)
    assert not q.requires_grad and q.requires_grad_(False) is q


def test_linear4bit_function_on_the_nf4_tensors_directly():
    w = torch.randn(32, 64)
    q = Weight4bit(nf4.quantize(w, double_quant=False))
    x = torch.randn(2, 64)
    assert torch.equal(linear4bit(x, q), x @ q.dequantize().T)


def test_pissa_over_4bit_is_refused_before_anything_changes():
    """PiSSA / OLoRA subtract the initial adapter from the base weight, which 4 bits cannot hold exactly: refused,
    whichever comes first (inject over 4 bits, or quantize over them)."""
    m = model()
    lora.quantize(m)
    packed = m[0].weight.packed.clone()
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match="4-bit"):
            lora.inject(m, ["0"], r=4, init_lora_weights=init)
        assert type(m[0]) is Linear4bit and torch.equal(m[0].weight.packed, packed)
    m = model()
    lora.inject(m, ["0"], r=4, init_lora_weights="pissa")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="cannot quantize '0'"):
        lora.quantize(m)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(x, Weight4bit) for x in m.modules())


@pytest.mark.parametrize("kind", ["Linear", "MergedLinear"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_over_nf4_equals_dora_over_the_dequantized_weight(kind, dropout):
    """QDoRA: DoRA over a 4-bit base is DoRA over the weight the 4 bits encode (forward, input gradient, A / B /
    magnitude gradients), with the weight norm taken of the dequantized weight and cached."""
    torch.manual_seed(0)
    if kind == "Linear":
        q = lora.Linear(64, 96, r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True)
    else:
        q = lora.MergedLinear(
            64, 96, r=4, lora_alpha=8, lora_dropout=dropout, enable_lora=[True, False, True], use_dora=True
        )
    with torch.no_grad():
        q.lora_B.normal_(0, 0.1)
        q.lora_magnitude.mul_(1.5)
    lora.quantize(q)
    assert isinstance(q.weight, Weight4bit)
    dense = dequantized_copy(q)
    assert isinstance(dense.weight, nn.Parameter)
    x = torch.randn(5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    y = q(x)
    torch.manual_seed(1)
    y2 = dense(x2)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for name in ("lora_A", "lora_B", "lora_magnitude"):
        torch.testing.assert_close(getattr(q, name).grad, getattr(dense, name).grad, rtol=1e-5, atol=1e-6)
    # the norm of the 4-bit weight is computed once while nothing changes
    calls = []
    original = q._weight_norm
    q._weight_norm = lambda *a, **k: calls.append(1) or original(*a, **k)
    q.eval()
    with torch.no_grad():
        q(x)
        q(x)
    assert len(calls) == 0
    # merge_and_unload dequantizes, then merges the DoRA update: the plain layer computes what the adapter did
    plain = lora.merge_and_unload(q)
    assert type(plain) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(x), dense.eval()(x), rtol=1e-5, atol=1e-5)


def test_named_adapters_over_a_4bit_base(tmp_path):
    """The routed forward (several adapters, mixed batches) computes the frozen 4-bit GEMM too."""
    m = model()
    lora.quantize(m)
    lora.inject(m, ["0", "2"], r=4)
    randomize_adapters(m, seed=1)
    x = torch.randn(6, 64)
    alone = m(x)
    other = model()
    lora.quantize(other)
    lora.inject(other, ["0", "2"], r=2)
    randomize_adapters(other, seed=2)
    lora.save_lora(other, tmp_path / "b.safetensors")
    lora.load_lora(m, tmp_path / "b.safetensors", adapter_name="b")
    with lora.adapter_batch(m, [None, "b", None, "b", None, None]):
        mixed = m(x)
    torch.testing.assert_close(mixed[[1, 3]], other(x)[[1, 3]], rtol=0, atol=1e-6)
    lora.set_adapter(m, None)  # rows without an adapter are the 4-bit base alone
    base = m(x)
    torch.testing.assert_close(mixed[[0, 2, 4, 5]], base[[0, 2, 4, 5]], rtol=0, atol=1e-6)
    assert not torch.allclose(base, alone)  # the default adapter does change the output
