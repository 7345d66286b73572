"""The built-in tiny Phi-3 (examples/phi3-tiny) and its pretraining script."""

import importlib.util
import json
from pathlib import Path

import torch

from lora.phi3 import ByteTokenizer, Phi3ForCausalLM, encode_prompt, load_tokenizer

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
        hits += tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip().startswith(fact["answer"])
    assert hits >= 0.75 * len(sample), f"{hits}/{len(sample)} facts completed"  # it read them as prose

    held_out = [json.loads(line) for line in (DATA / "world_chat_heldout.jsonl").read_text().splitlines()][:8]
    for q in held_out:
        prompt = [m for m in q["messages"] if m["role"] != "assistant"]
        ids = torch.tensor([encode_prompt(prompt, tokenizer)])
        out = model.generate(ids, max_new_tokens=48, eos_token_id=list(tokenizer.stop_token_ids))
        reply = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        reference = next(m["content"] for m in q["messages"] if m["role"] == "assistant")
        assert reply.strip() != reference  # the base does not answer in the chat format


def test_pretraining_is_reproducible_from_the_seed(tmp_path):
    pretrain = _pretrain_module()
    tokenizer = ByteTokenizer()
    stream = pretrain.load_corpus(DATA / "world_corpus.txt", tokenizer)
    assert stream.numel() > 100_000 and int(stream.max()) < tokenizer.vocab_size
    for name in ("a", "b"):
        pretrain.main(["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / name),
                       "--no-eval"])
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
