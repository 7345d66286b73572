"""NF4 (4-bit NormalFloat) weights in pure PyTorch, bit-compatible with bitsandbytes 0.50 on the CPU.

NF4 (Dettmers et al. 2023, "QLoRA", arXiv:2305.14314) stores a weight as 4-bit indices into 16 fixed values spread
like the quantiles of a normal distribution, one float32 scale per block of ``block_size`` consecutive weights (the
weight flattened in row-major order). ``quantize`` returns an :class:`NF4Weight`; ``NF4Weight.dequantize`` gives the
weight back.

Layout (what :meth:`NF4Weight.state_tensors` holds):

* ``packed``: uint8 ``(ceil(numel / 2),)``. Element ``2i`` is the high nibble of byte ``i``, element ``2i + 1`` the
  low nibble; an odd ``numel`` leaves a low nibble of 7 (the code of 0.0) in the last byte.
* without double quantization, ``absmax``: float32 ``(n_blocks,)``, ``n_blocks = ceil(numel / block_size)``.
* with double quantization (bitsandbytes' ``compress_statistics=True``) the absmax vector is itself quantized:
  ``absmax_offset`` float32 ``()`` (its mean), ``absmax_codes`` uint8 ``(n_blocks,)`` (8-bit codes of
  ``absmax - offset`` in bitsandbytes' signed dynamic map, blocks of 256) and ``absmax_scales`` float32
  ``(ceil(n_blocks / 256),)`` (the absmax of each block of 256). 0.5 byte per weight plus about 1.02 bytes per
  block of 64 instead of 4.
* ``shape`` int64 ``(ndim,)``, ``block_size`` int64 ``()``, ``dtype`` int64 ``()`` (0 float32, 1 float16,
  2 bfloat16: the dtype the weight had, and the default of ``dequantize``).

What bitsandbytes 0.50 does on the CPU, and this module does the same way (checked bit for bit in
``tests/test_nf4.py``):

* 4-bit codes (its torch fallback kernel): the weight is cast to float32; a block's absmax is ``max |w|``; the block is
  scaled as ``w * (1 / max(absmax, 1e-38))`` (a float32 reciprocal, then a product) and clamped to [-1, 1]; the code is
  the index of the nearest NF4 value, found against the float32 midpoints ``(c[i] + c[i+1]) / 2`` with an exact tie
  going to the *lower* code. A partial last block (``numel`` not a multiple of ``block_size``) is scaled by a true
  division ``w / absmax`` and stores its absmax clamped to 1e-38 (full blocks store it unclamped, 0 for an all-zero
  block). The 1e-38 floor is a float32 denormal: a block whose absmax is a smaller denormal is scaled by 1e38, not by
  its own absmax, as bitsandbytes does.
* Double quantization: ``offset = absmax.mean()`` (torch's float32 mean; its summation order follows torch's thread
  count, so bit-identity with bitsandbytes holds under the same torch and thread settings). Each block of 256
  ``absmax - offset`` values gets ``scale = max |v|``; ``v * (1 / scale)`` is clamped to [-1, 1] and mapped to a 16-bit
  bucket ``trunc(((v + 1) * 0.5) * 65535 + 0.5)`` (float32), and the bucket to the number of the dynamic map's
  float32 midpoints ``(c[i] + c[i+1]) / 2`` that lie strictly below the bucket's centre ``-1 + 2k / 65535``. That is
  bitsandbytes' 65536-entry lookup table, so codes near 0 are not always the nearest map value (the map is finer than
  the table there); a block whose scale is 0 gets code 0.
* Dequantization: ``code_value * absmax`` in float32 (with double quantization ``absmax = dyn[code] * scale +
  offset``, float32), then one rounding to the output dtype (round to nearest even).

bitsandbytes is a test oracle only; nothing here imports it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

__all__ = ["BLOCK_SIZES", "NF4_VALUES", "STATS_BLOCK_SIZE", "NF4Weight", "quantize"]

# The 16 NF4 values as bitsandbytes stores them (float32 of these literals): quantiles of N(0, 1) normalised to
# [-1, 1], 7 negative, zero, 8 positive (QLoRA, appendix E; bitsandbytes `get_4bit_type("nf4")`).
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# Float32 midpoints between neighbouring NF4 values (the decision boundaries bitsandbytes' quantizer uses).
_NF4_MIDPOINTS: tuple[float, ...] = tuple(
    ((torch.tensor(NF4_VALUES[:-1]) + torch.tensor(NF4_VALUES[1:])) / 2).tolist()  # float32 sums and halves
)
# The block sizes bitsandbytes' quantize_4bit accepts.
BLOCK_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Double quantization quantizes the absmax vector in blocks of 256 (fixed in bitsandbytes' quantize_4bit).
STATS_BLOCK_SIZE = 256

# The dtype codes of the `dtype` state tensor.
_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# Below this absmax a full block is scaled by 1 / 1e-38 (bitsandbytes' clamp; 1e-38 becomes a float32 denormal).
_TINY = 1e-38
# bitsandbytes' 8-bit quantizer maps [-1, 1] onto this many buckets before the code lookup.
_LUT_SIZE = 65536
# Weights quantized per step: bounds the float32 temporaries (1 MiB each) and keeps them in cache.
_CHUNK = 1 << 18
# Weights dequantized per step on the CPU (1 MiB of float32: stays in cache between gather, scale and cast).
_DEQUANT_CHUNK = 1 << 18
_NIBBLE_ZERO = 7  # NF4_VALUES.index(0.0): the code that pads an odd numel


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015, arXiv:1511.04561), float32 (256,), sorted.

    For e = 0..6, the 2**e midpoints of ``linspace(0.1, 1, 2**e + 1)`` scaled by ``10**(e - 6)``, with both signs;
    plus 0 and 1. The arithmetic follows bitsandbytes' ``create_dynamic_map()`` step by step in float32, so the values
    are identical (the test compares them).
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10.0 ** (e - 6)) * mids  # float32 product with the scalar rounded to float32, as in bitsandbytes
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _tables(device: torch.device) -> dict[str, torch.Tensor]:
    """Lookup tables on ``device`` (built once per device; read-only)."""
    nf4 = torch.tensor(NF4_VALUES, dtype=torch.float32)
    byte = torch.arange(256)
    dyn = _dynamic_map()
    dyn_mids = (dyn[:-1] + dyn[1:]) * 0.5
    centres = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    below, split = _nf4_key_tables()
    tables = {
        "nf4": nf4,
        "nf4_below": below,
        "nf4_split": split,
        # (256,) int64 whose 8 bytes are the two float32 values a packed byte holds, high nibble first
        "nf4_pairs": torch.stack([nf4[byte >> 4], nf4[byte & 15]], dim=1).view(torch.int64).view(256),
        "dyn": dyn,
        # bucket k -> number of midpoints strictly below the bucket centre (bucketize's left side)
        "dyn_lut": torch.bucketize(centres, dyn_mids).to(torch.uint8),
    }
    return {k: v.to(device) for k, v in tables.items()}


def _check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} (what bitsandbytes supports), got {block_size!r}")
    return block_size


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _DTYPES:
        raise TypeError(f"NF4 quantizes float32, float16 and bfloat16 weights, got {dtype}")


def _report_non_finite(weight: torch.Tensor) -> None:
    bad = ~torch.isfinite(weight)
    count = int(bad.sum())
    first = tuple(int(i) for i in bad.nonzero()[0].tolist()) if weight.dim() else ()
    raise ValueError(
        f"cannot quantize a weight with non-finite values: {count} of {weight.numel()} are NaN or inf "
        f"(the first at index {first}: {weight[first].item()})"
    )


def _nearest_nf4(scaled: torch.Tensor) -> torch.Tensor:
    """The index of the nearest NF4 value to each of ``scaled`` (float32 in [-1, 1]), ties to the lower index: uint8.

    That is the number of float32 midpoints strictly below the value (bitsandbytes: ``torch.bucketize(scaled,
    midpoints)``), looked up by the value's top 16 bits and corrected by one comparison (see ``_nf4_key_tables``):
    bit for bit the same, 3-6x faster than bucketize on the CPU.
    """
    tables = _tables(scaled.device)
    key = (scaled.view(torch.int32) >> 16) + 32768  # sign, exponent and 7 mantissa bits, as 0..65535
    return tables["nf4_below"].index_select(0, key) + (scaled > tables["nf4_split"].index_select(0, key))


def _nf4_key_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """For each 16-bit key: ``below`` (uint8), the number of NF4 midpoints under every float32 with that key, and
    ``split`` (float32), the one midpoint among them (+inf if none): the code of ``x`` is ``below + (x > split)``.

    The float32 values sharing their top 16 bits form an interval at most 2**-7 wide in [-1, 1], and the midpoints are
    over 0.07 apart, so no interval holds two of them.
    """
    top = torch.arange(-32768, 32768, dtype=torch.int32) << 16  # key k covers the bit patterns (k - 32768) << 16 ...
    ends = torch.stack([top, top | 0xFFFF]).view(torch.float32)  # ... up to | 0xFFFF: (2, 65536) interval ends
    low, high = ends.amin(dim=0).unsqueeze(1), ends.amax(dim=0).unsqueeze(1)  # NaN for NaN keys: never matched
    midpoints = torch.tensor(_NF4_MIDPOINTS)
    inside = (midpoints >= low) & (midpoints <= high)  # (65536, 15)
    if int(inside.sum(dim=1).max()) > 1:
        raise RuntimeError("two NF4 midpoints share a 16-bit key")  # cannot happen with these values
    split = torch.full((65536,), math.inf)
    keys, which = inside.nonzero(as_tuple=True)
    split[keys] = midpoints[which]
    return (midpoints < low).sum(dim=1).to(torch.uint8), split


def _quantize_4bit(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed NF4 codes and per-block absmax of ``flat`` (any float dtype, 1-D), as bitsandbytes computes them.

    Returns ``packed: uint8 (ceil(n / 2),)`` and ``absmax: float32 (ceil(n / block_size),)``.
    """
    n = flat.numel()
    full = n - n % block_size
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=flat.device)
    step = max(_CHUNK // block_size, 1) * block_size  # whole blocks, so an even count of weights
    for start in range(0, full, step):
        stop = min(start + step, full)
        blocks = flat[start:stop].float().view(-1, block_size)  # (b, block_size)
        amax = blocks.abs().amax(dim=1)  # (b,)
        scaled = (blocks * (1.0 / amax.clamp(min=_TINY)).unsqueeze(1)).clamp_(-1.0, 1.0)
        codes = _nearest_nf4(scaled.view(-1))
        packed[start // 2 : stop // 2] = (codes[0::2] << 4) | codes[1::2]
        absmax[start // block_size : stop // block_size] = amax
    if full < n:  # the partial last block: clamped absmax and a true division, as in bitsandbytes
        tail = flat[full:].float()
        amax = tail.abs().amax().clamp(min=_TINY)
        codes = _nearest_nf4((tail / amax).clamp_(-1.0, 1.0))
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), _NIBBLE_ZERO)])
        packed[full // 2 :] = (codes[0::2] << 4) | codes[1::2]
        absmax[-1] = amax
    return packed, absmax


def _quantize_dynamic(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU ``quantize_blockwise(values, blocksize=256)`` with its signed dynamic map.

    ``values: float32 (n,)`` -> ``codes: uint8 (n,)`` and ``scales: float32 (ceil(n / 256),)`` (each block's
    ``max |v|``); see the module docstring for the 65536-bucket lookup it goes through.
    """
    n = values.numel()
    padded = values.new_zeros(-(-n // STATS_BLOCK_SIZE) * STATS_BLOCK_SIZE)
    padded[:n] = values  # zeros never raise a block's max |v|
    blocks = padded.view(-1, STATS_BLOCK_SIZE)  # (n_stats, 256)
    scales = blocks.abs().amax(dim=1)
    inverse = torch.where(scales == 0, 0.0, 1.0 / scales)  # a zero block is coded 0 below, whatever its bucket
    normed = (blocks * inverse.unsqueeze(1)).clamp_(-1.0, 1.0)
    bucket = ((normed + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).long()  # float32 at each step, then truncation
    codes = _tables(values.device)["dyn_lut"][bucket]
    codes[scales == 0] = 0
    return codes.view(-1)[:n], scales


def _quantize_stats(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' double quantization of the absmax vector: ``(codes uint8, scales float32, offset float32 ())``."""
    offset = absmax.mean()  # torch's float32 mean, the reduction bitsandbytes uses
    if not torch.isfinite(offset):
        raise ValueError(
            f"double quantization needs a finite mean of the block absmax values, got {offset.item()} (the weight's "
            "magnitudes overflow float32 when summed); quantize with double_quant=False"
        )
    codes, scales = _quantize_dynamic(absmax - offset)
    return codes, scales, offset


class NF4Weight:
    """An NF4-quantized weight: packed 4-bit codes plus per-block scales; see the module docstring for the layout.

    Build one with :func:`quantize` or :meth:`from_state_tensors`. It is a value: ``to()`` returns a new one and
    nothing mutates it. ``dequantize()`` returns a tensor of ``shape``.
    """

    __slots__ = ("absmax", "absmax_codes", "absmax_offset", "absmax_scales", "block_size", "dtype", "packed", "shape")

    def __init__(
        self,
        packed: torch.Tensor,
        *,
        shape: Sequence[int],
        dtype: torch.dtype,
        block_size: int,
        absmax: torch.Tensor | None = None,
        absmax_codes: torch.Tensor | None = None,
        absmax_scales: torch.Tensor | None = None,
        absmax_offset: torch.Tensor | None = None,
    ) -> None:
        """Wrap already quantized tensors (checked for consistency; nothing is copied).

        Give either ``absmax`` or all three of ``absmax_codes`` / ``absmax_scales`` / ``absmax_offset``.
        """
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.block_size = _check_block_size(block_size)
        _check_dtype(dtype)
        numel = self.shape.numel()
        n_blocks = -(-numel // block_size)
        stats = (absmax_codes, absmax_scales, absmax_offset)
        if (absmax is None) == all(t is None for t in stats) or (absmax is None and any(t is None for t in stats)):
            raise ValueError("give either absmax, or all of absmax_codes, absmax_scales and absmax_offset")
        expected: dict[str, tuple[torch.Tensor | None, torch.dtype, tuple[int, ...]]] = {
            "packed": (packed, torch.uint8, ((numel + 1) // 2,)),
            "absmax": (absmax, torch.float32, (n_blocks,)),
            "absmax_codes": (absmax_codes, torch.uint8, (n_blocks,)),
            "absmax_scales": (absmax_scales, torch.float32, (-(-n_blocks // STATS_BLOCK_SIZE),)),
            "absmax_offset": (absmax_offset, torch.float32, ()),
        }
        for name, (tensor, want_dtype, want_shape) in expected.items():
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
                got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor)
                raise ValueError(
                    f"{name} must be {want_dtype} of shape {want_shape} for a weight of shape {tuple(self.shape)} "
                    f"with block_size={block_size}, got {got}"
                )
            if tensor.device != packed.device:
                raise ValueError(f"{name} is on {tensor.device}, packed on {packed.device}")
        self.packed = packed
        self.absmax = absmax
        self.absmax_codes = absmax_codes
        self.absmax_scales = absmax_scales
        self.absmax_offset = absmax_offset

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves quantized (bitsandbytes' ``compress_statistics``)."""
        return self.absmax is None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (codes and statistics)."""
        return sum(t.nbytes for t in self._tensors().values())

    def numel(self) -> int:
        return self.shape.numel()

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = (
            ("packed", "absmax_codes", "absmax_scales", "absmax_offset") if self.double_quant else ("packed", "absmax")
        )
        return {name: getattr(self, name) for name in names}

    def block_absmax(self) -> torch.Tensor:
        """The float32 scale of each block, ``(ceil(numel / block_size),)`` (dequantized if double-quantized)."""
        return self._block_absmax(0, -(-self.numel() // self.block_size))

    def _block_absmax(self, first: int, end: int) -> torch.Tensor:
        """The scales of blocks ``[first, end)``: ``(end - first,)`` float32."""
        if not self.double_quant:
            return self.absmax[first:end]
        codes = self.absmax_codes[first:end].long()
        scales = self.absmax_scales.repeat_interleave(STATS_BLOCK_SIZE)[first:end]  # the scale of each block's group
        # bitsandbytes: dequantize_blockwise (float32 product), then += offset
        return _tables(self.device)["dyn"][codes] * scales + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None, *, rows: slice | None = None) -> torch.Tensor:
        """The weight, ``shape``, in ``dtype`` (default: the dtype it was quantized from).

        ``rows`` (a slice of the first dimension, step 1) dequantizes only those rows: ``(len(rows), *shape[1:])``,
        equal to ``dequantize(dtype)[rows]`` but touching only the blocks those rows overlap.
        """
        dtype = self.dtype if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dequantize needs a floating dtype, got {dtype}")
        if rows is None:
            start, stop, out_shape = 0, self.numel(), self.shape
        else:
            if not isinstance(rows, slice) or rows.step not in (None, 1) or not self.shape:
                raise ValueError(f"rows must be a slice with step 1 over the first dimension, got {rows!r}")
            first, last, _ = rows.indices(self.shape[0])
            last = max(last, first)
            row_numel = self.shape[1:].numel()
            start, stop, out_shape = first * row_numel, last * row_numel, (last - first, *self.shape[1:])
        return self._dequantize_range(start, stop, dtype).view(out_shape)

    def _dequantize_range(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Flat elements ``[start, stop)`` in ``dtype``: ``(stop - start,)``."""
        bs = self.block_size
        first_block, end_block = start // bs, -(-stop // bs)
        lo, hi = first_block * bs, min(end_block * bs, self.numel())  # the blocks that overlap; lo is even
        out = torch.empty(max(hi - lo, 0), dtype=dtype, device=self.device)
        if hi <= lo:
            return out
        scales = self._block_absmax(first_block, end_block)  # (b,)
        pairs = _tables(self.device)["nf4_pairs"]
        # On the CPU a cache-sized chunk at a time: gather, scale and round while the chunk is still in cache.
        step = max(_DEQUANT_CHUNK // bs, 1) * bs if self.device.type == "cpu" else hi - lo
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            # one int64 per packed byte = its two float32 code values, high nibble first: (bytes,) -> (2 * bytes,)
            values = pairs.index_select(0, self.packed[a // 2 : (b + 1) // 2].int()).view(torch.float32)[: b - a]
            chunk_scales = scales[(a - lo) // bs : -(-(b - lo) // bs)]
            full = (b - a) // bs * bs  # every block but a partial last one
            values[:full].view(-1, bs).mul_(chunk_scales[: full // bs].unsqueeze(1))  # (k, bs) * (k, 1)
            if full < b - a:
                values[full:].mul_(chunk_scales[-1])
            out[a - lo : b - lo] = values  # float32 product, then one rounding to dtype (as bitsandbytes)
        return out[start - lo : stop - lo]

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy on ``device`` (``self`` if already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        moved = {name: t.to(device) for name, t in self._tensors().items()}
        return NF4Weight(shape=self.shape, dtype=self.dtype, block_size=self.block_size, **moved)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild this weight, as a flat dict of tensors (safetensors-ready; see the layout)."""
        meta = {
            "shape": torch.tensor(list(self.shape), dtype=torch.int64),
            "block_size": torch.tensor(self.block_size, dtype=torch.int64),
            "dtype": torch.tensor(_DTYPES.index(self.dtype), dtype=torch.int64),
        }
        return {**self._tensors(), **meta}

    @classmethod
    def from_state_tensors(cls, tensors: dict[str, torch.Tensor]) -> NF4Weight:
        """Rebuild from :meth:`state_tensors` (the tensors are used as they are, not copied)."""
        plain = {"packed", "absmax", "shape", "block_size", "dtype"}
        nested = {"packed", "absmax_codes", "absmax_scales", "absmax_offset", "shape", "block_size", "dtype"}
        keys = set(tensors)
        if keys not in (plain, nested):
            want = plain if "absmax" in keys else nested
            raise ValueError(
                f"NF4 state tensors: missing {sorted(want - keys)}, unexpected {sorted(keys - want)} "
                f"(expected {sorted(plain)} or {sorted(nested)})"
            )
        for name in ("shape", "block_size", "dtype"):
            if tensors[name].dtype != torch.int64 or tensors[name].dim() != (1 if name == "shape" else 0):
                raise ValueError(
                    f"NF4 state tensor {name!r} must be an int64 {'vector' if name == 'shape' else 'scalar'}"
                )
        code = int(tensors["dtype"])
        if not 0 <= code < len(_DTYPES):
            raise ValueError(f"NF4 state tensor 'dtype' must be 0..{len(_DTYPES) - 1}, got {code}")
        shape = [int(s) for s in tensors["shape"].tolist()]
        if any(s < 0 for s in shape):
            raise ValueError(f"NF4 state tensor 'shape' has a negative size: {shape}")
        data = {k: v for k, v in tensors.items() if k not in ("shape", "block_size", "dtype")}
        return cls(shape=shape, dtype=_DTYPES[code], block_size=int(tensors["block_size"]), **data)

    def __repr__(self) -> str:
        stats = "double_quant" if self.double_quant else "absmax"
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, block_size={self.block_size}, {stats}, "
            f"nbytes={self.nbytes}, device={self.device})"
        )


@torch.no_grad()
def quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``weight`` (any shape, float32/float16/bfloat16) to NF4, as bitsandbytes' ``quantize_4bit(weight,
    blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)`` does on the CPU.

    Blocks run over the flattened weight; a ``numel`` that is not a multiple of ``block_size`` ends in a shorter block
    with its own absmax (as in bitsandbytes), so every element round-trips. Raises ``TypeError`` for other dtypes and
    ``ValueError`` for an empty weight, NaN/inf values or an unsupported ``block_size``.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize needs a tensor, got {type(weight).__name__}")
    _check_dtype(weight.dtype)
    _check_block_size(block_size)
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty weight (shape {tuple(weight.shape)})")
    weight = weight.detach()
    packed, absmax = _quantize_4bit(weight.reshape(-1), block_size)
    if not bool(torch.isfinite(absmax).all()):  # max |w| propagates NaN and inf, so this sees every element
        _report_non_finite(weight)
    common = {"shape": weight.shape, "dtype": weight.dtype, "block_size": block_size}
    if not double_quant:
        return NF4Weight(packed, absmax=absmax, **common)
    codes, scales, offset = _quantize_stats(absmax)
    return NF4Weight(packed, absmax_codes=codes, absmax_scales=scales, absmax_offset=offset, **common)
