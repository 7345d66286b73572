"""lora.layers: drop-in parity with torch, loralib checkpoint parity, and the loralib bugs we do not have.

Oracles: the plain torch layer on the same weights, fp64 math written out by hand, and loralib 0.1.2. A test that
reproduces a loralib bug asserts loralib's wrong behaviour next to ours, so a fixed loralib release shows up here.
"""

import copy
import io
import math
import pickle
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import lora

CONVS = {lora.Conv1d: nn.Conv1d, lora.Conv2d: nn.Conv2d, lora.Conv3d: nn.Conv3d}
PADDING_MODES = ("zeros", "reflect", "circular", "replicate")


def randomize(layer: nn.Module, std: float = 1.0) -> nn.Module:
    """Non-zero A and B, so the LoRA term is not trivially zero."""
    with torch.no_grad():
        layer.lora_A.normal_(0, std)
        layer.lora_B.normal_(0, std)
    return layer


def plain_twin(layer: nn.Module, weight: torch.Tensor | None = None) -> nn.Module:
    """The plain torch layer configured as ``layer``, with a copy of its bias and of ``weight`` (default: its own)."""
    if isinstance(layer, nn.Linear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    elif isinstance(layer, nn.Embedding):
        plain = nn.Embedding(
            layer.num_embeddings,
            layer.embedding_dim,
            padding_idx=layer.padding_idx,
            max_norm=layer.max_norm,
            norm_type=layer.norm_type,
        )
    else:
        plain = CONVS[type(layer)](
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
        )
    plain = plain.to(layer.weight.dtype)
    state = {k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")}
    if weight is not None:
        state["weight"] = weight
    if getattr(layer, "fan_in_fan_out", False):
        state["weight"] = state["weight"].T
    plain.load_state_dict(state)
    return plain


def without_lora(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s output from its weight and bias alone (works for loralib's Linear/MergedLinear/Embedding too)."""
    if isinstance(layer, nn.Embedding):
        return F.embedding(x, layer.weight).detach()
    return F.linear(x, layer.weight.T if layer.fan_in_fan_out else layer.weight, layer.bias).detach()


# kind -> (make(**lora_kwargs), make_input()). The convs use tuple kernels, groups, dilation, stride, padding modes.
KINDS = {
    "Linear": (lambda **kw: lora.Linear(6, 5, **kw), lambda: torch.randn(3, 6)),
    "MergedLinear": (
        lambda **kw: lora.MergedLinear(6, 12, enable_lora=[True, False, True], split_sizes=(8, 2, 2), **kw),
        lambda: torch.randn(2, 3, 6),
    ),
    "Embedding": (lambda **kw: lora.Embedding(7, 5, padding_idx=0, **kw), lambda: torch.tensor([[0, 3, 6], [1, 1, 2]])),
    "Conv1d": (
        lambda **kw: lora.Conv1d(4, 6, 3, groups=2, padding=2, dilation=2, padding_mode="circular", **kw),
        lambda: torch.randn(2, 4, 9),
    ),
    "Conv2d": (
        lambda **kw: lora.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1, padding_mode="reflect", **kw),
        lambda: torch.randn(2, 3, 7, 6),
    ),
    "Conv3d": (
        lambda **kw: lora.Conv3d(2, 4, (1, 2, 3), groups=2, padding=(0, 1, 1), padding_mode="replicate", **kw),
        lambda: torch.randn(1, 2, 3, 4, 5),
    ),
}
TORCH_BASE = {
    "Linear": nn.Linear,
    "MergedLinear": nn.Linear,
    "Embedding": nn.Embedding,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
}
FROM_MODULE_KW = {"MergedLinear": dict(enable_lora=[True, False, True], split_sizes=(8, 2, 2))}


def build(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> tuple[nn.Module, torch.Tensor]:
    make, make_input = KINDS[kind]
    torch.manual_seed(seed)
    layer = make(**{"r": 2, "lora_alpha": 4, "dtype": dtype, **kw})
    x = make_input()
    return layer, (x if x.dtype == torch.long else x.to(dtype))


def fan_in(layer: nn.Module) -> int:
    if isinstance(layer, nn.Embedding):
        return 1
    return layer.weight.shape[0] if getattr(layer, "fan_in_fan_out", False) else layer.weight[0].numel()


# Per-ulp-ish relative tolerances of an output that sums fan_in products.
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_outputs_close(a: torch.Tensor, b: torch.Tensor, layer: nn.Module, x: torch.Tensor) -> None:
    """``|a - b| <= tol * (fan_in * max|x| * (max|W| + max|delta| + 1) + max|bias|)``: a bound that survives
    cancellation, and the rounding of an output the bias dominates."""
    xs = 1.0 if x.dtype == torch.long else float(x.abs().max())
    ws = float(layer.weight.detach().abs().max()) + float(layer.delta_weight().detach().abs().max()) + 1.0
    bias = getattr(layer, "bias", None)
    bs = float(bias.detach().abs().max()) if isinstance(bias, torch.Tensor) and bias.numel() else 0.0
    bound = REL_TOL[layer.weight.dtype] * (fan_in(layer) * xs * ws + bs)
    err = float((a.detach().double() - b.detach().double()).abs().max())
    assert err <= bound, f"max error {err} > {bound}"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


# ---------------------------------------------------------------------------------------------------------------
# 1. Drop-in layers


@pytest.mark.parametrize("kind", KINDS)
def test_subclasses_the_torch_layer(kind):
    layer, _ = build(kind)
    assert isinstance(layer, TORCH_BASE[kind])
    assert isinstance(layer, lora.LoRALayer) and lora.is_lora_layer(layer)
    assert not lora.is_lora_layer(plain_twin(layer))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_at_init_output_is_the_torch_layers_bit_for_bit(kind, dtype):
    layer, x = build(kind, dtype)
    zero = layer.lora_A if kind == "Embedding" else layer.lora_B  # Embedding: A is zero, B normal (loralib's init)
    assert not zero.any() and (layer.lora_B if kind == "Embedding" else layer.lora_A).any()
    if kind.startswith("Conv") and dtype == torch.float32:
        # The fused fp32 conv runs the frozen filters inside one wider convolution (for speed, see
        # lora.functional.fused_lora_conv): equal up to the convolution library's rounding, not bit for bit.
        torch.testing.assert_close(layer(x), plain_twin(layer)(x), rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(layer(x), plain_twin(layer)(x))


@pytest.mark.parametrize("kind", ["Conv1d", "Conv2d", "Conv3d"])
def test_fused_conv_at_init_is_within_rounding_of_the_torch_layer(kind):
    """Realistic channel counts, where the wider convolution does round differently."""
    torch.manual_seed(0)
    dims = int(kind[-2])
    base = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](64, 64, 3, padding=1)
    layer = getattr(lora, kind).from_module(base, r=8)
    x = torch.randn(2, 64, *([10] * dims))
    want = base(x).detach()
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("kind", KINDS)
def test_r0_is_exactly_the_torch_layer(kind):
    layer, x = build(kind, r=0)
    plain = plain_twin(layer)
    assert [n for n, _ in layer.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert layer.weight.requires_grad and layer.scaling == 0
    assert torch.equal(layer(x), plain(x))


def test_fan_in_fan_out_linear_at_init_is_linear_on_the_transposed_weight():
    torch.manual_seed(0)
    layer = lora.Linear(6, 5, r=2, fan_in_fan_out=True)
    assert layer.weight.shape == (6, 5)
    x = torch.randn(3, 6)
    # The same products from (in, out) vs (out, in) memory: a BLAS may sum them in another order, so within rounding.
    torch.testing.assert_close(layer(x), plain_twin(layer)(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_against_fp64_math_by_hand(use_rslora):
    torch.manual_seed(0)
    r, alpha = 4, 8
    layer = randomize(lora.Linear(6, 5, r=r, lora_alpha=alpha, use_rslora=use_rslora, dtype=torch.float64))
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert layer.scaling == s
    x = torch.randn(3, 6, dtype=torch.float64)
    W, b, A, B = layer.weight, layer.bias, layer.lora_A, layer.lora_B
    torch.testing.assert_close(layer(x), x @ W.T + b + s * (x @ A.T @ B.T), rtol=1e-12, atol=1e-12)
    other = alpha / r if use_rslora else alpha / math.sqrt(r)  # 2 vs 4: the test tells them apart
    assert not torch.allclose(layer(x), x @ W.T + b + other * (x @ A.T @ B.T))


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments fail at construction with a ValueError naming the value


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(r=-1), "r=-1"),
        (dict(r=1.5), "r=1.5"),
        (dict(r=2, lora_alpha=0), "lora_alpha=0"),
        (dict(r=2, lora_alpha=-3.0), "lora_alpha=-3.0"),
        (dict(r=2, lora_dropout=1.0), "lora_dropout=1.0"),
        (dict(r=2, lora_dropout=-0.1), "lora_dropout=-0.1"),
    ],
)
def test_bad_lora_arguments_raise_value_error_naming_the_value(kind, kwargs, shown):
    make, _ = KINDS[kind]
    with pytest.raises(ValueError) as err:
        make(**kwargs)
    assert shown in str(err.value)


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(out_features=10, enable_lora=[True, False, True]), "enable_lora=[True, False, True]"),
        (dict(out_features=12, enable_lora=[]), "enable_lora=[]"),
        (dict(out_features=12, enable_lora=[True, False, True], split_sizes=(8, 2, 3)), "split_sizes=[8, 2, 3]"),
        (dict(out_features=12, enable_lora=[True, False, True], split_sizes=(10, 2)), "split_sizes=[10, 2]"),
        (dict(out_features=12, enable_lora=[True, False, True], split_sizes=(12, 0, 0)), "split_sizes=[12, 0, 0]"),
        (dict(out_features=12, enable_lora=[True, False], split_sizes=(14, -2)), "split_sizes=[14, -2]"),
    ],
)
def test_merged_linear_bad_layout_raises_value_error_naming_the_value(kwargs, shown):
    with pytest.raises(ValueError) as err:
        lora.MergedLinear(4, r=2, **kwargs)
    assert shown in str(err.value)


def test_lora_layer_mixin_checks_its_arguments_and_uses_a_dropout_module():
    class Mine(nn.Linear, lora.LoRALayer):
        def __init__(self, r: int, dropout: float = 0.0) -> None:
            nn.Linear.__init__(self, 3, 3)
            lora.LoRALayer.__init__(self, r, 1, dropout, True)

    with pytest.raises(ValueError, match="r=-2"):
        Mine(-2)
    assert isinstance(Mine(0).lora_dropout, nn.Identity) and isinstance(Mine(0, 0.5).lora_dropout, nn.Dropout)
    assert lora.is_lora_layer(Mine(0))


# ---------------------------------------------------------------------------------------------------------------
# 2. loralib checkpoint compatibility (loralib is the oracle)

# name -> (make(lib), input): the same layer from loralib or from us. loralib's Conv layers have other keys
# (conv.weight) by design, see lora/layers.py.
COMPAT = {
    "Linear": (lambda lib: lib.Linear(6, 5, r=2, lora_alpha=4), lambda: torch.randn(3, 6)),
    "Linear-fan_in_fan_out": (
        lambda lib: lib.Linear(6, 5, r=2, lora_alpha=4, fan_in_fan_out=True),
        lambda: torch.randn(3, 6),
    ),
    "Embedding": (
        lambda lib: lib.Embedding(7, 5, r=2, lora_alpha=4, padding_idx=0),
        lambda: torch.tensor([[0, 3, 6], [1, 1, 2]]),
    ),
    "MergedLinear": (
        lambda lib: lib.MergedLinear(6, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]),
        lambda: torch.randn(2, 3, 6),
    ),
    "MergedLinear-fan_in_fan_out": (
        lambda lib: lib.MergedLinear(6, 12, r=2, lora_alpha=4, fan_in_fan_out=True, enable_lora=[True, False, True]),
        lambda: torch.randn(2, 3, 6),
    ),
}


@pytest.mark.parametrize("kind", COMPAT)
def test_state_dict_keys_and_shapes_equal_loralibs(kind):
    loralib = pytest.importorskip("loralib")
    make, _ = COMPAT[kind]
    theirs, ours = make(loralib).state_dict(), make(lora).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("kind", COMPAT)
def test_loralib_state_dict_loads_strictly_and_gives_the_same_outputs(kind):
    loralib = pytest.importorskip("loralib")
    make, make_input = COMPAT[kind]
    torch.manual_seed(1)
    theirs, ours = randomize(make(loralib)), make(lora)
    theirs.train()  # both in train mode (loralib merges on eval()); loralib's train() returns None
    ours.train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = make_input()
    assert not torch.allclose(ours(x), without_lora(ours, x), atol=1e-2)  # the LoRA term matters
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", COMPAT)
def test_our_state_dict_loads_into_loralib_and_gives_the_same_outputs(kind):
    loralib = pytest.importorskip("loralib")
    make, make_input = COMPAT[kind]
    torch.manual_seed(2)
    ours, theirs = randomize(make(lora)), make(loralib)
    ours.train()
    theirs.train()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = make_input()
    assert not torch.allclose(ours(x), without_lora(ours, x), atol=1e-2)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 3a. train() / eval() never touch a parameter (loralib merges on eval() and drifts)


def _bf16_model(lib) -> nn.Sequential:
    torch.manual_seed(3)
    model = nn.Sequential(
        lib.Linear(16, 32, r=4, lora_alpha=8),
        lib.MergedLinear(32, 48, r=4, lora_alpha=8, enable_lora=[True, False, True]),
        lib.Embedding(10, 8, r=2),
        lib.Conv2d(3, 4, 3, r=2),
    )
    model = model.to(torch.bfloat16)  # loralib keeps A and B in the base's dtype; so does .to() here
    for layer in model:
        randomize(layer, std=0.5)
    return model


def test_train_eval_cycles_never_change_a_parameter_bf16():
    model = _bf16_model(lora)
    before = {k: bits(v) for k, v in model.state_dict().items()}
    for _ in range(100):
        model.eval()
        model.train()
    assert {k: bits(v) for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(bits(v), before[k]) for k, v in model.state_dict().items())
    assert not any(layer.merged for layer in model)


def test_loralib_train_eval_cycles_drift_bf16_weights():
    loralib = pytest.importorskip("loralib")
    model = _bf16_model(loralib)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    for _ in range(10):
        model.eval()
        model.train()
    changed = sum(int((model.state_dict()[k] != v).sum()) for k, v in before.items())
    total = sum(v.numel() for v in before.values())
    print(
        f"\nloralib 0.1.2: {changed}/{total} = {changed / total:.1%} of the bf16 base weights changed "
        f"after 10 eval/train cycles"
    )
    assert changed / total > 0.05


def test_eval_does_not_merge_and_merge_weights_is_accepted():
    torch.manual_seed(0)
    layer = randomize(lora.Linear(6, 5, r=2, merge_weights=True))
    w = bits(layer.weight)
    layer.eval()
    assert layer.merge_weights is True and not layer.merged and torch.equal(bits(layer.weight), w)
    assert lora.MergedLinear(6, 6, r=1, enable_lora=[True], merge_weights=False).merge_weights is False


@pytest.mark.parametrize("kind", ["Linear", "MergedLinear", "Embedding"])
def test_state_dict_saved_in_eval_mode_does_not_apply_lora_twice(kind):
    loralib = pytest.importorskip("loralib")
    make, make_input = COMPAT[kind]
    x = make_input()
    for lib in (loralib, lora):
        torch.manual_seed(4)
        layer = randomize(make(lib))
        want, base = layer(x).detach(), without_lora(layer, x)  # fresh layers are in train mode
        layer.eval()
        saved = copy.deepcopy(layer.state_dict())
        fresh = make(lib)
        fresh.load_state_dict(saved)
        got = fresh(x).detach()
        if lib is loralib:  # the saved weight is W + delta, and loralib adds delta on top again
            assert not torch.allclose(got, want, atol=1e-2)
            torch.testing.assert_close(got, want + (want - base), rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            fresh.eval()
            torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 3b. layer.merge() / layer.unmerge()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_matches_and_unmerge_restores_bit_for_bit(kind, dtype):
    layer, x = build(kind, dtype, seed=5)
    randomize(layer, std=2.0)  # |delta| >> |W|: merging rounds away low bits of W
    w0 = bits(layer.weight)
    unmerged = layer(x)
    layer.merge()
    merged_w = bits(layer.weight)
    layer.merge()  # idempotent
    assert layer.merged and torch.equal(bits(layer.weight), merged_w)
    assert_outputs_close(layer(x), unmerged, layer, x)
    with torch.no_grad():  # the naive undo would not have been exact, so the exact one proves something
        naive = (layer.weight.float() - layer.delta_weight()).to(dtype)
    assert not torch.equal(bits(naive), w0)
    layer.unmerge()
    layer.unmerge()  # idempotent
    assert not layer.merged and torch.equal(bits(layer.weight), w0)
    assert torch.equal(layer(x), unmerged)


def test_merge_in_fp64_keeps_fp64_precision():
    torch.manual_seed(0)
    layer = lora.Linear(6, 5, r=2, dtype=torch.float64)  # B = 0: the delta is exactly zero
    w0 = bits(layer.weight)
    layer.merge()
    assert torch.equal(bits(layer.weight), w0)  # a merge through fp32 would round W to fp32 here
    layer.unmerge()
    randomize(layer)
    x = torch.randn(3, 6, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-13, atol=1e-13)


def test_unmerge_restores_negative_zero_in_fp64():
    # -0.0 and +0.0 differ by INT64_MIN in their bits: the residual must not be squeezed into int8
    layer = lora.Linear(3, 2, r=1, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-0.0, 1.0, -0.0], [2.0, -0.0, 0.0]], dtype=torch.float64))
    w0 = bits(layer.weight)
    layer.merge()
    layer.unmerge()
    assert torch.equal(bits(layer.weight), w0)


def test_unmerge_after_a_cast_while_merged_is_a_plain_subtraction_not_garbage():
    torch.manual_seed(0)
    layer = randomize(lora.Linear(8, 8, r=2), std=4.0)
    with torch.no_grad():
        layer.weight.mul_(1e-6)  # tiny W, large delta: the fp32 residual is far outside int8
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer._merge_record.escape_index.numel() > 0  # original fp32 bits kept for the swamped weights
    layer.to(torch.bfloat16)
    layer.unmerge()  # the fp32 record applied to bf16 bits would give garbage (inf, nan, 1e30)
    assert (layer.weight.float() - w0).abs().max() <= 2**-6 * layer.delta_weight().abs().max()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_a_non_finite_delta_and_changes_nothing(kind, bad):
    layer, _ = build(kind)
    randomize(layer)
    with torch.no_grad():
        layer.lora_B[-1, -1] = bad
    w0 = bits(layer.weight)
    with pytest.raises(ValueError, match="not finite"):
        layer.merge(safe=True)
    assert not layer.merged and torch.equal(bits(layer.weight), w0) and layer._merge_record is None


# ---------------------------------------------------------------------------------------------------------------
# 3c. MergedLinear with unequal split_sizes


def test_merged_linear_split_sizes_put_each_delta_on_its_own_rows():
    torch.manual_seed(0)
    layer = randomize(
        lora.MergedLinear(
            6, 12, r=2, lora_alpha=4, enable_lora=[True, False, True], split_sizes=(8, 2, 2), dtype=torch.float64
        )
    )
    assert layer.lora_A.shape == (4, 6) and layer.lora_B.shape == (10, 2)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    W, b, A, B, s = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling
    want = x @ W.T + b
    want[..., 0:8] += s * x @ A[0:2].T @ B[0:8].T  # q: rows 0-7, its own A and B
    want[..., 10:12] += s * x @ A[2:4].T @ B[8:10].T  # v: rows 10-11
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    adapted = layer.delta_weight().abs().sum(1) > 0
    assert adapted.tolist() == [True] * 8 + [False] * 2 + [True] * 2


def test_loralib_merged_linear_puts_unequal_slices_on_the_wrong_rows():
    loralib = pytest.importorskip("loralib")
    torch.manual_seed(0)
    # q, k, v = 8, 2, 2 rows (grouped-query attention). loralib has no split_sizes and cuts 12 into 3 x 4:
    with pytest.raises(TypeError):
        loralib.MergedLinear(6, 12, r=2, enable_lora=[True, False, True], split_sizes=(8, 2, 2))
    theirs = randomize(loralib.MergedLinear(6, 12, r=2, enable_lora=[True, False, True]))
    adapted = (theirs.merge_AB().abs().sum(1) > 0).tolist()
    assert adapted == [True] * 4 + [False] * 4 + [True] * 4  # rows 0-3 and 8-11: half of q and all of k
    ours = randomize(lora.MergedLinear(6, 12, r=2, enable_lora=[True, False, True], split_sizes=(8, 2, 2)))
    assert (ours.delta_weight().abs().sum(1) > 0).tolist() == [True] * 8 + [False] * 2 + [True] * 2


def test_merged_linear_forward_stays_factored():
    torch.manual_seed(0)
    n_in, n_out, r = 256, 192, 2
    layer = randomize(lora.MergedLinear(n_in, n_out, r=r, enable_lora=[True, False, True], split_sizes=(128, 32, 32)))
    x = torch.randn(1, n_in)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    base_flops = 2 * n_in * n_out
    delta_flops = 2 * r * n_in * (128 + 32)  # building the (out, in) delta from B @ A
    lora_flops = counter.get_total_flops() - base_flops
    assert 0 < lora_flops < delta_flops / 20
    with mock.patch.object(lora.MergedLinear, "delta_weight", side_effect=AssertionError("delta built")):
        layer(x).sum().backward()


# ---------------------------------------------------------------------------------------------------------------
# 3d. Convolutions


CONV_CASES = {
    lora.Conv1d: (
        dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, stride=2, padding=2, dilation=2),
        (2, 4, 11),
    ),
    lora.Conv2d: (
        dict(
            in_channels=4, out_channels=6, kernel_size=(3, 2), groups=2, stride=(2, 1), dilation=(1, 2), padding=(1, 1)
        ),
        (2, 4, 7, 6),
    ),
    lora.Conv3d: (
        dict(
            in_channels=2,
            out_channels=4,
            kernel_size=(1, 2, 3),
            groups=2,
            stride=(1, 1, 2),
            dilation=(1, 2, 1),
            padding=(0, 1, 1),
        ),
        (1, 2, 3, 5, 6),
    ),
}


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("cls", CONV_CASES)
def test_conv_factored_forward_equals_conv_with_the_merged_weight_fp64(cls, padding_mode):
    kwargs, shape = CONV_CASES[cls]
    torch.manual_seed(0)
    layer = randomize(cls(**kwargs, r=3, lora_alpha=6, padding_mode=padding_mode, dtype=torch.float64))
    assert isinstance(layer, CONVS[cls])
    x = torch.randn(shape, dtype=torch.float64)
    plain = plain_twin(layer)
    merged = plain_twin(layer, weight=layer.weight + layer.delta_weight())
    torch.testing.assert_close(layer(x), merged(x), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(layer(x), plain(x))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_same_padding(padding_mode):
    torch.manual_seed(0)
    layer = randomize(lora.Conv2d(3, 4, (3, 5), padding="same", padding_mode=padding_mode, r=2, dtype=torch.float64))
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    merged = plain_twin(layer, weight=layer.weight + layer.delta_weight())
    torch.testing.assert_close(layer(x), merged(x), rtol=1e-10, atol=1e-10)


def test_loralib_conv1d_and_conv3d_crash_ours_work():
    loralib = pytest.importorskip("loralib")
    x1, x3 = torch.randn(1, 4, 9), torch.randn(1, 4, 5, 5, 5)
    with pytest.raises(RuntimeError, match="invalid for input"):  # (r*k, in*k) blocks only fit a 2-d kernel
        loralib.Conv1d(4, 6, 3, r=2)(x1)
    with pytest.raises(RuntimeError, match="invalid for input"):
        loralib.Conv3d(4, 6, 3, r=2)(x3)
    assert lora.Conv1d(4, 6, 3, r=2)(x1).shape == (1, 6, 7)
    assert lora.Conv3d(4, 6, 3, r=2)(x3).shape == (1, 6, 3, 3, 3)


def test_loralib_conv_rejects_tuple_kernels_ours_take_them():
    loralib = pytest.importorskip("loralib")
    with pytest.raises(AssertionError):
        loralib.Conv2d(3, 4, (3, 2), r=2)
    assert lora.Conv2d(3, 4, (3, 2), r=2).lora_A.shape == (2, 3 * 3 * 2)


def test_loralib_conv_ignores_dropout_ours_applies_it():
    loralib = pytest.importorskip("loralib")
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(0)
    theirs = randomize(loralib.Conv2d(3, 4, 3, r=2, lora_dropout=0.5))
    assert theirs.training and torch.equal(theirs(x), theirs(x))  # dropout never applied
    ours = randomize(lora.Conv2d(3, 4, 3, r=2, lora_dropout=0.5)).train()
    assert not torch.equal(ours(x), ours(x))


# ---------------------------------------------------------------------------------------------------------------
# Dropout is a module, honoured in train mode, off in eval mode


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_is_a_module_applied_in_train_mode_only(kind):
    layer, x = build(kind, lora_dropout=0.5)
    randomize(layer)
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.5
    twin, _ = build(kind, lora_dropout=0.0)
    assert isinstance(twin.lora_dropout, nn.Identity)
    twin.load_state_dict(layer.state_dict())
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x)) and torch.equal(layer(x), twin(x))


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])  # 0.0: where loralib puts its lambda
@pytest.mark.parametrize("kind", KINDS)
def test_layers_pickle_deepcopy_and_torch_save_round_trip(kind, lora_dropout):
    layer, x = build(kind, lora_dropout=lora_dropout)
    randomize(layer).eval()
    want = layer(x)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert type(clone) is type(layer) and torch.equal(clone(x), want)
    layer.merge()
    buf = io.BytesIO()
    torch.save(nn.Sequential(layer), buf)
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)[0]  # our own object: unpickling it is fine
    assert clone.merged and torch.equal(clone(x), layer(x))
    clone.unmerge()
    assert torch.equal(clone(x), want)


def test_loralib_dropout_lambda_breaks_pickling():
    loralib = pytest.importorskip("loralib")
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(loralib.Linear(4, 4, r=2))  # lora_dropout = lambda x: x


# ---------------------------------------------------------------------------------------------------------------
# 3e. Embedding: padding_idx and max_norm


def test_embedding_padding_row_stays_the_base_row_and_gets_no_gradient():
    torch.manual_seed(0)
    layer = lora.Embedding(7, 5, r=2, lora_alpha=4, padding_idx=0)
    x = torch.tensor([[0, 3, 6], [1, 0, 2]])
    (layer(x) * torch.randn(2, 3, 5)).sum().backward()
    grad = layer.lora_A.grad
    assert not grad[:, 0].any() and grad[:, [1, 2, 3, 6]].abs().sum(0).gt(0).all()
    with torch.no_grad():
        layer.lora_A -= 0.5 * grad  # one SGD step
    out = layer(x)
    assert torch.equal(out[x == 0], layer.weight[0].expand(2, 5))
    assert not torch.allclose(out[0, 1], layer.weight[3])


def test_embedding_max_norm_never_rescales_a_parameter():
    torch.manual_seed(0)
    layer = lora.Embedding(7, 5, r=2, lora_alpha=4, max_norm=0.1)
    x = torch.tensor([[0, 3, 6], [1, 1, 2]])
    reference = nn.Embedding(7, 5, max_norm=0.1)  # a fresh copy: torch renormalises its weight in place
    reference.load_state_dict({"weight": layer.weight.detach().clone()})
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-6, atol=1e-7)
    randomize(layer)
    before = {k: bits(v) for k, v in layer.state_dict().items()}
    out = layer(x)
    assert all(torch.equal(bits(v), before[k]) for k, v in layer.state_dict().items())
    assert out.norm(dim=-1).max() <= 0.1 + 1e-6
    rows = (layer.weight + layer.delta_weight())[x]  # (base + update) rows, rescaled out of place
    torch.testing.assert_close(out, rows * (0.1 / (rows.norm(dim=-1, keepdim=True) + 1e-7)).clamp(max=1))


def test_loralib_embedding_max_norm_rescales_lora_a_in_place():
    loralib = pytest.importorskip("loralib")
    torch.manual_seed(0)
    theirs = randomize(loralib.Embedding(7, 5, r=2, max_norm=0.1))
    a0, w0 = theirs.lora_A.detach().clone(), theirs.weight.detach().clone()
    theirs(torch.tensor([1, 2]))
    assert not torch.equal(theirs.lora_A, a0)  # F.embedding(max_norm=...) on lora_A.T renormalises lora_A
    assert not torch.equal(theirs.weight, w0)


def test_peft_embedding_max_norm_rescales_lora_a_in_place():
    peft = pytest.importorskip("peft")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 5, max_norm=0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.emb(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(Model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb"]))
    lora_a = model.base_model.model.emb.lora_embedding_A["default"]
    with torch.no_grad():
        lora_a.normal_()
    a0 = lora_a.detach().clone()
    model(torch.tensor([1, 2]))
    assert not torch.equal(lora_a, a0)  # F.embedding(max_norm=...) on lora_embedding_A.T, as loralib


# ---------------------------------------------------------------------------------------------------------------
# 4. Mixed precision: fp32 LoRA over a bf16 base


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_base_keeps_fp32_lora_and_works_with_and_without_autocast(kind):
    layer, x = build(kind, torch.bfloat16)
    randomize(layer)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    reference = copy.deepcopy(layer).float()
    want = reference(x if x.dtype == torch.long else x.float())
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert_outputs_close(out, want, layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = layer(x)
    assert out_ac.dtype == torch.bfloat16
    assert_outputs_close(out_ac, want, layer, x)
    if getattr(layer, "bias", None) is not None:
        layer.bias.requires_grad_(False)
    out_ac.float().square().sum().backward()
    grads = {n for n, p in layer.named_parameters() if p.grad is not None}
    assert grads == {"lora_A", "lora_B"} and layer.lora_A.grad.dtype == torch.float32


def test_lora_dtype_override_and_validation():
    assert lora.Linear(4, 4, r=2, dtype=torch.bfloat16, lora_dtype=torch.bfloat16).lora_A.dtype == torch.bfloat16
    assert lora.Linear(4, 4, r=2, dtype=torch.float64).lora_A.dtype == torch.float64
    with pytest.raises(ValueError, match="lora_dtype=torch.int64"):
        lora.Linear(4, 4, r=2, lora_dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# 5. The rest of torch: compile, checkpointing, meta, .to(), from_module


class _Tiny(nn.Module):
    def __init__(self, lora_dropout: float = 0.0) -> None:
        super().__init__()
        self.qkv = lora.MergedLinear(
            8, 12, r=2, lora_alpha=4, lora_dropout=lora_dropout, enable_lora=[True, False, True], split_sizes=(8, 2, 2)
        )
        self.out = lora.Linear(12, 8, r=2, lora_alpha=4, lora_dropout=lora_dropout)
        self.fifo = lora.Linear(8, 4, r=1, fan_in_fan_out=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fifo(torch.tanh(self.out(torch.tanh(self.qkv(x)))))


def _tiny(lora_dropout: float = 0.0) -> _Tiny:
    torch.manual_seed(0)
    model = _Tiny(lora_dropout)
    for layer in (model.qkv, model.out, model.fifo):
        randomize(layer, std=0.5)
    return model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_torch_compile_fullgraph_has_no_graph_breaks_and_matches_eager():
    model = _tiny()
    x = torch.randn(2, 3, 8)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    eager = model(x)
    eager.square().sum().backward()
    want = _grads(model)
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    got = _grads(model)
    assert got.keys() == want.keys() and {"qkv.lora_A", "qkv.lora_B", "out.lora_B"} <= got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_a_whole_model_pickles_deepcopies_and_torch_saves(lora_dropout):
    model = _tiny(lora_dropout).eval()
    x = torch.randn(2, 3, 8)
    want = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert type(clone.qkv.lora_dropout) is type(model.qkv.lora_dropout) and torch.equal(clone(x), want)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _tiny(lora_dropout=0.2)
    x = torch.randn(2, 3, 8)
    torch.manual_seed(7)
    model(x).square().sum().backward()
    want = _grads(model)
    model.zero_grad()
    torch.manual_seed(7)
    torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False).square().sum().backward()
    got = _grads(model)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize("kind", KINDS)
def test_builds_on_the_meta_device(kind):
    make, _ = KINDS[kind]
    with torch.device("meta"):
        layer = make(r=2, lora_dropout=0.1)
        fifo = lora.Linear(6, 5, r=2, fan_in_fan_out=True)
    assert all(t.is_meta for t in [*layer.parameters(), *fifo.parameters()])
    assert layer.lora_A.shape[0] == (4 if kind == "MergedLinear" else 2)


@pytest.mark.parametrize("kind", KINDS)
def test_to_moves_every_tensor_and_no_tensor_hangs_off_a_plain_attribute(kind):
    layer, _ = build(kind)
    randomize(layer).merge()  # the merged state (residual buffer) too
    for module in layer.modules():
        assert not [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
    layer.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    layer.to("meta")
    assert all(t.is_meta for t in [*layer.parameters(), *layer.buffers()])


def test_loralib_merged_linear_keeps_a_tensor_on_a_plain_attribute():
    loralib = pytest.importorskip("loralib")
    theirs = loralib.MergedLinear(4, 6, r=2, enable_lora=[True, False]).to("meta")
    assert theirs.weight.is_meta and not theirs.lora_ind.is_meta  # .to() does not move lora_ind


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_from_module_adopts_the_same_parameters_and_keeps_the_output(kind, train):
    layer, x = build(kind)
    base = plain_twin(layer).train(train)
    want = base(x)
    weight, bias = base.weight, getattr(base, "bias", None)
    wrapped = type(layer).from_module(base, r=2, lora_alpha=4, **FROM_MODULE_KW.get(kind, {}))
    assert type(wrapped) is type(layer) and wrapped.training == train
    assert wrapped.weight is weight and getattr(wrapped, "bias", None) is bias
    assert not weight.requires_grad and wrapped.lora_A.requires_grad
    assert not any(t.is_meta for t in wrapped.parameters())
    assert torch.equal(wrapped(x), want)


def test_from_module_refuses_fan_in_fan_out():
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        lora.Linear.from_module(nn.Linear(4, 4), r=2, fan_in_fan_out=True)


# ---------------------------------------------------------------------------------------------------------------
# 6. Property tests

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


@st.composite
def lora_layers(draw, kinds=("Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d")):
    """A random LoRA layer with random A and B, and an input for it."""
    kind, dtype = draw(st.sampled_from(kinds)), draw(DTYPES)
    r, alpha = draw(st.integers(1, 4)), draw(st.sampled_from([1, 2, 8]))
    common = dict(r=r, lora_alpha=alpha, dtype=dtype, use_rslora=draw(st.booleans()))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if kind == "Linear":
        n_in, n_out = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        layer = lora.Linear(n_in, n_out, fan_in_fan_out=draw(st.booleans()), bias=draw(st.booleans()), **common)
        x = torch.randn(draw(st.integers(1, 3)), n_in)
    elif kind == "MergedLinear":
        sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
        enable = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)).filter(any))
        n_in = draw(st.integers(1, 8))
        layer = lora.MergedLinear(
            n_in, sum(sizes), enable_lora=enable, split_sizes=sizes, fan_in_fan_out=draw(st.booleans()), **common
        )
        x = torch.randn(2, n_in)
    elif kind == "Embedding":
        num = draw(st.integers(1, 8))
        layer = lora.Embedding(num, draw(st.integers(1, 6)), **common)
        x = torch.randint(0, num, (2, 3))
    else:
        layer, x = draw(conv_layers(kind, common))
    randomize(layer, std=draw(st.sampled_from([0.1, 1.0, 4.0])))
    return layer, (x if x.dtype == torch.long else x.to(dtype))


@st.composite
def conv_layers(draw, kind, common):
    cls = getattr(lora, kind)
    n = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3}[kind]
    groups = draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(n))
    padding_mode = draw(st.sampled_from(PADDING_MODES))
    layer = cls(
        groups * draw(st.integers(1, 2)),
        groups * draw(st.integers(1, 2)),
        kernel,
        groups=groups,
        stride=tuple(draw(st.integers(1, 2)) for _ in range(n)),
        dilation=dilation,
        padding=padding,
        padding_mode=padding_mode,
        **common,
    )
    # each spatial size covers the dilated kernel and exceeds the padding (reflect needs that)
    spatial = [max(d * (k - 1) + 1, p + 1) + draw(st.integers(0, 2)) for k, d, p in zip(kernel, dilation, padding)]
    return layer, torch.randn(1, layer.in_channels, *spatial)


@settings(max_examples=25, deadline=None)
@given(lora_layers())
def test_property_merged_equals_unmerged(case):
    layer, x = case
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    assert_outputs_close(merged, unmerged, layer, x)


@settings(max_examples=25, deadline=None)
@given(lora_layers(), st.booleans())
def test_property_unmerge_after_merge_is_the_identity_bit_for_bit(case, signed_zeros):
    layer, _ = case
    if signed_zeros:
        with torch.no_grad():
            layer.weight.view(-1)[::2] = -0.0
    w0 = bits(layer.weight)
    layer.merge()
    layer.merge()
    layer.unmerge()
    layer.unmerge()
    assert torch.equal(bits(layer.weight), w0)


@settings(max_examples=25, deadline=None)
@given(lora_layers(kinds=("MergedLinear",)))
def test_property_merged_linear_equals_separate_per_slice_loras(case):
    layer, x = case
    # fp64 reference from the layer's own tensors: base, then one LoRA per enabled slice on its own rows
    W = (layer.weight.T if layer.fan_in_fan_out else layer.weight).double()
    A, B, s, r = layer.lora_A.double(), layer.lora_B.double(), layer.scaling, layer.r
    want = x.double() @ W.T + layer.bias.double()
    start, b_row, i = 0, 0, 0
    for size, enabled in zip(layer.split_sizes, layer.enable_lora):
        if enabled:
            want[:, start : start + size] += s * x.double() @ A[i * r : (i + 1) * r].T @ B[b_row : b_row + size].T
            b_row, i = b_row + size, i + 1
        start += size
    assert_outputs_close(layer(x), want, layer, x)


@settings(max_examples=25, deadline=None)
@given(lora_layers(kinds=("Conv1d", "Conv2d", "Conv3d")))
def test_property_factored_conv_equals_conv_with_the_merged_weight(case):
    layer, x = case
    layer, x = layer.double(), x.double()
    merged = plain_twin(layer, weight=layer.weight + layer.delta_weight())
    torch.testing.assert_close(layer(x), merged(x), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# The fused path under autocast: Hugging Face Trainer's bf16 (fp32 weights) and the example's --bf16 (bf16 weights)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["Linear", "MergedLinear"])
def test_fused_path_serves_autocast_and_matches_the_plain_ops(kind, weight_dtype):
    import lora.functional

    layer, x = build(kind, weight_dtype, lora_dropout=0.0)
    randomize(layer, std=0.3)
    x = x.float().requires_grad_()

    def run(fused: bool):
        for p in (x, layer.lora_A, layer.lora_B):
            p.grad = None
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            mock.patch.object(
                lora.functional._FusedLoRALinear, "apply", wraps=lora.functional._FusedLoRALinear.apply
            ) as spy,
        ):
            if not fused:  # the plain ops (the path of cases the fused one does not cover)
                with mock.patch("lora.layers._fused_dtype", return_value=None):
                    y = layer(x)
            else:
                y = layer(x)
        y.float().square().sum().backward()
        return y, spy.call_count, [p.grad.clone() for p in (x, layer.lora_A, layer.lora_B)]

    y_fused, calls, grads_fused = run(fused=True)
    y_plain, plain_calls, grads_plain = run(fused=False)
    assert calls == 1 and plain_calls == 0
    assert y_fused.dtype == y_plain.dtype == torch.bfloat16  # what autocast's own matmul gives
    assert grads_fused[0].dtype == torch.float32 and grads_fused[1].dtype == layer.lora_A.dtype
    y_fused, y_plain = y_fused.detach().float(), y_plain.detach().float()
    torch.testing.assert_close(y_fused, y_plain, rtol=2e-2, atol=2e-2 * float(y_plain.abs().max()))
    for gf, gp in zip(grads_fused, grads_plain):
        torch.testing.assert_close(gf, gp, rtol=3e-2, atol=3e-2 * float(gp.abs().max()))
