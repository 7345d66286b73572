"""The built-in tiny Phi-3 (examples/phi3-tiny) and its pretraining script."""

import importlib.util
import json
import random
from pathlib import Path

import torch

import lora
from lora.data import causal_lm_loss
from lora.phi3 import (
    ByteTokenizer,
    Phi3ForCausalLM,
    collate,
    encode_prompt,
    load_conversations,
    load_tokenizer,
    tokenize_conversation,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "phi3-tiny"
DATA = ROOT / "examples" / "data"


def _pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain_tiny", ROOT / "examples" / "pretrain_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_model_loads_like_a_real_checkpoint():
    files = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in MODEL.iterdir()) < 20 * 2**20
    model = Phi3ForCausalLM.from_pretrained(MODEL)
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    tokenizer = load_tokenizer(MODEL)
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.vocab_size == config.vocab_size
    card = (MODEL / "README.md").read_text()
    assert "pretrain_tiny.py" in card and "make_world.py" in card


@torch.no_grad()
def test_shipped_model_knows_the_facts_but_not_the_chat_format():
    model = Phi3ForCausalLM.from_pretrained(MODEL).eval()
    tokenizer = load_tokenizer(MODEL)
    facts = [json.loads(line) for line in (DATA / "world_facts.jsonl").read_text().splitlines()]
    sample = facts[::16]  # 24 facts across both splits
    hits = 0
    for fact in sample:
        ids = torch.tensor([tokenizer.encode(fact["prompt"], allow_special=False)])
        out = model.generate(ids, max_new_tokens=len(fact["answer"]) + 2, eos_token_id=tokenizer.eos_token_id)
        hits += (
            tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
            .strip()
            .startswith(fact["answer"])
        )
    assert hits >= 0.75 * len(sample), f"{hits}/{len(sample)} facts completed"  # it read them as prose

    held_out = [json.loads(line) for line in (DATA / "world_chat_heldout.jsonl").read_text().splitlines()][:8]
    for q in held_out:
        prompt = [m for m in q["messages"] if m["role"] != "assistant"]
        ids = torch.tensor([encode_prompt(prompt, tokenizer)])
        out = model.generate(ids, max_new_tokens=48, eos_token_id=list(tokenizer.stop_token_ids))
        reply = tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        reference = next(m["content"] for m in q["messages"] if m["role"] == "assistant")
        assert reply.strip() != reference  # the base does not answer in the chat format


def test_pretraining_is_reproducible_from_the_seed(tmp_path):
    pretrain = _pretrain_module()
    tokenizer = ByteTokenizer()
    stream = pretrain.load_corpus(DATA / "world_corpus.txt", tokenizer)
    assert stream.numel() > 100_000 and int(stream.max()) < tokenizer.vocab_size
    for name in ("a", "b"):
        pretrain.main(
            ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / name), "--no-eval"]
        )
    a = Phi3ForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = Phi3ForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_writing_to_loaded_weights_never_touches_the_checkpoint_file(tmp_path):
    """from_pretrained's tensors may read from the file's memory mapping; merging into them must not write it."""
    import hashlib
    import shutil

    import lora

    shutil.copytree(MODEL, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    model = Phi3ForCausalLM.from_pretrained(tmp_path / "m")
    lora.phi3.inject(model, r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
        model.model.norm.weight.add_(1.0)
    lora.merge_lora(model)
    del model
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


# A short LoRA run (the example's LoRA settings, fewer steps, no dropout) must already answer held-out questions:
# facts the model only read as prose, about people and towns never named in a chat. SHORT_RUN_THRESHOLD is
# derived in docs/tiny-model.md ("The test's threshold") from this run's exact match over several seeds.
SHORT_RUN_STEPS = 100
SHORT_RUN_BATCH = 8
SHORT_RUN_LR = 2e-3
SHORT_RUN_QUESTIONS = 2  # every 2nd held-out question: all kinds of fact
SHORT_RUN_THRESHOLD = 0.45  # seeds 0, 1, 2 gave 64.5%, 68.4%, 56.6% (docs/tiny-model.md); 0% before training


def short_lora_run(seed: int = 0, steps: int = SHORT_RUN_STEPS) -> float:
    """Exact match on held-out questions after ``steps`` LoRA steps on the chat training data."""
    torch.manual_seed(seed)
    model = Phi3ForCausalLM.from_pretrained(MODEL)
    tokenizer = load_tokenizer(MODEL)
    lora.phi3.inject(model, r=16, lora_alpha=32, lora_dropout=0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=SHORT_RUN_LR, weight_decay=0.0)
    conversations, _ = load_conversations(DATA / "world_chat_train.jsonl")
    rows = [tokenize_conversation(c, tokenizer, 512) for c in conversations]
    order = random.Random(seed).sample(range(len(rows)), steps * SHORT_RUN_BATCH)
    model.train()
    for step in range(steps):
        batch = collate(
            [rows[i] for i in order[step * SHORT_RUN_BATCH : (step + 1) * SHORT_RUN_BATCH]], tokenizer.pad_token_id
        )
        for group in optimizer.param_groups:  # linear decay to 0
            group["lr"] = SHORT_RUN_LR * (1 - step / steps)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, vocab)
        loss = causal_lm_loss(logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.eval()
    questions = [json.loads(line) for line in (DATA / "world_chat_heldout.jsonl").read_text().splitlines()]
    questions = questions[::SHORT_RUN_QUESTIONS]
    stops = list(tokenizer.stop_token_ids)
    hits = 0
    with torch.no_grad():
        for i in range(0, len(questions), 32):  # batches of 32, left-padded
            encoded = [encode_prompt(q["messages"][:-1], tokenizer) for q in questions[i : i + 32]]
            T = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), T), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, e in enumerate(encoded):
                ids[b, T - len(e) :], mask[b, T - len(e) :] = torch.tensor(e), 1
            out = model.generate(ids, 64, attention_mask=mask, eos_token_id=stops)[:, T:]
            for q, row in zip(questions[i : i + 32], out.tolist()):
                end = next((j for j, t in enumerate(row) if t in stops), len(row))
                hits += tokenizer.decode(row[:end], skip_special_tokens=True).strip() == q["messages"][-1]["content"]
    return hits / len(questions)


def test_short_lora_run_answers_held_out_questions():
    exact_match = short_lora_run(seed=0)
    assert exact_match >= SHORT_RUN_THRESHOLD, f"held-out exact match {exact_match:.1%} after {SHORT_RUN_STEPS} steps"
