"""Everything that knows about Phi-3: the model, its config, LoRA injection preset, chat format and tokenizers."""

from .chat import (
    IGNORE_INDEX,
    collate,
    encode_prompt,
    format_chat,
    length_grouped_batches,
    load_conversations,
    split_train_eval,
    tokenize_conversation,
)
from .config import LongRoPEScaling, Phi3Config
from .injection import GATE_UP_SLICES, QKV_SLICES, TARGETS, inject, split_sizes, trainable_count
from .model import CausalLMOutput, KVCache, Phi3ForCausalLM
from .tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder, load_tokenizer

__all__ = [
    "Phi3Config",
    "LongRoPEScaling",
    "Phi3ForCausalLM",
    "CausalLMOutput",
    "KVCache",
    "TARGETS",
    "QKV_SLICES",
    "GATE_UP_SLICES",
    "inject",
    "split_sizes",
    "trainable_count",
    "IGNORE_INDEX",
    "load_conversations",
    "split_train_eval",
    "format_chat",
    "tokenize_conversation",
    "encode_prompt",
    "collate",
    "length_grouped_batches",
    "ByteTokenizer",
    "HFTokenizer",
    "StreamDecoder",
    "load_tokenizer",
]
