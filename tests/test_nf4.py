"""lora.nf4 against bitsandbytes (the oracle: its CPU quantize_4bit / dequantize_4bit, bit for bit), plus round trips
and errors. bitsandbytes is imported lazily, so the tests that need no oracle run without it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora import nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


def bnb_nf4(weight: torch.Tensor, block_size: int, double_quant: bool):
    """bitsandbytes' CPU result for ``weight``: ``packed (ceil(n / 2),)``, its ``QuantState``, and the dequantized
    weight, flat, in the weight's dtype and in float32.

    The dequantization treats the weight as one row of even length: bitsandbytes' C++ kernel then takes every shape
    (an odd last dimension would go to its torch.compile fallback, half a minute to compile; and with AVX-512 its
    kernel indexes absmax per row, wrong for rows that are not a whole number of blocks). Values do not depend on the
    shape: blocks run over the flattened weight.
    """
    F = bnb_functional()
    packed, state = F.quantize_4bit(weight, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)
    n = weight.numel()
    state.shape = torch.Size([1, n + n % 2])
    dequantized = []
    for dtype in (weight.dtype, torch.float32):
        state.dtype = dtype
        dequantized.append(F.dequantize_4bit(packed, state, quant_type="nf4").reshape(-1)[:n])
    state.dtype = weight.dtype
    return packed.reshape(-1), state, *dequantized


def assert_same_bits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal dtype, shape and bits (so -0.0 != 0.0 and NaN == NaN)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (
        ours.dtype,
        ours.shape,
        theirs.dtype,
        theirs.shape,
    )
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[ours.element_size()]
    mismatch = (ours.contiguous().view(width) != theirs.contiguous().view(width)).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} differ, first at {mismatch[0].tolist()}"


def assert_matches_bnb(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> None:
    """Codes, statistics and dequantized values (in the weight's dtype and in float32) equal bitsandbytes'."""
    ours = nf4.quantize(weight, block_size=block_size, double_quant=double_quant)
    packed, state, dequantized, dequantized_fp32 = bnb_nf4(weight, block_size, double_quant)
    assert_same_bits(ours.packed, packed)
    if double_quant:
        assert_same_bits(ours.absmax_codes, state.absmax)
        assert_same_bits(ours.absmax_scales, state.state2.absmax)
        assert_same_bits(ours.absmax_offset, state.offset)
    else:
        assert_same_bits(ours.absmax, state.absmax)
    assert ours.dequantize().shape == weight.shape
    assert_same_bits(ours.dequantize().reshape(-1), dequantized)
    assert_same_bits(ours.dequantize(torch.float32).reshape(-1), dequantized_fp32)


# --- the tables ---------------------------------------------------------------------------------------------------


def test_code_tables_are_bitsandbytes():
    F = bnb_functional()
    assert_same_bits(torch.tensor(nf4.NF4_VALUES), F.get_4bit_type("nf4", device="cpu"))
    assert_same_bits(nf4._dynamic_map(), F.create_dynamic_map())


def test_nearest_code_lookup_equals_bucketize_against_midpoints():
    """The 16-bit-key lookup is bucketize (ties to the lower code) at every key boundary and around every midpoint."""
    midpoints = torch.tensor(nf4._NF4_MIDPOINTS)
    top = torch.arange(-32768, 32768, dtype=torch.int32) << 16
    ends = torch.cat([top, top | 0xFFFF]).view(torch.float32)
    ends = ends[ends.abs() <= 1]  # the quantizer only sees [-1, 1]
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    around = torch.cat([midpoints, torch.nextafter(midpoints, up), torch.nextafter(midpoints, down)])
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-38, -1e-38])
    values = torch.cat([ends, around, special, torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    assert_same_bits(nf4._nearest_nf4(values), torch.bucketize(values, midpoints).to(torch.uint8))
    # ties really go down: a value exactly on a midpoint takes the lower code
    assert nf4._nearest_nf4(midpoints).tolist() == list(range(15))


# --- parity with bitsandbytes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        (64, 128),  # whole blocks
        (7, 50),  # 350 weights: a partial last block of 30
        (5, 37),  # odd numel: a padded last nibble
        (2, 3, 64),
        (80, 300),  # 375 blocks: two groups of 256 for the double quantization, the second partial
    ],
)
def test_random_weights_match_bitsandbytes(shape, dtype, double_quant):
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05).to(dtype)
    assert_matches_bnb(weight, double_quant=double_quant)


@pytest.mark.parametrize("block_size", nf4.BLOCK_SIZES)
def test_every_block_size_matches_bitsandbytes(block_size):
    weight = torch.randn(3, 4096 + 100, generator=torch.Generator().manual_seed(block_size)).to(torch.bfloat16)
    for double_quant in (False, True):
        ours = nf4.quantize(weight, block_size=block_size, double_quant=double_quant)
        F = bnb_functional()
        packed, state = F.quantize_4bit(
            weight, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant
        )
        assert_same_bits(ours.packed, packed.reshape(-1))
        assert_same_bits(ours.absmax_codes if double_quant else ours.absmax, state.absmax)
        if block_size <= 1024:  # bitsandbytes dequantizes 2048/4096 with torch.compile on AVX-512 CPUs (slow)
            assert_same_bits(ours.dequantize().reshape(-1), bnb_nf4(weight, block_size, double_quant)[2])
        # an independent dequantization: unpack the nibbles, look up, scale in float32, round once
        codes = torch.stack([ours.packed >> 4, ours.packed & 15], dim=1).reshape(-1)[: weight.numel()].long()
        scales = ours.block_absmax().repeat_interleave(block_size)[: weight.numel()]
        expected = (torch.tensor(nf4.NF4_VALUES)[codes] * scales).to(weight.dtype)
        assert_same_bits(ours.dequantize().reshape(-1), expected)


def division_sensitive(absmax: float = 3.0) -> torch.Tensor:
    """``absmax`` followed by float32 values ``x`` whose code differs between ``x * (1 / absmax)`` (how bitsandbytes
    scales a full block) and ``x / absmax`` (how it scales a partial last block)."""
    midpoints = torch.tensor(nf4._NF4_MIDPOINTS)
    candidates = [torch.cat([midpoints, -midpoints]) * absmax]
    for direction in (torch.tensor(9.0), torch.tensor(-9.0)):
        for _ in range(8):
            candidates.append(torch.nextafter(candidates[-1], direction))
    x, a = torch.cat(candidates), torch.tensor(absmax)
    by_reciprocal = torch.bucketize((x * (1.0 / a)).clamp(-1, 1), midpoints)
    by_division = torch.bucketize((x / a).clamp(-1, 1), midpoints)
    found = x[by_reciprocal != by_division]
    assert found.numel() >= 4
    return torch.cat([a.view(1), found])


def adversarial_weight(dtype: torch.dtype, tail: str) -> torch.Tensor:
    """Blocks of 64 chosen to hit every edge of the quantizer, then an optional partial last block."""
    gen = torch.Generator().manual_seed(7)
    normal = torch.randn(64, generator=gen)
    midpoints = torch.tensor(nf4._NF4_MIDPOINTS)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    finfo = torch.finfo(dtype)

    def block(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values, values[:1].expand(64)])[:64].clone()

    ties = block(torch.cat([torch.tensor([1.0]), midpoints, -midpoints]))  # absmax 1: x / absmax is exact
    ties_scaled = ties * 4.0  # a power-of-two absmax keeps the ties exact
    near_ties = block(
        torch.cat([torch.tensor([1.0]), torch.nextafter(midpoints, up), torch.nextafter(midpoints, down)])
    )
    outlier = normal * 1e-3
    outlier[17] = 1e4 if dtype != torch.float16 else 6e4
    negative_outlier = normal.clone()
    negative_outlier[3] = -50.0
    denormal_fp32 = torch.rand(64, generator=gen) * 5e-39 - 2.5e-39  # absmax below bitsandbytes' 1e-38 floor
    just_above_floor = torch.full((64,), 1.1e-38) * torch.sign(normal)  # a denormal absmax above the floor
    mixed = normal * 1e-2
    mixed[::2] = 1e-40  # denormals next to normal values
    fp16_subnormal = torch.randn(64, generator=gen) * 3e-6  # float16 subnormals (normal in float32)
    rows = [
        normal,
        torch.zeros(64),
        -torch.zeros(64),  # negative zero
        torch.where(torch.arange(64) % 2 == 0, -0.0, normal),
        outlier,
        negative_outlier,
        ties,
        ties_scaled,
        near_ties,
        torch.full((64,), -3.0),  # every weight at -absmax
        torch.full((64,), finfo.max),  # the largest finite value of the dtype
        torch.full((64,), finfo.tiny),  # the smallest normal
        denormal_fp32,
        just_above_floor,
        mixed,
        fp16_subnormal,
        block(division_sensitive()),  # float32: the reciprocal's rounding decides the code
    ]
    if tail == "zeros":
        rows.append(torch.zeros(30))  # a partial block of zeros: absmax clamped to 1e-38
    elif tail == "denormal":
        rows.append(torch.rand(31, generator=gen) * 4e-39)  # partial, odd, denormal: divided by 1e-38
    elif tail == "division":
        rows.append(division_sensitive()[:40])  # partial: these values are divided, not multiplied
    elif tail == "normal":
        rows.append(torch.randn(33, generator=gen))
    return torch.cat(rows).to(dtype)


@pytest.mark.parametrize("tail", ["none", "zeros", "denormal", "division", "normal"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_blocks_match_bitsandbytes(dtype, tail):
    weight = adversarial_weight(dtype, tail)
    assert_matches_bnb(weight, double_quant=False)
    if dtype == torch.float16:  # float32 max values would overflow the float32 mean; float16's do not
        assert_matches_bnb(weight, double_quant=True)
    assert_matches_bnb(weight[weight.abs() < 1e30], double_quant=True)


def test_ties_go_to_the_lower_code():
    """An exact tie between two NF4 values (x / absmax == their float32 midpoint) takes the lower code."""
    midpoints = torch.tensor(nf4._NF4_MIDPOINTS)
    weight = torch.cat([torch.tensor([1.0]), midpoints, torch.zeros(64 - 16)])
    packed = nf4.quantize(weight).packed
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)  # high nibble first
    assert codes[1:16].tolist() == list(range(15))


def test_double_quantized_statistics_match_bitsandbytes_blockwise():
    """The 8-bit absmax quantizer on its own, against bitsandbytes' quantize_blockwise(blocksize=256) (CPU)."""
    F = bnb_functional()
    gen = torch.Generator().manual_seed(3)
    normal = torch.randn(700, generator=gen)  # 3 groups, the last partial
    near_zero = torch.rand(512, generator=gen) * 2e-4 - 1e-4  # where the map is finer than the 65536-entry table
    near_zero[::256] = 1.0
    buckets = torch.arange(1, 65536, dtype=torch.float32)  # every bucket boundary of the table, and both sides
    edges = ((buckets - 0.5) / 65535 * 2 - 1).clamp(-1, 1)
    edges = torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0)), torch.nextafter(edges, torch.tensor(-2.0))])
    edges = torch.cat([edges.reshape(-1, 255), torch.ones(edges.numel() // 255, 1)], dim=1).reshape(-1)
    for values in (normal, near_zero, edges, torch.zeros(300), torch.full((10,), -2.5)):
        codes, scales = nf4._quantize_dynamic(values)
        theirs, state = F.quantize_blockwise(values, blocksize=256)
        assert_same_bits(codes, theirs)
        assert_same_bits(scales, state.absmax)
    # the table is not nearest-value everywhere: this data reaches codes a nearest search would not give
    dyn = nf4._dynamic_map()
    codes, scales = nf4._quantize_dynamic(near_zero)
    nearest = (near_zero.unsqueeze(1) - dyn).abs().argmin(dim=1)
    assert (codes.long() != nearest).any()


@pytest.mark.parametrize("double_quant", [False, True])
def test_chunked_work_matches_bitsandbytes(monkeypatch, double_quant):
    """Large weights are (de)quantized a chunk at a time; small chunks here put many boundaries in a small weight."""
    monkeypatch.setattr(nf4, "_CHUNK", 128)  # 2 blocks of 64
    monkeypatch.setattr(nf4, "_DEQUANT_CHUNK", 192)  # 3 blocks of 64
    weight = torch.randn(41, 99, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)  # partial last block
    assert_matches_bnb(weight, double_quant=double_quant)
    full = nf4.quantize(weight, double_quant=double_quant).dequantize()
    for rows in (slice(3, 17), slice(40, 41)):
        assert_same_bits(nf4.quantize(weight, double_quant=double_quant).dequantize(rows=rows), full[rows])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    block_size=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_matches_bitsandbytes(shape, dtype, block_size, double_quant, scale, seed):
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    assert_matches_bnb(weight, block_size=block_size, double_quant=double_quant)


# --- behaviour without an oracle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_is_within_half_the_widest_code_gap(dtype, double_quant):
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = nf4.quantize(weight, double_quant=double_quant)
    error = (q.dequantize(torch.float32) - weight.float()).abs().view(-1, 64)
    absmax = weight.float().abs().view(-1, 64).amax(dim=1, keepdim=True)
    widest_gap = max(b - a for a, b in zip(nf4.NF4_VALUES, nf4.NF4_VALUES[1:]))
    # half a gap, plus the double quantization's error on the scale (under 1%) and the output's rounding
    assert (error <= absmax * (widest_gap / 2 * 1.01 + 0.01) + 1e-6).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_tensors_round_trip_through_safetensors(tmp_path, double_quant):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    weight = torch.randn(33, 70, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    q = nf4.quantize(weight, block_size=128, double_quant=double_quant)
    tensors = q.state_tensors()
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert sum(t.nbytes for k, t in tensors.items() if k not in ("shape", "block_size", "dtype")) == q.nbytes
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    back = nf4.NF4Weight.from_state_tensors(safetensors_torch.load_file(str(path)))
    assert (back.shape, back.dtype, back.block_size, back.double_quant) == (q.shape, q.dtype, 128, double_quant)
    assert_same_bits(back.dequantize(), q.dequantize())
    assert back.nbytes == q.nbytes


def test_nbytes_is_what_the_layout_says():
    n = 4096 * 64
    q = nf4.quantize(torch.randn(4096, 64), double_quant=True)
    assert q.nbytes == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4
    q = nf4.quantize(torch.randn(4096, 64), double_quant=False)
    assert q.nbytes == n // 2 + 4 * (n // 64)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(10, 40), (9, 7), (200,), (4, 3, 21)])
def test_dequantize_rows_equals_slicing_the_full_weight(shape, double_quant):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    q = nf4.quantize(weight, block_size=32, double_quant=double_quant)
    full = q.dequantize()
    n = shape[0]
    for rows in (slice(0, 1), slice(3, 7), slice(n - 1, n), slice(2, 2), slice(-3, None), slice(None), slice(5, 1)):
        for dtype in (torch.float32, torch.bfloat16):
            assert_same_bits(q.dequantize(dtype, rows=rows), full.to(dtype)[rows])


def test_quantize_leaves_the_weight_alone_and_ignores_autograd():
    weight = torch.nn.Parameter(torch.randn(16, 64))
    before = weight.detach().clone()
    q = nf4.quantize(weight)
    assert torch.equal(weight.detach(), before)
    assert not q.dequantize().requires_grad
    assert q.dequantize().dtype == torch.float32


def test_non_contiguous_weight_quantizes_its_values():
    weight = torch.randn(64, 96)
    assert_same_bits(nf4.quantize(weight.t()).dequantize(), nf4.quantize(weight.t().contiguous()).dequantize())


def test_to_device():
    q = nf4.quantize(torch.randn(8, 64))
    assert q.to("cpu") is q
    if torch.cuda.is_available():  # pragma: no cover - CPU CI
        moved = q.to("cuda")
        assert moved.device.type == "cuda" and moved.packed.device.type == "cuda"
        assert_same_bits(moved.dequantize().cpu(), q.dequantize())


# --- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.float64, torch.complex64])
def test_unsupported_dtypes_are_type_errors_naming_the_dtype(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        nf4.quantize(torch.zeros(64, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("double_quant", [False, True])
def test_non_finite_weights_are_refused_with_count_and_place(bad, double_quant):
    weight = torch.randn(4, 100)
    weight[2, 7] = bad
    weight[3, 99] = bad  # in the partial last block
    with pytest.raises(ValueError, match=r"2 of 400 are NaN or inf \(the first at index \(2, 7\)"):
        nf4.quantize(weight, double_quant=double_quant)


@pytest.mark.parametrize("block_size", [0, -64, 48, 16, 8192, 64.0, True, "64"])
def test_unsupported_block_sizes_are_refused(block_size):
    with pytest.raises(ValueError, match="block_size"):
        nf4.quantize(torch.randn(128), block_size=block_size)


def test_empty_weight_is_refused():
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(torch.zeros(0, 64))


def test_double_quant_overflowing_the_mean_is_refused():
    weight = torch.full((4, 64), 3e38)  # four block absmax values whose float32 sum overflows
    with pytest.raises(ValueError, match="double_quant=False"):
        nf4.quantize(weight, double_quant=True)
    assert torch.isfinite(nf4.quantize(weight, double_quant=False).dequantize()).all()


def test_bad_state_tensors_are_refused():
    tensors = nf4.quantize(torch.randn(8, 64), double_quant=True).state_tensors()
    with pytest.raises(ValueError, match=r"missing \['absmax_offset'\]"):
        nf4.NF4Weight.from_state_tensors({k: v for k, v in tensors.items() if k != "absmax_offset"})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        nf4.NF4Weight.from_state_tensors({**tensors, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="packed must be torch.uint8 of shape"):
        nf4.NF4Weight.from_state_tensors({**tensors, "packed": tensors["packed"][:-1]})
    with pytest.raises(ValueError, match="absmax_scales must be torch.float32"):
        nf4.NF4Weight.from_state_tensors({**tensors, "absmax_scales": tensors["absmax_scales"].half()})
    with pytest.raises(ValueError, match="'dtype' must be 0..2"):
        nf4.NF4Weight.from_state_tensors({**tensors, "dtype": torch.tensor(7)})
    with pytest.raises(ValueError, match="block_size"):
        nf4.NF4Weight.from_state_tensors({**tensors, "block_size": torch.tensor(48)})
    with pytest.raises(ValueError, match="'shape' must be an int64 vector"):
        nf4.NF4Weight.from_state_tensors({**tensors, "shape": torch.tensor([8.0, 64.0])})


def test_bad_dequantize_arguments_are_refused():
    q = nf4.quantize(torch.randn(8, 64))
    with pytest.raises(TypeError, match="torch.int8"):
        q.dequantize(torch.int8)
    with pytest.raises(ValueError, match="step 1"):
        q.dequantize(rows=slice(0, 8, 2))
