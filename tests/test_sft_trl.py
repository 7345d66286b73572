"""examples/sft_trl.py: lora under TRL's SFTTrainer with bf16 mixed precision, against PEFT under the same Trainer.

A tiny random transformers Phi-3 (hidden 32, 2 layers), 16 conversations of the made-up world, a few steps: seconds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from unittest import mock

import pytest
import torch

import lora
import lora.functional

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
WORLD_CHATS = EXAMPLES / "data" / "world_chat_train.jsonl"
STEPS = 4
BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: neighbouring values differ by 2^-8 relative (at most)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sft = _load_example("sft_trl")


@pytest.fixture(scope="module")
def tokenizer():
    return sft.byte_tokenizer_for_transformers(EXAMPLES / "phi3-tiny")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A random transformers Phi-3 (grouped-query attention) with phi3-tiny's byte vocabulary, saved HF-style."""
    path = tmp_path_factory.mktemp("tiny-hf-phi3")
    config = transformers.Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def train_dataset():
    lines = WORLD_CHATS.read_text(encoding="utf-8").splitlines()[:16]
    return datasets.Dataset.from_list([{"messages": json.loads(line)["messages"]} for line in lines])


def _args(out: Path, **overrides) -> object:
    flags = f"--max_steps {STEPS} --batch_size 4 --learning_rate 2e-2 --max_length 128".split()
    args = sft.parse_args(["--output_dir", str(out), *flags])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def _train(model, tokenizer, dataset, out: Path, bf16: bool, callbacks=(), **config) -> tuple[list[float], list]:
    """Train ``STEPS`` steps; return the logged loss per step and the dtypes the fused LoRA function ran in."""
    args = _args(out, bf16=bf16)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft.sft_config(args, logging_steps=1, disable_tqdm=True, **config),
        processing_class=tokenizer,
        train_dataset=dataset,
        callbacks=list(callbacks),
    )
    dtypes = []
    real_apply = lora.functional._FusedLoRALinear.apply

    def spy(x2, *rest):
        dtypes.append(x2.dtype)
        return real_apply(x2, *rest)

    with mock.patch.object(lora.functional._FusedLoRALinear, "apply", side_effect=spy):
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == STEPS
    return losses, dtypes


def _lora_model(tiny_dir: Path, dropout: float = 0.0, fused: bool = True):
    model = sft.load_base_model(tiny_dir)
    torch.manual_seed(1)
    lora.phi3.inject(model, r=4, lora_alpha=8, lora_dropout=dropout, fused=fused)
    with torch.no_grad():  # B != 0, so the first step's loss already depends on the LoRA path
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    return model


def _peft_twin(tiny_dir: Path, init: dict[str, torch.Tensor]):
    """PEFT over the same base, with the same adapter: one LoRA per fused projection (as ``inject(fused=True)``)."""
    base = sft.load_base_model(tiny_dir)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(lora.phi3.TARGETS))
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for name, tensor in init.items():
            module, _, leaf = name.rpartition(".")  # ...qkv_proj.lora_A -> PEFT's ...qkv_proj.lora_A.default.weight
            getattr(model.base_model.model.get_submodule(module), leaf)["default"].weight.copy_(tensor)
    return model


def test_sft_trainer_bf16_runs_the_fused_path_and_matches_peft_and_fp32(tiny_dir, tokenizer, train_dataset, tmp_path):
    # lora under SFTTrainer with bf16=True: accelerate's autocast over fp32 weights.
    model = _lora_model(tiny_dir)
    init = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    loss_bf16, dtypes = _train(model, tokenizer, train_dataset, tmp_path / "bf16", bf16=True)
    linears = sum(isinstance(m, lora.Linear) for m in model.modules())  # 4 projections x 2 layers
    assert linears == 8
    assert len(dtypes) == STEPS * linears and set(dtypes) == {torch.bfloat16}  # every forward, in autocast's dtype
    assert loss_bf16[-1] < 0.95 * loss_bf16[0]  # it trains: the trajectory moves far more than the tolerances below

    # PEFT under the same Trainer with the same base and adapter: the bar, 1e-2 relative.
    loss_peft_bf16, peft_dtypes = _train(
        _peft_twin(tiny_dir, init), tokenizer, train_dataset, tmp_path / "p16", bf16=True
    )
    assert peft_dtypes == []
    torch.testing.assert_close(torch.tensor(loss_bf16), torch.tensor(loss_peft_bf16), rtol=1e-2, atol=0)

    # Autocast off (fp32): lora and PEFT agree to fp32 rounding, and lora's bf16 run is as far from its fp32 run as
    # PEFT's is from PEFT's: the bf16 rounding of this model and data, measured on the oracle (x2 for the rounding
    # noise of two different op orders), not a number picked to pass.
    model32 = _lora_model(tiny_dir)
    loss_fp32, dtypes32 = _train(model32, tokenizer, train_dataset, tmp_path / "fp32", bf16=False)
    assert set(dtypes32) == {torch.float32}
    loss_peft_fp32, _ = _train(_peft_twin(tiny_dir, init), tokenizer, train_dataset, tmp_path / "p32", bf16=False)
    torch.testing.assert_close(torch.tensor(loss_fp32), torch.tensor(loss_peft_fp32), rtol=1e-5, atol=0)
    ours_gap = max(abs(a - b) / b for a, b in zip(loss_bf16, loss_fp32))
    peft_gap = max(abs(a - b) / b for a, b in zip(loss_peft_bf16, loss_peft_fp32))
    assert 0 < peft_gap < BF16_EPS  # bf16 rounding shows, and stays within one bf16 step of the loss
    assert ours_gap <= 2 * peft_gap, (ours_gap, peft_gap)


def test_adapter_checkpoints_hold_the_adapter_only_and_reload_equal(tiny_dir, tokenizer, train_dataset, tmp_path):
    model = _lora_model(tiny_dir, dropout=0.1, fused=False)  # per-slice MergedLinear, dropout on
    out = tmp_path / "run"
    _train(
        model,
        tokenizer,
        train_dataset,
        out,
        bf16=False,
        callbacks=[sft.adapter_checkpoints()],
        save_strategy="steps",
        save_steps=2,
    )
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    for step in (2, 4):  # no model.safetensors, optimizer.pt, ...: the Trainer's own checkpoint was not written
        assert [p.name for p in (out / f"checkpoint-{step}").iterdir()] == ["adapter.safetensors"]
    trained = lora.lora_state_dict(model)
    fresh = sft.load_base_model(tiny_dir)
    lora.load_lora(fresh, out / "checkpoint-4" / "adapter.safetensors")  # injects from the file's settings
    reloaded = lora.lora_state_dict(fresh)
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(reloaded[k], trained[k]) for k in trained)
    earlier = lora.read_lora(out / "checkpoint-2" / "adapter.safetensors")[0]
    assert any(not torch.equal(earlier[k], trained[k]) for k in trained)  # step 2's adapter, not the final one


def test_example_end_to_end(tiny_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in tiny_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    (model_dir / "tokenizer.json").write_bytes((EXAMPLES / "phi3-tiny" / "tokenizer.json").read_bytes())
    out = tmp_path / "run"
    flags = "--max_steps 2 --batch_size 2 --save_steps 1 --num_samples 1 --max_new_tokens 4 --no-bf16".split()
    argv = ["--model_dir", str(model_dir), "--output_dir", str(out), *flags]
    assert sft.main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter.safetensors", "peft", "log_history.json", "samples.json", "checkpoint-1", "checkpoint-2"} <= names
    # PEFT loads the export onto the same base and computes what lora computes.
    fresh = sft.load_base_model(model_dir)
    lora.load_lora(fresh, out / "adapter.safetensors")
    peft_model = peft.PeftModel.from_pretrained(sft.load_base_model(model_dir), str(out / "peft"))
    ids = torch.randint(0, 261, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(ids).logits, fresh.eval()(ids).logits, rtol=1e-4, atol=1e-5)
    assert "all equal" in capsys.readouterr().out

    # User errors: one line on stderr, exit 2, nothing written.
    for bad, needle in (
        (["--model_dir", str(tmp_path / "nope")], "no config.json"),
        (["--output_dir", str(out)], "not an empty directory"),
        (["--max_steps", "0"], "--max_steps must be >= 1"),
    ):
        assert sft.main([*argv, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_example_without_its_extra_is_one_line(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real_find_spec(name, *a)
    )
    assert sft.main(["--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == 'error: this example needs trl: pip install -e ".[hf]"\n'
    assert not (tmp_path / "run").exists()
