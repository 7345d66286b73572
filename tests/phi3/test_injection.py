"""lora.phi3.inject on transformers' Phi3ForCausalLM and on this library's Phi-3."""

import pytest
import torch

import lora
import lora.phi3

transformers = pytest.importorskip("transformers")

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
# microsoft/Phi-3-mini-4k-instruct and microsoft/Phi-3-medium-4k-instruct config.json (the fields that size LoRA)
MINI = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 32000,
    "eos_token_id": 32000,
}
MEDIUM = {
    "vocab_size": 32064,
    "hidden_size": 5120,
    "intermediate_size": 17920,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 10,
    "pad_token_id": 32000,
    "eos_token_id": 32000,
}


def hf_model(**overrides):
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(**{**TINY, **overrides})
    return transformers.Phi3ForCausalLM(cfg).eval()


def our_model(**overrides):
    from lora.phi3 import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config.from_dict({**TINY, **overrides})).eval()


def _has_our_model() -> bool:
    return hasattr(lora.phi3, "Phi3ForCausalLM")


BUILDERS = [pytest.param(hf_model, id="transformers")]
BUILDERS += [pytest.param(our_model, id="ours")] if _has_our_model() else []


def logits(model, ids):
    return model(ids).logits


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("kwargs", [{}, {"fused": True}, {"qkv_slices": ("q", "v"), "targets": ("qkv_proj", "o_proj")}])
def test_logits_unchanged_at_init(build, kwargs):
    model = build()
    ids = torch.randint(3, 96, (2, 9))
    before = logits(model, ids)
    lora.phi3.inject(model, r=4, **kwargs)
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("build", BUILDERS)
def test_module_kinds_and_split_sizes(build):
    model = build()
    names = lora.phi3.inject(model, r=4)
    assert len(names) == 4 * TINY["num_hidden_layers"]
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, lora.MergedLinear)
    assert layer.self_attn.qkv_proj.split_sizes == (64, 32, 32)  # 4 heads x 16, 2 kv heads x 16 twice
    assert isinstance(layer.mlp.gate_up_proj, lora.MergedLinear) and layer.mlp.gate_up_proj.split_sizes == (96, 96)
    assert type(layer.self_attn.o_proj) is lora.Linear and type(layer.mlp.down_proj) is lora.Linear
    assert not lora.is_lora_layer(model.lm_head) and not lora.is_lora_layer(model.model.embed_tokens)


@pytest.mark.parametrize("build", BUILDERS)
def test_only_lora_trains_and_disabled_slices_stay_zero(build):
    model = build().train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora.phi3.inject(model, r=4, lora_dropout=0.0, qkv_slices=("q", "v"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 96, (2, 12))
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"
    qkv = model.model.layers[0].self_attn.qkv_proj
    delta = qkv.delta_weight()
    q, k = 64, 32  # v is the remaining 32 rows
    assert delta[:q].abs().sum() > 0 and delta[q + k :].abs().sum() > 0
    assert torch.equal(delta[q : q + k], torch.zeros_like(delta[q : q + k]))


@pytest.mark.parametrize("build", BUILDERS)
def test_gqa_slices_adapt_the_right_rows(build):
    """Only the k slice gets a non-zero B: the k projection moves by x A_k^T B_k^T s, q and v do not move."""
    model = build()
    lora.phi3.inject(model, r=2, lora_dropout=0.0, targets=("qkv_proj",), qkv_slices=("k",))
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.lora_B.shape == (32, 2)
    torch.manual_seed(1)
    with torch.no_grad():
        qkv.lora_B.normal_()
    x = torch.randn(3, 64, dtype=torch.float64)
    out = qkv.double()(x)
    base = x @ qkv.weight.T
    expected_k = base[:, 64:96] + qkv.scaling * (x @ qkv.lora_A.T @ qkv.lora_B.T)
    torch.testing.assert_close(out[:, :64], base[:, :64], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 64:96], expected_k)
    torch.testing.assert_close(out[:, 96:], base[:, 96:], rtol=0, atol=0)


def _meta_model(config: dict):
    with torch.device("meta"):
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**config))


def test_phi3_mini_fused_count_equals_peft_all_linear():
    model = _meta_model(MINI)
    lora.phi3.inject(model, r=16, fused=True)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # What PEFT prints for target_modules="all-linear", r=16 on Phi-3-mini-4k-instruct.
    assert n == 25_165_824
    assert lora.phi3.trainable_count(model.config, r=16, fused=True) == n


@pytest.mark.parametrize("config, kwargs", [(MINI, {}), (MEDIUM, {}), (MEDIUM, {"qkv_slices": ("q", "v")})])
def test_per_slice_count_matches_formula(config, kwargs):
    model = _meta_model(config)
    lora.phi3.inject(model, r=16, **kwargs)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = h // config["num_attention_heads"]
    q, kv = h, config["num_key_value_heads"] * head_dim
    slices = [q, kv] if kwargs else [q, kv, kv]
    per_layer = 16 * (len(slices) * h + sum(slices))  # qkv: one A (r x h) and B rows per enabled slice
    per_layer += 16 * (h + h)  # o_proj
    per_layer += 16 * (2 * h + 2 * inter)  # gate_up: two slices of `inter` rows
    per_layer += 16 * (inter + h)  # down_proj
    assert n == per_layer * layers == lora.phi3.trainable_count(model.config, r=16, **kwargs)


def test_phi3_medium_split_is_gqa():
    model = _meta_model(MEDIUM)
    lora.phi3.inject(model, r=16, targets=("qkv_proj",))
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.split_sizes == (5120, 1280, 1280)
    assert qkv.lora_slices == ((0, 5120), (5120, 1280), (6400, 1280))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"targets": ("qkv_proj", "lm_head")}, "lm_head"),
        ({"qkv_slices": ("q", "x")}, "qkv_slices"),
        ({"qkv_slices": ()}, "qkv_slices"),
        ({"fused": True, "qkv_slices": ("q", "v")}, "fused"),
        ({"r": 0.5}, "r=0.5"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = hf_model()
    with pytest.raises(ValueError, match=match):
        lora.phi3.inject(model, **kwargs)
    assert not any(lora.is_lora_layer(m) for m in model.modules())


@pytest.mark.parametrize("kwargs", [{}, {"fused": True}, {"qkv_slices": ("q", "v")}])
def test_lora_step_matches_transformers(kwargs):
    """Same base weights, same LoRA weights: our Phi-3 and transformers' give the same loss and LoRA gradients."""
    from lora.phi3 import Phi3Config, Phi3ForCausalLM

    config = {
        **TINY,
        "num_hidden_layers": 2,
        "sliding_window": 7,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
        "original_max_position_embeddings": 8,
        "max_position_embeddings": 64,
    }
    hf = hf_model(**config).train()
    ours = Phi3ForCausalLM(Phi3Config.from_dict(config))
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours.train()
    for m in (hf, ours):
        lora.phi3.inject(m, r=4, lora_dropout=0.0, **kwargs)
    torch.manual_seed(3)
    lora_hf = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.normal_(std=0.3)
                lora_hf[name].copy_(p)
    ids = torch.randint(3, 96, (2, 13))  # 13 > original_max_position_embeddings: LongRoPE's long factors
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    out_hf = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out_ours = ours(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_hf.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out_ours.loss, out_hf.loss, atol=1e-5, rtol=0)
    out_hf.loss.backward()
    out_ours.loss.backward()
    grads = [(n, p.grad, lora_hf[n].grad) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(grads) == 8 * TINY["num_hidden_layers"]
    for name, g_ours, g_hf in grads:
        torch.testing.assert_close(g_ours, g_hf, atol=1e-5, rtol=1e-4, msg=name)
