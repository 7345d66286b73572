"""Everything that knows about Phi-3: the model, its config, LoRA injection preset, chat templates and tokenizers.

The model-independent data code (JSONL conversations, splits, batches, the loss) lives in :mod:`lora.data`; its
names are also importable from here.
"""

from lora.data import (
    IGNORE_INDEX,
    causal_lm_loss,
    collate,
    length_grouped_batches,
    load_conversations,
    split_train_eval,
)

from .chat import encode_prompt, format_chat, tokenize_conversation
from .config import SUPPORTED_MODELS, LongRoPEScaling, Phi3Config
from .injection import GATE_UP_SLICES, QKV_SLICES, TARGETS, inject, split_sizes, trainable_count
from .model import CausalLMOutput, KVCache, Phi3ForCausalLM
from .template import PHI3_CHAT_TEMPLATE, JinjaChatTemplate, Phi3Template
from .tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder, load_tokenizer

__all__ = [
    "GATE_UP_SLICES",
    "IGNORE_INDEX",
    "PHI3_CHAT_TEMPLATE",
    "QKV_SLICES",
    "SUPPORTED_MODELS",
    "TARGETS",
    "ByteTokenizer",
    "CausalLMOutput",
    "HFTokenizer",
    "JinjaChatTemplate",
    "KVCache",
    "LongRoPEScaling",
    "Phi3Config",
    "Phi3ForCausalLM",
    "Phi3Template",
    "StreamDecoder",
    "causal_lm_loss",
    "collate",
    "encode_prompt",
    "format_chat",
    "inject",
    "length_grouped_batches",
    "load_conversations",
    "load_tokenizer",
    "split_sizes",
    "split_train_eval",
    "tokenize_conversation",
    "trainable_count",
]
