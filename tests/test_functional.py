"""lora.functional: the fused LoRA linear and its dropout, against the same math written with plain torch ops."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lora
from lora.functional import dropout_positions, fused_lora_linear


def test_dropout_positions_are_bernoulli():
    torch.manual_seed(0)
    n, p = 400_000, 0.05
    pos = dropout_positions(n, p)
    assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all())  # sorted, no repeats
    assert 0 <= int(pos[0]) and int(pos[-1]) < n
    sd = math.sqrt(n * p * (1 - p))
    assert abs(pos.numel() - n * p) < 6 * sd
    # Independence: the gaps are geometric, so P(gap == 1) = p and the mean gap is 1 / p.
    gaps = (pos[1:] - pos[:-1]).double()
    assert abs(float((gaps == 1).double().mean()) - p) < 0.01
    assert abs(float(gaps.mean()) - 1 / p) < 0.5
    # Every region of the range is hit at the same rate (first and last tenth included).
    counts = torch.bincount(pos * 10 // n, minlength=10).double()
    assert float((counts - n * p / 10).abs().max()) < 6 * math.sqrt(n * p / 10)


def test_dropout_positions_reproduce_from_the_seed():
    torch.manual_seed(1)
    a = dropout_positions(10_000, 0.3)
    torch.manual_seed(1)
    assert torch.equal(a, dropout_positions(10_000, 0.3))


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_dropout_positions_rejects_p(p):
    with pytest.raises(ValueError, match="p="):
        dropout_positions(10, p)


def reference(x, W, b, A, B, s, p, blocks, r, state):
    """The same computation with plain ops and an explicit mask, replaying the RNG from ``state``."""
    mask = torch.ones(x.numel(), dtype=x.dtype)
    if p > 0:
        torch.set_rng_state(state)
        mask[dropout_positions(x.numel(), p)] = 0
    xd = x * mask.view_as(x) / (1 - p)
    out = F.linear(x, W, b)
    cols = []
    for start, size, b_row, a_row in blocks:
        upd = s * (xd @ A[a_row : a_row + r].T @ B[b_row : b_row + size].T)
        cols.append(F.pad(upd, (start, W.shape[0] - start - size)))
    return out + sum(cols)


@settings(max_examples=25, deadline=None)
@given(
    p=st.sampled_from([0.0, 0.1, 0.5]),
    layout=st.sampled_from([((0, 6, 0, 0),), ((0, 4, 0, 0), (5, 1, 4, 2)), ((2, 2, 0, 0),)]),
    lead=st.sampled_from([(3,), (2, 5), (1, 1, 4)]),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_fused_matches_reference_fp64(p, layout, lead, bias, seed):
    torch.manual_seed(seed)
    r = 2
    rows = max(b_row + size for _, size, b_row, _ in layout)
    x = torch.randn(*lead, 7, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if bias else None
    A = torch.randn(r * len(layout), 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(rows, r, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    y = fused_lora_linear(x, W.T, b, A, B, 0.7, p, layout, r)
    y_ref = reference(x, W, b, A, B, 0.7, p, layout, r, state)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    inputs = [t for t in (x, W, b, A, B) if t is not None]
    for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_ref, inputs, g)):
        torch.testing.assert_close(got, want)


def test_layers_use_the_fused_path_with_the_same_math():
    """lora.Linear / MergedLinear in train mode with dropout equal the plain-op reference, gradients included."""
    torch.manual_seed(0)
    layer = lora.MergedLinear(
        8, 12, r=2, lora_alpha=3, lora_dropout=0.25, enable_lora=[True, False, True], split_sizes=(8, 2, 2)
    ).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    y = layer(x)
    blocks = [(0, 8, 0, 0), (10, 2, 8, 2)]
    y_ref = reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 1.5, 0.25, blocks, 2, state)
    torch.testing.assert_close(y, y_ref)
    assert not torch.allclose(y, layer.eval()(x))  # dropout was really applied in train mode


def _saved_bytes(layer, x) -> int:
    """Bytes of distinct storages autograd keeps for the backward of ``layer(x)``, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def test_dropout_keeps_no_second_copy_of_the_input():
    torch.manual_seed(0)
    x = torch.randn(256, 512, requires_grad=True)
    without = _saved_bytes(lora.Linear(512, 512, r=16, lora_dropout=0.0), x)
    with_dropout = _saved_bytes(lora.Linear(512, 512, r=16, lora_dropout=0.05), x)
    plain = _saved_bytes(torch.nn.Sequential(torch.nn.Dropout(0.05), torch.nn.Linear(512, 16)), x)
    assert without >= x.numel() * 4  # the input itself is kept (for lora_A's gradient)
    assert with_dropout <= 1.1 * without, (with_dropout, without)
    assert plain > 1.2 * without  # what dropout(x) @ A^T with torch's own ops keeps: x's copy and a mask


@settings(max_examples=20, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    mode=st.sampled_from(["zeros", "reflect", "circular", "replicate"]),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_fused_conv_matches_the_merged_weight_fp64(dims, kernel, stride, padding, dilation, mode, bias, seed):
    """The fused conv path (groups=1, no dropout) equals a conv with W + delta, outputs and every gradient."""
    if mode != "zeros" and padding == 0:
        mode = "zeros"
    torch.manual_seed(seed)
    cls = {1: lora.Conv1d, 2: lora.Conv2d, 3: lora.Conv3d}[dims]
    layer = cls(
        3, 5, kernel, r=2, lora_alpha=3, stride=stride, padding=padding, dilation=dilation, padding_mode=mode, bias=bias
    ).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    for p in layer.parameters():
        p.requires_grad_(True)
    x = torch.randn(2, 3, *([7] * dims), dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y_ref = layer._conv_forward(x, layer.weight + layer.delta_weight(), layer.bias)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    inputs = [x, *layer.parameters()]
    for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_ref, inputs, g)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dense_mask_variant_matches_reference_fp64(p):
    """The dense-mask dropout (what runs on CUDA) against the plain-op math with the same mask."""
    torch.manual_seed(0)
    r, layout = 2, ((0, 4, 0, 0), (5, 1, 4, 2))
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, r, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    y = fused_lora_linear(x, W.T, None, A, B, 0.7, p, layout, r, dense_mask=True)
    torch.set_rng_state(state)
    xd = torch.native_dropout(x.detach(), p, True)[0] if p > 0 else x.detach()
    keep = (xd != 0).double() if p > 0 else torch.ones_like(x)
    xd_diff = x * keep / (1 - p)
    y_ref = x @ W.T + sum(
        F.pad(0.7 * xd_diff @ A[a : a + r].T @ B[b : b + size].T, (start, 6 - start - size))
        for start, size, b, a in layout
    )
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, W, A, B), g), torch.autograd.grad(y_ref, (x, W, A, B), g)):
        torch.testing.assert_close(got, want)


def test_fp32_adapter_over_bf16_base_runs_fused_in_bf16():
    """fp32 LoRA parameters over a bf16 base: the fused path computes in bf16 (as autocast would) and the
    parameters get fp32 gradients; the result is close to the fp64 math."""
    torch.manual_seed(0)
    layer = lora.Linear(32, 16, r=4, lora_alpha=8).to(torch.bfloat16)
    layer.lora_A.data, layer.lora_B.data = layer.lora_A.float(), torch.randn(16, 4)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = (
        x.double() @ layer.weight.double().T
        + layer.bias.double()
        + 2 * x.double() @ layer.lora_A.double().T @ layer.lora_B.double().T
    )
    torch.testing.assert_close(y.double(), ref, atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_dropout_path_in_16_bit(dtype):
    """The sparse-CSR dropout correction runs for 16-bit inputs too (computed in fp32) and matches fp64 math."""
    torch.manual_seed(0)
    x = torch.randn(6, 16, dtype=torch.float64)
    W, A, B = (
        torch.randn(8, 16, dtype=torch.float64),
        torch.randn(2, 16, dtype=torch.float64),
        torch.randn(8, 2, dtype=torch.float64),
    )
    state = torch.get_rng_state()
    low = [t.to(dtype).requires_grad_() for t in (x, W, A, B)]
    y = fused_lora_linear(low[0], low[1].T, None, low[2], low[3], 0.5, 0.3, ((0, 8, 0, 0),), 2, dense_mask=False)
    y.float().sum().backward()
    ref = reference(
        low[0].double(), low[1].double(), None, low[2].double(), low[3].double(), 0.5, 0.3, ((0, 8, 0, 0),), 2, state
    )
    torch.testing.assert_close(y.double(), ref, atol=0.15, rtol=0.05)
    assert all(t.grad is not None and t.grad.dtype == dtype for t in low)


# fp32 GEMMs over 16-bit operands, on a CPU that would emulate 16-bit GEMMs (lora.functional._gemm_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("kind", ["Linear", "MergedLinear"])
def test_fp32_gemms_over_16_bit_operands_give_the_16_bit_result(kind, p, dtype, monkeypatch):
    """The same values as the 16-bit GEMMs (a product of two 16-bit numbers is exact in fp32, and both accumulate
    in fp32; the intermediates the 16-bit path holds in 16 bits are rounded at the same points), under autocast."""
    from unittest import mock

    import lora.functional

    torch.manual_seed(0)
    if kind == "Linear":
        layer = lora.Linear(96, 160, r=8, lora_alpha=16, lora_dropout=p)
    else:
        layer = lora.MergedLinear(96, 192, r=4, lora_alpha=8, lora_dropout=p, enable_lora=[True, False, True])
    torch.nn.init.normal_(layer.lora_B, std=0.2)
    x = torch.randn(3, 40, 96, requires_grad=True)
    monkeypatch.setattr(lora.functional, "_cpu_has_16bit_gemm", lambda dt: False)  # as on an AVX2-only CPU
    assert lora.functional._gemm_dtype(dtype, torch.device("cpu")) == torch.float32

    def run(gemm_dtype):
        for t in (x, layer.lora_A, layer.lora_B):
            t.grad = None
        torch.manual_seed(1)  # the same dropout positions
        with (
            mock.patch.object(lora.functional, "_gemm_dtype", return_value=gemm_dtype) as chosen,
            torch.autocast("cpu", dtype=dtype),
        ):
            y = layer(x)
        assert chosen.call_count == 1
        y.float().square().sum().backward()
        return [y.detach().float()] + [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]

    emulated, native = run(torch.float32), run(None)
    ulp = torch.finfo(dtype).eps  # one unit in the last place, relative to 1
    for got, want in zip(emulated, native):
        same = (got == want).float().mean().item()
        assert same > 0.95, same  # bit for bit but where another order of fp32 accumulation rounds otherwise
        torch.testing.assert_close(got, want, rtol=2 * ulp, atol=2 * ulp * float(want.abs().max()))


def test_gemm_dtype_only_for_16_bit_on_a_cpu_without_16_bit_units(monkeypatch):
    import lora.functional

    cpu, meta = torch.device("cpu"), torch.device("meta")
    monkeypatch.setattr(lora.functional, "_cpu_has_16bit_gemm", lambda dt: dt == torch.float16)
    assert lora.functional._gemm_dtype(torch.bfloat16, cpu) == torch.float32
    assert lora.functional._gemm_dtype(torch.float16, cpu) is None  # the hardware has it
    assert lora.functional._gemm_dtype(torch.float32, cpu) is None
    assert lora.functional._gemm_dtype(torch.bfloat16, meta) is None  # a GPU's 16-bit GEMMs are its fast ones


# ---------------------------------------------------------------------------------------------------------------
# the custom ops torch.compile sees (lora::fused_lora_linear and its backward)


def _op_call(x, weight_t, b, A, B, s, p, layout, r, dense_mask):
    """fused_lora_linear through the custom op (as under torch.compile) instead of the autograd Function."""
    from lora.functional import _flat_blocks

    out, _, _ = torch.ops.lora.fused_lora_linear(x, weight_t, b, A, B, s, p, _flat_blocks(layout), r, dense_mask)
    return out


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dense_mask", [False, True])
def test_custom_op_equals_the_autograd_function_fp64(p, dense_mask):
    """Same RNG state, same dropped inputs: output and every gradient equal the eager Function's (both run the same
    two functions, so up to nothing); only the gradients asked for are computed."""
    torch.manual_seed(0)
    layout, r = ((0, 4, 0, 0), (5, 1, 4, 2)), 2
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 7, dtype=torch.float64)  # frozen: no gradient asked for
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, r, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 6, dtype=torch.float64)
    results = []
    for call in (fused_lora_linear, _op_call):
        torch.manual_seed(1)
        y = call(x, W.T, b, A, B, 0.7, p, layout, r, dense_mask)
        results.append((y, torch.autograd.grad(y, (x, b, A, B), g)))
    (y_fn, grads_fn), (y_op, grads_op) = results
    assert torch.equal(y_op, y_fn)
    for got, want in zip(grads_op, grads_fn):
        assert torch.equal(got, want)
    if p > 0:
        torch.manual_seed(2)
        assert not torch.equal(_op_call(x, W.T, b, A, B, 0.7, p, layout, r, dense_mask), y_fn)  # another draw


def test_custom_ops_pass_torch_library_opcheck():
    """Schema, fake (meta) implementations and autograd registration, as torch.library documents for custom ops
    (without dropout: opcheck compares repeated runs, which a random op cannot pass; the dropout path's fake size is
    exercised by the compiled tests)."""
    from lora.functional import _flat_blocks

    torch.manual_seed(0)
    layout = _flat_blocks(((0, 4, 0, 0), (5, 1, 4, 2)))
    x = torch.randn(5, 7, requires_grad=True)
    W = torch.randn(6, 7)
    args = (x, W.T, torch.randn(6), torch.randn(4, 7, requires_grad=True), torch.randn(5, 2, requires_grad=True))
    torch.library.opcheck(torch.ops.lora.fused_lora_linear, (*args, 0.7, 0.0, layout, 2, False))
    out, h, dropped = torch.ops.lora.fused_lora_linear(*args, 0.7, 0.0, layout, 2, False)
    needs = [True, False, False, True, True]
    grads_in = (torch.randn_like(out), x.detach(), W.T, args[3].detach(), args[4].detach(), h.detach(), dropped)
    bwd = (*grads_in, 0.7, 0.0, layout, 2)
    torch.library.opcheck(torch.ops.lora.fused_lora_linear_backward, (*bwd, needs, True))


class _TwoBranches(torch.nn.Module):
    """Two LoRA layers with dropout on the same input, independent of each other: no data dependence orders their
    draws in the compiled graph (inductor keeps the order of ``nondeterministic_seeded`` ops; in this graph it
    also kept it without the tag, so this test guards the order, the tag's need is shown by the checkpoint test
    below)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = lora.Linear(16, 8, r=2, lora_alpha=4, lora_dropout=0.3)
        self.b = lora.MergedLinear(16, 8, r=2, lora_alpha=4, lora_dropout=0.3, enable_lora=[True, True])
        with torch.no_grad():
            self.a.lora_B.normal_()
            self.b.lora_B.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.b(x)) * self.a(x).sigmoid()


def test_inductor_compiles_the_op_and_draws_the_eager_masks_in_eager_order():
    """torch.compile with inductor (its scheduling, its min-cut partitioner, its generated code around the op):
    from the same seed the output and every gradient equal eager's."""
    torch.manual_seed(0)
    model = _TwoBranches().train()
    x = torch.randn(3, 5, 16, requires_grad=True)

    def run(fn) -> list[torch.Tensor]:
        model.zero_grad()
        x.grad = None
        torch.manual_seed(7)
        y = fn(x)
        y.square().sum().backward()
        return [y.detach(), x.grad, *(p.grad for p in model.parameters() if p.requires_grad)]

    eager = run(model)
    torch._dynamo.reset()
    compiled = run(torch.compile(model, fullgraph=True))
    torch._dynamo.reset()
    assert len(compiled) == len(eager) == 2 + 6  # x and the output, weight, bias, A and B of each layer
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _compiled_equals_eager(fn, params: list[torch.Tensor], x: torch.Tensor, backend: str) -> None:
    def run(f) -> list[torch.Tensor]:
        for t in (*params, x):
            t.grad = None
        torch.manual_seed(7)
        y = f(x)
        y.backward()
        return [y.detach(), x.grad, *(p.grad for p in params)]

    eager = run(fn)
    torch._dynamo.reset()
    compiled = run(torch.compile(fn, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _dropout_layer(out_features: int) -> lora.Linear:
    layer = lora.Linear(16, out_features, r=2, lora_alpha=4, lora_dropout=0.3)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_one_layer_applied_twice_to_one_input_draws_twice_when_compiled():
    """Two calls of the op with the same inputs are two draws in eager; AOT autograd's CSE must not merge them
    (lora.functional._exempt_from_cse)."""
    torch.manual_seed(0)
    layer = _dropout_layer(8)
    x = torch.randn(4, 16, requires_grad=True)
    _compiled_equals_eager(
        lambda x: (layer(x) * layer(x).sigmoid()).sum(), [layer.lora_A, layer.lora_B], x, "aot_eager"
    )


def test_checkpoint_inside_a_compiled_region_recomputes_the_same_draws():
    """torch.utils.checkpoint traced inside the compiled function: the min-cut partitioner (as inductor's,
    without its code generation) recomputes the op in the backward, and the nondeterministic_seeded tag makes it
    restore the generator's state first, so the recompute drops what the forward dropped."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    a, b = _dropout_layer(16), _dropout_layer(8)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return checkpoint(lambda t: b(torch.tanh(a(t))), x, use_reentrant=False).square().sum()

    params = [a.lora_A, a.lora_B, b.lora_A, b.lora_B]
    _compiled_equals_eager(fn, params, torch.randn(4, 16, requires_grad=True), "aot_eager_decomp_partition")
