"""Tokenizers for Phi-3 chat: a byte-level one for the built-in small model, and a wrapper for real checkpoints.

Both speak one interface (:class:`ChatTokenizer`): ``encode(text) -> list[int]``, ``decode(ids) -> str`` and the ids of
Phi-3's chat tokens. Phi-3's chat template (see :mod:`lora.phi3.chat`) needs five special tokens, each a single id:

    <|endoftext|>  end of a document; Phi-3's pad token, and what a training conversation ends with
    <|system|>, <|user|>, <|assistant|>  open a message
    <|end|>        closes a message; what an assistant turn ends with, so generation stops on it

* :class:`ByteTokenizer`: ids 0-255 are raw UTF-8 bytes, then the five special tokens as 256..260. No BOS token:
  Phi-3's chat template emits none, and the built-in model is trained from scratch without one.
* :class:`HFTokenizer`: a real Phi-3 ``tokenizer.json`` read through the optional ``tokenizers`` package. Every id
  is read from the file (Phi-3-mini has ``<|endoftext|>`` = 32000 and ``<|end|>`` = 32007, but nothing here
  assumes it).

Each tokenizer also carries the chat template to format conversations with (``chat_template``): the checkpoint's own
for :class:`HFTokenizer` (``chat_template.jinja``, or ``tokenizer_config.json``'s ``chat_template``), None for the
built-in Phi-3 template (:class:`~lora.phi3.template.Phi3Template`).

``decode`` of a growing list of ids is how to stream text; :class:`StreamDecoder` does it incrementally, holding back
a partly generated UTF-8 character until its last byte arrives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from lora.phi3.config import Phi3Config
from lora.phi3.template import ChatTemplate, JinjaChatTemplate

__all__ = [
    "PHI3_SPECIAL_TOKENS",
    "ByteTokenizer",
    "ChatTokenizer",
    "HFTokenizer",
    "StreamDecoder",
    "load_tokenizer",
]

# The special tokens Phi-3's chat template uses (microsoft/Phi-3-mini-4k-instruct, tokenizer_config.json's
# chat_template). The checkpoint's other added tokens (<|placeholderN|>, <s>, ...) are not needed for chat.
PHI3_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

_NUM_BYTES = 256
_BYTE_TOKENIZER_TYPE = "byte"
_BYTE_TOKENIZER_VERSION = 1


class ChatTokenizer(Protocol):
    """What :mod:`lora.phi3.chat` and generation need from a tokenizer."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int
    end_token_id: int
    pad_token_id: int
    special_tokens: dict[str, int]
    chat_template: ChatTemplate | None  # None: the built-in Phi-3 template

    @property
    def stop_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str, allow_special: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def token_to_id(self, token: str) -> int: ...


def _require_chat_tokens(special_tokens: dict[str, int], where: str) -> None:
    missing = [t for t in PHI3_SPECIAL_TOKENS if t not in special_tokens]
    if missing:
        raise ValueError(f"{where} lacks Phi-3's chat special tokens {missing}; it has {sorted(special_tokens)}")


class ByteTokenizer:
    """Byte-level tokenizer: ids 0-255 are UTF-8 bytes, ids 256.. are whole special tokens.

    Args:
        special_tokens: the special-token strings, given ids 256, 257, ... in order. Must contain
            :data:`PHI3_SPECIAL_TOKENS`.

    Attributes:
        vocab_size: ``256 + len(special_tokens)`` (261 by default).
        bos_token_id: always ``None``; Phi-3's chat template starts with a role token, not a BOS.
        eos_token_id: ``<|endoftext|>``; also ``pad_token_id``.
        end_token_id: ``<|end|>``, which closes every message.
        special_tokens: ``{string: id}``.
    """

    def __init__(self, special_tokens: Sequence[str] = PHI3_SPECIAL_TOKENS) -> None:
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens has duplicates: {list(special_tokens)}")
        for token in special_tokens:
            if len(token.encode("utf-8")) < 2:
                # A one-byte special token would be indistinguishable from that byte in text.
                raise ValueError(f"special token {token!r} must be at least two bytes long")
        self.special_tokens: dict[str, int] = {t: _NUM_BYTES + i for i, t in enumerate(special_tokens)}
        _require_chat_tokens(self.special_tokens, "ByteTokenizer(special_tokens=...)")
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        self.vocab_size: int = _NUM_BYTES + len(special_tokens)
        self.bos_token_id: int | None = None
        self.eos_token_id: int = self.special_tokens["<|endoftext|>"]
        self.end_token_id: int = self.special_tokens["<|end|>"]
        self.pad_token_id: int = self.eos_token_id
        self.chat_template: ChatTemplate | None = None  # the built-in Phi-3 template
        # Longest first, so a special token that is a prefix of another never wins the match.
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True)))

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: ``<|end|>`` (end of the assistant's turn) and ``<|endoftext|>``."""
        return (self.end_token_id, self.eos_token_id)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """``text`` -> ids. With ``allow_special``, special-token strings in ``text`` become their single ids;
        without, they are encoded as their plain bytes (use this for untrusted message content)."""
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            ids.extend(text[start : match.start()].encode("utf-8"))
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids.extend(text[start:].encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """ids -> text. Invalid UTF-8 (e.g. a character cut in half) becomes U+FFFD; this never raises for ids in
        ``range(vocab_size)``. An id outside it raises ``ValueError``."""
        pieces: list[str] = []
        run = bytearray()  # bytes since the last special token, decoded together so multi-byte characters join
        for i in ids:
            i = int(i)
            if 0 <= i < _NUM_BYTES:
                run.append(i)
            elif i in self._id_to_special:
                pieces.append(run.decode("utf-8", errors="replace"))
                run.clear()
                if not skip_special_tokens:
                    pieces.append(self._id_to_special[i])
            else:
                raise ValueError(f"token id {i} is outside this ByteTokenizer's vocabulary (size {self.vocab_size})")
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def token_to_id(self, token: str) -> int:
        """Id of a special token, or of a one-character string that is a single UTF-8 byte; ``KeyError`` else."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        raw = token.encode("utf-8")
        if len(raw) == 1:
            return raw[0]
        raise KeyError(f"{token!r} is not a single token of this ByteTokenizer")

    def save(self, path: str | Path) -> None:
        """Write this tokenizer to ``path`` as a small JSON file (``{"type": "byte", ...}``)."""
        special = [self._id_to_special[_NUM_BYTES + i] for i in range(len(self.special_tokens))]
        obj = {"type": _BYTE_TOKENIZER_TYPE, "version": _BYTE_TOKENIZER_VERSION, "special_tokens": special}
        Path(path).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ByteTokenizer:
        """Read a file written by :meth:`save`."""
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(obj, dict) or obj.get("type") != _BYTE_TOKENIZER_TYPE:
            raise ValueError(f'{path} is not a ByteTokenizer file (expected a JSON object with "type": "byte")')
        if obj.get("version") != _BYTE_TOKENIZER_VERSION:
            raise ValueError(f"{path}: unsupported ByteTokenizer version {obj.get('version')!r}")
        special = obj.get("special_tokens")
        if not isinstance(special, list) or not all(isinstance(t, str) for t in special):
            raise ValueError(f'{path}: "special_tokens" must be a list of strings, got {special!r}')
        return cls(special)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "reading a Hugging Face tokenizer.json needs the optional 'tokenizers' package: pip install tokenizers"
        ) from err
    return tokenizers


def _config_token(config: dict, key: str) -> str | None:
    """A token name from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_source(jinja_file: Path, config: dict, config_path: Path) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja`` (what transformers >= 4.50 writes), else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates: the "default" one)."""
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{config_path}: chat_template lists {sorted(map(str, named))} but no 'default' template")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{config_path}: chat_template must be a string, got {type(template).__name__}")
    return template


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (e.g. Phi-3's, SentencePiece-style BPE) behind :class:`ChatTokenizer`.

    Phi-3's chat tokens are "added tokens" in that file, so ``encode`` turns them into single ids. Encoding never
    applies the file's post-processor (Phi-3's would prepend ``<s>``): the chat template decides what goes where.

    Args:
        path: the ``tokenizer.json`` file. A ``tokenizer_config.json`` beside it, if present, names the BOS and
            pad tokens (``bos_token``, ``pad_token``); without it ``bos_token_id`` is ``None`` and padding uses
            ``<|endoftext|>``, as Phi-3 does. Its ``chat_template`` (or a ``chat_template.jinja`` file beside it)
            becomes :attr:`chat_template`, rendered with jinja2; without one, the built-in Phi-3 template applies.

    Note:
        Phi-3's real file strips the whitespace right of ``<|user|>``, ``<|end|>`` etc. (``rstrip``), so the
        template's ``"\\n"`` after them produces no token, and its normalizer prepends ``"▁"`` to every span
        between special tokens. Both are the checkpoint's own behaviour and are kept as they are.
    """

    def __init__(self, path: str | Path) -> None:
        tokenizers = _import_tokenizers()
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        self._tok = tokenizers.Tokenizer.from_str(text)
        # A second instance that reads special-token strings as plain text, for encode(allow_special=False).
        self._plain = tokenizers.Tokenizer.from_str(text)
        self._plain.encode_special_tokens = True
        self.path = path

        added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_tokens: dict[str, int] = {tok.content: i for i, tok in sorted(added.items()) if tok.special}
        _require_chat_tokens(self.special_tokens, f"{path} (its special added_tokens)")
        # One past the largest id, not the entry count: a file's ids may leave gaps.
        self.vocab_size: int = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_token_id: int = self.special_tokens["<|endoftext|>"]
        self.end_token_id: int = self.special_tokens["<|end|>"]

        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        bos = _config_token(config, "bos_token")
        pad = _config_token(config, "pad_token")
        self.bos_token_id: int | None = None if bos is None else self.token_to_id(bos)
        self.pad_token_id: int = self.eos_token_id if pad is None else self.token_to_id(pad)
        source = _chat_template_source(path.with_name("chat_template.jinja"), config, config_path)
        self.chat_template: ChatTemplate | None = None
        if source is not None:
            # The special tokens are template variables, as transformers passes them ({{ eos_token }} etc.).
            names = ("bos_token", "eos_token", "unk_token", "pad_token")
            variables = {name: token for name in names if (token := _config_token(config, name)) is not None}
            self.chat_template = JinjaChatTemplate(source, variables)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: ``<|end|>`` (end of the assistant's turn) and ``<|endoftext|>``."""
        return (self.end_token_id, self.eos_token_id)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """``text`` -> ids, without BOS/EOS. With ``allow_special``, special-token strings become their ids;
        without, they are tokenized as ordinary text (use this for untrusted message content)."""
        tok = self._tok if allow_special else self._plain
        return list(tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """ids -> text, through the file's decoder; incomplete or invalid UTF-8 becomes U+FFFD.

        Phi-3's decoder drops one leading space of the whole result, so decode a growing list (or use
        :class:`StreamDecoder`) rather than joining per-token decodes, which would lose every word's space.

        An id past the vocabulary decodes to nothing, as in transformers: checkpoints pad the embedding beyond
        the tokenizer (Phi-3: 32064 rows for 32011 tokens) and generation may pick a padding row. A negative id
        (such as -100, a masked label) raises ``ValueError``.
        """
        ids = [int(i) for i in ids]
        for i in ids:
            if i < 0:
                raise ValueError(f"token id {i} is negative; {self.path} has ids 0..{self.vocab_size - 1}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary entry or added token; ``KeyError`` if there is none."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not a token of {self.path}")
        return i

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Turns generated ids, one at a time, into text deltas whose concatenation is ``decode(all ids)``.

    It decodes a short window of recent ids twice (with and without the newest) and emits the difference, as
    Hugging Face's text-generation-inference does: each step costs O(window), not O(all ids), and a leading-space
    rule of the decoder (Phi-3 strips one) applies to both decodes alike. Text ending in U+FFFD is held back: it
    is usually a UTF-8 character whose remaining bytes are still to come.

    Example::

        stream = StreamDecoder(tokenizer)
        for token_id in generated:
            print(stream.push(token_id), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer: ChatTokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this are already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly ``""``)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of generation: return whatever is still held back (an unfinished character comes out as
        U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :]


def load_tokenizer(model_dir: str | Path) -> ByteTokenizer | HFTokenizer:
    """Load ``model_dir/tokenizer.json``: our :class:`ByteTokenizer` file (``"type": "byte"``) or a Hugging Face
    ``tokenizers`` file (one with ``"model"`` and ``"added_tokens"``), as :class:`HFTokenizer`.

    A ``config.json`` in ``model_dir`` must describe a Phi-3 model (:meth:`Phi3Config.from_json_file` refuses
    other architectures): the tokenizer of a Phi-3-small or a Llama checkpoint is no Phi-3 chat tokenizer.
    """
    config_file = Path(model_dir) / "config.json"
    if config_file.is_file():
        Phi3Config.from_json_file(config_file)
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir} (expected a model directory holding one)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if isinstance(obj, dict) and obj.get("type") == _BYTE_TOKENIZER_TYPE:
        return ByteTokenizer.load(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("added_tokens"), list):
        return HFTokenizer(path)
    raise ValueError(
        f'{path} is neither a ByteTokenizer file ("type": "byte") nor a Hugging Face tokenizers file '
        '(with "model" and "added_tokens")'
    )
