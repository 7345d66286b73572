"""lora: LoRA layers with loralib's API and checkpoint keys, without loralib's bugs.

>>> import lora
>>> layer = lora.Linear(768, 768, r=16, lora_alpha=32, lora_dropout=0.05)
>>> lora.mark_only_lora_as_trainable(model)          # doctest: +SKIP
>>> torch.save(lora.lora_state_dict(model), "ckpt_lora.pt")   # doctest: +SKIP
"""

from .base import LoRABase, LoRALayer, is_lora_layer
from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, MergedLinear
from .checkpoint import load_lora, read_lora, save_lora
from .peft_format import export_peft, import_peft
from .injection import inject
from .adapters import active_adapter, adapter_batch, adapter_names, delete_adapter, set_adapter
from .qlora import dequantize, quantize
from .utils import (
    loraplus_param_groups,
    lora_parameter_names,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

from . import data, distributed, nf4, phi3, qlora  # noqa: E402  (lora.data, lora.distributed, lora.phi3.inject etc.; import torch only)

__version__ = "0.1.0"

__all__ = [
    "LoRALayer",
    "LoRABase",
    "Linear",
    "MergedLinear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "is_lora_layer",
    "lora_parameter_names",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "merge_lora",
    "unmerge_lora",
    "merge_and_unload",
    "loraplus_param_groups",
    "inject",
    "save_lora",
    "load_lora",
    "read_lora",
    "export_peft",
    "import_peft",
    "adapter_names",
    "set_adapter",
    "active_adapter",
    "delete_adapter",
    "adapter_batch",
    "quantize",
    "dequantize",
    "data",
    "distributed",
    "nf4",
    "qlora",
    "phi3",
]
