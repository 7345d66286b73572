"""QLoRA on Phi-3 against the ecosystem's: transformers' Phi3ForCausalLM loaded in 4 bits by bitsandbytes (NF4,
fp32 compute on the CPU) with a PEFT LoRA, vs this library's Phi-3 loaded with quantize="nf4" and
lora.phi3.inject(fused=True), from the same tiny checkpoint and with the same adapter values."""

from __future__ import annotations

import pytest
import torch

import lora
import lora.phi3
from lora.phi3 import Phi3ForCausalLM
from lora.qlora import Linear4bit

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

# Every dimension a multiple of the 64-weight block: bitsandbytes' AVX-512 CPU kernel reads the block scales per row.
TINY = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("phi3")
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY)).save_pretrained(path)
    return path


def bnb_model(path, double_quant: bool = True):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=double_quant,
    )
    return transformers.Phi3ForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.float32, device_map="cpu", attn_implementation="eager"
    )


def pair(path, double_quant: bool = True):
    """(transformers + bitsandbytes + PEFT, ours) with the same random (nonzero) adapters, dropout off."""
    theirs = peft.get_peft_model(
        bnb_model(path, double_quant), peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    )
    ours = Phi3ForCausalLM.from_pretrained(path, dtype=torch.float32, quantize="nf4", double_quant=double_quant)
    lora.phi3.inject(ours, r=R, lora_alpha=ALPHA, lora_dropout=0.0, fused=True, targets=tuple(TARGETS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, lora.Linear):
                peft_layer = theirs.base_model.model.get_submodule(name)
                for ab in ("A", "B"):
                    ours_p = getattr(module, f"lora_{ab}")
                    ours_p.copy_(torch.randn(ours_p.shape, generator=g) * 0.2)
                    getattr(peft_layer, f"lora_{ab}")["default"].weight.copy_(ours_p)
    return theirs, ours


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def ids(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantized_weights_are_bitsandbytes(checkpoint, double_quant):
    theirs = bnb_model(checkpoint, double_quant)
    ours = Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, quantize="nf4", double_quant=double_quant)
    quantized = [n for n, m in ours.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 4 * TINY["num_hidden_layers"] and type(ours.lm_head) is torch.nn.Linear
    for name in quantized:
        bnb_weight = theirs.get_submodule(name).weight
        assert torch.equal(ours.get_submodule(name).weight.packed, bnb_weight.data.reshape(-1)), name
        dequantized = __import__("bitsandbytes").functional.dequantize_4bit(bnb_weight.data, bnb_weight.quant_state)
        assert torch.equal(ours.get_submodule(name).weight.dequantize(), dequantized), name


@pytest.mark.parametrize("double_quant", [True, False])
def test_logits_match_transformers_bitsandbytes_peft(checkpoint, double_quant):
    theirs, ours = pair(checkpoint, double_quant)
    x = ids()
    with torch.no_grad():
        assert relative(ours(x).logits, theirs(input_ids=x).logits) < 1e-5


def test_six_adamw_steps_match(checkpoint):
    theirs, ours = pair(checkpoint)
    theirs.train()
    ours.train()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (theirs, ours)]
    assert [len(o.param_groups[0]["params"]) for o in optimizers] == [2 * 4 * TINY["num_hidden_layers"]] * 2
    losses = {"theirs": [], "ours": []}
    for step in range(6):
        x = ids(seed=10 + step)
        for key, model, opt in (("theirs", theirs, optimizers[0]), ("ours", ours, optimizers[1])):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[key].append(loss.item())
    assert losses["ours"][-1] < losses["ours"][0]
    for a, b in zip(losses["ours"], losses["theirs"]):
        assert abs(a - b) <= 1e-4 * abs(b), losses


def test_peft_export_loads_over_the_bitsandbytes_base(checkpoint, tmp_path):
    _, ours = pair(checkpoint)
    lora.export_peft(ours, tmp_path / "peft", base_model_name_or_path=str(checkpoint))
    theirs = peft.PeftModel.from_pretrained(bnb_model(checkpoint), tmp_path / "peft")
    x = ids(seed=5)
    with torch.no_grad():
        assert relative(ours(x).logits, theirs(input_ids=x).logits) < 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(checkpoint):
    _, ours = pair(checkpoint)
    x = ids()

    def grads():
        ours.zero_grad()
        ours(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}

    plain = grads()
    ours.gradient_checkpointing_enable()
    checkpointed = grads()
    assert all(torch.allclose(plain[n], checkpointed[n], rtol=1e-5, atol=1e-7) for n in plain)


def test_bad_quantize_argument_and_saving_4bit(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="quantize='int4'"):
        Phi3ForCausalLM.from_pretrained(checkpoint, quantize="int4")
    model = Phi3ForCausalLM.from_pretrained(checkpoint, quantize="nf4")
    with pytest.raises(ValueError, match="dequantize"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    lora.dequantize(model, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "out")
    back = Phi3ForCausalLM.from_pretrained(tmp_path / "out")
    assert back.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_quantized_load_keeps_no_mapping_of_the_checkpoint(checkpoint):
    """A memory-mapped load keeps the file mapped while the model lives (its pages count as the process's); a
    quantized load reads the tensors into memory of their own, so the full-precision pages it read are gone."""
    import gc

    def mapped() -> bool:
        with open("/proc/self/maps", encoding="utf-8") as f:
            return str(checkpoint) in f.read()

    gc.collect()
    assert not mapped()
    plain = Phi3ForCausalLM.from_pretrained(checkpoint)
    assert mapped()  # the control: safetensors' mapping, alive through the model's tensors
    del plain
    gc.collect()
    assert not mapped()
    quantized = Phi3ForCausalLM.from_pretrained(checkpoint, quantize="nf4")
    assert not mapped()
    assert isinstance(quantized.model.layers[0].mlp.down_proj, Linear4bit)
