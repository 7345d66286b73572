"""lora.utils: trainable marking and LoRA state dicts (vs loralib 0.1.2), and explicit model-level merging."""

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import lora
from lora.utils import BIAS_MODES


def randomize(model: nn.Module, std: float = 1.0) -> nn.Module:
    """Non-zero A and B in every LoRA layer, so merging actually changes (and rounds) the weights."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.normal_(0, std)
    return model


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


def weight_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: bits(p) for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# Selection: ours vs loralib where loralib's substring matching is right


def mixed(lib, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """LoRA and plain layers with and without biases, nested, with the same names in loralib and here."""
    torch.manual_seed(0)
    block = nn.Sequential(
        OrderedDict(
            qkv=lib.MergedLinear(8, 24, r=2, enable_lora=[True, False, True], dtype=dtype),
            proj=lib.Linear(24, 8, r=2, fan_in_fan_out=True, dtype=dtype),
            norm=nn.LayerNorm(8, dtype=dtype),
            fc=lib.Linear(8, 8, r=2, bias=False, dtype=dtype),  # no bias; and no "bias" in its name
        )
    )
    return nn.Sequential(
        OrderedDict(emb=lib.Embedding(10, 8, r=2, dtype=dtype), block=block, head=nn.Linear(8, 4, dtype=dtype))
    )


@pytest.mark.parametrize("bias", BIAS_MODES)
def test_mark_only_lora_as_trainable_matches_loralib(bias):
    loralib = pytest.importorskip("loralib")
    ours, theirs = mixed(lora), mixed(loralib)
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    loralib.mark_only_lora_as_trainable(theirs, bias=bias)
    flags = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in theirs.named_parameters()}
    assert {n for n, on in flags.items() if on} == set(lora.lora_parameter_names(ours, bias))
    assert flags["block.qkv.lora_A"] and not flags["block.qkv.weight"] and not flags["head.weight"]


@pytest.mark.parametrize("bias", BIAS_MODES)
def test_lora_state_dict_matches_loralib(bias):
    loralib = pytest.importorskip("loralib")
    ours, theirs = mixed(lora), mixed(loralib)
    mine = lora.lora_state_dict(ours, bias=bias)
    assert mine.keys() == loralib.lora_state_dict(theirs, bias=bias).keys()
    assert list(mine) == [k for k in ours.state_dict() if k in mine]  # state_dict order
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in mine.items())
    expected_biases = {
        "none": set(),
        "lora_only": {"block.qkv.bias", "block.proj.bias"},
        "all": {"block.qkv.bias", "block.proj.bias", "block.norm.bias", "head.bias"},
    }[bias]
    assert {k for k in mine if k.endswith("bias")} == expected_biases


def test_lora_state_dict_round_trips_into_a_fresh_model_and_loralib():
    loralib = pytest.importorskip("loralib")
    saved = lora.lora_state_dict(randomize(mixed(lora)), bias="all")
    fresh, theirs = mixed(lora), mixed(loralib)
    assert not fresh.load_state_dict(saved, strict=False).unexpected_keys
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert not theirs.load_state_dict(saved, strict=False).unexpected_keys


@pytest.mark.parametrize("fn", [lora.mark_only_lora_as_trainable, lora.lora_state_dict, lora.lora_parameter_names])
def test_unknown_bias_mode_raises_value_error_naming_it(fn):
    with pytest.raises(ValueError, match="bias='lora'"):
        fn(mixed(lora), bias="lora")


# ---------------------------------------------------------------------------------------------------------------
# Selection: where loralib's substring matching is wrong


class _CausalAttention(nn.Module):
    def __init__(self, lib) -> None:
        super().__init__()
        self.c_attn = lib.Linear(8, 8, r=2)
        # GPT-2's causal mask is a buffer called attn.bias: not a parameter, never a trainable bias
        self.register_buffer("bias", torch.tril(torch.ones(4, 4)).view(1, 1, 4, 4))


class _Model(nn.Module):
    def __init__(self, lib) -> None:
        super().__init__()
        self.attn = _CausalAttention(lib)
        self.flora_head = nn.Linear(8, 3)  # a plain head whose name happens to contain "lora_"


def test_selection_is_by_type_and_exact_name_where_loralib_matches_substrings():
    loralib = pytest.importorskip("loralib")
    ours, theirs = _Model(lora), _Model(loralib)

    lora.mark_only_lora_as_trainable(ours)
    loralib.mark_only_lora_as_trainable(theirs)
    assert not ours.flora_head.weight.requires_grad and not ours.flora_head.bias.requires_grad
    assert theirs.flora_head.weight.requires_grad  # loralib: 'lora_' in 'flora_head.weight'

    assert set(lora.lora_state_dict(ours)) == {"attn.c_attn.lora_A", "attn.c_attn.lora_B"}
    assert "flora_head.weight" in loralib.lora_state_dict(theirs)

    all_ours, all_theirs = lora.lora_state_dict(ours, bias="all"), loralib.lora_state_dict(theirs, bias="all")
    assert "attn.bias" not in all_ours and {"attn.c_attn.bias", "flora_head.bias"} <= all_ours.keys()
    assert "attn.bias" in all_theirs  # loralib: 'bias' in 'attn.bias', the causal-mask buffer


def test_loralib_style_lora_layer_subclass_is_selected():
    class Mine(nn.Linear, lora.LoRALayer):
        def __init__(self) -> None:
            nn.Linear.__init__(self, 4, 4)
            lora.LoRALayer.__init__(self, 2, 1, 0.0, True)
            self.lora_A = nn.Parameter(torch.zeros(2, 4))
            self.lora_B = nn.Parameter(torch.zeros(4, 2))

    model = nn.Sequential(Mine(), nn.Linear(4, 4))
    assert lora.lora_parameter_names(model, "lora_only") == ["0.bias", "0.lora_A", "0.lora_B"]
    lora.mark_only_lora_as_trainable(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_A", "0.lora_B"]


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision: gradients only where mark_only_lora_as_trainable says


@pytest.mark.parametrize("bias", BIAS_MODES)
def test_bf16_model_gradients_only_on_selected_parameters(bias):
    model = randomize(mixed(lora, dtype=torch.bfloat16))
    assert model.block.qkv.lora_A.dtype == torch.float32 and model.block.qkv.weight.dtype == torch.bfloat16
    lora.mark_only_lora_as_trainable(model, bias=bias)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    out = model(ids)
    assert out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = out + model(ids)
    out.float().square().sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(lora.lora_parameter_names(model, bias))
    assert all(model.get_parameter(n).grad.dtype == torch.float32 for n in with_grad if "lora_" in n)


# ---------------------------------------------------------------------------------------------------------------
# merge_lora / unmerge_lora / merge_and_unload


class Net(nn.Module):
    """Every kind of LoRA layer in one forward: ids (B, T) -> (B, T, 3)."""

    def __init__(self, dtype: torch.dtype = torch.float32, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        kw = dict(r=2, lora_alpha=4, dtype=dtype)
        self.emb = lora.Embedding(10, 8, padding_idx=0, **kw)
        self.qkv = lora.MergedLinear(8, 12, enable_lora=[True, False, True], split_sizes=(8, 2, 2), **kw)
        self.proj = lora.Linear(12, 16, fan_in_fan_out=fan_in_fan_out, **kw)
        self.conv = lora.Conv1d(4, 4, 3, padding=1, padding_mode="reflect", **kw)
        self.conv2 = lora.Conv2d(2, 2, (3, 1), padding="same", groups=2, **kw)
        self.head = nn.Linear(16, 3, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.proj(torch.tanh(self.qkv(self.emb(ids))))  # (B, T, 16)
        h = self.conv(h.reshape(-1, 4, 4)).reshape(h.shape)  # (B*T, 4, 4): 4 channels of length 4
        h = self.conv2(h.reshape(-1, 2, 4, 2)).reshape(h.shape)  # (B*T, 2, 4, 2)
        return self.head(torch.tanh(h))


IDS = torch.tensor([[1, 2, 3, 0], [4, 5, 9, 7]])
LORA_NAMES = ("emb", "qkv", "proj", "conv", "conv2")
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}


def net(dtype: torch.dtype = torch.float32, std: float = 1.0, **kw) -> Net:
    torch.manual_seed(0)
    return randomize(Net(dtype, **kw), std=std)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_lora_is_idempotent_matches_and_unmerge_restores_bit_for_bit(dtype):
    model = net(dtype, std=1.5)
    original = weight_bits(model)
    with torch.no_grad():
        unmerged = model(IDS)
        assert lora.merge_lora(model) is model
        merged_bits = weight_bits(model)
        assert all(getattr(model, n).merged for n in LORA_NAMES)
        lora.merge_lora(model)
        assert all(torch.equal(v, merged_bits[k]) for k, v in weight_bits(model).items())
        merged = model(IDS)
        scale = float(unmerged.abs().max())
        torch.testing.assert_close(merged.float(), unmerged.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)
        # the naive undo would not have been exact, so restoring bit for bit below proves something
        naive_exact = [
            torch.equal(bits((m.weight.float() - m.delta_weight()).to(dtype)), original[f"{n}.weight"])
            for n, m in model.named_children()
            if n in LORA_NAMES
        ]
        assert not all(naive_exact)
        assert lora.unmerge_lora(model) is model
        lora.unmerge_lora(model)
    assert not any(getattr(model, n).merged for n in LORA_NAMES)
    assert all(torch.equal(v, original[k]) for k, v in weight_bits(model).items())
    assert torch.equal(model(IDS), unmerged)


def test_merge_lora_on_a_single_layer():
    torch.manual_seed(0)
    layer = randomize(lora.Linear(4, 3, r=2))
    w0 = bits(layer.weight)
    assert lora.merge_lora(layer) is layer and layer.merged
    lora.unmerge_lora(layer)
    assert not layer.merged and torch.equal(bits(layer.weight), w0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_safe_merge_refuses_a_non_finite_delta_and_touches_nothing(bad):
    model = net()
    with torch.no_grad():
        model.conv.lora_B[1, 0] = bad  # not the first LoRA layer: emb, qkv and proj come before it
    before = weight_bits(model)
    with pytest.raises(ValueError, match="conv"):
        lora.merge_lora(model, safe=True)
    with pytest.raises(ValueError, match="conv"):
        lora.merge_and_unload(model)  # safe by default
    assert not any(getattr(model, n).merged for n in LORA_NAMES)
    assert all(torch.equal(v, before[k]) for k, v in weight_bits(model).items())
    assert all(type(getattr(model, n)).__module__ == "lora.layers" for n in LORA_NAMES)


def test_merge_and_unload_returns_plain_layers_sharing_the_merged_storage():
    model = net().eval()
    with torch.no_grad():
        want = model(IDS)
    weights = {n: getattr(model, n).weight for n in LORA_NAMES}
    ptrs = {n: w.data_ptr() for n, w in weights.items()}
    biases = {n: getattr(model, n).bias for n in LORA_NAMES if getattr(getattr(model, n), "bias", None) is not None}
    assert lora.merge_and_unload(model) is model
    expected = {"emb": nn.Embedding, "qkv": nn.Linear, "proj": nn.Linear, "conv": nn.Conv1d, "conv2": nn.Conv2d}
    for name, cls in expected.items():
        plain = getattr(model, name)
        assert type(plain) is cls and not plain.training
        assert plain.weight is weights[name] and plain.weight.data_ptr() == ptrs[name]  # adopted, not copied
        assert name not in biases or plain.bias is biases[name]
    assert not any(lora.is_lora_layer(m) for m in model.modules())
    assert not any(n.endswith(("lora_A", "lora_B")) for n in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), want, rtol=1e-5, atol=1e-5)
    assert model.emb.padding_idx == 0 and model.conv.padding_mode == "reflect" and model.conv2.groups == 2


def test_merge_and_unload_of_a_single_layer_returns_the_plain_layer():
    torch.manual_seed(0)
    layer = randomize(lora.Conv2d(2, 4, (3, 1), stride=2, padding=1, r=2))
    x = torch.randn(1, 2, 5, 5)
    want = layer(x)
    plain = lora.merge_and_unload(layer)
    assert type(plain) is nn.Conv2d and plain.weight is layer.weight and plain.stride == (2, 2)
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_refuses_fan_in_fan_out_before_merging_anything():
    model = net(fan_in_fan_out=True)
    before = weight_bits(model)
    with pytest.raises(ValueError, match="proj"):
        lora.merge_and_unload(model)
    assert not any(getattr(model, n).merged for n in LORA_NAMES)
    assert all(torch.equal(v, before[k]) for k, v in weight_bits(model).items())
    lora.merge_lora(model)  # merging in place still works for such a layer
    assert model.proj.merged


def test_lora_parameter_names_follow_named_parameters():
    model = net()
    names = lora.lora_parameter_names(model)
    assert names == [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")]
    assert set(lora.lora_parameter_names(model, "lora_only")) - set(names) == {
        "qkv.bias",
        "proj.bias",
        "conv.bias",
        "conv2.bias",
    }
    assert set(lora.lora_parameter_names(model, "all")) - set(names) == {
        "qkv.bias",
        "proj.bias",
        "conv.bias",
        "conv2.bias",
        "head.bias",
    }


# ---------------------------------------------------------------------------------------------------------------
# LoRA+ parameter groups


def _loraplus_model(dora: bool):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.fc = nn.Linear(6, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, ids):
            return self.head(self.fc(self.emb(ids)))

    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize("dora", [False, True])
def test_loraplus_groups_hold_every_trainable_parameter_once_with_peft_rates(dora):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    ours = _loraplus_model(dora)
    lora.inject(ours, ["emb", "fc"], r=2, use_dora=dora, mark_trainable=False)
    lora.mark_only_lora_as_trainable(ours, bias="lora_only")
    ours.head.weight.requires_grad_(True)  # a fully trained module next to the adapters
    groups = lora.loraplus_param_groups(ours, lr=1e-3, ratio=8, weight_decay=0.01)
    trainable = [p for p in ours.parameters() if p.requires_grad]
    in_groups = [p for g in groups for p in g["params"]]
    assert len(in_groups) == len(trainable) and {id(p) for p in in_groups} == {id(p) for p in trainable}
    names = {id(p): n for n, p in ours.named_parameters()}
    ours_lr = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert ours_lr["fc.lora_B"][0] == 8 * ours_lr["fc.lora_A"][0] == 8e-3
    torch.optim.AdamW(groups)  # torch accepts them as they are

    # PEFT's LoRA+ on the same structure: the same rate for each parameter
    theirs = peft.get_peft_model(
        _loraplus_model(dora),
        peft.LoraConfig(r=2, target_modules=["emb", "fc"], use_dora=dora, bias="lora_only", modules_to_save=None),
    )
    theirs.base_model.model.head.weight.requires_grad_(True)
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8, loraplus_weight_decay=0.01)
    peft_names = {id(p): n for n, p in theirs.named_parameters()}

    def ours_name(n):
        n = n.removeprefix("base_model.model.").replace(".base_layer", "").replace(".default", "")
        n = n.replace("lora_embedding_", "lora_").replace("lora_magnitude_vector.weight", "lora_magnitude")
        return n.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")

    theirs_lr = {
        ours_name(peft_names[id(p)]): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]
    }
    assert theirs_lr == ours_lr


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0}, {"lr": 1e-3, "ratio": -1}, {"lr": 1e-3, "weight_decay": -0.1}, {"lr": float("nan")}]
)
def test_loraplus_bad_rates_are_value_errors(kwargs):
    with pytest.raises(ValueError, match=next(iter(k for k in kwargs if k != "lr" or len(kwargs) == 1))):
        lora.loraplus_param_groups(nn.Linear(2, 2), **kwargs)
