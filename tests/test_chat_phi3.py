"""examples/chat_phi3.py as a user meets it: piped and interactive input, one-line errors (built-in tiny model)."""

import os
import pty
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHAT = [sys.executable, str(EXAMPLES / "chat_phi3.py"), "--max_new_tokens", "3"]


def test_piped_input_echoes_each_question_before_its_reply():
    proc = subprocess.run(CHAT, input="Hi\n/reset\nWho are you?\n/quit\nNever asked\n", capture_output=True, text=True, timeout=120,
                          check=False)
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
    proc = subprocess.run([*CHAT, "--adapter", str(tmp_path / "nope.safetensors"), "--prompt", "Hi"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.safetensors" in lines[0], proc.stderr


def test_quantized_base_chats():
    proc = subprocess.run([*CHAT, "--quantize", "nf4", "--prompt", "Hi"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("> Hi\n") and len(proc.stdout.splitlines()) == 2
    bad = subprocess.run([*CHAT, "--quantize", "int4", "--prompt", "Hi"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "int4" in bad.stderr
