"""Helpers shared by the Phi-3 tests: the family's chat templates, and tokenizer.json files of both kinds the family
uses, built with the `tokenizers` package itself (tests/conftest.py has the SentencePiece-style Phi-3 one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora.phi3.template import PHI3_CHAT_TEMPLATE

# The chat_template of each member's tokenizer_config.json (microsoft/... on the Hub). Phi-3-mini-4k and -128k share
# Phi-3's, which lora.phi3.template ships as PHI3_CHAT_TEMPLATE.
CHAT_TEMPLATES = {
    "phi3": PHI3_CHAT_TEMPLATE,
    # Phi-3.5-mini-instruct: Phi-3's, but an empty system message is left out.
    "phi3.5": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' and message['content'] %}"
        "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    # Phi-3-medium-4k/128k-instruct: no system message, the assistant header follows every user message, no EOS.
    "phi3-medium": (
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + "
        "'<|assistant|>' + '\n'}}"
        "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}"
        "{% endif %}{% endfor %}"
    ),
    # Phi-4-mini-instruct: no newlines; a system message may carry tools.
    "phi4-mini": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
        "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + "
        "'<|end|>' }}"
        "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}

# The o200k pre-tokenizer split Phi-4-mini's tokenizer.json uses (before its byte-level step).
O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PHI4_SPECIAL_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what a byte-level BPE vocabulary is written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def write_phi4_like_tokenizer(directory: Path) -> Path:
    """A tiny GPT-style byte-level BPE laid out like Phi-4-mini's tokenizer.json: the 256 byte symbols, a few merges
    (one makes "é" a single token; "€" stays three byte tokens), the o200k split then ByteLevel, a ByteLevel decoder,
    and the chat tokens as special added tokens (no rstrip, as in Phi-4-mini). Ids differ from Phi-4-mini's."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    symbol = _bytes_to_unicode()
    vocab = {symbol[b]: b for b in range(256)}
    e_acute = "".join(symbol[b] for b in "é".encode())
    merges = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "n"),
        ("Ġ", "a"),
        ("Ġ", "c"),
        ("a", "t"),
        ("Ġc", "at"),
        (e_acute[0], e_acute[1]),
        ("Ġ", "i"),
        ("Ġi", "s"),
    ]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PHI4_SPECIAL_TOKENS])
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def write_tokenizer_config(directory: Path, chat_template: str | None, **tokens: str) -> Path:
    """tokenizer_config.json with the special-token names (bos_token=..., eos_token=...) and the chat template."""
    config = {**tokens, "chat_template": chat_template} if chat_template is not None else dict(tokens)
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="session")
def phi4_like_tokenizer():
    """The function that writes a Phi-4-mini-like ``tokenizer.json`` into a directory (and returns its path)."""
    return write_phi4_like_tokenizer


@pytest.fixture(scope="session")
def chat_templates() -> dict[str, str]:
    return CHAT_TEMPLATES


@pytest.fixture(scope="session")
def tokenizer_config():
    """The function that writes ``tokenizer_config.json`` (chat template and special-token names)."""
    return write_tokenizer_config
