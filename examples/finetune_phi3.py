"""Fine-tune Phi-3 with LoRA on chat data: no transformers, trl or peft underneath.

    python examples/finetune_phi3.py                                   # built-in tiny Phi-3 and chat data, CPU
    python examples/finetune_phi3.py --model path/to/Phi-3-mini-4k-instruct --data my_chats.jsonl --bf16
    torchrun --nproc_per_node=2 examples/finetune_phi3.py ...           # DistributedDataParallel (gloo / nccl)
    python examples/finetune_phi3.py --output_dir runs/x --resume       # continue from the latest checkpoint

Settings come in two groups, as in the Phi-3 CookBook's LoRA recipe: ``training_config`` and ``lora_config``
below. Override them with a JSON file (``--config cfg.json`` holding ``{"training_config": {...},
"lora_config": {...}}``) and then with flags (``--learning_rate 1e-4``, ``--r 8``, ...). The run directory gets
``adapter.safetensors`` (this library's format), ``peft/`` (PEFT's format), ``config.json`` (the settings used),
``metrics.jsonl``, ``loss.png`` (if matplotlib is installed), ``checkpoints/`` and, with ``--merge``, ``merged/``
(a Hugging Face-layout model with the adapter merged in).

Data: JSONL in OpenAI/TRL ``messages``, ShareGPT ``conversations`` or Alpaca ``instruction/input/output`` form.
The loss covers assistant tokens only (content and its ``<|end|>``). Batches group conversations of similar length
(rather than packing several into one row) so no conversation attends to another and padding stays small.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import lora
from lora.data import causal_lm_loss, count_targets
from lora.phi3 import (
    IGNORE_INDEX,
    Phi3ForCausalLM,
    collate,
    encode_prompt,
    length_grouped_batches,
    load_conversations,
    load_tokenizer,
    split_train_eval,
    tokenize_conversation,
)

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------- defaults
# With no arguments: the built-in tiny Phi-3 (pretrained on a made-up world's prose, never on chat) and chat
# questions about half of that world; the held-out questions ask about facts only the prose ever stated.
model_dir = HERE / "phi3-tiny"
data_file = HERE / "data" / "world_chat_train.jsonl"
qa_eval_file = HERE / "data" / "world_chat_heldout.jsonl"  # questions with an "answer": exact-match accuracy

training_config = dict(
    output_dir="runs/phi3-lora",
    learning_rate=2e-3,  # the tiny model's; Hugging Face's Phi-3-mini recipe uses 5e-6 (full) to ~2e-4 (LoRA)
    per_device_train_batch_size=16,
    per_device_eval_batch_size=32,
    gradient_accumulation_steps=1,
    num_train_epochs=2,
    max_steps=-1,  # > 0 overrides num_train_epochs
    warmup_ratio=0.1,
    lr_scheduler_type="cosine",  # or "linear"
    weight_decay=0.0,
    max_grad_norm=1.0,
    max_seq_length=2048,
    eval_fraction=0.05,  # held out of --data for the eval loss, unless --eval_data is given
    eval_steps=40,
    save_steps=40,
    save_total_limit=2,
    logging_steps=10,
    seed=0,
    bf16=False,  # bf16 weights and autocast (LoRA parameters stay fp32)
    gradient_checkpointing=False,
    skip_malformed=False,  # skip (and count) malformed JSONL lines instead of stopping
    num_samples=4,  # replies shown before and after training
    max_new_tokens=64,
    full_finetune=False,  # train every weight instead of LoRA (for comparison)
    merge=False,  # also write a merged model in Hugging Face layout
)
lora_config = dict(
    r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    qkv_slices=["q", "k", "v"],  # ["q", "v"] as in the LoRA paper
    fused=False,  # one LoRA per fused matrix, as PEFT
)


# ---------------------------------------------------------------------------------------------------- settings


def parse_settings(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults < ``--config`` JSON < flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=model_dir, help="Phi-3 checkpoint directory (HF layout)")
    parser.add_argument("--data", type=Path, default=data_file, help="training conversations (JSONL)")
    parser.add_argument("--eval_data", type=Path, default=None, help="eval conversations (default: split of --data)")
    parser.add_argument("--qa_eval", type=Path, default=None,
                        help="questions with an 'answer' field for exact-match accuracy (default: the built-in "
                             "held-out set when --model and --data are the defaults)")
    parser.add_argument("--config", type=Path, default=None, help="JSON file with training_config / lora_config")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--kill_after_step", type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL self
    for group in (training_config, lora_config):
        for key, value in group.items():
            if isinstance(value, bool):
                parser.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, default=None)
            elif isinstance(value, list):
                parser.add_argument(f"--{key}", nargs="+", default=None)
            else:
                parser.add_argument(f"--{key}", type=type(value), default=None)
    args = parser.parse_args(argv)

    train_cfg, lora_cfg = dict(training_config), dict(lora_config)
    if args.config is not None:
        loaded = json.loads(args.config.read_text())
        for name, group, defaults in (("training_config", train_cfg, training_config), ("lora_config", lora_cfg, lora_config)):
            unknown = set(loaded.get(name, {})) - set(defaults)
            if unknown:
                raise ValueError(f"{args.config}: unknown {name} keys {sorted(unknown)}")
            group.update(loaded.get(name, {}))
        unknown = set(loaded) - {"training_config", "lora_config"}
        if unknown:
            raise ValueError(f"{args.config}: unknown top-level keys {sorted(unknown)}")
    for group in (train_cfg, lora_cfg):
        for key in group:
            if getattr(args, key) is not None:
                group[key] = getattr(args, key)
    if train_cfg["lr_scheduler_type"] not in ("cosine", "linear"):
        raise ValueError(f"lr_scheduler_type must be 'cosine' or 'linear', got {train_cfg['lr_scheduler_type']!r}")
    if args.qa_eval is None and args.model == model_dir and args.data == data_file:
        args.qa_eval = qa_eval_file
    args.training_config, args.lora_config = train_cfg, lora_cfg
    return args


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


def step_batches(rows: list[dict], batch_size: int, accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """An epoch as optimizer steps, each a list of ``accum`` micro-batches of row indices (global, all ranks)."""
    batches = length_grouped_batches([len(r["input_ids"]) for r in rows], batch_size, seed, epoch)
    return [batches[i:i + accum] for i in range(0, len(batches) - accum + 1, accum)]


# ----------------------------------------------------------------------------------------------- training math


def lr_lambda(cfg: dict, total_steps: int):
    warmup = int(cfg["warmup_ratio"] * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg["lr_scheduler_type"] == "cosine" else 1 - progress

    return factor


def token_loss_sum(model, batch: dict[str, torch.Tensor], autocast: bool) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled tokens, and their count."""
    with torch.autocast("cuda" if batch["input_ids"].is_cuda else "cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, vocab)
    return causal_lm_loss(logits, batch["labels"], reduction="sum"), count_targets(batch["labels"])


@torch.no_grad()
def eval_loss(model, rows: list[dict], cfg: dict, pad_id: int, device) -> float:
    """Mean cross-entropy per assistant token over ``rows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bs = cfg["per_device_eval_batch_size"]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for i in range(0, len(order), bs):
        batch = {k: v.to(device) for k, v in collate([rows[j] for j in order[i:i + bs]], pad_id).items()}
        loss, n = token_loss_sum(model, batch, cfg["bf16"])
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int, device) -> list[str]:
    """Greedy replies to each prompt's messages (batched with left padding), decoded up to ``<|end|>``."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(p, tokenizer) for p in prompts[i:i + batch_size]]
        T = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), T), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, e in enumerate(encoded):
            ids[b, T - len(e):], mask[b, T - len(e):] = torch.tensor(e), 1
        gen = model.generate(ids.to(device), max_new_tokens, attention_mask=mask.to(device),
                             eos_token_id=list(tokenizer.stop_token_ids))
        for row in gen[:, T:].tolist():
            stop = next((j for j, t in enumerate(row) if t in tokenizer.stop_token_ids), len(row))
            out.append(tokenizer.decode(row[:stop], skip_special_tokens=True).strip())
    model.train(was_training)
    return out


def qa_accuracy(model, tokenizer, qa: list[dict], cfg: dict, device) -> tuple[dict[str, float], list[str]]:
    """Exact match (reply == the conversation's last assistant message) and answer match (the record's ``answer``
    appears in the reply); the prompt is everything before that last assistant message."""
    last = [max(i for i, m in enumerate(q["messages"]) if m["role"] == "assistant") for q in qa]
    prompts = [q["messages"][:i] for q, i in zip(qa, last)]
    got = replies(model, tokenizer, prompts, cfg["max_new_tokens"], cfg["per_device_eval_batch_size"], device)
    reference = [q["messages"][i]["content"].strip() for q, i in zip(qa, last)]
    scores = {"exact_match": sum(g == r for g, r in zip(got, reference)) / len(qa)}
    with_answer = [(q["answer"], g) for q, g in zip(qa, got) if isinstance(q.get("answer"), str)]
    if with_answer:
        scores["answer_match"] = sum(a in g for a, g in with_answer) / len(with_answer)
    return scores, got


# ------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(run: Path, model, optimizer, scheduler, position: dict, cfg: dict) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temporary directory renamed into place); keep the newest N."""
    ckpt_root = run / "checkpoints"
    final = ckpt_root / f"step-{position['step']:07d}"
    tmp = ckpt_root / f".tmp-step-{position['step']:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp, cfg)
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": position,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
    }
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpt_root.glob("step-*"))[:-cfg["save_total_limit"]]:
        shutil.rmtree(old)
    return final


def save_weights(model, directory: Path, cfg: dict) -> None:
    if cfg["full_finetune"]:
        model.save_pretrained(directory)
    else:
        lora.save_lora(model, directory / "adapter.safetensors")


def load_checkpoint(run: Path, model, optimizer, scheduler, cfg: dict) -> dict:
    """Restore the newest complete checkpoint; return its data position."""
    found = sorted((run / "checkpoints").glob("step-*"))
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {run / 'checkpoints'}")
    ckpt = found[-1]
    if cfg["full_finetune"]:
        restored = Phi3ForCausalLM.from_pretrained(ckpt, dtype=next(model.parameters()).dtype)
        model.load_state_dict(restored.state_dict())
    else:
        lora.load_lora(model, ckpt / "adapter.safetensors")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # tensors and plain values only
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    return state["position"] | {"checkpoint": str(ckpt)}


# ------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_settings(argv)
    cfg, lcfg = args.training_config, args.lora_config
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    run = Path(cfg["output_dir"])
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])

    # Model, tokenizer and LoRA.
    tokenizer = load_tokenizer(args.model)
    dtype = torch.bfloat16 if cfg["bf16"] else torch.float32
    model = Phi3ForCausalLM.from_pretrained(args.model, dtype=dtype, device=device)
    if cfg["full_finetune"]:
        for p in model.parameters():
            p.requires_grad = True
    else:
        lora.phi3.inject(model, r=lcfg["r"], lora_alpha=lcfg["lora_alpha"], lora_dropout=lcfg["lora_dropout"],
                         targets=tuple(lcfg["targets"]), qkv_slices=tuple(lcfg["qkv_slices"]), fused=lcfg["fused"])
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    say(f"model {args.model}: {model.num_parameters():,} parameters, {sum(p.numel() for p in trainable):,} trainable"
        f" ({'full fine-tuning' if cfg['full_finetune'] else 'LoRA'}), {dtype}, {device}, world size {world}")

    # Data.
    conversations, stats = load_conversations(args.data, skip_malformed=cfg["skip_malformed"])
    if args.eval_data is not None:
        train_convs, (eval_convs, _) = conversations, load_conversations(args.eval_data, cfg["skip_malformed"])
    else:
        train_convs, eval_convs = split_train_eval(conversations, cfg["eval_fraction"], cfg["seed"])
    train_rows, train_counts = tokenize_all(train_convs, tokenizer, cfg["max_seq_length"])
    eval_rows, _ = tokenize_all(eval_convs, tokenizer, cfg["max_seq_length"])
    if not train_rows:
        raise ValueError(f"{args.data}: no conversation with an assistant token left to train on")
    qa = [json.loads(line) for line in args.qa_eval.read_text().splitlines() if line.strip()] if args.qa_eval else []
    say(f"data {args.data}: {stats.n_loaded} conversations ({stats.n_malformed} malformed skipped, "
        f"{stats.n_no_assistant} without an assistant turn skipped); {len(train_rows)} train, {len(eval_rows)} eval; "
        f"{train_counts['truncated']} truncated to {cfg['max_seq_length']} tokens, "
        f"{train_counts['dropped_no_target']} dropped with no assistant token left")

    global_bs = cfg["per_device_train_batch_size"] * world
    steps_per_epoch = len(step_batches(train_rows, global_bs, cfg["gradient_accumulation_steps"], cfg["seed"], 0))
    total_steps = cfg["max_steps"] if cfg["max_steps"] > 0 else steps_per_epoch * cfg["num_train_epochs"]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    position = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    results: dict = {"settings": {"training_config": cfg, "lora_config": lcfg, "model": str(args.model),
                                  "data": str(args.data)}}
    if args.resume:
        position = load_checkpoint(run, model, optimizer, scheduler, cfg)
        say(f"resumed from {position.pop('checkpoint')} at step {position['step']}")
        if is_main:  # forget metrics logged after that checkpoint by the interrupted run
            kept = [line for line in (run / "metrics.jsonl").read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= position["step"]]
            (run / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    elif is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text("")
        (run / "config.json").write_text(json.dumps(results["settings"], indent=2, default=str) + "\n")

    # each sample: the conversation up to its first assistant turn (system prompt, if any, and the first question)
    sample_prompts = [c[:next(i for i, m in enumerate(c) if m["role"] == "assistant")]
                      for c in eval_convs[: cfg["num_samples"]]]
    if is_main and not args.resume:
        results["before"] = evaluate(model, tokenizer, eval_rows, qa, sample_prompts, cfg, device)
        report("before training", results["before"], say)

    # Train.
    metrics = (run / "metrics.jsonl").open("a") if is_main else None
    progress = _progress(total_steps, position["step"], is_main)
    model.train()
    tokens_seen, t0, window_loss, window_tokens = 0, time.time(), 0.0, 0
    while position["step"] < total_steps:
        steps = step_batches(train_rows, global_bs, cfg["gradient_accumulation_steps"], cfg["seed"], position["epoch"])
        for micro_batches in steps[position["batch_in_epoch"]:]:
            # Normalise by the labelled tokens of the whole optimizer step (all micro-batches, all ranks), so the
            # gradient does not depend on how the step is split; DDP averages over ranks, hence the * world.
            n_target = sum(train_rows[j]["n_target"] for mb in micro_batches for j in mb)
            for k, mb in enumerate(micro_batches):
                batch = {key: v.to(device) for key, v in
                         collate([train_rows[j] for j in mb[rank::world]], tokenizer.pad_token_id).items()}
                last = k == len(micro_batches) - 1
                with ddp_model.no_sync() if distributed and not last else contextlib.nullcontext():
                    loss_sum, n = token_loss_sum(ddp_model, batch, cfg["bf16"])
                    (loss_sum * world / n_target).backward()
                window_loss, window_tokens = window_loss + loss_sum.item(), window_tokens + n
                tokens_seen += int(batch["attention_mask"].sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg["max_grad_norm"])
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
                row = {"step": step, "epoch": position["epoch"], "loss": window_loss / max(window_tokens, 1),
                       "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                       "tokens_per_s": round(tokens_seen * world / (time.time() - t0), 1)}
                window_loss, window_tokens = 0.0, 0
            if is_main and (step % cfg["eval_steps"] == 0 or step == total_steps) and eval_rows:
                row = {"step": step, **row, "eval_loss": eval_loss(model, eval_rows, cfg, tokenizer.pad_token_id, device)}
            if is_main and row:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                progress.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "eval_loss") if k in row})
            if is_main and step % cfg["save_steps"] == 0 and step < total_steps:
                save_checkpoint(run, model, optimizer, scheduler, position, cfg)
            if args.kill_after_step == step:
                os.kill(os.getpid(), signal.SIGKILL)  # a real crash, for the resume test
            if step >= total_steps:
                break
        else:
            position = {"step": position["step"], "epoch": position["epoch"] + 1, "batch_in_epoch": 0}
    progress.close()

    # Outputs.
    if is_main:
        metrics.close()
        save_weights(model, run, cfg)
        if not cfg["full_finetune"]:
            # One rank for every module (zero-padded): serving tools such as vLLM read only r and lora_alpha.
            lora.export_peft(model, run / "peft", base_model_name_or_path=str(args.model), uniform_rank=True)
        results["after"] = evaluate(model, tokenizer, eval_rows, qa, sample_prompts, cfg, device)
        report("after training", results["after"], say)
        if "before" in results:
            side_by_side(sample_prompts, results["before"]["samples"], results["after"]["samples"], say)
        if cfg["merge"]:
            write_merged(model, args.model, run / "merged", cfg)
            say(f"merged model written to {run / 'merged'}")
        plot_losses(run)
        (run / "results.json").write_text(json.dumps({k: v for k, v in results.items()}, indent=2, default=str) + "\n")
        say(f"outputs in {run}/")
    if distributed:
        dist.destroy_process_group()
    return results


def evaluate(model, tokenizer, eval_rows, qa, sample_prompts, cfg, device) -> dict:
    out = {"eval_loss": eval_loss(model, eval_rows, cfg, tokenizer.pad_token_id, device) if eval_rows else None}
    if qa:
        out["qa"], _ = qa_accuracy(model, tokenizer, qa, cfg, device)
    out["samples"] = replies(model, tokenizer, sample_prompts, cfg["max_new_tokens"], len(sample_prompts) or 1, device)
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
    """The adapter merged into the weights (in place: the run is over), saved in Hugging Face layout."""
    if not cfg["full_finetune"]:
        lora.merge_and_unload(model)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (base_dir / name).is_file():
            shutil.copy(base_dir / name, out / name)


def plot_losses(run: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per assistant token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=100)
    plt.close(fig)


def _progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: a plain counter instead
        class _Plain:
            def update(self, n): ...
            def set_postfix(self, **kw): print(f"  {kw}", file=sys.stderr)
            def close(self): ...
        return _Plain()
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step")


if __name__ == "__main__":
    main()
