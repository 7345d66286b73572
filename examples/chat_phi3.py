"""Talk to a Phi-3 checkpoint with a LoRA adapter, streaming the reply token by token.

    python examples/chat_phi3.py --adapter runs/phi3-lora/adapter.safetensors    # after the default fine-tuning run
    python examples/chat_phi3.py --adapter runs/phi3-lora/adapter.safetensors --prompt "Where does Zalfa Fesrow live?"
    python examples/chat_phi3.py --model path/to/Phi-3-mini-4k-instruct --adapter runs/mine/adapter.safetensors
    python examples/chat_phi3.py --model path/to/base --peft path/to/peft_adapter_dir
    python examples/chat_phi3.py --quantize nf4 --adapter runs/qlora/adapter.safetensors      # 4-bit base (QLoRA)

Several adapters over one base (loaded once), switched with ``/use NAME`` (``/use base``: none) or compared:

    python examples/chat_phi3.py --adapter math=runs/a/adapter.safetensors --adapter chat=runs/b/adapter.safetensors
    python examples/chat_phi3.py --adapter math=runs/a/adapter.safetensors --adapter chat=runs/b/adapter.safetensors \
        --compare --prompt "What is 2 + 2?"

``--compare`` answers each prompt with every adapter and the base in one mixed batch (``lora.adapter_batch``) and
prints the replies one under the other, labelled ``[name]``; each prompt is a conversation of its own.

With no ``--prompt`` it reads messages from standard input, one per line, keeping the conversation's history:
``/reset`` starts a new conversation; ``/quit``, an empty line or end of input ends. Piped input is echoed
(``> question``) before each reply, so the output reads as a transcript.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

import lora
from lora.phi3 import Phi3ForCausalLM, StreamDecoder, encode_prompt, load_tokenizer

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------- defaults
model_dir = HERE / "phi3-tiny"
max_new_tokens = 128
temperature = 0.0  # 0 = greedy
top_p = 1.0


def parse_adapter(value: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` -> (NAME, PATH); a bare ``PATH`` -> (None, PATH), the default adapter."""
    name, sep, path = value.partition("=")
    if sep and re.fullmatch(r"[A-Za-z0-9_\-]+", name) and path:
        return name, Path(path)
    return None, Path(value)


def load(
    model: Path,
    adapter: Path | list[tuple[str | None, Path]] | None,
    peft: Path | None,
    bf16: bool,
    quantize: str = "none",
):
    """Base model (meta-built, weights read once; ``quantize="nf4"``: its linears in 4 bits as they are read),
    tokenizer, and the adapters if any (``adapter``: one path, or ``(name or None, path)`` pairs; the first one is
    active)."""
    tokenizer = load_tokenizer(model)
    net = Phi3ForCausalLM.from_pretrained(
        model,
        dtype=torch.bfloat16 if bf16 else None,
        device="cuda" if torch.cuda.is_available() else "cpu",
        quantize=None if quantize == "none" else quantize,
    )
    adapters = [(None, adapter)] if isinstance(adapter, Path) else adapter or []
    for name, path in sorted(adapters, key=lambda a: a[0] is not None):  # the unnamed (default) one first
        lora.load_lora(net, path, adapter_name=name)  # injects LoRA from the file's metadata, then loads it
    if peft is not None:
        lora.import_peft(net, peft)
    if adapters and adapters[0][0] is not None:
        lora.set_adapter(net, adapters[0][0])
    return net.eval(), tokenizer


def reply(net, tokenizer, messages: list[dict], args: argparse.Namespace, out=None) -> str:
    """Generate the assistant's next message, printing it (to ``out``, default stdout) as it streams; return it."""
    out = out or sys.stdout
    ids = torch.tensor([encode_prompt(messages, tokenizer)], device=net.lm_head.weight.device)
    stream = StreamDecoder(tokenizer, skip_special_tokens=True)
    pieces: list[str] = []
    stops = set(tokenizer.stop_token_ids)
    done = False

    def on_token(token: torch.Tensor) -> None:
        nonlocal done
        t = int(token[0])
        if done or t in stops:
            done = True
            return
        piece = stream.push(t)
        pieces.append(piece)
        out.write(piece)
        out.flush()

    gen = torch.Generator(device=ids.device).manual_seed(args.seed)
    net.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        eos_token_id=list(stops),
        streamer=on_token,
        generator=gen,
    )
    if not done:
        pieces.append(stream.flush())
        out.write(pieces[-1])
    out.write("\n")
    out.flush()
    return "".join(pieces).strip()


def compare(
    net, tokenizer, messages: list[dict], names: list[str | None], args: argparse.Namespace, out=None
) -> dict[str | None, str]:
    """Reply to ``messages`` with each adapter of ``names`` (None: the base) in one mixed batch; print the replies
    labelled ``[name]``; return them."""
    out = out or sys.stdout
    prompt = encode_prompt(messages, tokenizer)
    ids = torch.tensor([prompt] * len(names), device=net.lm_head.weight.device)  # one row per adapter
    gen = torch.Generator(device=ids.device).manual_seed(args.seed)
    stops = set(tokenizer.stop_token_ids)
    with lora.adapter_batch(net, names):
        rows = net.generate(
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            eos_token_id=list(stops),
            generator=gen,
        )[:, len(prompt) :].tolist()
    replies = {}
    for name, row in zip(names, rows):
        row = row[: next((i for i, t in enumerate(row) if t in stops), len(row))]
        replies[name] = tokenizer.decode(row, skip_special_tokens=True).strip()
        out.write(f"[{name or 'base'}] {replies[name]}\n")
    out.flush()
    return replies


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    parser.add_argument("--model", type=Path, default=model_dir, help="Phi-3 checkpoint directory (HF layout)")
    parser.add_argument(
        "--adapter",
        action="append",
        type=parse_adapter,
        default=None,
        metavar="[NAME=]PATH",
        help="adapter.safetensors written by finetune_phi3.py; repeat as NAME=PATH for several "
        "adapters over one base (the first is active)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="answer each prompt with every adapter and the base, one reply under the other",
    )
    parser.add_argument("--peft", type=Path, default=None, help="a PEFT LoRA adapter directory instead")
    parser.add_argument("--prompt", action="append", default=None, help="one-shot prompt (repeatable)")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens, help="longest reply, in tokens")
    parser.add_argument("--temperature", type=float, default=temperature, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top_p", type=float, default=top_p, help="nucleus sampling: the top tokens with this mass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--bf16", action="store_true", help="load the base weights in bf16")
    parser.add_argument(
        "--quantize",
        choices=("none", "nf4"),
        default="none",
        help="nf4: the base's linear weights in 4 bits (QLoRA; as a --quantize nf4 run trained)",
    )
    args = parser.parse_args(argv)
    if args.adapter is not None and args.peft is not None:
        parser.error("give --adapter or --peft, not both")
    adapters = args.adapter or []
    names = [name or "default" for name, _ in adapters]
    if len(set(names)) != len(names):
        parser.error(f"each --adapter needs its own name (NAME=PATH; one may be unnamed), got {names}")
    if "base" in names:
        parser.error("'base' means no adapter (/use base, [base] in --compare); name the adapter otherwise")
    if args.compare and not adapters:
        parser.error("--compare needs --adapter (NAME=PATH, repeatable)")

    try:
        net, tokenizer = load(args.model, args.adapter, args.peft, args.bf16, args.quantize)
    except (OSError, ValueError, ImportError) as err:  # a missing or unreadable file: the user's, not a bug
        sys.exit(f"chat_phi3.py: error: {err}")
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.compare:
        for prompt in args.prompt or iter(lambda: sys.stdin.readline().strip(), ""):
            if prompt == "/quit":
                break
            print(f"> {prompt}")
            compare(net, tokenizer, system + [{"role": "user", "content": prompt}], [*names, None], args)
        return
    if args.prompt:
        for prompt in args.prompt:
            print(f"> {prompt}")
            reply(net, tokenizer, system + [{"role": "user", "content": prompt}], args)
        return
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        loaded = ", ".join(f"{n}={p}" if n else str(p) for n, p in adapters) or (str(args.peft) if args.peft else "")
        adapted = f" with {loaded}" if loaded else " (no adapter)"
        print(
            f"{args.model}{adapted}. Type a message and press Enter; /reset starts a new conversation, "
            "/quit (or an empty line, or Ctrl-D) ends"
            + (f", /use NAME switches adapter ({', '.join(names)}, base)." if len(names) > 1 else ".")
        )
    while True:
        if interactive:
            print("> ", end="", flush=True)
        text = sys.stdin.readline().strip()
        if text and not interactive:
            print(f"> {text}")  # piped: the question before its reply, as with --prompt
        if not text or text == "/quit":
            break
        if text == "/reset":
            history = []
            print("(new conversation)")
            continue
        if text.startswith("/use"):
            name = text.removeprefix("/use").strip()
            if name not in (*names, "base"):
                print(f"(no adapter {name!r}; loaded: {', '.join([*names, 'base'])})")
                continue
            lora.set_adapter(net, None if name == "base" else name)
            print(f"(now using {name})")
            continue
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": reply(net, tokenizer, system + history, args)})


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C ends a chat; no traceback
        print()
        sys.exit(130)
