"""Bytes autograd saves for backward: each LoRA implementation against the frozen torch layer.

    python benchmarks/saved_bytes.py

Counts every distinct tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` during one training forward
(the input included, each storage view counted once), for the layers of ``bench_layers.py``: ``Conv2d`` 64 -> 64,
k=3, r=8 on 16 x 64 x 56 x 56 (no dropout), and ``Linear`` 3072, r=16, 4096 tokens without and with dropout 0.05.
Bytes, not time: a shared machine does not change them. Target (issue "one home per layer kind"): the conv
saves <= 1.1x the frozen conv's bytes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import _impls
import _timing

MiB = 2**20


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for ``layer(x)``'s backward."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))] = (
            t.numel() * t.element_size()
        )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def main() -> None:
    torch.manual_seed(0)
    cases = [
        (
            "Conv2d 64->64, k=3, r=8, 16x64x56x56",
            lambda impl: _impls.adapt_conv2d(nn.Conv2d(64, 64, 3, padding=1), impl, 8, 16),
            (16, 64, 56, 56),
        ),
        (
            "Linear 3072, r=16, 4096 tokens",
            lambda impl: _impls.adapt_linear(nn.Linear(3072, 3072), impl, 16, 32, 0.0),
            (4096, 3072),
        ),
        (
            "Linear 3072, r=16, 4096 tokens, dropout 0.05",
            lambda impl: _impls.adapt_linear(nn.Linear(3072, 3072), impl, 16, 32, 0.05),
            (4096, 3072),
        ),
    ]
    print(_timing.header(torch.float32))
    print("\n| case | impl | saved MiB | ratio to frozen |\n|---|---|---|---|")
    for label, make, shape in cases:
        x = torch.randn(shape, requires_grad=True)
        frozen = None
        for impl in ("frozen", "ours", "loralib", "peft"):
            if not _impls.have(impl):
                continue
            layer = make(impl)
            layer.train()
            b = saved_bytes(layer, x)
            frozen = b if impl == "frozen" else frozen
            print(f"| {label} | {impl} | {b / MiB:.2f} | {b / frozen:.3f}x |")


if __name__ == "__main__":
    main()
