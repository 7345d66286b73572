"""Fine-tune Phi-3 with LoRA under Hugging Face TRL's ``SFTTrainer``, keep only the adapter, reload it and chat.

    pip install -e ".[hf]"                               # trl, transformers, datasets
    python examples/sft_trl.py                           # built-in phi3-tiny on the made-up world: seconds on a CPU
    python examples/sft_trl.py --model_dir path/to/Phi-3-mini-4k-instruct --train_file my_chats.jsonl

The recipe, top to bottom (see docs/hf-trainer.md):

1. transformers' ``Phi3ForCausalLM`` loads ``--model_dir`` (a Hugging Face-layout checkpoint; the built-in
   ``examples/phi3-tiny`` is one). Its tokenizer: a real checkpoint's own (``AutoTokenizer``), or phi3-tiny's byte
   tokenizer rebuilt as a transformers tokenizer (same ids as ``lora.phi3.ByteTokenizer``), with Phi-3's chat
   template.
2. ``lora.phi3.inject`` adapts ``qkv_proj``, ``o_proj``, ``gate_up_proj`` and ``down_proj``; only LoRA trains.
3. ``SFTTrainer`` trains with ``assistant_only_loss=True`` (TRL swaps Phi-3's template for its training variant
   with ``{% generation %}`` markers, so the loss covers each assistant message and its ``<|end|>``) and, where the
   hardware has bf16 matmuls, ``bf16=True``: autocast to bf16 over the fp32 weights, which lora's fused path serves.
4. The Trainer's own checkpoints would hold the whole model; ``adapter_checkpoints()`` (a callback) makes each
   checkpoint ``checkpoint-N/adapter.safetensors`` instead (``--save_steps``).
5. The trained adapter is written from the model (not from a Trainer checkpoint): ``adapter.safetensors``
   (``lora.save_lora``) and ``peft/`` (``lora.export_peft``, loadable by PEFT onto the same base).
6. A fresh base model loads ``adapter.safetensors`` (``lora.load_lora`` injects from the file's own settings); every
   LoRA tensor is checked equal to the trained one, then it answers a few held-out questions (``generate``).

The run directory gets those two adapters, ``log_history.json`` (the Trainer's logged loss, learning rate and
gradient norm per step, to plot) and ``samples.json`` (the answers).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

import lora
from lora.data import load_conversations

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------- defaults
MODEL_DIR = HERE / "phi3-tiny"  # transformers-loadable Phi-3 (config.json + model.safetensors)
TRAIN_FILE = HERE / "data" / "world_chat_train.jsonl"  # OpenAI/TRL "messages", ShareGPT or Alpaca JSONL
EVAL_FILE = HERE / "data" / "world_chat_heldout.jsonl"  # questions to ask the reloaded model
OUTPUT_DIR = Path("runs") / "sft_trl"
# Hugging Face's Phi-3 LoRA recipe is r=16, alpha=32, dropout=0.05 over the same four projections; r=8 is plenty
# for phi3-tiny (hidden 192).
R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.05
MAX_STEPS = 24  # a demonstration-sized run (about 20 s of training on 2 shared CPU cores); more for right answers
BATCH_SIZE = 8
LEARNING_RATE = 2e-3  # a tiny model's LoRA takes a large rate; use ~1e-4 for Phi-3-mini
MAX_LENGTH = 256  # tokens per conversation (phi3-tiny's are bytes: its training conversations are < 200)
SAVE_STEPS = 0  # 0: no intermediate checkpoints
NUM_SAMPLES = 3  # held-out questions answered at the end
MAX_NEW_TOKENS = 48
SEED = 0


class UserError(Exception):
    """A problem with the command line or its files: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------- tokenizer, model


def byte_tokenizer_for_transformers(model_dir: str | os.PathLike) -> Any:
    """phi3-tiny's byte tokenizer (``lora.phi3.ByteTokenizer``) as a transformers ``PreTrainedTokenizerFast``.

    Ids 0-255 are the UTF-8 bytes (each spelled as GPT-2's printable stand-in character, which is how the
    ``tokenizers`` library writes a byte-level vocabulary), then the special tokens with the ids the byte tokenizer
    gives them. No merges: every byte stays its own token, so ``encode`` gives exactly ``ByteTokenizer.encode``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_tokenizer = lora.phi3.load_tokenizer(model_dir)
    if not isinstance(byte_tokenizer, lora.phi3.ByteTokenizer):
        raise TypeError(f"{model_dir}/tokenizer.json is not a ByteTokenizer file")
    stand_in = bytes_to_unicode()  # byte -> printable character
    tok = Tokenizer(models.BPE(vocab={stand_in[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = sorted(byte_tokenizer.special_tokens, key=byte_tokenizer.special_tokens.get)  # ids 256, 257, ...
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=lora.phi3.PHI3_CHAT_TEMPLATE,
    )


def load_hf_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The checkpoint's own tokenizer (with Phi-3's template if it has none), or phi3-tiny's byte tokenizer."""
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("type") == "byte":
        return byte_tokenizer_for_transformers(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = lora.phi3.PHI3_CHAT_TEMPLATE
    return tokenizer


def load_base_model(model_dir: str | os.PathLike) -> torch.nn.Module:
    """transformers' ``Phi3ForCausalLM`` in fp32 (bf16 mixed precision keeps fp32 weights), SDPA attention."""
    from transformers import Phi3ForCausalLM

    return Phi3ForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )


# ------------------------------------------------------------------------------------------------- checkpoints


def adapter_checkpoints(bias: str = "none") -> Any:
    """A ``TrainerCallback`` that writes ``output_dir/checkpoint-N/adapter.safetensors`` (``lora.save_lora``)
    wherever the Trainer would write a checkpoint (``save_strategy`` / ``save_steps``), and stops the Trainer from
    writing its own (the whole model, optimizer, scheduler and RNG states) there.

    A function returning the callback, so that importing this file does not import transformers.
    """
    from transformers import TrainerCallback

    class AdapterCheckpoints(TrainerCallback):
        def _save_adapter(self, args, state, control, model=None, **kwargs):
            if control.should_save and model is not None:
                if state.is_world_process_zero:
                    folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                    folder.mkdir(parents=True, exist_ok=True)
                    lora.save_lora(model, folder / "adapter.safetensors", bias=bias)
                control.should_save = False  # the Trainer's own checkpoint would be the whole model
            return control

        on_step_end = _save_adapter  # DefaultFlowCallback (called first) has set should_save by now
        on_epoch_end = _save_adapter

    return AdapterCheckpoints()


# -------------------------------------------------------------------------------------------------------- main


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to every flag's help but those whose help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("``", ""), formatter_class=_HelpWithDefaults
    )
    p.add_argument("--model_dir", type=Path, default=MODEL_DIR, help="Hugging Face-layout Phi-3 checkpoint")
    p.add_argument("--train_file", type=Path, default=TRAIN_FILE, help="chat JSONL to train on")
    p.add_argument("--eval_file", type=Path, default=EVAL_FILE, help="chat JSONL whose questions are asked at the end")
    p.add_argument("--output_dir", type=Path, default=OUTPUT_DIR, help="run directory (must be empty or absent)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="allow a non-empty --output_dir")
    p.add_argument("--r", type=int, default=R, help="LoRA rank")
    p.add_argument("--lora_alpha", type=float, default=LORA_ALPHA, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--lora_dropout", type=float, default=LORA_DROPOUT, help="dropout on the LoRA input")
    p.add_argument("--max_steps", type=int, default=MAX_STEPS, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="conversations per step")
    p.add_argument("--learning_rate", type=float, default=LEARNING_RATE, help="AdamW peak learning rate")
    p.add_argument("--max_length", type=int, default=MAX_LENGTH, help="tokens kept per conversation")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 mixed precision (autocast over fp32 weights), SFTConfig's default (default: on where "
        "the hardware has bf16 matmuls: CUDA with bf16, or a CPU with AVX512-BF16/AMX; on other CPUs "
        "bf16 matmuls are emulated and many times slower than fp32)",
    )
    p.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute activations in the backward (saves memory on a real model; slower)",
    )
    p.add_argument(
        "--save_steps",
        type=int,
        default=SAVE_STEPS,
        help="write checkpoint-N/adapter.safetensors every N steps (0: none)",
    )
    p.add_argument("--num_samples", type=int, default=NUM_SAMPLES, help="held-out questions answered at the end")
    p.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS, help="tokens generated per answer")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the LoRA init, data order and dropout")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def native_bf16() -> bool:
    """Whether this machine multiplies bf16 matrices in hardware (CUDA with bf16; a CPU with AVX512-BF16 or AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_args(args: argparse.Namespace) -> None:
    for flag in ("r", "max_steps", "batch_size", "max_length", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("save_steps", "num_samples"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UserError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not (args.model_dir / "config.json").is_file():
        raise UserError(f"--model_dir {args.model_dir}: no config.json there (expected a Hugging Face-layout Phi-3)")
    for flag in ("train_file", "eval_file"):
        if not getattr(args, flag).is_file():
            raise UserError(f"--{flag} {getattr(args, flag)}: no such file")
    out = args.output_dir
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite_output_dir)):
        raise UserError(f"--output_dir {out} exists and is not an empty directory (pass --overwrite_output_dir)")


def read_chats(path: Path) -> list[list[dict[str, str]]]:
    try:
        conversations, _ = load_conversations(path)
    except ValueError as err:
        raise UserError(str(err)) from err
    return [[{"role": m["role"], "content": m["content"]} for m in conv] for conv in conversations]


def sft_config(args: argparse.Namespace, **overrides: Any) -> Any:
    """The ``SFTConfig`` of this recipe (``overrides`` for tests)."""
    from trl import SFTConfig

    settings: dict[str, Any] = dict(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, args.max_steps // 10),
        weight_decay=0.0,
        max_length=args.max_length,
        assistant_only_loss=True,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        packing=False,
        seed=args.seed,
        data_seed=args.seed,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        logging_steps=max(1, min(10, args.max_steps // 10)),
        report_to="none",
        dataset_num_proc=None,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not sys.stderr.isatty(),
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def inject(model: torch.nn.Module, args: argparse.Namespace) -> list[str]:
    torch.manual_seed(args.seed)  # the LoRA init
    return lora.phi3.inject(model, r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)


def generate(model: torch.nn.Module, tokenizer: Any, question: list[dict[str, str]], max_new_tokens: int) -> str:
    """Greedy answer to the conversation ``question`` (ending with a user message)."""
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    stop = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        train_chats, eval_chats = read_chats(args.train_file), read_chats(args.eval_file)
        missing = [m for m in ("trl", "transformers", "datasets", "tokenizers") if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f'this example needs {", ".join(missing)}: pip install -e ".[hf]"')
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bf16 is None:
        args.bf16 = native_bf16()
    print(f"bf16 mixed precision: {'on' if args.bf16 else 'off'}")
    from datasets import Dataset
    from trl import SFTTrainer

    tokenizer = load_hf_tokenizer(args.model_dir)
    model = load_base_model(args.model_dir)
    names = inject(model, args)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA r={args.r} over {len(names)} projections: {n_train:,} trainable parameters")

    # 1.-4. Train: the Trainer's checkpoints hold the adapter only.
    trainer = SFTTrainer(
        model=model,
        args=sft_config(args),
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"messages": c} for c in train_chats]),
        callbacks=[adapter_checkpoints()],
    )
    trainer.train()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")

    # 5. The adapter, from the trained model.
    model = trainer.model
    lora.save_lora(model, args.output_dir / "adapter.safetensors")
    lora.export_peft(model, args.output_dir / "peft", base_model_name_or_path=str(args.model_dir))

    # 6. Reload into a fresh base model, check, and ask.
    fresh = load_base_model(args.model_dir)
    lora.load_lora(fresh, args.output_dir / "adapter.safetensors")
    trained, reloaded = lora.lora_state_dict(model), lora.lora_state_dict(fresh)
    if trained.keys() != reloaded.keys() or any(not torch.equal(trained[k], reloaded[k]) for k in trained):
        raise RuntimeError("the reloaded adapter differs from the trained one")  # a bug in lora, not user error
    print(f"reloaded {len(reloaded)} LoRA tensors from {args.output_dir / 'adapter.safetensors'}: all equal")
    fresh.eval()
    samples = []
    for chat in eval_chats[: args.num_samples]:
        question, expected = chat[:-1], chat[-1]["content"]
        answer = generate(fresh, tokenizer, question, args.max_new_tokens)
        samples.append({"question": question[-1]["content"], "answer": answer, "expected": expected})
        print(f"> {question[-1]['content']}\n{answer}   [expected: {expected}]")
    (args.output_dir / "samples.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.output_dir}/: adapter.safetensors, peft/, log_history.json, samples.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
