"""lora.adapters: several adapters on one base (named slots, switching, mixed batches, hot swap).

The oracle for every adapter is a separate model holding that adapter alone, loaded from the same file as its
default adapter (the path every other test of this project covers).
"""

import copy

import pytest
import torch

import lora
import lora.adapters
import lora.phi3
from lora.phi3 import Phi3Config, Phi3ForCausalLM

TINY = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
RANKS = {"a": (2, 4.0), "b": (4, 16.0), "c": (3, 3.0)}  # name -> (r, lora_alpha): different ranks and scalings


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config.from_dict(TINY)).eval()


def random_adapter(base_model, r, alpha, seed, **inject_kwargs):
    model = copy.deepcopy(base_model)
    lora.phi3.inject(model, r=r, lora_alpha=alpha, lora_dropout=0.0, **inject_kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make_files(base_model, out, fused):
    paths = {"fused": fused}
    for seed, (name, (r, alpha)) in enumerate(RANKS.items()):
        paths[name] = out / f"{name}.safetensors"
        lora.save_lora(random_adapter(base_model, r, alpha, seed, fused=fused), paths[name])
    return paths


@pytest.fixture(scope="module", params=[False, True], ids=["per-slice", "fused"])
def files(request, base, tmp_path_factory):
    return make_files(base, tmp_path_factory.mktemp("adapters"), request.param)


def alone(base_model, path):
    model = copy.deepcopy(base_model)
    lora.load_lora(model, path)
    return model.eval()


def several(base_model, paths):
    model = copy.deepcopy(base_model)
    lora.load_lora(model, paths["a"])  # the default adapter: lora_A / lora_B
    lora.load_lora(model, paths["b"], adapter_name="b")
    lora.load_lora(model, paths["c"], adapter_name="c")
    return model.eval()


def ids(batch, length, seed=1):
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def test_names_keys_and_switching(base, files):
    model = several(base, files)
    assert lora.adapter_names(model) == ["default", "b", "c"]
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.o_proj.lora_A" in keys  # the default keeps loralib's keys
    assert "model.layers.0.self_attn.o_proj.lora_adapters.b.lora_A" in keys
    assert set(lora.lora_state_dict(model)) == {k for k in keys if k.endswith(("lora_A", "lora_B"))}
    x = ids(2, 7)
    for name, path in (("default", files["a"]), ("b", files["b"]), ("c", files["c"])):
        lora.set_adapter(model, name)
        assert lora.active_adapter(model) == name
        torch.testing.assert_close(model(x).logits, alone(base, path)(x).logits, rtol=0, atol=1e-6)
    lora.set_adapter(model, None)
    assert torch.equal(model(x).logits, base(x).logits)
    with pytest.raises(ValueError, match="'nope'"):
        lora.set_adapter(model, "nope")


@pytest.mark.parametrize("rows", [["b", None, "default", "c", "c", "b"], [None, None], ["c"]])
def test_mixed_batch_row_equals_adapter_alone(base, files, rows):
    model = several(base, files)
    x = ids(len(rows), 9)
    with lora.adapter_batch(model, rows):
        mixed = model(x).logits
    refs = {"default": alone(base, files["a"]), "b": alone(base, files["b"]), "c": alone(base, files["c"]), None: base}
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i : i + 1], refs[name](x[i : i + 1]).logits, rtol=0, atol=1e-6)
    assert torch.equal(model(x).logits, refs["default"](x).logits)  # the block is left behind: default again
    assert not any(n.endswith(("lora_rows", "lora_stack_A")) for n, _ in model.named_buffers())


def test_mixed_generate_with_kv_cache(base, files):
    model = several(base, files)
    rows = ["c", "default", None, "b"]
    prompt = ids(len(rows), 5)
    refs = {"default": alone(base, files["a"]), "b": alone(base, files["b"]), "c": alone(base, files["c"]), None: base}
    with lora.adapter_batch(model, rows):
        generated = model.generate(prompt, 6)
        # one cached decoding step, logits compared directly
        first = model(prompt, use_cache=True)
        step = model(generated[:, 5:6], past_key_values=first.past_key_values, use_cache=True).logits
    assert torch.equal(model.generate(prompt, 6, adapter_names=rows), generated)  # lora.phi3's own argument
    assert torch.equal(model(prompt, adapter_names=rows).logits, first.logits)
    for i, name in enumerate(rows):
        assert torch.equal(generated[i], refs[name].generate(prompt[i : i + 1], 6)[0]), name
        ref_first = refs[name](prompt[i : i + 1], use_cache=True)
        ref_step = refs[name](generated[i : i + 1, 5:6], past_key_values=ref_first.past_key_values, use_cache=True)
        torch.testing.assert_close(step[i : i + 1], ref_step.logits, rtol=0, atol=1e-6)


def test_mixed_batch_is_differentiable(base, files):
    model = several(base, files)
    lora.mark_only_lora_as_trainable(model)
    x = ids(3, 4)
    with lora.adapter_batch(model, ["b", "c", None]):
        model(x).logits.square().mean().backward()
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.lora_adapters["b"].lora_B.grad.abs().sum() > 0
    assert layer.lora_adapters["c"].lora_B.grad.abs().sum() > 0
    assert layer.lora_B.grad is None or layer.lora_B.grad.abs().sum() == 0  # default: no row used it


def test_hot_swap_keeps_modules_and_parameters(base, files, tmp_path):
    model = several(base, files)
    layer = model.model.layers[1].mlp.down_proj
    slot = layer.lora_adapters["b"]
    before = {n: id(p) for n, p in model.named_parameters()}
    modules = {n: id(m) for n, m in model.named_modules()}
    x = ids(2, 5)
    with lora.adapter_batch(model, ["b", "b"]):
        model(x)  # builds the stacked cache
        # a new adapter of the same shapes (another seed) into slot "b"
        r, alpha = RANKS["b"]
        other = tmp_path / "b2.safetensors"
        lora.save_lora(random_adapter(base, r, alpha, 99, fused=files["fused"]), other)
        lora.load_lora(model, other, adapter_name="b")
        swapped = model(x).logits  # the cache notices the in-place write
    assert {n: id(p) for n, p in model.named_parameters()} == before
    assert {n: id(m) for n, m in model.named_modules()} == modules
    assert layer.lora_adapters["b"] is slot
    torch.testing.assert_close(swapped, alone(base, other)(x).logits, rtol=0, atol=1e-6)


def test_save_by_name_round_trips(base, files, tmp_path):
    model = several(base, files)
    lora.save_lora(model, tmp_path / "c.safetensors", adapter_name="c")
    assert lora.read_lora(tmp_path / "c.safetensors")[0].keys() == lora.read_lora(files["c"])[0].keys()
    for key, t in lora.read_lora(tmp_path / "c.safetensors")[0].items():
        assert torch.equal(t, lora.read_lora(files["c"])[0][key])
    lora.save_lora(model, tmp_path / "default.safetensors")
    for key, t in lora.read_lora(tmp_path / "default.safetensors")[0].items():
        assert torch.equal(t, lora.read_lora(files["a"])[0][key])
    assert lora.adapter_names(model) == ["default", "b", "c"]  # the view was put back


def test_merge_rules(base, files):
    model = several(base, files)
    x = ids(2, 5)
    lora.set_adapter(model, "b")
    with pytest.raises(ValueError, match="'b' is active"):
        lora.merge_lora(model)
    lora.set_adapter(model, "default")
    lora.merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        lora.set_adapter(model, "c")
    with pytest.raises(ValueError, match="merged"), lora.adapter_batch(model, ["b", "c"]):
        pass
    lora.unmerge_lora(model)
    lora.set_adapter(model, "c")
    expected = alone(base, files["c"])(x).logits
    plain = lora.merge_and_unload(model)  # the active adapter is the one merged
    assert not any(isinstance(m, lora.LoRABase) for m in plain.modules())
    torch.testing.assert_close(plain(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_delete_adapter(base, files):
    model = several(base, files)
    lora.set_adapter(model, "b")
    with pytest.raises(ValueError, match="active"):
        lora.delete_adapter(model, "b")
    lora.delete_adapter(model, "c")
    assert lora.adapter_names(model) == ["default", "b"]
    with pytest.raises(ValueError, match="default"):
        lora.delete_adapter(model, "default")
    lora.set_adapter(model, "default")
    lora.delete_adapter(model, "b")
    assert not any(n.endswith("lora_adapters") for n, _ in model.named_modules())


def test_named_adapter_onto_plain_base(base, files):
    model = copy.deepcopy(base)
    lora.load_lora(model, files["b"], adapter_name="b")
    lora.load_lora(model, files["c"], adapter_name="c")
    assert lora.adapter_names(model) == ["b", "c"]
    x = ids(3, 6)
    assert torch.equal(model(x).logits, base(x).logits)  # no default adapter: the base
    with lora.adapter_batch(model, ["c", None, "b"]):
        mixed = model(x).logits
    torch.testing.assert_close(mixed[0:1], alone(base, files["c"])(x[0:1]).logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[2:3], alone(base, files["b"])(x[2:3]).logits, rtol=0, atol=1e-6)


def test_bad_input_changes_nothing(base, files):
    model = several(base, files)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'x y'"):
        lora.load_lora(model, files["b"], adapter_name="x y")
    with pytest.raises(ValueError, match="'zzz'"), lora.adapter_batch(model, ["b", "zzz"]):
        pass
    with pytest.raises(ValueError, match="3 rows"), lora.adapter_batch(model, ["b", "c", None]):
        model(ids(2, 4))
    with pytest.raises(ValueError, match="'nope'"):
        lora.save_lora(model, "/nonexistent/x.safetensors", adapter_name="nope")
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert lora.adapter_names(model) == ["default", "b", "c"]


# ---------------------------------------------------------------------------------------------------------------
# PEFT as the oracle: its mixed-batch forward (adapter_names=) on transformers' Phi-3


@pytest.mark.parametrize("ours_on", ["transformers", "lora.phi3"])
def test_mixed_batch_matches_peft(ours_on, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY)).eval()
    hf.save_pretrained(tmp_path / "base")
    ours = copy.deepcopy(hf) if ours_on == "transformers" else Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    # init_lora_weights=False: random A and B, so every adapter changes the logits
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    pm.add_adapter(
        "c", peft.LoraConfig(r=3, lora_alpha=3, use_rslora=True, target_modules=targets[1:], init_lora_weights=False)
    )
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")  # default in peft/, the others in peft/<name>/
    lora.import_peft(ours, tmp_path / "peft")
    lora.import_peft(ours, tmp_path / "peft" / "b", adapter_name="b")
    lora.import_peft(ours, tmp_path / "peft" / "c", adapter_name="c")
    ours.eval()
    x = ids(5, 8)
    rows = ["b", None, "default", "c", "b"]
    with torch.no_grad():
        expected = pm(input_ids=x, adapter_names=[n or "__base__" for n in rows]).logits
        with lora.adapter_batch(ours, rows):
            got = ours(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (expected[0] - expected[1]).abs().max() > 1e-2  # the adapters do change the logits


def test_refusals_name_what_is_wrong(base, files, tmp_path):
    # a PEFT adapter (one LoRA over the whole qkv matrix) cannot become a per-slice MergedLinear's named adapter
    fused = random_adapter(base, 2, 4.0, 5, fused=True)
    lora.export_peft(fused, tmp_path / "peft")
    per_slice = random_adapter(base, 2, 4.0, 6)
    before = {k: v.clone() for k, v in per_slice.state_dict().items()}
    with pytest.raises(ValueError, match="MergedLinear.*fused=True"):
        lora.import_peft(per_slice, tmp_path / "peft", adapter_name="p")
    assert all(torch.equal(v, per_slice.state_dict()[k]) for k, v in before.items())
    # named adapters run on the linear kinds only
    emb = torch.nn.Sequential(lora.Embedding(10, 4, r=2))
    with pytest.raises(TypeError, match="Embedding"):
        lora.adapters.put_slot(emb[0], "x", 2, 1.0, False, {"lora_A": torch.zeros(2, 10), "lora_B": torch.zeros(4, 2)})
    # an adapter saved with biases would change what every other adapter computes
    with_bias = random_adapter(base, 2, 4.0, 7, fused=files["fused"])
    path = tmp_path / "bias.safetensors"
    lora.save_lora(with_bias, path, bias="all")
    model = several(base, files)
    with pytest.raises(ValueError, match="biases"):
        lora.load_lora(model, path, adapter_name="biased")


def test_state_dict_round_trip_keeps_every_adapter(base, files):
    model = several(base, files)
    state = lora.lora_state_dict(model)
    fresh = several(base, files)
    with torch.no_grad():
        for p in lora.lora_state_dict(fresh).values():
            p.zero_()
    fresh.load_state_dict(state, strict=False)
    x = ids(3, 5)
    with lora.adapter_batch(model, ["b", "c", "default"]), lora.adapter_batch(fresh, ["b", "c", "default"]):
        assert torch.equal(model(x).logits, fresh(x).logits)


def test_hot_swap_does_not_recompile(base, tmp_path):
    from torch._dynamo.testing import CompileCounter

    files = make_files(base, tmp_path, fused=False)  # per-slice only: tracing takes seconds

    model = several(base, files)
    r, alpha = RANKS["b"]
    other = tmp_path / "b2.safetensors"
    lora.save_lora(random_adapter(base, r, alpha, 98, fused=files["fused"]), other)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = ids(2, 5)
    torch._dynamo.reset()
    with torch.no_grad():
        lora.set_adapter(model, "b")
        compiled(x)
        frames = counter.frame_count
        lora.load_lora(model, other, adapter_name="b")
        swapped = compiled(x).logits
        assert counter.frame_count == frames  # same tensors, new values: no recompilation
        torch.testing.assert_close(swapped, alone(base, other)(x).logits, rtol=0, atol=1e-6)
        lora.set_adapter(model, "default")
        with lora.adapter_batch(model, ["b", "c"]):
            compiled(x)
            frames = counter.frame_count
            lora.load_lora(model, files["b"], adapter_name="b")
            mixed = compiled(x).logits
            assert counter.frame_count == frames
        torch.testing.assert_close(mixed[:1], alone(base, files["b"])(x[:1]).logits, rtol=0, atol=1e-6)


def test_mixed_batch_on_transformers_per_slice(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY)).eval()
    files = make_files(hf, tmp_path, fused=False)  # per-slice MergedLinear on transformers' fused projections
    model = several(hf, files)
    rows = ["c", None, "b", "default"]
    x = ids(len(rows), 6)
    with torch.no_grad(), lora.adapter_batch(model, rows):
        mixed = model(x).logits
    refs = {"default": alone(hf, files["a"]), "b": alone(hf, files["b"]), "c": alone(hf, files["c"]), None: hf}
    with torch.no_grad():
        for i, name in enumerate(rows):
            torch.testing.assert_close(mixed[i : i + 1], refs[name](x[i : i + 1]).logits, rtol=0, atol=1e-6)


def test_named_adapters_refuse_dora_and_pissa_layers(base, files, tmp_path):
    """The routed forward is plain LoRA: a DoRA or PiSSA default adapter cannot sit under named ones, and a DoRA
    file cannot become a named adapter; both are refused before anything changes."""
    dora = copy.deepcopy(base)
    lora.phi3.inject(dora, r=2, lora_alpha=4.0, lora_dropout=0.0, use_dora=True, fused=files["fused"])
    before = {k: v.clone() for k, v in dora.state_dict().items()}
    with pytest.raises(ValueError, match="DoRA"):
        lora.load_lora(dora, files["b"], adapter_name="b")
    assert dora.state_dict().keys() == before.keys()
    assert all(torch.equal(v, dora.state_dict()[k]) for k, v in before.items())
    path = tmp_path / "dora.safetensors"
    lora.save_lora(dora, path)
    plain = several(base, files)
    with pytest.raises(ValueError, match="DoRA"):
        lora.load_lora(plain, path, adapter_name="d")
    assert "d" not in lora.adapter_names(plain)
    pissa = copy.deepcopy(base)
    lora.phi3.inject(pissa, r=2, lora_alpha=4.0, lora_dropout=0.0, init_lora_weights="pissa", fused=files["fused"])
    with pytest.raises(TypeError, match="PiSSA"):
        lora.adapters.put_slot(pissa.model.layers[0].self_attn.o_proj, "x", 2, 1.0, False, {})


def test_set_adapter_none_serves_the_base_under_dora(base):
    dora = copy.deepcopy(base)
    lora.phi3.inject(dora, r=2, lora_alpha=4.0, lora_dropout=0.0, use_dora=True)
    with torch.no_grad():
        for name, p in dora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    x = ids(2, 5)
    assert not torch.allclose(dora(x).logits, base(x).logits)
    lora.set_adapter(dora, None)
    torch.testing.assert_close(dora(x).logits, base(x).logits, rtol=0, atol=1e-6)
