"""Pretrain the small built-in Phi-3 (``examples/phi3-tiny``) on the made-up world's plain prose.

The result is a base model that *knows* the world's facts (it read them, in several phrasings) but has never seen
Phi-3's chat format: the starting point of ``python examples/finetune_phi3.py``. Reproducible from the seed:

    python examples/make_world.py --seed 0         # writes examples/data/world_corpus.txt
    python examples/pretrain_tiny.py --seed 0      # writes examples/phi3-tiny/ (about 14 minutes on 2 CPU cores)

Memorising the facts is what takes the steps (about 240 sightings of each fact): the loss falls fast while the
model learns the phrasings, then slowly while it learns which value goes with which name (pretrain_log.json).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora.phi3 import ByteTokenizer, Phi3Config, Phi3ForCausalLM

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------- defaults
CORPUS = HERE / "data" / "world_corpus.txt"
FACTS = HERE / "data" / "world_facts.jsonl"  # every fact with a completion prompt, to check what the model learned
OUT = HERE / "phi3-tiny"
MODEL = dict(  # Phi-3's architecture at toy size; grouped-query attention on (6 query heads share 2 kv heads)
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    original_max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TRAIN = dict(
    seed=0,
    steps=2000,  # about 12 passes over the corpus at batch 16 x 192 tokens: each fact seen ~240 times
    batch_size=16,
    seq_len=192,
    lr=1.5e-3,
    warmup_steps=100,
    min_lr_ratio=0.05,
    weight_decay=0.1,
    grad_clip=1.0,
    threads=2,  # the project's 2-core CPU; a fixed count, so a machine gives the same weights whatever its core count
)


def load_corpus(path: Path, tokenizer: ByteTokenizer) -> torch.Tensor:
    """The corpus as one stream of byte ids, paragraphs (one per line) joined by ``<|endoftext|>``."""
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").splitlines() if p.strip()]
    ids: list[int] = []
    for p in paragraphs:
        ids += tokenizer.encode(p, allow_special=False) + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, cfg: dict) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    progress = (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
    return cfg["lr"] * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def completion_accuracy(model: Phi3ForCausalLM, tokenizer: ByteTokenizer, facts_path: Path) -> dict[str, Any]:
    """Share of facts whose greedy completion of ``prompt`` (e.g. "Zalfa Fesrow lives in") starts with the answer,
    per split (``"train"``, ``"heldout"``) and per kind of fact (``"by_attribute"``)."""
    model.eval()
    hits: dict[str, dict[str, list[bool]]] = {"split": {}, "by_attribute": {}}
    for line in facts_path.read_text(encoding="utf-8").splitlines():
        fact = json.loads(line)
        ids = torch.tensor([tokenizer.encode(fact["prompt"], allow_special=False)])
        out = model.generate(ids, max_new_tokens=len(fact["answer"].encode()) + 2, eos_token_id=tokenizer.eos_token_id)
        completion = tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        hit = completion.strip().startswith(fact["answer"])
        hits["split"].setdefault(fact["split"], []).append(hit)
        hits["by_attribute"].setdefault(fact["attribute"], []).append(hit)
    model.train()
    share = {group: {k: round(sum(h) / len(h), 4) for k, h in values.items()} for group, values in hits.items()}
    return {**dict(sorted(share["split"].items())), "by_attribute": share["by_attribute"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the prose to train on (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=OUT, help="where the model is written (default: %(default)s)")
    parser.add_argument("--no-eval", action="store_true", help="skip the fact-completion check at the end")
    train_help = {
        "seed": "seed of the initialisation and of the windows drawn",
        "steps": "optimizer steps",
        "batch_size": "windows per step",
        "seq_len": "tokens (bytes) per window",
        "lr": "peak learning rate (AdamW)",
        "warmup_steps": "linear warm-up steps",
        "min_lr_ratio": "the cosine decay ends at this fraction of --lr",
        "weight_decay": "AdamW weight decay on matrices",
        "grad_clip": "clip the gradient's global L2 norm to this",
        "threads": "CPU threads (fixed, so the weights do not depend on the machine)",
    }
    for key, value in TRAIN.items():
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=type(value),
            default=value,
            help=f"{train_help[key]} (default: %(default)s)",
        )
    args = parser.parse_args(argv)
    cfg = {k: getattr(args, k) for k in TRAIN}

    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    tokenizer = ByteTokenizer()
    stream = load_corpus(args.corpus, tokenizer)
    config = Phi3Config(
        vocab_size=tokenizer.vocab_size,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL,
    )
    model = Phi3ForCausalLM(config).train()
    n_params = model.num_parameters()
    print(f"corpus: {len(stream):,} tokens; model: {n_params:,} parameters; {cfg['steps']} steps")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg["seed"])
    T, B = cfg["seq_len"], cfg["batch_size"]
    log, start, ema = [], time.time(), None
    for step in range(cfg["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        starts = torch.randint(0, len(stream) - T - 1, (B,), generator=gen)
        window = torch.stack([stream[s : s + T + 1] for s in starts.tolist()])  # (B, T + 1)
        logits = model(window[:, :-1]).logits  # (B, T, vocab)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == cfg["steps"] - 1:
            elapsed = time.time() - start
            print(
                f"step {step:5d}  loss {loss.item():.4f}  (ema {ema:.4f})  lr {lr_at(step, cfg):.2e}  {elapsed:6.0f}s"
            )
            log.append(
                {"step": step, "loss": round(loss.item(), 4), "ema_loss": round(ema, 4), "seconds": round(elapsed)}
            )

    accuracy = completion_accuracy(model, tokenizer, FACTS) if FACTS.is_file() and not args.no_eval else {}
    print(f"fact completion accuracy (greedy, prose prompts): {accuracy}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save(args.out / "tokenizer.json")
    (args.out / "pretrain_log.json").write_text(
        json.dumps(
            {
                "train": cfg,
                "model": MODEL,
                "n_params": n_params,
                "corpus_tokens": len(stream),
                "completion_accuracy": accuracy,
                "log": log,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out} in {time.time() - start:.0f}s; final loss (ema) {ema:.4f}")


if __name__ == "__main__":
    main()
