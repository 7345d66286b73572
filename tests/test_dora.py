"""DoRA (``use_dora=True``) on every layer kind: parity with PEFT's ``use_dora=True`` on the same weights (outputs,
input gradients, LoRA and magnitude gradients), merge / unmerge / merge_and_unload, the weight-norm cache, adapter
files and PEFT export/import. The code lives in lora/base.py (shared) and lora/layers.py (per kind); it is tested
here, in one file, so that the variant reads as one piece."""

import pytest
import torch
import torch.nn as nn

import lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5


class Wrap(nn.Module):
    """A module holding one layer under the name ``m`` (PEFT adapts submodules)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


def randomise(layer, seed=1):
    """Non-trivial A, B and magnitude, so that every term of DoRA matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in layer.lora_param_names():
            p = getattr(layer, name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name == "lora_magnitude" else 0.0))


def peft_twin(base, ours, kind):
    """PEFT's DoRA over a deep copy of ``base`` carrying ``ours``'s A, B and magnitude."""
    import copy

    model = peft.get_peft_model(
        Wrap(copy.deepcopy(base)),
        peft.LoraConfig(r=ours.r, lora_alpha=ours.lora_alpha, target_modules=["m"], use_dora=True, lora_dropout=0.0),
    )
    m = model.base_model.model.m
    with torch.no_grad():
        if kind == "Embedding":
            m.lora_embedding_A["default"].copy_(ours.lora_A)
            m.lora_embedding_B["default"].copy_(ours.lora_B)
        else:
            m.lora_A["default"].weight.copy_(ours.lora_A.view_as(m.lora_A["default"].weight))
            m.lora_B["default"].weight.copy_(ours.lora_B.view_as(m.lora_B["default"].weight))
        mag = m.lora_magnitude_vector["default"].weight
        mag.copy_(ours.lora_magnitude.view_as(mag))
    return model, m


CASES = {
    "Linear": (lambda: nn.Linear(7, 5), lambda: torch.randn(4, 7)),
    "Embedding": (lambda: nn.Embedding(9, 6), lambda: torch.tensor([[0, 3, 8], [1, 1, 2]])),
    "Conv2d": (lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1), lambda: torch.randn(2, 3, 7, 6)),
    "Conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 8)),
}


def peft_grads(m, kind):
    if kind == "Embedding":
        a, b = m.lora_embedding_A["default"], m.lora_embedding_B["default"]
    else:
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
    return a.grad, b.grad, m.lora_magnitude_vector["default"].weight.grad


@pytest.mark.parametrize("kind", CASES)
def test_outputs_and_gradients_equal_peft_dora(kind):
    torch.manual_seed(0)
    make_base, make_x = CASES[kind]
    base = make_base()
    ours = getattr(lora, kind).from_module(base, r=3, lora_alpha=6, use_dora=True)
    randomise(ours)
    model, m = peft_twin(base, ours, kind)
    x = make_x()
    xs = [x, x.clone()] if x.is_floating_point() else [x, x]
    for t in xs:
        if t.is_floating_point():
            t.requires_grad_(True)
    out_ours, out_peft = ours(xs[0]), model(xs[1])
    torch.testing.assert_close(out_ours, out_peft, rtol=0, atol=ATOL)
    w = torch.randn_like(out_ours)
    (out_ours * w).sum().backward()
    (out_peft * w).sum().backward()
    if x.is_floating_point():
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=ATOL)
    ga, gb, gm = peft_grads(m, kind)
    torch.testing.assert_close(ours.lora_A.grad, ga.view_as(ours.lora_A), rtol=0, atol=ATOL)
    torch.testing.assert_close(ours.lora_B.grad, gb.view_as(ours.lora_B), rtol=0, atol=ATOL)
    torch.testing.assert_close(ours.lora_magnitude.grad, gm.view_as(ours.lora_magnitude), rtol=0, atol=ATOL)
    assert ours.weight.grad is None


def test_merged_linear_per_slice_equals_peft_dora_on_the_unfused_modules():
    """A MergedLinear with slices (q: 8, k: 4, v: 4), q and v adapted, against PEFT's DoRA on three separate
    Linear modules holding the same rows (k unadapted)."""
    torch.manual_seed(0)
    sizes, enable = (8, 4, 4), [True, False, True]
    fused = nn.Linear(6, 16)
    ours = lora.MergedLinear.from_module(fused, r=2, lora_alpha=4, split_sizes=sizes, enable_lora=enable, use_dora=True)
    randomise(ours)

    class Unfused(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x):
            return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    plain = Unfused()
    with torch.no_grad():
        for mod, rows in zip((plain.q, plain.k, plain.v), (slice(0, 8), slice(8, 12), slice(12, 16))):
            mod.weight.copy_(fused.weight[rows])
            mod.bias.copy_(fused.bias[rows])
    model = peft.get_peft_model(plain, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], use_dora=True))
    q, v = model.base_model.model.q, model.base_model.model.v
    with torch.no_grad():
        for i, (mod, b_rows) in enumerate(((q, slice(0, 8)), (v, slice(8, 12)))):
            mod.lora_A["default"].weight.copy_(ours.lora_A[2 * i : 2 * i + 2])
            mod.lora_B["default"].weight.copy_(ours.lora_B[b_rows])
            mod.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude[b_rows])
    x1 = torch.randn(3, 5, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ours(x1), model(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=ATOL)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=ATOL)
    for i, (mod, b_rows) in enumerate(((q, slice(0, 8)), (v, slice(8, 12)))):
        torch.testing.assert_close(
            ours.lora_A.grad[2 * i : 2 * i + 2], mod.lora_A["default"].weight.grad, rtol=0, atol=ATOL
        )
        torch.testing.assert_close(ours.lora_B.grad[b_rows], mod.lora_B["default"].weight.grad, rtol=0, atol=ATOL)
        torch.testing.assert_close(
            ours.lora_magnitude.grad[b_rows], mod.lora_magnitude_vector["default"].weight.grad, rtol=0, atol=ATOL
        )


def test_dora_with_dropout_is_peft_form():
    """Under dropout PEFT rescales the dropped input's path: x W^T + b + (f - 1) d W^T + f s d A^T B^T."""
    torch.manual_seed(0)
    layer = lora.Linear(6, 5, r=2, lora_alpha=4, lora_dropout=0.5, use_dora=True).train()
    randomise(layer)
    x = torch.randn(4, 6)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    d = layer.lora_dropout(x)  # the same mask: nn.Dropout draws from the same generator state
    f = (layer.lora_magnitude / (layer.weight + layer.lora_delta()).norm(dim=1)).detach()
    want = (
        x @ layer.weight.T
        + layer.bias
        + (f - 1) * (d @ layer.weight.T)
        + f * layer.scaling * (d @ layer.lora_A.T @ layer.lora_B.T)
    )
    torch.testing.assert_close(y, want.detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The contract with DoRA: magnitude is a LoRA parameter; merge, unmerge, merge_and_unload


MAKE = {
    "Linear": lambda **kw: lora.Linear(6, 5, **kw),
    "MergedLinear": lambda **kw: lora.MergedLinear(6, 12, enable_lora=[True, False, True], split_sizes=(8, 2, 2), **kw),
    "Embedding": lambda **kw: lora.Embedding(7, 5, padding_idx=0, **kw),
    "Conv1d": lambda **kw: lora.Conv1d(4, 6, 3, groups=2, padding=2, dilation=2, padding_mode="circular", **kw),
    "Conv2d": lambda **kw: lora.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1, **kw),
    "Conv3d": lambda **kw: lora.Conv3d(2, 4, (1, 2, 3), groups=2, padding=(0, 1, 1), **kw),
}
INPUT = {
    "Linear": lambda: torch.randn(3, 6),
    "MergedLinear": lambda: torch.randn(2, 3, 6),
    "Embedding": lambda: torch.tensor([[0, 3, 6], [1, 1, 2]]),
    "Conv1d": lambda: torch.randn(2, 4, 9),
    "Conv2d": lambda: torch.randn(2, 3, 7, 6),
    "Conv3d": lambda: torch.randn(1, 2, 3, 4, 5),
}


def test_every_kind_is_covered_here():
    from lora.layers import KINDS

    assert set(MAKE) == set(KINDS)


def build(kind, dtype=torch.float32):
    torch.manual_seed(0)
    layer = MAKE[kind](r=2, lora_alpha=4, dtype=dtype, use_dora=True)
    randomise(layer)
    x = INPUT[kind]()
    return layer, (x if x.dtype == torch.long else x.to(dtype))


@pytest.mark.parametrize("kind", MAKE)
def test_fresh_dora_layer_equals_its_base(kind):
    torch.manual_seed(0)
    layer = MAKE[kind](r=2, lora_alpha=4, use_dora=True)
    x = INPUT[kind]()
    torch.testing.assert_close(layer(x), layer.to_plain()(x), rtol=0, atol=1e-6)
    assert "lora_magnitude" in layer.lora_param_names() and layer.lora_magnitude.requires_grad


@pytest.mark.parametrize("kind", MAKE)
def test_magnitude_is_a_lora_parameter(kind):
    model = Wrap(MAKE[kind](r=2, lora_alpha=4, use_dora=True))
    lora.mark_only_lora_as_trainable(model)
    assert set(lora.lora_state_dict(model)) == {"m.lora_A", "m.lora_B", "m.lora_magnitude"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"m.lora_A", "m.lora_B", "m.lora_magnitude"}


@pytest.mark.parametrize("kind", MAKE)
def test_rebuilt_from_its_description_computes_the_same(kind):
    from lora.layers import KINDS

    layer, x = build(kind)
    cls = KINDS[kind]
    info = layer.describe()
    assert info["use_dora"] is True
    import copy

    rebuilt = cls.from_module(copy.deepcopy(layer.to_plain()), **cls.rebuild_kwargs(info))
    assert rebuilt.use_dora and rebuilt.mismatches(info) == []
    assert cls.adapter_shapes(
        info["base_shape"], info["r"], use_dora=True, **{f: info[f] for f in cls.lora_fields}
    ) == {n: tuple(getattr(layer, n).shape) for n in layer.lora_param_names()}
    rebuilt.load_state_dict(layer.state_dict())
    assert torch.equal(rebuilt(x), layer(x))


@pytest.mark.parametrize("kind", ["Linear", "MergedLinear", "Conv2d"])
def test_bf16_base_with_fp32_adapter_follows_fp32(kind):
    layer, x = build(kind)
    want = layer(x).detach()
    import copy

    half = copy.deepcopy(layer.to_plain()).to(torch.bfloat16)
    twin = type(layer).from_module(half, **type(layer).rebuild_kwargs(layer.describe()))
    with torch.no_grad():
        for n in layer.lora_param_names():
            getattr(twin, n).copy_(getattr(layer, n))
    assert twin.lora_magnitude.dtype == torch.float32
    torch.testing.assert_close(twin(x.to(torch.bfloat16)).float(), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", MAKE)
def test_delta_weight_is_what_the_forward_adds(kind):
    layer, x = build(kind, torch.float64)
    import copy

    plain = copy.deepcopy(layer.to_plain())  # its own weight: DoRA's delta depends on the weight
    with torch.no_grad():
        plain.weight += layer.delta_weight()
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", MAKE)
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_output(kind):
    layer, x = build(kind)
    want = layer(x).detach()
    w0 = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    # a merged layer's state dict holds the unmerged weight
    assert torch.equal(layer.state_dict()["weight"], w0)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    plain = lora.merge_and_unload(Wrap(layer)).m
    assert type(plain) is layer.adapts
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["Linear", "MergedLinear", "Conv2d", "Embedding"])
def test_two_bf16_merge_unmerge_cycles_leave_weights_bit_identical(kind):
    layer, x = build(kind, torch.bfloat16)
    w0 = layer.weight.detach().clone()
    for _ in range(2):
        layer.merge()
        assert not torch.equal(layer.weight, w0)
        layer.unmerge()
        assert torch.equal(layer.weight.view(torch.int16), w0.view(torch.int16))


def test_unmerge_without_a_record_divides_by_the_merge_time_factor():
    layer, x = build("Linear", torch.float32)
    w0 = layer.weight.detach().clone()
    layer.merge(exact_unmerge=False)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)


def test_weight_norm_is_cached_until_a_parameter_changes():
    layer, x = build("Linear")
    layer.eval()
    calls = []
    real = type(layer).lora_delta

    def counting(self):
        calls.append(1)
        return real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(layer), "lora_delta", counting)
        with torch.no_grad():
            y1 = layer(x)
            layer(x)
            layer(x)
        assert len(calls) == 1  # three calls, one norm
        layer.lora_A.data.mul_(1.5)  # a write through .data (no version bump) is seen too
        y2 = layer(x)
        assert len(calls) == 2 and not torch.allclose(y1, y2)
        with torch.no_grad():
            layer.lora_B.add_(0.5)
        y2 = layer(x)
        assert len(calls) == 3 and not torch.allclose(y1, y2)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        y2.sum().backward()
        opt.step()  # an optimizer step too
        layer(x)
        assert len(calls) == 4
        layer.weight.requires_grad_(False)
        with torch.no_grad():
            layer.weight.mul_(2)  # and a write to the base weight
        f = layer.lora_magnitude / (layer.weight + real(layer)).norm(dim=1)
        torch.testing.assert_close(
            layer(x),
            (layer.to_plain()(x) - layer.bias + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T) * f + layer.bias,
        )


# ---------------------------------------------------------------------------------------------------------------
# Injection, adapter files, PEFT


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


def hf_model():
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY)).eval()


def test_six_adamw_steps_on_phi3_equal_peft_dora():
    ours, theirs = hf_model(), hf_model()
    lora.phi3.inject(ours, r=4, lora_alpha=8, lora_dropout=0.0, fused=True, use_dora=True)
    theirs = peft.get_peft_model(
        theirs,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            use_dora=True,
            target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        ),
    )
    peft_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():  # the same random A (B starts at zero in both, the magnitude at ||W||)
        for name, m in ours.named_modules():
            if isinstance(m, lora.Linear):
                m.lora_A.copy_(peft_modules[name].lora_A["default"].weight)
                torch.testing.assert_close(m.lora_magnitude, peft_modules[name].lora_magnitude_vector["default"].weight)
    ids = torch.randint(3, 96, (2, 12))
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    assert sum(p.numel() for g in opt_ours.param_groups for p in g["params"]) == sum(
        p.numel() for g in opt_theirs.param_groups for p in g["params"]
    )
    for _ in range(6):
        losses = []
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4, losses
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_adapter_file_round_trip_says_dora(tmp_path):
    import json

    from safetensors import safe_open

    model = hf_model()
    lora.phi3.inject(model, r=4, use_dora=True)
    for m in model.modules():
        if lora.is_lora_layer(m):
            randomise(m)
    ids = torch.randint(3, 96, (1, 7))
    want = model(ids).logits
    lora.save_lora(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        modules = json.loads(f.metadata()["modules"])
        assert any(k.endswith(".lora_magnitude") for k in f.keys())
    assert all(info["use_dora"] for info in modules.values())
    fresh = hf_model()
    lora.load_lora(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=0)
    plain = hf_model()
    lora.phi3.inject(plain, r=4)  # the same rank without DoRA: refused, not silently loaded without the magnitude
    with pytest.raises(ValueError, match="use_dora"):
        lora.load_lora(plain, tmp_path / "a.safetensors")


@pytest.mark.parametrize("fused", [True, False])
def test_export_peft_dora_loads_in_peft_with_the_same_logits(tmp_path, fused):
    model = hf_model()
    lora.phi3.inject(model, r=4, use_dora=True, fused=fused, lora_dropout=0.0)
    for m in model.modules():
        if lora.is_lora_layer(m):
            randomise(m)
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
    config = lora.export_peft(model, tmp_path)
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(hf_model(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def test_import_peft_dora_gives_peft_logits(tmp_path):
    theirs = peft.get_peft_model(
        hf_model(),
        peft.LoraConfig(
            r=4, lora_alpha=8, use_dora=True, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        ),
    )
    g = torch.Generator().manual_seed(0)
    for m in theirs.modules():
        if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector:
            with torch.no_grad():  # B non-zero and a magnitude off the weight norm, so that both matter
                m.lora_B["default"].weight.normal_(0, 0.3, generator=g)
                m.lora_magnitude_vector["default"].weight.mul_(1.5)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path))
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
    ours = hf_model()
    lora.import_peft(ours, tmp_path)
    assert all(m.use_dora for m in ours.modules() if lora.is_lora_layer(m))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, want, rtol=0, atol=1e-5)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, ids):
        h = self.emb(ids)  # (N, T, 6)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.fc(h)


def test_peft_dora_embedding_conv_linear_both_directions(tmp_path):
    theirs = peft.get_peft_model(
        Mixed(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv", "fc"], use_dora=True)
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:  # every LoRA tensor random, magnitudes off the weight norms
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.eval().save_pretrained(str(tmp_path / "theirs"))
    ids = torch.tensor([[0, 3, 10, 4], [1, 1, 2, 9]])
    with torch.no_grad():
        want = theirs(ids)
    ours = Mixed()
    assert lora.import_peft(ours, tmp_path / "theirs") and ours.conv.lora_magnitude.shape == (6,)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), want, rtol=0, atol=1e-5)
    lora.export_peft(ours, tmp_path / "ours", task_type=None)
    back = peft.PeftModel.from_pretrained(Mixed(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids), want, rtol=0, atol=1e-5)
