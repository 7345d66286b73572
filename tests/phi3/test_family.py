"""The Phi-3 family end to end, member by member, against transformers (the table in docs/phi3.md).

Each `phi3` member is described by its published config.json (the structural fields) and tested on a width-reduced
config that keeps its structure: head_dim, the GQA ratio, the rotary fraction (so the LongRoPE factor count), tied
embeddings and the sliding window; only the head count, the MLP width, the layer count and the vocabulary shrink.
The LongRoPE factor values are made up (48 or 64 of them, as published); only their count is structure.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lora
import lora.phi3
from lora.phi3 import Phi3Config, Phi3ForCausalLM, load_tokenizer

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4


def _longrope(n: int) -> dict:
    return {
        "type": "longrope",
        "short_factor": [1.0 + 0.02 * i for i in range(n)],
        "long_factor": [1.0 + 1.5 * i for i in range(n)],
    }


_MINI = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "sliding_window": 2047,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
}
_LONG = {"max_position_embeddings": 131072, "rope_scaling": _longrope(48), "sliding_window": 262144}
_MEDIUM = dict(
    _MINI,
    hidden_size=5120,
    intermediate_size=17920,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=10,
)
# member -> (published config.json fields, (heads, kv heads) of its width-reduced twin, its chat template)
MEMBERS = {
    "Phi-3-mini-4k": (_MINI, (2, 2), "phi3"),
    "Phi-3-mini-128k": (dict(_MINI, **_LONG), (2, 2), "phi3"),
    "Phi-3.5-mini": (dict(_MINI, **_LONG), (2, 2), "phi3.5"),
    "Phi-3-medium-4k": (_MEDIUM, (4, 1), "phi3-medium"),
    "Phi-3-medium-128k": (
        dict(_MEDIUM, max_position_embeddings=131072, rope_scaling=_longrope(64), sliding_window=131072),
        (4, 1),
        "phi3-medium",
    ),
    "Phi-4-mini": (
        dict(
            _MINI,
            num_attention_heads=24,
            num_key_value_heads=8,
            partial_rotary_factor=0.75,
            tie_word_embeddings=True,
            vocab_size=200064,
            bos_token_id=199999,
            eos_token_id=199999,
            pad_token_id=199999,
            **_LONG,
        ),
        (3, 1),
        "phi4-mini",
    ),
}
LONG_MEMBERS = [m for m, (config, _, _) in MEMBERS.items() if config.get("rope_scaling")]


def narrow(member: str, vocab_size: int = 320, layers: int = 2, **overrides) -> dict:
    """The member's config with fewer heads (same head_dim and GQA ratio), a narrow MLP, few layers, a small vocab."""
    real, (heads, kv_heads), _ = MEMBERS[member]
    head_dim = real["hidden_size"] // real["num_attention_heads"]
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if real.get("tie_word_embeddings"):
        special["bos_token_id"] = 2  # Phi-4-mini: bos = eos = pad = <|endoftext|>
    return {
        **real,
        "hidden_size": heads * head_dim,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "vocab_size": vocab_size,
        "initializer_range": 0.1,
        **special,
        **overrides,
    }  # 0.1: logits that differ visibly between tokens


def hf_model(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**json.loads(json.dumps(config)))).eval()


def ids_for(config: dict, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, config["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------- real sizes, on the meta device


@pytest.mark.parametrize("member", MEMBERS)
def test_real_size_parameters_and_lora_count(member: str) -> None:
    real = MEMBERS[member][0]
    config = Phi3Config.from_dict(real)
    with torch.device("meta"):
        hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**json.loads(json.dumps(real))))
    ours = Phi3ForCausalLM(config, device="meta")
    assert ours.num_parameters() == hf.num_parameters()  # a tied embedding counted once by both
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == bool(real.get("tie_word_embeddings"))
    for kwargs in ({}, {"fused": True}, {"qkv_slices": ("q", "v")}):
        model = Phi3ForCausalLM(config, device="meta")
        lora.phi3.inject(model, r=16, **kwargs)
        created = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert created == lora.phi3.trainable_count(config, r=16, **kwargs), kwargs


# ------------------------------------------------------------------------------ loads, logits and generation parity


@pytest.mark.parametrize("member", MEMBERS)
def test_loads_transformers_checkpoint_with_logits_and_generation_parity(member: str, tmp_path: Path) -> None:
    config = narrow(member)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path, max_shard_size="300KB")  # sharded, with model.safetensors.index.json
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    if config.get("tie_word_embeddings"):
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = ids_for(config, 3, 14)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, 11:] = 0  # right padding
    with torch.no_grad():
        assert max_diff(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits) <= ATOL
    # greedy generation from a left-padded batch gives transformers' tokens, with and without the cache
    prompt, prompt_mask = ids[:2, :9].clone(), mask[:2, :9].clone()
    prompt_mask[1] = 1
    prompt = prompt.masked_fill(prompt_mask == 0, config["pad_token_id"])
    expected = hf.generate(prompt, attention_mask=prompt_mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(ours.generate(prompt, 8, attention_mask=prompt_mask, eos_token_id=[]), expected)
    assert torch.equal(ours.generate(prompt, 8, attention_mask=prompt_mask, eos_token_id=[], use_cache=False), expected)


# -------------------------------------------------------------------------------------------------- long context


@pytest.mark.parametrize("member", MEMBERS)
def test_long_context_loss_matches_transformers(member: str) -> None:
    """128k members: 5,000 tokens, past original_max_position_embeddings (LongRoPE's long factors and attention
    factor). 4k members: 2,100 tokens, past the 2,047-token sliding window."""
    config = narrow(member, layers=1)
    length = 5000 if member in LONG_MEMBERS else 2100
    hf = hf_model(config)
    ours = Phi3ForCausalLM(Phi3Config.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    ids = ids_for(config, 1, length)
    labels = ids.clone()
    labels[0, : length // 3] = -100
    with torch.no_grad():
        expected, got = hf(ids, labels=labels), ours(ids, labels=labels)
    assert abs(got.loss.item() - expected.loss.item()) <= ATOL
    assert max_diff(got.logits[0, -64:], expected.logits[0, -64:]) <= ATOL


@pytest.mark.parametrize("member", LONG_MEMBERS)
def test_generation_crossing_the_longrope_switch_matches_transformers(member: str) -> None:
    """A 4,090-token prompt and 12 new tokens: the sequence outgrows original_max_position_embeddings=4096 mid-way,
    where transformers drops its cache and recomputes with the long factors; ours must give the same tokens."""
    config = narrow(member, layers=1)
    hf = hf_model(config)
    ours = Phi3ForCausalLM(Phi3Config.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    prompt = ids_for(config, 1, 4090)
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert expected.shape[1] == 4102
    assert torch.equal(ours.generate(prompt, 12, eos_token_id=[]), expected)


# ------------------------------------------------------------------------------ fine-tuning with the example, exports


def _load_example():
    spec = importlib.util.spec_from_file_location("finetune_phi3", ROOT / "examples" / "finetune_phi3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finetune():
    return _load_example()


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    lines = (ROOT / "examples" / "data" / "world_chat_train.jsonl").read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:16]))
    return path


def write_member_checkpoint(
    member: str, directory: Path, phi3_like_tokenizer, phi4_like_tokenizer, chat_templates, tokenizer_config
) -> dict:
    """A Hub-layout checkpoint of the member's width-reduced twin: transformers' save_pretrained (sharded), the
    tokenizer.json of the member's kind and tokenizer_config.json with the member's chat template."""
    template = MEMBERS[member][2]
    directory.mkdir()
    if template == "phi4-mini":
        phi4_like_tokenizer(directory)
        tokens = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    else:
        phi3_like_tokenizer(directory)
        tokens = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
    tokenizer_config(directory, chat_templates[template], **tokens)
    tok = load_tokenizer(directory)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = narrow(member, vocab_size=-(-tok.vocab_size // 64) * 64, **special)  # padded, as Phi-3's 32064
    hf_model(config).save_pretrained(directory, max_shard_size="300KB")
    return config


@pytest.mark.parametrize("member", MEMBERS)
def test_finetune_example_merge_and_peft_export(
    member: str,
    tmp_path: Path,
    finetune,
    chats,
    phi3_like_tokenizer,
    phi4_like_tokenizer,
    chat_templates,
    tokenizer_config,
) -> None:
    peft = pytest.importorskip("peft")
    pytest.importorskip("jinja2")
    model_dir = tmp_path / member
    config = write_member_checkpoint(
        member, model_dir, phi3_like_tokenizer, phi4_like_tokenizer, chat_templates, tokenizer_config
    )
    out = tmp_path / "run"
    results = finetune.main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(chats),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--eval_fraction",
            "0.25",
            "--num_samples",
            "1",
            "--max_new_tokens",
            "4",
            "--learning_rate",
            "1e-2",
            "--lora_dropout",
            "0",
            "--merge",
        ]
    )
    assert results["after"]["eval_loss"] is not None

    ours = Phi3ForCausalLM.from_pretrained(model_dir)
    lora.load_lora(ours, out / "adapter.safetensors")
    ours.eval()
    ids = ids_for(config, 2, 12)
    with torch.no_grad():
        adapted = ours(ids).logits
        base = Phi3ForCausalLM.from_pretrained(model_dir).eval()(ids).logits
    assert max_diff(adapted, base) > 1e-5  # the adapter learned something

    # the PEFT export, loaded by PEFT onto transformers' model, gives our adapted logits
    with_adapter = peft.PeftModel.from_pretrained(transformers.Phi3ForCausalLM.from_pretrained(model_dir), out / "peft")
    with torch.no_grad():
        assert max_diff(with_adapter.eval()(input_ids=ids).logits, adapted) <= ATOL
    # the merged model (Hugging Face layout) loads in transformers and in ours, with the adapted logits
    merged_hf = transformers.Phi3ForCausalLM.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        assert max_diff(merged_hf(ids).logits, adapted) <= ATOL
        assert max_diff(Phi3ForCausalLM.from_pretrained(out / "merged").eval()(ids).logits, adapted) <= ATOL
    assert (out / "merged" / "tokenizer_config.json").is_file()
    if config.get("tie_word_embeddings"):  # one tensor on disk, as transformers writes it, and tied once loaded
        for directory in (out / "merged", model_dir):
            keys = set()
            for shard in directory.glob("*.safetensors"):
                with safe_open(str(shard), "pt") as f:
                    keys |= set(f.keys())
            assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys, directory
        assert merged_hf.lm_head.weight.data_ptr() == merged_hf.model.embed_tokens.weight.data_ptr()
        tied = with_adapter.base_model.model
        assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()


def test_tied_embeddings_stay_tied_through_merge_save_and_export(tmp_path: Path) -> None:
    """Phi-4-mini ties lm_head to the embedding: merge_and_unload, save_pretrained and export_peft keep one tensor."""
    peft = pytest.importorskip("peft")
    config = narrow("Phi-4-mini")
    hf = hf_model(config)
    hf.save_pretrained(tmp_path / "base")
    ours = Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    lora.phi3.inject(ours, r=4, lora_dropout=0.0)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.2)
    ours.eval()
    ids = ids_for(config, 2, 10)
    with torch.no_grad():
        adapted = ours(ids).logits
    lora.export_peft(ours, tmp_path / "peft")
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert not any("embed_tokens" in k or "lm_head" in k for k in f.keys())
    lora.merge_and_unload(ours)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours.save_pretrained(tmp_path / "merged")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    merged = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    with_adapter = peft.PeftModel.from_pretrained(
        transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft"
    ).eval()
    with torch.no_grad():
        assert max_diff(merged(ids).logits, adapted) <= ATOL
        assert max_diff(with_adapter(input_ids=ids).logits, adapted) <= ATOL


# ------------------------------------------------------------------------------------------ other architectures


# model_type and architectures of each published config.json; the Llama one with Phi-3's weights beside it.
OTHERS = {
    "phi3small": ["Phi3SmallForCausalLM"],  # Phi-3-small-8k/128k: block-sparse attention, GeGLU, muP
    "phi3_v": ["Phi3VForCausalLM"],  # Phi-3-vision, Phi-3.5-vision
    "phimoe": ["PhiMoEForCausalLM"],  # Phi-3.5-MoE
    "llama": ["LlamaForCausalLM"],
}


@pytest.mark.parametrize("model_type", OTHERS)
def test_other_architectures_are_refused_before_reading_weights(
    model_type: str, tmp_path: Path, finetune, chats, phi3_like_tokenizer
) -> None:
    config = narrow("Phi-3-mini-4k")
    hf_model(config).save_pretrained(tmp_path)  # Phi-3-shaped weights ...
    phi3_like_tokenizer(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    # ... under another architecture's config.json
    (tmp_path / "config.json").write_text(
        json.dumps({**written, "model_type": model_type, "architectures": OTHERS[model_type]})
    )
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file: reading it would fail differently")
    pattern = rf"model_type '{model_type}'.*supported: model_type 'phi3'.*Phi-3-mini-4k.*Phi-4-mini"
    with pytest.raises(ValueError, match=pattern):
        Phi3ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        finetune.main(["--model", str(tmp_path), "--data", str(chats), "--output_dir", str(tmp_path / "run")])


def test_phi3_config_of_another_head_is_refused() -> None:
    with pytest.raises(ValueError, match=r"architectures \['Phi3ForSequenceClassification'\].*supported"):
        Phi3Config.from_dict(
            {**narrow("Phi-3-mini-4k"), "model_type": "phi3", "architectures": ["Phi3ForSequenceClassification"]}
        )
