"""Chat templates: the checkpoint's own (a jinja2 ``chat_template``), or this library's Phi-3 template without jinja2.

A template turns messages into text. To tokenize that text with an exact loss mask, :mod:`lora.phi3.chat` needs to
know which characters are whose, so a template here gives **segments**: ``(text, role)`` pairs that alternate between
template text (``role`` is None: role headers, ``<|end|>``, the final ``<|endoftext|>``) and one message's content
(``role`` is that message's role). Joined, they are the rendered text; empty texts are left out (but for an
assistant's empty content, whose closing ``<|end|>`` is still learned).

* :class:`Phi3Template` is Phi-3-mini-4k-instruct's template (:data:`PHI3_CHAT_TEMPLATE`), for every message::

      <|{role}|>\\n{content}<|end|>\\n

  then ``<|endoftext|>`` for a whole training conversation, or ``<|assistant|>\\n`` for a generation prompt. It is
  the fallback when a checkpoint carries no template (and the built-in tiny model's format).
* :class:`JinjaChatTemplate` renders a checkpoint's ``chat_template`` as transformers' ``apply_chat_template`` does
  (sandboxed jinja2, ``trim_blocks``, ``lstrip_blocks``, the special tokens as variables). Its segments come from
  rendering once with each content replaced by a marker and splitting there; the markers replaced by the contents
  must give the real rendering, else the template rewrites content (strips it, say) and ``ValueError`` says so.
  Phi-4-mini's template, for instance, has no newlines: ``<|user|>{content}<|end|><|assistant|>...``.

jinja2 is optional: only a checkpoint with a template needs it (``pip install jinja2``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar, Protocol

__all__ = ["PHI3_CHAT_TEMPLATE", "ChatTemplate", "JinjaChatTemplate", "Phi3Template", "Segment"]

# microsoft/Phi-3-mini-4k-instruct, tokenizer_config.json's chat_template (also Phi-3-mini-128k's, and Phi-3.5-mini's
# but for skipping an empty system message). Phi3Template is this, in Python.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
_ROLES = ("system", "user", "assistant")

# (text, role): role is None for template text, else the role of the message whose content ``text`` is.
Segment = tuple[str, "str | None"]


class ChatTemplate(Protocol):
    """What :mod:`lora.phi3.chat` needs from a template."""

    def segments(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> list[Segment]: ...


def _append(out: list[Segment], text: str, role: str | None) -> None:
    """Append a segment; template text merges into template text before it. Empty text is dropped, but for an
    assistant's content: the stop token after it is still labelled."""
    if not text and role != "assistant":
        return
    if role is None and out and out[-1][1] is None:
        out[-1] = (out[-1][0] + text, None)
        return
    out.append((text, role))


class Phi3Template:
    """Phi-3's chat template (:data:`PHI3_CHAT_TEMPLATE`) in Python: no jinja2 needed."""

    def segments(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> list[Segment]:
        out: list[Segment] = []
        for m in messages:
            role = m["role"]
            if role not in _ROLES:
                raise ValueError(f"unknown role {role!r} (expected one of {list(_ROLES)})")
            _append(out, f"<|{role}|>\n", None)
            _append(out, m["content"], role)
            _append(out, "<|end|>\n", None)
        _append(out, "<|assistant|>\n" if add_generation_prompt else "<|endoftext|>", None)
        return out

    def __repr__(self) -> str:
        return "Phi3Template()"


def _import_jinja2() -> Any:
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as err:
        raise ImportError(
            "this checkpoint's tokenizer_config.json has a chat_template; rendering it needs the optional 'jinja2' "
            "package: pip install jinja2"
        ) from err
    return jinja2


def _environment(jinja2: Any) -> Any:
    """A sandboxed environment set up as transformers' ``_compile_jinja_template`` sets up its own."""

    class Generation(jinja2.ext.Extension):
        # transformers' {% generation %} ... {% endgeneration %} marks assistant text; here it only renders its body
        # (the segments already say what the assistant wrote).
        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        # Not jinja2's own tojson, which escapes HTML characters.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class JinjaChatTemplate:
    """A checkpoint's jinja2 ``chat_template``.

    Args:
        source: the template text (``tokenizer_config.json``'s ``chat_template``, or ``chat_template.jinja``).
        special_tokens: template variables such as ``{"bos_token": "<s>", "eos_token": "<|endoftext|>"}``, as
            transformers passes its tokenizer's special tokens.
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        if not isinstance(source, str) or not source:
            raise ValueError(f"chat_template must be a non-empty string, got {source!r}")
        jinja2 = _import_jinja2()
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _environment(jinja2).from_string(source)

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages``, as transformers' ``apply_chat_template(tokenize=False)``."""
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self._template.render(messages=plain, add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def segments(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> list[Segment]:
        # A private-use character found in no content and not in the template marks where each content goes.
        contents = [m["content"] for m in messages]
        unused = (chr(c) for c in range(0xE000, 0xF900))
        mark = next(c for c in unused if c not in self.source and all(c not in s for s in contents))
        # Empty contents keep their value (a template may test them, as Phi-3.5-mini's does an empty system message),
        # except an assistant's, whose closing <|end|> is still labelled and so must be located.
        marked = [
            {"role": m["role"], "content": f"{mark}{i}{mark}" if m["content"] or m["role"] == "assistant" else ""}
            for i, m in enumerate(messages)
        ]
        text = self.render(marked, add_generation_prompt)
        out: list[Segment] = []
        pos, last = 0, -1
        for match in re.finditer(f"{mark}(\\d+){mark}", text):
            i = int(match.group(1))
            if i <= last:
                raise ValueError(f"chat template renders message {i}'s content twice or out of order: no loss mask")
            _append(out, text[pos : match.start()], None)
            _append(out, contents[i], messages[i]["role"])
            pos, last = match.end(), i
        _append(out, text[pos:], None)
        if "".join(t for t, _ in out) != self.render(messages, add_generation_prompt):
            raise ValueError(
                "chat template changes message content (it strips or rewrites it), so the tokens of each message "
                "cannot be located for the loss mask"
            )
        return out

    def __repr__(self) -> str:
        return f"JinjaChatTemplate({len(self.source)} characters)"
