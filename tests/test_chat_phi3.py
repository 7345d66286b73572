"""examples/chat_phi3.py as a user meets it: piped and interactive input, one-line errors (built-in tiny model)."""

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora
import lora.phi3

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHAT = [sys.executable, str(EXAMPLES / "chat_phi3.py"), "--max_new_tokens", "3"]


def test_piped_input_echoes_each_question_before_its_reply():
    proc = subprocess.run(
        CHAT,
        input="Hi\n/reset\nWho are you?\n/quit\nNever asked\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    asked = [line for line in lines if line.startswith("> ")]
    assert asked == ["> Hi", "> /reset", "> Who are you?", "> /quit"], proc.stdout
    # each question is followed by its reply (or, for /reset, by what it did)
    assert lines[lines.index("> Hi") + 1] != "> /reset"
    assert "new conversation" in lines[lines.index("> /reset") + 1]
    assert lines[lines.index("> Who are you?") + 1] != "> /quit"


def test_interactive_chat_says_how_to_reset_and_quit():
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(CHAT, stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(controller, b"/quit\n\n")  # the empty line also ends it, should /quit not
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == 0, err[-2000:]
    assert "/reset" in out and "/quit" in out, out


def test_missing_adapter_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [*CHAT, "--adapter", str(tmp_path / "nope.safetensors"), "--prompt", "Hi"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.safetensors" in lines[0], proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Several adapters: --adapter NAME=PATH (repeatable), /use NAME, --compare (in process, on the built-in tiny model)


def _chat_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("chat_phi3", EXAMPLES / "chat_phi3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Two random adapters (ranks 2 and 3) for the built-in tiny model, strong enough to change its replies."""
    out = tmp_path_factory.mktemp("adapters")
    paths = {}
    for seed, (name, r) in enumerate((("math", 2), ("story", 3))):
        net = lora.phi3.Phi3ForCausalLM.from_pretrained(EXAMPLES / "phi3-tiny")
        lora.phi3.inject(net, r=r, lora_alpha=2 * r, lora_dropout=0.0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lora.lora_state_dict(net).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        paths[name] = out / f"{name}.safetensors"
        lora.save_lora(net, paths[name])
    return paths


def _reply_alone(chat, capsys, prompt, *adapter):
    chat.main(["--max_new_tokens", "6", "--prompt", prompt, *(("--adapter", str(adapter[0])) if adapter else ())])
    out = capsys.readouterr().out
    assert out.startswith(f"> {prompt}\n"), out
    return out.split("\n", 1)[1].strip()


def test_compare_prints_each_adapters_reply(two_adapters, capsys):
    chat = _chat_module()
    chat.main(
        [
            "--max_new_tokens",
            "6",
            "--compare",
            "--prompt",
            "Hi",
            "--adapter",
            f"math={two_adapters['math']}",
            "--adapter",
            f"story={two_adapters['story']}",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "> Hi" and [line.split("]")[0] + "]" for line in lines[1:]] == ["[math]", "[story]", "[base]"]
    got = {line[1:].split("] ", 1)[0]: line.split("] ", 1)[1] if "] " in line else "" for line in lines[1:]}
    # each reply is what that adapter alone replies (one mixed batch reproduces three separate runs)
    assert got["math"] == _reply_alone(chat, capsys, "Hi", two_adapters["math"])
    assert got["story"] == _reply_alone(chat, capsys, "Hi", two_adapters["story"])
    assert got["base"] == _reply_alone(chat, capsys, "Hi")
    assert len({got["math"], got["story"], got["base"]}) > 1  # the adapters do change the replies


def test_use_switches_adapter(two_adapters, capsys, monkeypatch):
    import io

    chat = _chat_module()
    piped = "Hi\n/use story\n/reset\nHi\n/use nope\n/use base\n/reset\nHi\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(piped))
    chat.main(
        [
            "--max_new_tokens",
            "6",
            "--adapter",
            f"math={two_adapters['math']}",
            "--adapter",
            f"story={two_adapters['story']}",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    replies = [lines[i + 1].strip() for i, line in enumerate(lines) if line == "> Hi"]
    assert "(now using story)" in lines and "(now using base)" in lines
    assert any("no adapter 'nope'" in line and "math, story, base" in line for line in lines)
    assert replies == [
        _reply_alone(chat, capsys, "Hi", two_adapters["math"]),
        _reply_alone(chat, capsys, "Hi", two_adapters["story"]),
        _reply_alone(chat, capsys, "Hi"),
    ]


def test_single_unnamed_adapter_and_bad_flags(two_adapters, capsys):
    chat = _chat_module()
    chat.main(["--max_new_tokens", "6", "--prompt", "Hi", "--adapter", str(two_adapters["math"])])
    unnamed = capsys.readouterr().out
    chat.main(["--max_new_tokens", "6", "--prompt", "Hi", "--adapter", f"m={two_adapters['math']}"])
    assert capsys.readouterr().out == unnamed  # the same adapter, named or not
    for argv in (
        ["--adapter", f"a={two_adapters['math']}", "--adapter", f"a={two_adapters['story']}"],
        ["--compare", "--prompt", "Hi"],
        ["--adapter", f"base={two_adapters['math']}"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            chat.main(argv)
        assert exit_info.value.code != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err) and ": error: " in err[-1], err


def test_quantized_base_chats():
    proc = subprocess.run(
        [*CHAT, "--quantize", "nf4", "--prompt", "Hi"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("> Hi\n") and len(proc.stdout.splitlines()) == 2
    bad = subprocess.run(
        [*CHAT, "--quantize", "int4", "--prompt", "Hi"], capture_output=True, text=True, timeout=120, check=False
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "int4" in bad.stderr
