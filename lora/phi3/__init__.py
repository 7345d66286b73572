"""Everything that knows about Phi-3: LoRA injection preset (and, as they land, the model and chat format)."""

from .inject import GATE_UP_SLICES, QKV_SLICES, TARGETS, inject, split_sizes, trainable_count

__all__ = ["TARGETS", "QKV_SLICES", "GATE_UP_SLICES", "inject", "split_sizes", "trainable_count"]
