"""Tests for lora.phi3.tokenizer: byte tokenizer round trips, the HF wrapper on a Phi-3-like file, streaming."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora.phi3.tokenizer import (
    PHI3_SPECIAL_TOKENS,
    ByteTokenizer,
    HFTokenizer,
    StreamDecoder,
    load_tokenizer,
)

TEMPLATE = "<|system|>\nBe brief.<|end|>\n<|user|>\nthe cat<|end|>\n<|assistant|>\nhe is here<|end|>\n<|endoftext|>"


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory: pytest.TempPathFactory, phi3_like_tokenizer) -> Path:
    return phi3_like_tokenizer(tmp_path_factory.mktemp("phi3_like"))


@pytest.fixture(scope="module")
def hf(hf_path: Path) -> HFTokenizer:
    return HFTokenizer(hf_path)


# ---------------------------------------------------------------- ByteTokenizer


def test_byte_tokenizer_ids() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 + len(PHI3_SPECIAL_TOKENS)
    assert tok.bos_token_id is None
    assert tok.eos_token_id == tok.special_tokens["<|endoftext|>"] == tok.pad_token_id
    assert tok.end_token_id == tok.special_tokens["<|end|>"]
    assert tok.stop_token_ids == (tok.end_token_id, tok.eos_token_id)
    assert sorted(tok.special_tokens.values()) == list(range(256, tok.vocab_size))
    assert tok.token_to_id("<|user|>") == tok.special_tokens["<|user|>"]
    assert tok.token_to_id("a") == 97
    with pytest.raises(KeyError):
        tok.token_to_id("ab")


def test_byte_tokenizer_special_tokens_are_single_ids() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("<|user|>\nhi<|end|>\n")
    assert ids == [tok.special_tokens["<|user|>"], 10, 104, 105, tok.end_token_id, 10]
    assert tok.decode(ids) == "<|user|>\nhi<|end|>\n"
    assert tok.decode(ids, skip_special_tokens=True) == "\nhi\n"
    # Without allow_special the same string is plain bytes: message content cannot forge a special token.
    assert tok.encode("<|end|>", allow_special=False) == list(b"<|end|>")


@given(st.text())
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=False)) == text
    assert tok.encode(text, allow_special=False) == list(text.encode("utf-8"))


@given(st.lists(st.integers(0, 255)))
def test_byte_tokenizer_decode_invalid_utf8_never_raises(ids: list[int]) -> None:
    assert ByteTokenizer().decode(ids) == bytes(ids).decode("utf-8", errors="replace")


def test_byte_tokenizer_rejects_out_of_range_id() -> None:
    with pytest.raises(ValueError, match="999"):
        ByteTokenizer().decode([1, 999])


def test_byte_tokenizer_needs_the_chat_tokens() -> None:
    with pytest.raises(ValueError, match="<\\|end\\|>"):
        ByteTokenizer(["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"])


def test_byte_tokenizer_save_load(tmp_path: Path) -> None:
    tok = ByteTokenizer([*PHI3_SPECIAL_TOKENS, "<|extra|>"])
    tok.save(tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text())["type"] == "byte"
    for loaded in (ByteTokenizer.load(tmp_path / "tokenizer.json"), load_tokenizer(tmp_path)):
        assert isinstance(loaded, ByteTokenizer)
        assert loaded.special_tokens == tok.special_tokens
        assert loaded.encode(TEMPLATE + "<|extra|>") == tok.encode(TEMPLATE + "<|extra|>")


# ---------------------------------------------------------------- HFTokenizer


def test_hf_reads_ids_from_the_file(hf: HFTokenizer, hf_path: Path) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(hf_path))
    for token in PHI3_SPECIAL_TOKENS:
        assert hf.special_tokens[token] == hf.token_to_id(token) == raw.token_to_id(token)
    assert hf.eos_token_id == raw.token_to_id("<|endoftext|>")
    assert hf.end_token_id == raw.token_to_id("<|end|>")
    assert hf.pad_token_id == hf.eos_token_id
    assert hf.bos_token_id is None  # no tokenizer_config.json beside it
    assert hf.vocab_size == raw.get_vocab_size(with_added_tokens=True)


def test_hf_bos_and_pad_from_tokenizer_config(tmp_path: Path, phi3_like_tokenizer) -> None:
    path = phi3_like_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "pad_token": {"content": "<|placeholder1|>"}})
    )
    tok = HFTokenizer(path)
    assert tok.bos_token_id == 1
    assert tok.pad_token_id == tok.token_to_id("<|placeholder1|>")


def test_hf_template_specials_are_single_ids(hf: HFTokenizer) -> None:
    ids = hf.encode(TEMPLATE)
    sp = hf.special_tokens
    specials = [i for i in ids if i in sp.values()]
    order = ("<|system|>", "<|end|>", "<|user|>", "<|end|>", "<|assistant|>", "<|end|>", "<|endoftext|>")
    assert specials == [sp[t] for t in order]
    assert ids[0] == sp["<|system|>"]  # no <s>: the post-processor is not applied
    # Like Phi-3, rstrip=True swallows the "\n" after each role/end token.
    assert hf.decode(ids, skip_special_tokens=True) == "Be brief. the cat he is here"
    plain = hf.encode("<|end|>", allow_special=False)
    assert sp["<|end|>"] not in plain and hf.decode(plain) == "<|end|>"


def test_hf_matches_transformers(hf: HFTokenizer, hf_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    oracle = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_path))
    for text in (TEMPLATE, "the cat is here", " leading space", "naïve ünïcode ✓ 🐈", "a\n\nb"):
        assert hf.encode(text) == oracle.encode(text, add_special_tokens=False)
        ids = hf.encode(text)
        assert hf.decode(ids) == oracle.decode(ids, skip_special_tokens=False)


# "▁" is the space marker and decodes to " ", so it is left out of round-trip text.
_hf_text = st.text(st.characters(blacklist_characters="▁", blacklist_categories=("Cs",)))


@settings(max_examples=50, deadline=None)
@given(_hf_text)
def test_hf_round_trip(hf: HFTokenizer, text: str) -> None:
    assert hf.decode(hf.encode(text, allow_special=False)) == text


def test_hf_ids_past_the_vocabulary_decode_to_nothing_as_in_transformers(hf: HFTokenizer, hf_path: Path) -> None:
    # Phi-3's embedding has 32064 rows for 32011 tokens: a generated padding id must not stop a run.
    transformers = pytest.importorskip("transformers")
    oracle = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_path))
    ids = [*hf.encode("the cat"), hf.vocab_size + 5, *hf.encode("is")]
    assert hf.decode(ids) == oracle.decode(ids) == hf.decode([i for i in ids if i < hf.vocab_size])
    with pytest.raises(ValueError, match="-100"):
        hf.decode([3, -100])


def test_hf_needs_the_chat_tokens(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="<\\|end\\|>"):
        HFTokenizer(tmp_path / "tokenizer.json")


def test_hf_missing_package_says_how_to_install(hf_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HFTokenizer(hf_path)


# ---------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_dispatch(hf_path: Path, tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(hf_path.parent), HFTokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"something": "else"}')
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- StreamDecoder


def _stream(tok: ByteTokenizer | HFTokenizer, ids: list[int], skip_special_tokens: bool = False) -> str:
    stream = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    return "".join(stream.push(i) for i in ids) + stream.flush()


@given(st.text(), st.booleans())
def test_stream_decoder_byte(text: str, skip: bool) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert _stream(tok, ids, skip) == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=50, deadline=None)
@given(_hf_text)
def test_stream_decoder_hf(hf: HFTokenizer, text: str) -> None:
    ids = hf.encode(text)
    assert _stream(hf, ids) == hf.decode(ids)


def test_stream_decoder_holds_back_half_a_character() -> None:
    tok = ByteTokenizer()
    stream = StreamDecoder(tok)
    euro = list("€".encode())  # three bytes
    assert [stream.push(i) for i in euro] == ["", "", "€"]
    assert stream.push(0xE2) == ""  # a character cut off by the end of generation ...
    assert stream.flush() == "\ufffd"  # ... comes out as U+FFFD


# ---------------------------------------------------------------- both kinds of tokenizer.json, against transformers

# Multi-byte characters of every length: é (2 bytes; one token in the Phi-4-mini-like vocabulary), € and ✓ (3 bytes,
# one token per byte), 🐈 (4 bytes), and CJK.
TEXTS = ("the cat is here", " leading space", "naïve café € ✓ 🐈 猫", "a\n\nb  c", "<|user|>\nhi<|end|>\n<|assistant|>")


@pytest.fixture(scope="module", params=["phi3 (SentencePiece-style byte fallback)", "phi4-mini (GPT-style byte-level)"])
def both_kinds(request, tmp_path_factory, phi3_like_tokenizer, phi4_like_tokenizer) -> tuple[HFTokenizer, object]:
    """Our HFTokenizer and transformers' tokenizer on the same tokenizer.json, of each kind the family uses."""
    transformers = pytest.importorskip("transformers")
    write = phi4_like_tokenizer if request.param.startswith("phi4") else phi3_like_tokenizer
    path = write(tmp_path_factory.mktemp("kind"))
    return HFTokenizer(path), transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))


def test_both_kinds_encode_and_decode_like_transformers(both_kinds) -> None:
    ours, oracle = both_kinds
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == oracle.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == oracle.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True)
        plain = ours.encode(text, allow_special=False)  # special-token strings stay text
        assert not set(plain) & set(ours.special_tokens.values())
        assert plain == oracle(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_both_kinds_stream_like_transformers(both_kinds) -> None:
    """Token by token, our StreamDecoder never shows half a character, and its text is transformers' decode (and
    what transformers' TextStreamer prints, chunked differently)."""
    transformers = pytest.importorskip("transformers")
    import torch

    ours, oracle = both_kinds

    class Collect(transformers.TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            printed.append(text)

    for text in TEXTS:
        ids = ours.encode(text, allow_special=False)
        stream, deltas, printed = StreamDecoder(ours), [], []
        streamer = Collect(oracle)
        for i in ids:
            deltas.append(stream.push(i))
            streamer.put(torch.tensor([i]))
        deltas.append(stream.flush())
        streamer.end()
        assert "".join(deltas) == oracle.decode(ids) == "".join(printed)
        assert not any("\ufffd" in d for d in deltas)
    # a character cut in the middle shows up only once its last byte is there
    euro = ours.encode("€", allow_special=False)
    if len(euro) > 1:
        stream = StreamDecoder(ours)
        assert [stream.push(i) for i in euro] == [""] * (len(euro) - 1) + ["€"]
