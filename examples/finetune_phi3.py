"""Fine-tune Phi-3 with LoRA on chat data: no transformers, trl or peft underneath.

    python examples/finetune_phi3.py                                   # built-in tiny Phi-3 and chat data, CPU
    python examples/finetune_phi3.py --model path/to/Phi-3-mini-4k-instruct --data my_chats.jsonl --bf16
    torchrun --nproc_per_node=2 examples/finetune_phi3.py ...           # DistributedDataParallel (gloo / nccl)
    torchrun --nproc_per_node=8 examples/finetune_phi3.py --fsdp ...    # FSDP2: the model sharded over the GPUs
    python examples/finetune_phi3.py --output_dir runs/x --resume       # continue from the latest checkpoint
    python examples/finetune_phi3.py --quantize nf4 --output_dir runs/qlora   # QLoRA: the base in 4 bits (NF4)

Settings come in two groups, as in the Phi-3 CookBook's LoRA recipe: ``training_config`` and ``lora_config``
below. Override them with a JSON file (``--config cfg.json`` holding ``{"training_config": {...},
"lora_config": {...}}``) and then with flags (``--learning_rate 1e-4``, ``--r 8``, ...). The run directory gets
``adapter.safetensors`` (this library's format), ``peft/`` (PEFT's format), ``config.json`` (the settings used),
``metrics.jsonl``, ``loss.png`` (if matplotlib is installed), ``results.json`` (eval before and after, samples),
``checkpoints/`` (the newest ones, always including the last step) and, with ``--merge``, ``merged/`` (a Hugging
Face-layout model with the adapter merged in); ``--full_finetune`` writes ``model/`` instead of the adapter. A new
run refuses a non-empty run directory: ``--resume`` continues it (with the same model, data and LoRA settings),
``--overwrite_output_dir`` clears it. The run ends by listing what it wrote and the command to chat with it.

Data: JSONL in OpenAI/TRL ``messages``, ShareGPT ``conversations`` or Alpaca ``instruction/input/output`` form.
The loss covers assistant tokens only (content and its ``<|end|>``), and only those positions go through the LM head
(in chunks: no full-vocabulary logits). Batches group conversations of similar length so padding stays small;
``--packing`` instead packs shuffled conversations into shared rows, each attending only to itself.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import lora
from lora.data import collate_packed, count_targets, shuffled_batches
from lora.phi3 import (
    IGNORE_INDEX,
    Phi3Config,
    QKV_SLICES,
    TARGETS,
    Phi3ForCausalLM,
    collate,
    encode_prompt,
    length_grouped_batches,
    load_conversations,
    load_tokenizer,
    split_train_eval,
    tokenize_conversation,
)
from lora.phi3.model import Phi3RotaryEmbedding
from lora.phi3.model import _weight_files as weight_files

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------- defaults
# With no arguments: the built-in tiny Phi-3 (pretrained on a made-up world's prose, never on chat) and chat
# questions about half of that world; the held-out questions ask about facts only the prose ever stated.
model_dir = HERE / "phi3-tiny"
data_file = HERE / "data" / "world_chat_train.jsonl"
qa_eval_file = HERE / "data" / "world_chat_heldout.jsonl"  # questions with an "answer": exact-match accuracy

training_config = dict(
    output_dir="runs/phi3-lora",
    learning_rate=1e-3,  # the tiny model's; Hugging Face's Phi-3-mini recipe uses 5e-6 (full) to ~2e-4 (LoRA)
    per_device_train_batch_size=2,  # 559 optimizer steps over the built-in data: small steps learn it in 1 epoch
    per_device_eval_batch_size=8,  # eval-loss batches: little padding (batches of the sorted lengths)
    generation_batch_size=64,  # prompts decoded together: fewer decoding steps (each batch runs to its longest)
    gradient_accumulation_steps=1,
    num_train_epochs=1,
    max_steps=-1,  # > 0 overrides num_train_epochs
    warmup_ratio=0.03,
    lr_scheduler_type="linear",  # or "cosine"
    weight_decay=0.0,
    loraplus_lr_ratio=1.0,  # LoRA+: B's learning rate = this x A's (16 in the LoRA+ paper); 1 is plain LoRA
    max_grad_norm=1.0,
    max_seq_length=2048,
    eval_fraction=0.05,  # held out of --data for the eval loss, unless --eval_data is given
    eval_steps=280,  # 2 eval losses over the default 559 steps (each a forward pass over the eval split)
    save_steps=40,
    save_total_limit=2,
    logging_steps=10,
    seed=0,
    bf16=False,  # bf16 weights and autocast (LoRA parameters stay fp32)
    gradient_checkpointing=False,
    compile=False,  # torch.compile each decoder layer (measured: docs/performance.md)
    packing=False,  # several conversations per row, no padding (measured: docs/performance.md)
    skip_malformed=False,  # skip (and count) malformed JSONL lines instead of stopping
    num_samples=4,  # replies shown before and after training
    max_new_tokens=64,
    full_finetune=False,  # train every weight instead of LoRA (for comparison)
    merge=False,  # also write a merged model in Hugging Face layout
    fsdp=False,  # shard the model over the processes with FSDP2 (docs/distributed.md), instead of DDP's copies
    quantize="none",  # "nf4": QLoRA, the frozen base's linears in 4 bits (NF4, as bitsandbytes), LoRA on top
)
lora_config = dict(
    r=16,
    lora_alpha=32,
    lora_dropout=0.0,  # the tiny default learns more without (docs/performance.md); Phi-3's LoRA recipes use 0.05
    targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    qkv_slices=["q", "k", "v"],  # ["q", "v"] as in the LoRA paper
    fused=False,  # one LoRA per fused matrix, as PEFT
    use_dora=False,  # DoRA: a trainable magnitude per output row (Liu et al. 2024)
    init_lora_weights="default",  # or gaussian, pissa, pissa_niter_<k>, olora (these two rewrite the base weights)
)


# ---------------------------------------------------------------------------------------------------- settings


# One line of --help per setting, and the heading it is listed under (a setting missing here goes under training).
setting_help = {
    "output_dir": ("output", "run directory: adapter, exports, metrics, checkpoints"),
    "learning_rate": ("training", "peak learning rate (AdamW)"),
    "per_device_train_batch_size": ("training", "conversations per micro-batch, on each process"),
    "per_device_eval_batch_size": ("output", "conversations per eval-loss batch, on each process"),
    "generation_batch_size": ("output", "prompts per batch when generating replies (held-out questions, samples)"),
    "gradient_accumulation_steps": ("training", "micro-batches per optimizer step"),
    "num_train_epochs": ("training", "passes over the training data, unless --max_steps > 0"),
    "max_steps": ("training", "optimizer steps to train; > 0 overrides --num_train_epochs"),
    "warmup_ratio": ("training", "fraction of the steps with a linear learning-rate warm-up"),
    "lr_scheduler_type": ("training", "learning-rate decay after the warm-up: cosine or linear"),
    "weight_decay": ("training", "AdamW weight decay"),
    "loraplus_lr_ratio": ("training", "LoRA+: B's learning rate is this times A's (16 in the LoRA+ paper; 1: plain)"),
    "max_grad_norm": ("training", "clip the gradient's global L2 norm to this"),
    "max_seq_length": ("data", "truncate each conversation to this many tokens"),
    "eval_fraction": ("data", "fraction of --data held out for the eval loss, unless --eval_data is given"),
    "eval_steps": ("output", "eval loss every N steps (and at the last)"),
    "save_steps": ("output", "checkpoint every N steps (and at the last)"),
    "save_total_limit": ("output", "keep the newest N checkpoints"),
    "logging_steps": ("output", "log the train loss every N steps"),
    "seed": ("training", "seed of the LoRA init, dropout, data order and eval split"),
    "bf16": ("training", "bf16 weights and autocast (LoRA parameters stay fp32)"),
    "gradient_checkpointing": ("training", "recompute activations in the backward pass: less memory, slower"),
    "compile": ("training", "torch.compile each decoder layer with its LoRA layers (the first steps compile)"),
    "packing": (
        "training",
        "batches of shuffled conversations packed into shared rows (positions restart, attention "
        "stays within each conversation) instead of length-grouped padded batches",
    ),
    "skip_malformed": ("data", "skip (and count) malformed JSONL lines instead of stopping"),
    "num_samples": ("output", "eval prompts whose replies are shown before and after training"),
    "max_new_tokens": ("output", "longest reply generated for the samples and held-out questions"),
    "full_finetune": ("training", "train every weight instead of LoRA (for comparison); writes model/"),
    "merge": ("output", "also write merged/: a Hugging Face-layout model with the adapter merged in"),
    "fsdp": (
        "training",
        "shard the model over the processes with FSDP2 (fully_shard) instead of copying it (DDP); "
        "see docs/distributed.md",
    ),
    "quantize": (
        "training",
        "nf4: QLoRA, the frozen base's linear weights in 4 bits (NF4, double-quantized), "
        "LoRA on top; --merge then merges into the base dequantized to bf16",
    ),
    "r": ("lora", "LoRA rank"),
    "lora_alpha": ("lora", "the LoRA update is scaled by lora_alpha / r"),
    "lora_dropout": ("lora", "dropout on the LoRA branch's input"),
    "targets": ("lora", f"projections to adapt, some of: {' '.join(TARGETS)}"),
    "qkv_slices": ("lora", f"slices of qkv_proj to adapt, some of: {' '.join(QKV_SLICES)}"),
    "fused": ("lora", "one LoRA per fused matrix (qkv_proj, gate_up_proj), as PEFT, not one per slice"),
    "use_dora": ("lora", "DoRA: a trainable magnitude per output row on top of LoRA"),
    "init_lora_weights": (
        "lora",
        "default, gaussian, pissa, pissa_niter_<k> or olora (PiSSA/OLoRA start from the "
        "weights' principal/QR components and subtract them from the base)",
    ),
}
HEADINGS = {"training": "training", "lora": "LoRA", "data": "model and data", "output": "output and evaluation"}


class UsageError(ValueError):
    """A bad setting, flag or input file: reported as one line on stderr with a non-zero exit, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage (40 flags) before the one useful line
        raise UsageError(f"{message} (see --help)")


def _shown(value) -> str:
    """A default as a user would type it: paths relative to the working directory where they lie below it."""
    if isinstance(value, Path):
        with contextlib.suppress(ValueError):
            return str(value.relative_to(Path.cwd()))
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _help(text: str, default) -> str:
    return f"{text} (default: {_shown(default)})".replace("%", "%%")  # argparse %-formats help strings


def build_parser() -> argparse.ArgumentParser:
    """Every setting as a flag with its default and one line of help, under four headings."""
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {key: parser.add_argument_group(title) for key, title in HEADINGS.items()}
    data, out = groups["data"], groups["output"]
    data.add_argument(
        "--model",
        type=Path,
        default=model_dir,
        metavar="DIR",
        help=_help("Phi-3 checkpoint directory (Hugging Face layout)", model_dir),
    )
    data.add_argument(
        "--data",
        type=Path,
        default=data_file,
        metavar="FILE",
        help=_help("training conversations (JSONL: messages, conversations or Alpaca)", data_file),
    )
    data.add_argument(
        "--eval_data",
        type=Path,
        default=None,
        metavar="FILE",
        help="eval conversations (default: --eval_fraction of --data)",
    )
    data.add_argument(
        "--qa_eval",
        type=Path,
        default=None,
        metavar="FILE",
        help="questions with an 'answer' field for exact-match accuracy (default: the built-in "
        "held-out set when --model and --data are the defaults, else none)",
    )
    groups["training"].add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSON file with training_config / lora_config, under the flags (default: none)",
    )
    out.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output_dir from its newest checkpoint (default: off)",
    )
    out.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="clear a non-empty --output_dir (files this script writes only) (default: off)",
    )
    out.add_argument("--kill_after_step", type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL self
    for config, heading in ((training_config, "training"), (lora_config, "lora")):
        for key, value in config.items():
            where, text = setting_help.get(key, (heading, "see the settings at the top of finetune_phi3.py"))
            group, text = groups[where], _help(text, value)
            if isinstance(value, bool):
                group.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, default=None, help=text)
            elif isinstance(value, list):
                group.add_argument(f"--{key}", nargs="+", default=None, metavar="NAME", help=text)
            else:
                metavar = {int: "N", float: "X"}.get(type(value), "DIR" if key.endswith("_dir") else "VALUE")
                group.add_argument(f"--{key}", type=type(value), default=None, metavar=metavar, help=text)
    return parser


def parse_settings(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults < ``--config`` JSON < flags; each value checked, naming where it came from."""
    args = build_parser().parse_args(argv)
    train_cfg, lora_cfg = dict(training_config), dict(lora_config)
    groups = (("training_config", train_cfg, training_config), ("lora_config", lora_cfg, lora_config))
    origin = {
        key: f"{name}.{key}={value!r} (finetune_phi3.py)"
        for name, _, defaults in groups
        for key, value in defaults.items()
    }
    if args.config is not None:
        try:
            loaded = json.loads(args.config.read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"--config {args.config}: {getattr(err, 'strerror', None) or err}") from err
        if not isinstance(loaded, dict):
            raise UsageError(f"--config {args.config}: expected a JSON object with training_config / lora_config")
        for name, group, defaults in groups:
            unknown = set(loaded.get(name, {})) - set(defaults)
            if unknown:
                raise UsageError(f"{args.config}: unknown {name} keys {sorted(unknown)}")
            for key, value in loaded.get(name, {}).items():
                origin[key] = f"{args.config}: {name}.{key}={value!r}"
                group[key] = _typed(value, defaults[key], origin[key])
        unknown = set(loaded) - {"training_config", "lora_config"}
        if unknown:
            raise UsageError(f"{args.config}: unknown top-level keys {sorted(unknown)}")
    for group in (train_cfg, lora_cfg):
        for key in group:
            if getattr(args, key) is not None:
                group[key] = getattr(args, key)
                origin[key] = f"--{key} {_shown(group[key])}"
    if args.resume and args.overwrite_output_dir:
        raise UsageError("give --resume (continue the run) or --overwrite_output_dir (start over), not both")
    check_settings(train_cfg, lora_cfg, origin)
    if args.qa_eval is None and args.model == model_dir and args.data == data_file:
        args.qa_eval = qa_eval_file
    args.training_config, args.lora_config = train_cfg, lora_cfg
    return args


def _typed(value, default, where: str):
    """A config-file value of the default's type (an int is a float too)."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, kind) and kind is not list and (kind is bool or not isinstance(value, bool)):
        return value
    wanted = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list of strings"}
    raise UsageError(f"{where}: expected {wanted.get(kind, kind.__name__)}")


def check_settings(cfg: dict, lcfg: dict, origin: dict[str, str]) -> None:
    """Refuse values that would fail later with a confusing error, or silently do something else."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise UsageError(f"{origin[key]}: {why}")

    need(
        not (cfg["fsdp"] and cfg["full_finetune"]),
        "fsdp",
        "trains LoRA adapters; --full_finetune is not supported with it",
    )
    need(
        not (cfg["fsdp"] and cfg["merge"]),
        "fsdp",
        "does not merge (that needs the whole model in one process): "
        "merge adapter.safetensors afterwards with lora.load_lora and lora.merge_and_unload",
    )
    for key in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "generation_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "max_new_tokens",
    ):
        need(cfg[key] >= 1, key, "must be >= 1")
    need(cfg["save_total_limit"] >= 1, "save_total_limit", "must be >= 1 (the newest checkpoints to keep)")
    need(cfg["max_steps"] > 0 or cfg["num_train_epochs"] >= 1, "num_train_epochs", "must be >= 1 (or give --max_steps)")
    need(cfg["max_seq_length"] >= 2, "max_seq_length", "must be >= 2 (a token and the next one to predict)")
    need(cfg["num_samples"] >= 0, "num_samples", "must be >= 0")
    need(math.isfinite(cfg["learning_rate"]) and cfg["learning_rate"] > 0, "learning_rate", "must be > 0")
    need(0 <= cfg["warmup_ratio"] < 1, "warmup_ratio", "must be in [0, 1)")
    need(cfg["weight_decay"] >= 0, "weight_decay", "must be >= 0")
    need(cfg["max_grad_norm"] > 0, "max_grad_norm", "must be > 0")
    need(math.isfinite(cfg["loraplus_lr_ratio"]) and cfg["loraplus_lr_ratio"] > 0, "loraplus_lr_ratio", "must be > 0")
    need(0 <= cfg["eval_fraction"] < 1, "eval_fraction", "must be in [0, 1)")
    need(cfg["lr_scheduler_type"] in ("cosine", "linear"), "lr_scheduler_type", "must be 'cosine' or 'linear'")
    need(cfg["quantize"] in ("none", "nf4"), "quantize", "must be 'none' or 'nf4'")
    need(
        not (cfg["fsdp"] and cfg["quantize"] != "none"),
        "quantize",
        "--fsdp shards 16- or 32-bit weights; a 4-bit base is not sharded yet: leave out one of them",
    )
    if cfg["full_finetune"]:
        need(
            cfg["quantize"] == "none",
            "quantize",
            "a 4-bit base cannot be fine-tuned in full (QLoRA trains "
            "LoRA over it): leave out --full_finetune or --quantize",
        )
        return
    need(
        lcfg["r"] >= 1,
        "r",
        "the LoRA rank must be >= 1 (with r=0 there is nothing to train; --full_finetune trains every weight)",
    )
    need(math.isfinite(lcfg["lora_alpha"]) and lcfg["lora_alpha"] > 0, "lora_alpha", "must be > 0")
    need(0 <= lcfg["lora_dropout"] < 1, "lora_dropout", "must be in [0, 1)")
    need(
        cfg["quantize"] == "none" or not lcfg["init_lora_weights"].startswith(("pissa", "olora")),
        "quantize",
        "PiSSA / OLoRA rewrite the base weights, which a 4-bit base cannot hold exactly: use another init",
    )
    need(
        bool(lcfg["targets"]) and set(lcfg["targets"]) <= set(TARGETS),
        "targets",
        f"must be some of {' '.join(TARGETS)}",
    )
    need(
        bool(lcfg["qkv_slices"]) and set(lcfg["qkv_slices"]) <= set(QKV_SLICES),
        "qkv_slices",
        f"must be some of {' '.join(QKV_SLICES)}",
    )
    try:
        lora.base.check_init(lcfg["init_lora_weights"])
    except ValueError as e:
        need(False, "init_lora_weights", str(e).split(", got")[0].removeprefix("init_lora_weights "))


# -------------------------------------------------------------------------------------------------------- data


def tokenize_all(conversations: list, tokenizer, max_len: int) -> tuple[list[dict], dict[str, int]]:
    """Tokenize with the assistant-only loss mask; drop rows left without a labelled token after truncation."""
    rows, truncated, empty = [], 0, 0
    for messages in conversations:
        row = tokenize_conversation(messages, tokenizer, max_len)
        truncated += row["truncated"]
        n_target = sum(label != IGNORE_INDEX for label in row["labels"][1:])  # next-token targets with a loss
        if n_target == 0:
            empty += 1
            continue
        rows.append({**row, "n_target": n_target})
    return rows, {"truncated": truncated, "dropped_no_target": empty}


def step_batches(
    rows: list[dict], batch_size: int, accum: int, seed: int, epoch: int, packing: bool = False
) -> list[list[list[int]]]:
    """An epoch as optimizer steps, each a list of ``accum`` micro-batches of row indices (global, all ranks).
    Packed batches need no grouping by length: :func:`collate_packed` leaves (almost) no padding."""
    if packing:
        batches = shuffled_batches(len(rows), batch_size, seed, epoch)
    else:
        batches = length_grouped_batches([len(r["input_ids"]) for r in rows], batch_size, seed, epoch)
    return [batches[i : i + accum] for i in range(0, len(batches) - accum + 1, accum)]


# ----------------------------------------------------------------------------------------------- training math


def lr_lambda(cfg: dict, total_steps: int):
    warmup = int(cfg["warmup_ratio"] * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg["lr_scheduler_type"] == "cosine" else 1 - progress

    return factor


def adamw(params, cfg: dict) -> torch.optim.AdamW:
    """AdamW at the run's learning rate and weight decay, fused: one kernel updates every tensor instead of a loop
    of ops over them (the tiny model's 32 LoRA tensors: 0.7 against 3.1 ms a step on the project's CPU,
    docs/performance.md). FSDP2's sharded (DTensor) parameters keep torch's default implementation."""
    return torch.optim.AdamW(
        params, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"], fused=None if cfg["fsdp"] else True
    )


def token_loss_sum(model, batch: dict[str, torch.Tensor], autocast: bool) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled tokens, and their count.

    The model's ``labels=`` path (:func:`lora.data.lm_head_loss`) puts only the labelled positions through the LM
    head, in chunks: no (B, T, vocab) logits. Every row has a target (``tokenize_all`` drops the others), so the
    mean times the count is the sum.
    """
    n = count_targets(batch["labels"])
    with torch.autocast("cuda" if batch["input_ids"].is_cuda else "cpu", dtype=torch.bfloat16, enabled=autocast):
        packed = {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}  # from collate_packed
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], **packed)
    return out.loss * n, n


@torch.no_grad()
def eval_loss(model, rows: list[dict], cfg: dict, pad_id: int, device) -> float:
    """Mean cross-entropy per assistant token over ``rows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bs = cfg["per_device_eval_batch_size"]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for i in range(0, len(order), bs):
        batch = {k: v.to(device) for k, v in collate([rows[j] for j in order[i : i + bs]], pad_id).items()}
        loss, n = token_loss_sum(model, batch, cfg["bf16"])
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int, device) -> list[str]:
    """Greedy replies to each prompt's messages, in the prompts' order, decoded up to ``<|end|>``. Batched with left
    padding, prompts of similar length together (less padding to attend over), each batch ending when its every
    reply has."""
    was_training = model.training
    model.eval()
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        T = max(len(encoded[j]) for j in batch)
        ids = torch.full((len(batch), T), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, j in enumerate(batch):
            ids[b, T - len(encoded[j]) :], mask[b, T - len(encoded[j]) :] = torch.tensor(encoded[j]), 1
        gen = model.generate(
            ids.to(device), max_new_tokens, attention_mask=mask.to(device), eos_token_id=list(tokenizer.stop_token_ids)
        )
        for j, row in zip(batch, gen[:, T:].tolist()):
            stop = next((k for k, t in enumerate(row) if t in tokenizer.stop_token_ids), len(row))
            out[j] = tokenizer.decode(row[:stop], skip_special_tokens=True).strip()
    model.train(was_training)
    return out


def _last_reply(messages: list[dict]) -> int:
    """Index of the last assistant message: a held-out record's reference reply."""
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def qa_prompts(qa: list[dict]) -> list[list[dict]]:
    """Each held-out record's messages before its last assistant message: the prompt whose reply is scored."""
    return [q["messages"][: _last_reply(q["messages"])] for q in qa]


def qa_scores(qa: list[dict], got: list[str]) -> dict[str, float]:
    """Exact match (reply == the record's last assistant message) and answer match (the record's ``answer``
    appears in the reply as a whole word: "900" does not match "1900") of the replies ``got`` to :func:`qa_prompts`."""
    reference = [q["messages"][_last_reply(q["messages"])]["content"].strip() for q in qa]
    scores = {"exact_match": sum(g == r for g, r in zip(got, reference)) / len(qa)}
    with_answer = [(q["answer"], g) for q, g in zip(qa, got) if isinstance(q.get("answer"), str)]
    if with_answer:
        found = [re.search(rf"(?<!\w){re.escape(a)}(?!\w)", g) is not None for a, g in with_answer]
        scores["answer_match"] = sum(found) / len(with_answer)
    return scores


# ----------------------------------------------------------------------------------------------------- FSDP2


def sharded_model(model_dir: Path, dtype: torch.dtype, lcfg: dict, device: torch.device):
    """Phi-3 with LoRA, sharded over the processes with FSDP2, never whole in any of them: built on the meta device,
    LoRA injected, each decoder layer and then the root ``fully_shard``-ed, and each rank's rows of every weight read
    from the memory-mapped safetensors files. The base is frozen in ``dtype``, the LoRA parameters fp32 (over a
    16-bit base) and initialised with the same values as an unsharded run with the same seed."""
    config = Phi3Config.from_json_file(model_dir / "config.json")
    with torch.device("meta"):
        model = Phi3ForCausalLM(config).to(dtype)
    lora.phi3.inject(
        model,
        r=lcfg["r"],
        lora_alpha=lcfg["lora_alpha"],
        lora_dropout=lcfg["lora_dropout"],
        targets=tuple(lcfg["targets"]),
        qkv_slices=tuple(lcfg["qkv_slices"]),
        fused=lcfg["fused"],
    )
    lora.distributed.shard(model, model.model.layers)
    model.to_empty(device=device)
    tied = ["lm_head.weight"] if config.tie_word_embeddings else []  # the embedding's, as from_pretrained ties it
    lora.distributed.load_into_shards(model, weight_files(model_dir), skip=tied)
    model.model.rotary_emb = Phi3RotaryEmbedding(config, device=device)  # derived buffers: not in the checkpoint
    lora.distributed.init_lora(model)
    return model


# ------------------------------------------------------------------------------------------------ checkpoints

# What a run directory holds: the end-of-run listing describes each, and --overwrite_output_dir clears these only.
RUN_FILES = {
    "adapter.safetensors": "the adapter (lora.load_lora; chat_phi3.py --adapter)",
    "peft": "the adapter in PEFT's format (PEFT, transformers, vLLM; chat_phi3.py --peft)",
    "model": "the fine-tuned model, Hugging Face layout (--full_finetune)",
    "merged": "the model with the adapter merged in, Hugging Face layout (--merge)",
    "config.json": "the settings of this run",
    "metrics.jsonl": "loss, eval loss, learning rate per logged step",
    "loss.png": "the loss curves",
    "results.json": "eval loss, held-out accuracy and sample replies, before and after training",
    "checkpoints": "resumable state for --resume (the newest --save_total_limit of them)",
}


def run_settings(args: argparse.Namespace, cfg: dict, lcfg: dict, world: int) -> dict:
    """What a checkpoint must share with the run that resumes from it: the model, the data and how it is cut into
    batches, the LoRA settings. (The step count, schedule, logging and outputs may change between the two.)"""
    keys = (
        "seed",
        "max_seq_length",
        "eval_fraction",
        "skip_malformed",
        "gradient_accumulation_steps",
        "full_finetune",
        "bf16",
        "quantize",
        "packing",
    )
    return {
        "model": str(args.model.resolve()),
        "data": _digest(args.data, "--data"),
        "eval_data": _digest(args.eval_data, "--eval_data") if args.eval_data is not None else None,
        "training_config": {k: cfg[k] for k in keys}
        | {"global_batch_size": cfg["per_device_train_batch_size"] * world}
        | ({"fsdp": True} if cfg["fsdp"] else {}),  # its optimizer state is keyed by name
        "lora_config": None if cfg["full_finetune"] else lcfg,
    }


def _digest(path: Path, flag: str) -> str:
    """The file's contents, not its name: a copied data file resumes, an edited one does not."""
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    except OSError as err:
        raise UsageError(f"{flag} {path}: {err.strerror or err}") from err
    return f"sha256:{sha.hexdigest()}"


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``key saved vs now`` for every setting that differs, nested keys dotted."""
    out = []
    for key in sorted(saved.keys() | now.keys()):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            brief = [v[:15] + "..." if isinstance(v, str) and v.startswith("sha256:") else v for v in (a, b)]
            out.append(f"{prefix}{key} {brief[0]} vs {brief[1]}")
    return out


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint (a crash mid-save leaves only a ``.tmp-`` directory, never picked)."""
    found = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file())
    return found[-1] if found else None


def check_run_dir(run: Path, args: argparse.Namespace, settings: dict, warn) -> Path | None:
    """Refuse to mix two runs in one directory. Returns the checkpoint to resume from (``None`` for a new run)."""
    if run.exists() and not run.is_dir():
        raise UsageError(f"--output_dir {run} is a file, not a directory")
    if args.resume:
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise UsageError(f"--resume: no checkpoint in {run / 'checkpoints'} (leave out --resume to start a run)")
        if not (ckpt / "settings.json").is_file():
            warn(f"warning: {ckpt} records no settings (an older version wrote it): resuming unchecked")
            return ckpt
        saved = json.loads((ckpt / "settings.json").read_text())
        differ = _differences(saved, json.loads(json.dumps(settings)))
        if differ:
            raise UsageError(
                f"--resume: {ckpt} was written with other settings (checkpoint vs now: "
                f"{'; '.join(differ)}): resume with "
                "its settings, or start over with --overwrite_output_dir or another --output_dir"
            )
        return ckpt
    if run.is_dir() and any(run.iterdir()):
        if not args.overwrite_output_dir:
            raise UsageError(
                f"--output_dir {run} is not empty (an earlier run?): continue it with --resume, "
                "clear it with --overwrite_output_dir, or choose another --output_dir"
            )
        stray = sorted(p.name for p in run.iterdir() if p.name not in RUN_FILES)
        if stray:
            raise UsageError(
                f"--overwrite_output_dir: {run} holds files this script does not write "
                f"({', '.join(stray[:5])}), so it is not cleared: choose another --output_dir"
            )
    return None


def clear_run_dir(run: Path) -> None:
    """Remove an earlier run's outputs (``check_run_dir`` made sure there is nothing else)."""
    for path in run.iterdir() if run.is_dir() else ():
        if path.name in RUN_FILES:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def save_checkpoint(run: Path, model, optimizer, scheduler, position: dict, cfg: dict, settings: dict) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temporary directory renamed into place), with the run's settings
    for ``--resume`` to check; keep the newest N. With ``--fsdp`` every rank calls it (the adapter and optimizer
    state are gathered from the shards) and rank 0 writes."""
    ckpt_root = run / "checkpoints"
    final = ckpt_root / f"step-{position['step']:07d}"
    tmp = ckpt_root / f".tmp-step-{position['step']:07d}"
    writer = lora.distributed.is_writer()
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    save_weights(model, tmp, cfg)
    optimizer_state = full_optimizer_state(model, optimizer) if cfg["fsdp"] else optimizer.state_dict()
    if not writer:
        return final
    state = {
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "position": position,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
    }
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpt_root.glob("step-*"))[: -cfg["save_total_limit"]]:
        shutil.rmtree(old)
    return final


def save_weights(model, directory: Path, cfg: dict) -> None:
    if cfg["full_finetune"]:
        model.save_pretrained(directory)
    else:
        lora.save_lora(model, directory / "adapter.safetensors")


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer state gathered from the shards, keyed by parameter name (so that any number of processes can
    resume it); on rank 0 (the other ranks get an empty dict). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, cfg: dict) -> dict:
    """Restore a checkpoint written by ``save_checkpoint``; return its data position. With ``--fsdp`` each rank
    keeps its own part of the adapter and the optimizer state, whatever the number of processes that wrote it."""
    if cfg["full_finetune"]:
        restored = Phi3ForCausalLM.from_pretrained(ckpt, dtype=next(model.parameters()).dtype)
        model.load_state_dict(restored.state_dict())
    else:
        lora.load_lora(model, ckpt / "adapter.safetensors")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # tensors and plain values only
    if cfg["fsdp"]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    return state["position"]


# ------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    clock = Stopwatch()
    args = parse_settings(argv)
    cfg, lcfg = args.training_config, args.lora_config
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts; FSDP2's device mesh uses the current device
    own_group = distributed or (cfg["fsdp"] and not dist.is_initialized())  # ours to start, and to end
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    elif own_group:  # FSDP2 needs a process group, even of one process
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    warn = (lambda line: print(line, file=sys.stderr)) if is_main else (lambda line: None)
    run = Path(cfg["output_dir"])
    settings = run_settings(args, cfg, lcfg, world)
    resume_from = check_run_dir(run, args, settings, warn)  # before any work: a refused run costs nothing
    missing = missing_extras()
    if missing:
        say(
            f"note: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: running without "
            "(pip install '.[examples]' adds them)"
        )
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])

    # Model, tokenizer and LoRA.
    dtype = torch.bfloat16 if cfg["bf16"] else torch.float32
    with _reading("--model"):
        tokenizer = load_tokenizer(args.model)
        if cfg["fsdp"]:
            model = sharded_model(args.model, dtype, lcfg, device)
        else:
            model = Phi3ForCausalLM.from_pretrained(
                args.model, dtype=dtype, device=device, quantize=None if cfg["quantize"] == "none" else cfg["quantize"]
            )
    if cfg["full_finetune"]:
        for p in model.parameters():
            p.requires_grad = True
    elif not cfg["fsdp"]:  # sharded_model injected LoRA before sharding
        lora.phi3.inject(
            model,
            r=lcfg["r"],
            lora_alpha=lcfg["lora_alpha"],
            lora_dropout=lcfg["lora_dropout"],
            targets=tuple(lcfg["targets"]),
            qkv_slices=tuple(lcfg["qkv_slices"]),
            fused=lcfg["fused"],
            use_dora=lcfg["use_dora"],
            init_lora_weights=lcfg["init_lora_weights"],
        )
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    if cfg["compile"]:
        model.compile_layers()
    trainable = [p for p in model.parameters() if p.requires_grad]
    say(
        f"model {args.model}: {model.num_parameters():,} parameters, {sum(p.numel() for p in trainable):,} trainable"
        f" ({'full fine-tuning' if cfg['full_finetune'] else 'LoRA'}), {dtype}"
        f"{', linear weights in NF4 (QLoRA)' if cfg['quantize'] == 'nf4' else ''}, {device}, world size {world}"
    )

    clock.lap("model")

    # Data.
    with _reading("--data"):
        conversations, stats = load_conversations(args.data, skip_malformed=cfg["skip_malformed"])
    if args.eval_data is not None:
        with _reading("--eval_data"):
            train_convs, (eval_convs, _) = conversations, load_conversations(args.eval_data, cfg["skip_malformed"])
    else:
        with _reading("--eval_fraction"):
            train_convs, eval_convs = split_train_eval(conversations, cfg["eval_fraction"], cfg["seed"])
    train_rows, train_counts = tokenize_all(train_convs, tokenizer, cfg["max_seq_length"])
    eval_rows, _ = tokenize_all(eval_convs, tokenizer, cfg["max_seq_length"])
    if not train_rows:
        raise UsageError(
            f"--data {args.data}: no conversation has an assistant token left after truncation to "
            f"--max_seq_length {cfg['max_seq_length']}"
        )
    if eval_convs and not eval_rows:
        raise UsageError(
            f"{'--eval_data' if args.eval_data else 'the eval split'}: its {len(eval_convs)} "
            "conversations have no assistant token left after truncation to --max_seq_length "
            f"{cfg['max_seq_length']}: raise it, give other --eval_data, or --eval_fraction 0 for no eval"
        )
    if args.eval_data is None and len(eval_rows) == 1:
        warn(
            f"warning: the eval split is 1 conversation (--eval_fraction {cfg['eval_fraction']} of "
            f"{len(conversations)}): its loss says little; give --eval_data (or more data)"
        )
    with _reading("--qa_eval"):
        qa = (
            [json.loads(line) for line in args.qa_eval.read_text().splitlines() if line.strip()] if args.qa_eval else []
        )
    say(
        f"data {args.data}: {stats.n_loaded} conversations ({stats.n_malformed} malformed skipped, "
        f"{stats.n_no_assistant} without an assistant turn skipped); {len(train_rows)} train, {len(eval_rows)} eval; "
        f"{train_counts['truncated']} truncated to {cfg['max_seq_length']} tokens, "
        f"{train_counts['dropped_no_target']} dropped with no assistant token left"
    )

    clock.lap("data")
    global_bs = cfg["per_device_train_batch_size"] * world
    steps_per_epoch = len(
        step_batches(train_rows, global_bs, cfg["gradient_accumulation_steps"], cfg["seed"], 0, cfg["packing"])
    )
    total_steps = cfg["max_steps"] if cfg["max_steps"] > 0 else steps_per_epoch * cfg["num_train_epochs"]
    if cfg["loraplus_lr_ratio"] != 1 and not cfg["full_finetune"]:  # LoRA+: B (and DoRA's magnitude) learn faster
        params = lora.loraplus_param_groups(
            model, lr=cfg["learning_rate"], ratio=cfg["loraplus_lr_ratio"], weight_decay=cfg["weight_decay"]
        )
    else:
        params = trainable
    optimizer = adamw(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    # No buffer changes while training (the rotary frequencies, a 4-bit base's codes): DDP need not re-broadcast
    # them before every forward (for QLoRA that would be the whole 4-bit model each step).
    ddp_model = (
        torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        if distributed and not cfg["fsdp"]
        else model
    )

    position = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    results: dict = {
        "settings": {"training_config": cfg, "lora_config": lcfg, "model": str(args.model), "data": str(args.data)}
    }
    if resume_from is not None:
        position = load_checkpoint(resume_from, model, optimizer, scheduler, cfg)
        if position["step"] >= total_steps and (run / "results.json").is_file():
            say(
                f"{run}: already complete ({resume_from.name} is step {position['step']} of {total_steps}); nothing "
                "to do. --overwrite_output_dir starts it over"
            )
            if own_group:
                dist.destroy_process_group()
            return json.loads((run / "results.json").read_text())
        say(f"resumed from {resume_from} at step {position['step']}")
        if is_main and (run / "metrics.jsonl").is_file():  # forget metrics logged after that checkpoint
            kept = [
                line
                for line in (run / "metrics.jsonl").read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= position["step"]
            ]
            (run / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    elif is_main:
        clear_run_dir(run)  # an earlier run's outputs, with --overwrite_output_dir (check_run_dir refused otherwise)
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text("")
        (run / "config.json").write_text(json.dumps(results["settings"], indent=2, default=str) + "\n")

    # each sample: the conversation up to its first assistant turn (system prompt, if any, and the first question)
    sample_prompts = [
        c[: next(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in eval_convs[: cfg["num_samples"]]
    ]
    metrics = (run / "metrics.jsonl").open("a") if is_main else None
    everyone = cfg["fsdp"]  # sharded: every forward (eval, generation) and every save is a collective
    clock.lap("setup")
    if (is_main or everyone) and resume_from is None:
        results["before"] = evaluate(model, tokenizer, eval_rows, qa, sample_prompts, cfg, device)
        report("before training", results["before"], say)
        if is_main and results["before"]["eval_loss"] is not None:  # step 0: the curve starts where training did
            metrics.write(json.dumps({"step": 0, "eval_loss": results["before"]["eval_loss"]}) + "\n")
        clock.lap("evaluation before training")

    # Train.
    progress = _progress(total_steps, position["step"], is_main)
    model.train()
    tokens_seen, t0, window_loss, window_tokens = 0, time.time(), 0.0, 0
    final_eval_loss = None  # the eval loss at the last step, if taken: the evaluation after training reuses it
    while position["step"] < total_steps:
        steps = step_batches(
            train_rows, global_bs, cfg["gradient_accumulation_steps"], cfg["seed"], position["epoch"], cfg["packing"]
        )
        collate_train = collate_packed if cfg["packing"] else collate
        for micro_batches in steps[position["batch_in_epoch"] :]:
            # Normalise by the labelled tokens of the whole optimizer step (all micro-batches, all ranks), so the
            # gradient does not depend on how the step is split; DDP averages over ranks, hence the * world.
            n_target = sum(train_rows[j]["n_target"] for mb in micro_batches for j in mb)
            for k, mb in enumerate(micro_batches):
                batch = {
                    key: v.to(device)
                    for key, v in collate_train(
                        [train_rows[j] for j in mb[rank::world]], tokenizer.pad_token_id
                    ).items()
                }
                last = k == len(micro_batches) - 1
                if cfg["fsdp"]:  # FSDP2: reduce-scatter the gradients after the last micro-batch only
                    model.set_requires_gradient_sync(last)
                with ddp_model.no_sync() if distributed and not last and not cfg["fsdp"] else contextlib.nullcontext():
                    loss_sum, n = token_loss_sum(ddp_model, batch, cfg["bf16"])
                    (loss_sum * world / n_target).backward()
                window_loss, window_tokens = window_loss + loss_sum.item(), window_tokens + n
                tokens_seen += int(batch["attention_mask"].sum())
            grad_norm = lora.distributed.full_tensor(torch.nn.utils.clip_grad_norm_(trainable, cfg["max_grad_norm"]))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position = dict(position, step=position["step"] + 1, batch_in_epoch=position["batch_in_epoch"] + 1)
            step = position["step"]
            progress.update(1)
            row = {}
            if step % cfg["logging_steps"] == 0 or step == total_steps:
                if distributed:  # the logged loss covers every rank's tokens
                    window = torch.tensor([window_loss, window_tokens], dtype=torch.float64, device=device)
                    dist.all_reduce(window)
                    window_loss, window_tokens = window.tolist()
                row = {
                    "step": step,
                    "epoch": position["epoch"],
                    "loss": window_loss / max(window_tokens, 1),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": round(tokens_seen * world / (time.time() - t0), 1),
                }
                window_loss, window_tokens = 0.0, 0
            if (is_main or everyone) and (step % cfg["eval_steps"] == 0 or step == total_steps) and eval_rows:
                clock.lap("training steps")
                row = {
                    "step": step,
                    **row,
                    "eval_loss": eval_loss(model, eval_rows, cfg, tokenizer.pad_token_id, device),
                }
                final_eval_loss = row["eval_loss"] if step == total_steps else None
                clock.lap("eval loss during training")
            if is_main and row:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                progress.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "eval_loss") if k in row})
            if (is_main or everyone) and (
                step % cfg["save_steps"] == 0 or step == total_steps
            ):  # last: --resume sees it done
                clock.lap("training steps")
                save_checkpoint(run, model, optimizer, scheduler, position, cfg, settings)
                clock.lap("checkpoints")
            if args.kill_after_step == step:
                os.kill(os.getpid(), signal.SIGKILL)  # a real crash, for the resume test
            if step >= total_steps:
                break
        else:
            position = {"step": position["step"], "epoch": position["epoch"] + 1, "batch_in_epoch": 0}
    progress.close()
    clock.lap("training steps")

    # Outputs.
    if is_main:
        metrics.close()
    if is_main or everyone:  # with --fsdp every rank gathers its shards for the files, rank 0 writes them
        if cfg["full_finetune"]:
            write_merged(model, args.model, run / "model", cfg)  # nothing to merge: the weights, and the tokenizer
        else:
            save_weights(model, run, cfg)
            # One rank for every module (zero-padded): serving tools such as vLLM read only r and lora_alpha.
            # PiSSA / OLoRA: as a plain LoRA of rank 2r over the original base (PEFT would redo its own decomposition)
            lora.export_peft(
                model, run / "peft", base_model_name_or_path=str(args.model), uniform_rank=True, convert_to_lora=True
            )
        clock.lap("saving")
        results["after"] = evaluate(model, tokenizer, eval_rows, qa, sample_prompts, cfg, device, final_eval_loss)
        clock.lap("evaluation after training")
    if is_main:
        report("after training", results["after"], say)
        if "before" in results:
            side_by_side(sample_prompts, results["before"]["samples"], results["after"]["samples"], say)
        if cfg["merge"]:
            write_merged(model, args.model, run / "merged", cfg)
            say(f"merged model written to {run / 'merged'}")
        plot_losses(run, f"{'full' if cfg['full_finetune'] else 'LoRA'} fine-tuning of {args.model.name} ({run.name})")
        clock.lap("saving")
        results["seconds"] = clock.summary()  # where this run's wall time went (from main's start)
        say("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in results["seconds"].items()))
        (run / "results.json").write_text(json.dumps({k: v for k, v in results.items()}, indent=2, default=str) + "\n")
        list_outputs(run, say)
        say(f"chat with the result:\n  {chat_command(run, args.model, cfg)}")
    if own_group:
        if distributed:  # every rank ends together: gloo's threads must not be torn down while rank 0 still writes
            dist.barrier()
        dist.destroy_process_group()
    return results


def evaluate(model, tokenizer, eval_rows, qa, sample_prompts, cfg, device, known_loss: float | None = None) -> dict:
    """Eval loss (``known_loss`` if the model's was just computed), held-out accuracy and sample replies."""
    if known_loss is None and eval_rows:
        known_loss = eval_loss(model, eval_rows, cfg, tokenizer.pad_token_id, device)
    out = {"eval_loss": known_loss}
    # the held-out questions and the samples in one set of batches: the samples' replies cost no decoding steps
    # of their own (a batch runs until its longest reply ends)
    got = replies(
        model,
        tokenizer,
        qa_prompts(qa) + sample_prompts,
        cfg["max_new_tokens"],
        cfg["generation_batch_size"],
        device,
    )
    if qa:
        out["qa"] = qa_scores(qa, got[: len(qa)])
    out["samples"] = got[len(qa) :]
    return out


def report(when: str, r: dict, say) -> None:
    line = f"{when}: eval loss (assistant tokens) {r['eval_loss']:.4f}" if r["eval_loss"] is not None else when
    if "qa" in r:
        line += f"; held-out questions: exact match {r['qa']['exact_match']:.1%}"
        if "answer_match" in r["qa"]:
            line += f", answer match {r['qa']['answer_match']:.1%}"
    say(line)


def side_by_side(prompts, before, after, say) -> None:
    for p, b, a in zip(prompts, before, after):
        say(f"\n  user:   {p[-1]['content']}\n  before: {b[:120]!r}\n  after:  {a[:120]!r}")
    say("")


def write_merged(model, base_dir: Path, out: Path, cfg: dict) -> None:
    """The adapter merged into the weights (in place: the run is over), saved in Hugging Face layout with the base
    model's tokenizer files; with ``full_finetune``, just the weights."""
    if cfg["quantize"] == "nf4":  # QLoRA: merge into the base dequantized to bf16, never into 4 bits
        lora.dequantize(model, dtype=torch.bfloat16)
        lora.merge_and_unload(model)
        model.to(torch.bfloat16)
    elif not cfg["full_finetune"]:
        lora.merge_and_unload(model)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (base_dir / name).is_file():
            shutil.copy(base_dir / name, out / name)


def plot_losses(run: Path, title: str) -> None:
    """``loss.png`` from ``metrics.jsonl``: the train loss per logged step and the eval loss from step 0 (before
    training) on, with markers so that a run of a few steps shows. Nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], ".-", label="train loss")
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per assistant token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=100)
    plt.close(fig)


def list_outputs(run: Path, say) -> None:
    """Every file the run directory holds, with its size; each top-level entry's first file says what it is."""
    files = sorted(p for p in run.rglob("*") if p.is_file())
    say(f"wrote {run}/ ({len(files)} files, {_size(sum(p.stat().st_size for p in files))}):")
    width = max(len(str(p.relative_to(run))) for p in files)
    described = set()
    for p in files:
        name = str(p.relative_to(run))
        top = p.relative_to(run).parts[0]
        what = RUN_FILES.get(top, "") if top not in described else ""
        described.add(top)
        say(f"  {name:<{width}}  {_size(p.stat().st_size):>9}  {what}".rstrip())


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # unreachable


def chat_command(run: Path, model: Path, cfg: dict) -> str:
    """The command that chats with this run's result, as typed from the current directory."""
    script = Path(os.path.abspath(__file__)).parent / "chat_phi3.py"  # abspath, not resolve: keep the user's path
    argv = ["python", _shown(script)]
    if cfg["full_finetune"]:
        argv += ["--model", _shown(run / "model")]
    else:
        if model.resolve() != model_dir.resolve():
            argv += ["--model", _shown(model)]
        argv += ["--adapter", _shown(run / "adapter.safetensors")]
        if cfg["quantize"] != "none":  # the base the adapter was trained over
            argv += ["--quantize", cfg["quantize"]]
    return shlex.join(argv)


@contextlib.contextmanager
def _reading(flag: str):
    """Errors reading the file a flag names are the user's: one line naming the flag (no traceback)."""
    try:
        yield
    except (OSError, ValueError, ImportError) as err:  # a JSON error is a ValueError; ImportError: tokenizers
        why = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.strerror else str(err)
        raise UsageError(f"{flag}: {why}") from err


def missing_extras() -> list[str]:
    """The optional packages that would add to this run but do not import, each with what it would add."""
    missing = []
    for module, adds in (("tqdm", "a progress bar"), ("matplotlib", "loss.png")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{module} ({adds})")
    return missing


class Stopwatch:
    """Wall seconds per phase of a run (model load, data, evaluation, training steps, saving), for the closing line
    and ``results.json``: where the run's time goes. ``lap(phase)`` adds the time since the previous lap (or since
    the start) to ``phase``; a phase may recur (training steps between evals)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now

    def summary(self) -> dict[str, float]:
        """Each phase's seconds, rounded, and ``total``: the seconds since the start."""
        return {**{k: round(v, 2) for k, v in self.seconds.items()}, "total": round(self.last - self.start, 2)}


class _PlainProgress:
    """Without tqdm: a line on stderr per logged step (only where ``enabled``: rank 0)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.n, self.total, self.enabled, self.t0 = initial, total, enabled, time.time()

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix(self, values: dict) -> None:
        if self.enabled:
            shown = "".join(f", {k} {v}" for k, v in values.items())
            print(f"train: step {self.n}/{self.total}{shown} ({time.time() - self.t0:.0f} s)", file=sys.stderr)

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional (main said so once)
        return _PlainProgress(total, initial, enabled)
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step")


if __name__ == "__main__":
    try:
        main()
    except UsageError as err:  # the user's to fix: one line, from one process; anything else is a bug (traceback)
        if os.environ.get("RANK", "0") == "0":
            print(f"finetune_phi3.py: error: {err}", file=sys.stderr)
        sys.exit(2)
