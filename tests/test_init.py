"""init_lora_weights ("default", "gaussian", "pissa", "pissa_niter_<k>", "olora") on the layers and in injection;
PiSSA / OLoRA adapters saved and exported as they are (over the residual base) and converted to a plain LoRA of rank
2r over the original base. Oracles: the base layer at init, the trained model's outputs, and PEFT's own
initialisation and ``path_initial_model_for_weight_conversion`` on the same weights."""

import copy
import json

import pytest
import torch
import torch.nn as nn

import lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

INITS = ["default", "gaussian", "pissa", "pissa_niter_4", "olora"]
MUTATING = ["pissa", "pissa_niter_4", "olora"]

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_model():
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY)).eval()


def linear():
    torch.manual_seed(0)
    return nn.Linear(12, 10)


def merged():
    torch.manual_seed(0)
    return nn.Linear(12, 16)


MAKE = {
    "Linear": (linear, {}),
    "MergedLinear": (merged, {"split_sizes": (8, 4, 4), "enable_lora": [True, False, True]}),
}


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("kind", MAKE)
def test_initial_output_equals_the_base(kind, init):
    make, fields = MAKE[kind]
    base = make()
    x = torch.randn(5, 12)
    want = base(x).detach()
    w0 = base.weight.detach().clone()
    layer = getattr(lora, kind).from_module(base, r=3, lora_alpha=6, init_lora_weights=init, **fields)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)
    moved = not torch.equal(layer.weight, w0)
    assert moved == (init in MUTATING)  # PiSSA / OLoRA subtract the initial adapter from the base weight
    if init in MUTATING:
        assert layer.lora_B.abs().sum() > 0 and torch.equal(layer.lora_A_init, layer.lora_A)
    if init == "gaussian":
        assert layer.lora_B.abs().sum() == 0 and 0.5 / 3 < float(layer.lora_A.detach().std()) < 2 / 3  # std 1/r


def test_pissa_is_the_best_rank_r_approximation_per_slice():
    base = merged()
    w = base.weight.detach().clone()
    layer = lora.MergedLinear.from_module(base, r=2, lora_alpha=4, init_lora_weights="pissa", **MAKE["MergedLinear"][1])
    delta = layer.lora_delta()
    for rows in (slice(0, 8), slice(12, 16)):
        u, s, vh = torch.linalg.svd(w[rows])
        torch.testing.assert_close(delta[rows], u[:, :2] @ torch.diag(s[:2]) @ vh[:2], rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight[8:12], w[8:12])  # the unadapted slice is untouched


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_initial_adapter_and_residual_equal_peft(init):
    """PEFT's own PiSSA / OLoRA on the same weight: the same A, B and residual base."""
    base = linear()
    ours = lora.Linear.from_module(copy.deepcopy(base), r=3, lora_alpha=6, init_lora_weights=init)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = copy.deepcopy(base)

    theirs = peft.get_peft_model(
        Holder(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["m"], init_lora_weights=init)
    ).base_model.model.m
    # singular vectors are defined up to sign: compare the products, which are not
    torch.testing.assert_close(ours.lora_delta(), theirs.get_delta_weight("default"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-5)
    if init == "olora":  # QR is unique up to signs that torch and PEFT pick alike
        torch.testing.assert_close(ours.lora_A, theirs.lora_A["default"].weight)


@pytest.mark.parametrize("kind", ["Embedding", "Conv2d"])
def test_pissa_and_olora_are_refused_where_peft_has_none(kind):
    layer = lora.Embedding(5, 4) if kind == "Embedding" else nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        getattr(lora, kind).from_module(
            layer if kind != "Embedding" else nn.Embedding(5, 4), r=2, init_lora_weights="pissa"
        )


@pytest.mark.parametrize("bad", ["PiSSA", "pissa_niter_", "pissa_niter_x", "loftq", True, None])
def test_unknown_init_is_a_value_error(bad):
    with pytest.raises(ValueError, match="init_lora_weights"):
        lora.Linear(4, 4, r=2, init_lora_weights=bad)


def test_r_above_the_rank_is_refused_before_the_weight_is_touched():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="r <= min"):
        lora.inject(model, ["0", "1"], r=3, init_lora_weights="pissa")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="not available for Embedding"):
        lora.inject(nn.Sequential(nn.Linear(4, 4), nn.Embedding(3, 4)), ["0", "1"], r=2, init_lora_weights="olora")


# ---------------------------------------------------------------------------------------------------------------
# Training, then the converted adapter on the untouched base


def train(model, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (2, 10), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("init", MUTATING)
@pytest.mark.parametrize("use_dora", [False, True])
def test_converted_adapter_on_the_original_base_gives_the_trained_outputs(tmp_path, init, use_dora):
    model = hf_model()
    lora.phi3.inject(model, r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=init, use_dora=use_dora)
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_model()(ids).logits, rtol=0, atol=1e-5)
    train(model)
    with torch.no_grad():
        want = model(ids).logits
    lora.save_lora(model, tmp_path / "converted.safetensors", convert_to_lora=True)
    lora.save_lora(model, tmp_path / "residual.safetensors")
    with safe_open(str(tmp_path / "converted.safetensors"), "pt") as f:
        entries = json.loads(f.metadata()["modules"])
    assert all(
        e["converted_from"] == init and e["init_lora_weights"] == "default" and e["r"] == 4 for e in entries.values()
    )
    with safe_open(str(tmp_path / "residual.safetensors"), "pt") as f:
        entries = json.loads(f.metadata()["modules"])
        assert any(k.endswith("lora_A_init") for k in f.keys())
    assert all(e["init_lora_weights"] == init and "converted_from" not in e for e in entries.values())
    for name in ("converted", "residual"):
        fresh = hf_model()  # the untouched, original base
        lora.load_lora(fresh, tmp_path / f"{name}.safetensors")
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=1e-5)
    # the converted adapter is a plain LoRA: merging it into the original base gives the trained model too
    fresh = hf_model()
    lora.load_lora(fresh, tmp_path / "converted.safetensors")
    plain = lora.merge_and_unload(fresh)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("into", ["pissa_niter_2", "default"])
def test_residual_adapter_loads_into_an_adapted_model(tmp_path, into):
    """Resuming: the model was injected again (a randomised PiSSA gives another residual, a default init none);
    loading the file brings back the residual it was trained on."""
    model = hf_model()
    lora.phi3.inject(model, r=2, lora_dropout=0.0, init_lora_weights="pissa_niter_2")
    train(model)
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
    lora.save_lora(model, tmp_path / "a.safetensors")
    again = hf_model()
    torch.manual_seed(123)
    lora.phi3.inject(again, r=2, lora_dropout=0.0, init_lora_weights=into)
    lora.load_lora(again, tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="convert_to_lora=True"):
        lora.export_peft(model, tmp_path / "peft")
    # a plain adapter loaded into a PiSSA-initialised model: its base is the original one again
    plain = hf_model()
    lora.phi3.inject(plain, r=2, lora_dropout=0.0)
    lora.save_lora(plain, tmp_path / "plain.safetensors")
    lora.load_lora(again, tmp_path / "plain.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf_model()(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_export_peft_converted_equals_peft_conversion(tmp_path, init):
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) of the same initial and trained weights
    writes the same tensors as export_peft(convert_to_lora=True), and PEFT loads ours onto the original base with
    the trained model's logits."""
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    ours = hf_model()
    lora.phi3.inject(ours, r=2, lora_alpha=4, lora_dropout=0.0, fused=True, init_lora_weights=init)
    theirs = peft.get_peft_model(
        hf_model(), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets, init_lora_weights=init)
    )
    peft_modules = dict(theirs.base_model.model.named_modules())

    def copy_ours_into_peft():
        with torch.no_grad():
            for name, m in ours.named_modules():
                if isinstance(m, lora.Linear):
                    p = peft_modules[name]
                    p.lora_A["default"].weight.copy_(m.lora_A)
                    p.lora_B["default"].weight.copy_(m.lora_B)
                    p.base_layer.weight.copy_(m.weight)  # the same residual (SVD signs may differ from PEFT's)

    copy_ours_into_peft()
    theirs.save_pretrained(str(tmp_path / "init"))  # the initial adapter, before training (PEFT's recipe)
    train(ours)
    copy_ours_into_peft()
    theirs.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    config = lora.export_peft(ours, tmp_path / "ours", convert_to_lora=True)
    theirs_t = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours_t = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert set(theirs_t) == set(ours_t)
    for k in theirs_t:
        torch.testing.assert_close(ours_t[k], theirs_t[k], rtol=0, atol=1e-6)
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (peft_cfg["r"], peft_cfg["lora_alpha"]) == (4, 8)
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        want = ours(ids).logits
        loaded = peft.PeftModel.from_pretrained(hf_model(), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-5)
