"""Shared test helpers: a Phi-3-like Hugging Face tokenizer file, built with the `tokenizers` package itself."""

from __future__ import annotations

from pathlib import Path

import pytest


def write_phi3_like_tokenizer(directory: Path) -> Path:
    """A tiny SentencePiece-style BPE laid out like Phi-3-mini's tokenizer.json, built with `tokenizers` itself.

    Like the real file: byte fallback (<0xNN> pieces), a normalizer that prepends "▁" and maps spaces to "▁", a
    decoder that strips one leading space, a post-processor that adds <s>, and the chat tokens as special added
    tokens in Phi-3's order, all but <|endoftext|> with rstrip=True. The ids differ from Phi-3's on purpose.
    """
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, normalizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "s"), ("▁", "c")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    phi3_order = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|system|>"]
    phi3_order += ["<|end|>", "<|placeholder3|>", "<|user|>"]
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>") for t in phi3_order]
    )
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def phi3_like_tokenizer():
    """The function that writes a Phi-3-like ``tokenizer.json`` into a directory (and returns its path)."""
    return write_phi3_like_tokenizer
