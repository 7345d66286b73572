"""lora.checkpoint: native adapter files, strict loading, PEFT export/import, loralib compatibility.

Oracles: PEFT (``PeftModel.from_pretrained``, ``get_peft_model``) and transformers' ``Phi3ForCausalLM`` for the PEFT
format, loralib 0.1.2 for loralib's state-dict keys, and the adapted model itself for save -> load round trips.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora
import lora.checkpoint
import lora.peft_format
from lora._io import write_safetensors
import lora.phi3

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
PEFT_TOL = 1e-5  # fp32 max |logit difference| between this library and PEFT on the same adapter


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def hf_model(**overrides):
    """transformers' tiny Phi-3, weights seeded: two calls with the same overrides give the same base."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**TINY, **overrides})).eval()


def our_phi3():
    """This library's Phi-3 holding exactly hf_model()'s weights."""
    model = lora.phi3.Phi3ForCausalLM(lora.phi3.Phi3Config.from_dict(dict(TINY)))
    model.load_state_dict(hf_model().state_dict(), strict=True)
    return model.eval()


BASES = [pytest.param(hf_model, id="transformers")]
if hasattr(lora.phi3, "Phi3ForCausalLM"):  # this library's Phi-3 is being written alongside; test it when it lands
    BASES.append(pytest.param(our_phi3, id="ours"))


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x=None) -> torch.Tensor:
    return model(ids() if x is None else x).logits


@torch.no_grad()
def randomize_lora(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Give every LoRA parameter random values (B is zero at init, which would hide every bug)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.rpartition(".")[2] in ("lora_A", "lora_B"):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type]]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()})


def assert_unchanged(model: nn.Module, snap) -> None:
    state, types = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def adapted_phi3(base=hf_model, seed: int = 0, **inject_kwargs):
    model = base()
    lora.phi3.inject(model, r=inject_kwargs.pop("r", 4), lora_alpha=inject_kwargs.pop("lora_alpha", 8), **inject_kwargs)
    randomize_lora(model, seed)
    return model


# ---------------------------------------------------------------------------------------------------------------
# 1. Native file


def test_file_holds_lora_state_dict_and_describes_every_module(tmp_path):
    model = adapted_phi3(qkv_slices=("q", "v"), use_rslora=True)
    path = tmp_path / "adapter.safetensors"
    lora.save_lora(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]
    expected = lora.lora_state_dict(model)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        meta = f.metadata()
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), expected[k])
    assert meta["format"] == lora.checkpoint.FORMAT and meta["format_version"] == lora.checkpoint.FORMAT_VERSION
    modules = json.loads(meta["modules"])
    assert set(modules) == {n for n, m in model.named_modules() if lora.is_lora_layer(m)}
    qkv = modules["model.layers.0.self_attn.qkv_proj"]
    assert qkv["kind"] == "MergedLinear" and qkv["r"] == 4 and qkv["lora_alpha"] == 8 and qkv["use_rslora"] is True
    assert qkv["split_sizes"] == [64, 32, 32] and qkv["enable_lora"] == [True, False, True]
    assert qkv["base_shape"] == [128, 64] and qkv["lora_dtype"] == "float32"
    down = modules["model.layers.1.mlp.down_proj"]
    assert down["kind"] == "Linear" and down["base_shape"] == [64, 96] and "split_sizes" not in down
    assert json.loads(meta["target_counts"]) == {"qkv_proj": 2, "o_proj": 2, "gate_up_proj": 2, "down_proj": 2}
    tensors, described = lora.read_lora(path)
    assert described == modules and tensors.keys() == expected.keys()


@pytest.mark.parametrize("kwargs", [{}, {"qkv_slices": ("q", "v")}, {"fused": True}, {"use_rslora": True}])
def test_load_onto_plain_and_onto_injected_model(tmp_path, kwargs):
    model = adapted_phi3(**kwargs)
    path = tmp_path / "a.safetensors"
    lora.save_lora(model, path)
    want = logits(model)

    plain = hf_model()
    assert not torch.equal(logits(plain), want)
    names = lora.load_lora(plain, path)  # injects from the metadata first
    assert sorted(names) == sorted(n for n, m in model.named_modules() if lora.is_lora_layer(m))
    assert {n: type(m) for n, m in plain.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    assert torch.equal(logits(plain), want)

    injected = hf_model()  # same layout, other init and another alpha: the file's values win
    lora.phi3.inject(injected, r=4, lora_alpha=1, **kwargs)
    lora.load_lora(injected, path)
    assert torch.equal(logits(injected), want)
    for k, v in lora.lora_state_dict(model).items():
        assert torch.equal(lora.lora_state_dict(injected)[k], v)


def test_load_adapter_of_modules_whose_names_are_suffixes_of_each_other(tmp_path):
    # Regression: loading used lora.inject, which matches suffixes, so "fc" also adapted "blk.fc" (and a file with
    # both was refused as ambiguous).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.blk = nn.Linear(4, 4), nn.Module()
            self.blk.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.blk.fc(self.fc(x))

    x = torch.randn(3, 4)
    only_root = Net()
    only_root.fc = lora.Linear.from_module(only_root.fc, r=2)
    randomize_lora(only_root)
    lora.save_lora(only_root, tmp_path / "root.safetensors")
    fresh = Net()
    lora.load_lora(fresh, tmp_path / "root.safetensors")
    assert type(fresh.blk.fc) is nn.Linear and type(fresh.fc) is lora.Linear
    assert torch.equal(fresh(x), only_root(x))

    both = Net()
    lora.inject(both, ["fc"], r=2)
    randomize_lora(both)
    lora.save_lora(both, tmp_path / "both.safetensors")
    fresh = Net()
    assert sorted(lora.load_lora(fresh, tmp_path / "both.safetensors")) == ["blk.fc", "fc"]
    assert torch.equal(fresh(x), both(x))


def test_bare_layer_round_trip(tmp_path):
    # Regression: the keys of a model that *is* a LoRA layer are "lora_A"/"lora_B", and loading expected ".lora_A".
    torch.manual_seed(0)
    layer = lora.MergedLinear(6, 9, r=2, lora_alpha=3, enable_lora=[True, False, True])
    randomize_lora(layer)
    lora.save_lora(layer, tmp_path / "layer.safetensors")
    torch.manual_seed(0)
    other = lora.MergedLinear(6, 9, r=2, lora_alpha=1, enable_lora=[True, False, True])
    lora.load_lora(other, tmp_path / "layer.safetensors")
    x = torch.randn(4, 6)
    assert torch.equal(other(x), layer(x))
    plain = nn.Linear(6, 9)
    _load_fails(plain, tmp_path / "layer.safetensors", "(root): the model itself is a plain Linear")
    with pytest.raises(ValueError, match="PEFT adapts submodules"):
        lora.export_peft(layer, tmp_path / "peft")


def test_buffer_called_bias_is_never_overwritten(tmp_path):
    # Regression: a file naming a *buffer* called bias (GPT-2's causal mask) passed the checks, then loading failed
    # halfway with a KeyError, after the LoRA layers had been swapped in.
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(4, 4)
            self.register_buffer("bias", torch.ones(4, 4))

    model = Attn()
    lora.inject(model, ["proj"], r=2)
    lora.save_lora(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = {**load_file(str(tmp_path / "a.safetensors")), "bias": torch.zeros(4, 4)}
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
    _load_fails(Attn(), tmp_path / "b.safetensors", "bias: tensor in the file matches no LoRA parameter or bias")


def _crash_halfway(real_write):
    def save_file_then_crash(filename, tensors, metadata=None):
        real_write(filename, tensors, metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])  # a half-written file ...
        raise OSError("simulated crash mid-save")  # ... and then the process dies

    return save_file_then_crash


def test_crash_mid_save_keeps_previous_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    model = adapted_phi3()
    path = tmp_path / "a.safetensors"
    lora.save_lora(model, path)
    before = path.read_bytes()
    randomize_lora(model, seed=1)
    monkeypatch.setattr(lora.checkpoint, "write_safetensors", _crash_halfway(write_safetensors))
    with pytest.raises(OSError, match="simulated crash"):
        lora.save_lora(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]

    out = tmp_path / "peft"
    monkeypatch.undo()
    lora.export_peft(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    randomize_lora(model, seed=2)
    monkeypatch.setattr(lora.peft_format, "write_safetensors", _crash_halfway(write_safetensors))
    with pytest.raises(OSError, match="simulated crash"):
        lora.export_peft(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_saved_file_has_umask_permissions(tmp_path):
    # Regression: mkstemp (and safetensors' own save_file) create 0600 files.
    model = adapted_phi3(fused=True)
    old = os.umask(0o022)
    try:
        lora.save_lora(model, tmp_path / "a.safetensors")
        lora.export_peft(model, tmp_path / "peft")
    finally:
        os.umask(old)
    for p in [tmp_path / "a.safetensors", *(tmp_path / "peft").iterdir()]:
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_save_refuses_merged_model_and_model_without_lora(tmp_path):
    model = adapted_phi3(fused=True)
    lora.merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        lora.save_lora(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="nothing to save"):
        lora.save_lora(hf_model(), tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# 2. Strict validation: one ValueError naming every mismatch, and nothing changed


@pytest.fixture(scope="module")
def phi3_adapter(tmp_path_factory):
    """An adapter for hf_model() (2 layers, GQA 4/2 heads, per-slice q,k,v): (path, logits of the adapted model)."""
    model = adapted_phi3()
    path = tmp_path_factory.mktemp("adapter") / "phi3.safetensors"
    lora.save_lora(model, path)
    return path, logits(model)


MODULES = [
    f"model.layers.{i}.{p}"
    for i in range(2)
    for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
]


def _load_fails(model, path, *fragments, strict=True):
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        lora.load_lora(model, path, strict=strict)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert_unchanged(model, snap)
    return message


def test_wrong_hidden_size_names_every_module_with_both_shapes(phi3_adapter):
    path, _ = phi3_adapter
    model = hf_model(hidden_size=32)  # head_dim 8: qkv (64, 32), o (32, 32), gate_up (192, 32), down (32, 96)
    found = {
        "self_attn.qkv_proj": "(64, 32)",
        "self_attn.o_proj": "(32, 32)",
        "mlp.gate_up_proj": "(192, 32)",
        "mlp.down_proj": "(32, 96)",
    }
    expected = {
        "self_attn.qkv_proj": "(128, 64)",
        "self_attn.o_proj": "(64, 64)",
        "mlp.gate_up_proj": "(192, 64)",
        "mlp.down_proj": "(64, 96)",
    }
    message = _load_fails(
        model,
        path,
        *(
            f"model.layers.{i}.{p}: base weight shape expected {expected[p]}, found {found[p]}"
            for i in range(2)
            for p in found
        ),
    )
    assert message.count("\n") == len(MODULES)  # one ValueError, one line per module


def test_missing_module(phi3_adapter):
    path, _ = phi3_adapter
    model = hf_model()
    model.model.layers[1].mlp = nn.Identity()
    _load_fails(
        model,
        path,
        "model.layers.1.mlp.gate_up_proj: missing",
        "model.layers.1.mlp.down_proj: missing",
        "expected a MergedLinear over a base weight of shape (192, 64)",
    )


def test_more_layers(phi3_adapter):
    path, _ = phi3_adapter
    _load_fails(
        hf_model(num_hidden_layers=3),
        path,
        *(
            f"*.{leaf}: the adapter's base had 2 such modules, Phi3ForCausalLM has 3"
            for leaf in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        ),
    )


def test_fewer_layers(phi3_adapter):
    path, _ = phi3_adapter
    _load_fails(
        hf_model(num_hidden_layers=1),
        path,
        *(f"{n}: missing" for n in MODULES if ".1." in n),
        "the adapter's base had 2 such modules, Phi3ForCausalLM has 1",
    )


def test_gqa_adapter_on_mha_base(phi3_adapter):
    path, _ = phi3_adapter
    _load_fails(
        hf_model(num_key_value_heads=4),
        path,
        *(
            f"model.layers.{i}.self_attn.qkv_proj: base weight shape expected (128, 64), found (192, 64)"
            for i in range(2)
        ),
    )


def test_other_slice_layout_or_rank_on_injected_model(phi3_adapter):
    path, _ = phi3_adapter
    model = hf_model()
    lora.phi3.inject(model, r=4, qkv_slices=("q", "v"))
    _load_fails(
        model,
        path,
        *(
            f"model.layers.{i}.self_attn.qkv_proj: enable_lora expected [True, True, True], found [True, False, True]"
            for i in range(2)
        ),
    )
    model = hf_model()
    lora.phi3.inject(model, r=2)
    _load_fails(model, path, *(f"{n}: rank expected r=4, found r=2" for n in MODULES))
    model = hf_model()
    lora.phi3.inject(model, r=4, fused=True)
    _load_fails(model, path, "model.layers.0.self_attn.qkv_proj: expected a MergedLinear, found a Linear")


def test_merged_target_is_refused(phi3_adapter):
    path, _ = phi3_adapter
    model = hf_model()
    lora.phi3.inject(model, r=4)
    lora.merge_lora(model)
    _load_fails(model, path, "is merged")


def test_strict_refuses_lora_layers_the_file_does_not_cover(phi3_adapter, tmp_path):
    path, want = phi3_adapter
    model = hf_model()
    lora.phi3.inject(model, r=4)
    lora.inject(model, ["lm_head"], r=2, mark_trainable=False)
    _load_fails(model, path, "lm_head: has LoRA in the model but not in the adapter file")
    lora.load_lora(model, path, strict=False)  # lm_head's B is zero: the outputs are the adapter's
    assert torch.equal(logits(model), want)


def _corrupt(kind: str, good: bytes, path: Path) -> None:
    if kind == "truncated":
        path.write_bytes(good[:-7])
    elif kind == "header":
        n = struct.unpack("<Q", good[:8])[0]
        path.write_bytes(good[:8] + b"{" + b"\x00garbage" * (n // 8) + good[8 + 1 + 8 * (n // 8) :])
    elif kind == "header_length":
        path.write_bytes(struct.pack("<Q", 1 << 40) + good[8:])
    elif kind == "pickle":
        torch.save({"a": torch.zeros(2)}, path)
    elif kind == "text":
        path.write_text("this is not a tensor file\n")
    elif kind == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("kind", ["truncated", "header", "header_length", "pickle", "text", "empty"])
def test_unreadable_file_is_a_clear_error(phi3_adapter, tmp_path, kind):
    path, _ = phi3_adapter
    bad = tmp_path / "bad.safetensors"
    _corrupt(kind, path.read_bytes(), bad)
    for model in (hf_model(), adapted_phi3(seed=3)):
        _load_fails(model, bad, "is not a readable safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lora.read_lora(bad)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        lora.load_lora(hf_model(), tmp_path / "nope.safetensors")


def _mutate_module(field, value):
    def mutate(meta):
        modules = json.loads(meta["modules"])
        entry = modules["model.layers.0.self_attn.qkv_proj"]
        if value is KeyError:
            del entry[field]
        else:
            entry[field] = value
        meta["modules"] = json.dumps(modules)

    return mutate


def _set(key, value):
    def mutate(meta):
        if value is KeyError:
            del meta[key]
        else:
            meta[key] = value

    return mutate


BAD_METADATA = [
    ("r_string", _mutate_module("r", "4"), "r='4' has type str"),
    ("r_bool", _mutate_module("r", True), "r=True has type bool"),
    ("r_zero", _mutate_module("r", 0), "r=0 must be positive"),
    ("alpha_negative", _mutate_module("lora_alpha", -1), "lora_alpha=-1 must be a positive finite number"),
    ("alpha_nan", _mutate_module("lora_alpha", float("nan")), "lora_alpha=nan"),
    ("alpha_list", _mutate_module("lora_alpha", [8]), "lora_alpha=[8] has type list"),
    ("dropout", _mutate_module("lora_dropout", 1.5), "lora_dropout=1.5 must be in [0, 1)"),
    ("shape_strings", _mutate_module("base_shape", ["128", 64]), "base_shape=['128', 64] must be 2 positive ints"),
    ("shape_ndim", _mutate_module("base_shape", [128, 64, 1]), "base_shape=[128, 64, 1] must be 2 positive ints"),
    ("split_missing", _mutate_module("split_sizes", KeyError), "lacks the field 'split_sizes'"),
    ("split_strings", _mutate_module("split_sizes", ["a", "b", "c"]), "split_sizes=['a', 'b', 'c'] must be a list"),
    ("split_sum", _mutate_module("split_sizes", [32, 32, 32]), "sum to 96, not the 128 output rows"),
    ("enable_ints", _mutate_module("enable_lora", [1, 0, 1]), "enable_lora=[1, 0, 1] must be one bool"),
    ("enable_none", _mutate_module("enable_lora", [False, False, False]), "at least one True"),
    ("kind", _mutate_module("kind", "Bilinear"), "kind='Bilinear' is not one of"),
    ("dtype", _mutate_module("lora_dtype", "int8"), "lora_dtype='int8' is not a floating torch dtype"),
    ("dtype_junk", _mutate_module("lora_dtype", "Tensor"), "lora_dtype='Tensor' is not a floating torch dtype"),
    ("entry_not_object", _mutate_module("r", None), "r=None has type NoneType"),
    ("modules_not_json", _set("modules", "{not json"), "is not valid JSON"),
    ("modules_missing", _set("modules", KeyError), "is not valid JSON"),
    ("modules_list", _set("modules", "[]"), "must be JSON objects"),
    ("modules_empty", _set("modules", "{}"), "'modules' is empty"),
    ("counts_string", _set("target_counts", '{"qkv_proj": "2"}'), "target_counts['qkv_proj']='2'"),
    ("bias", _set("bias", "some"), "bias='some' is not one of"),
    ("format", _set("format", KeyError), "is not a lora adapter file"),
    ("version", _set("format_version", "2"), "format_version='2'"),
]


@pytest.mark.parametrize("mutate, fragment", [pytest.param(m, f, id=i) for i, m, f in BAD_METADATA])
def test_malformed_metadata_is_a_clear_error(phi3_adapter, tmp_path, mutate, fragment):
    path, _ = phi3_adapter
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    mutate(meta)
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata=meta)
    for model in (hf_model(), adapted_phi3(seed=3)):
        _load_fails(model, bad, fragment)


def test_tensor_problems_are_named(phi3_adapter, tmp_path):
    path, _ = phi3_adapter
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    bad = tmp_path / "bad.safetensors"
    broken = dict(tensors)
    broken["model.layers.0.self_attn.o_proj.lora_A"] = torch.zeros(4, 63)
    broken["model.layers.1.mlp.down_proj.lora_B"] = torch.zeros(64, 4, dtype=torch.int32)
    del broken["model.layers.1.self_attn.o_proj.lora_B"]
    broken["model.layers.0.mlp.extra.lora_A"] = torch.zeros(1)
    broken["model.norm.bias"] = torch.zeros(64)  # the base's norm has no bias
    save_file(broken, str(bad), metadata=meta)
    _load_fails(
        hf_model(),
        bad,
        "model.layers.0.self_attn.o_proj.lora_A: shape expected (4, 64), found (4, 63)",
        "model.layers.1.mlp.down_proj.lora_B: dtype torch.int32 is not floating point",
        "model.layers.1.self_attn.o_proj.lora_B: tensor missing",
        "model.layers.0.mlp.extra.lora_A: tensor in the file matches no LoRA parameter",
        "model.norm.bias: tensor in the file matches no LoRA parameter",
    )


def test_bias_modes_round_trip(tmp_path):
    model = adapted_phi3(fused=True)
    with torch.no_grad():
        model.lm_head.bias = nn.Parameter(torch.randn(TINY["vocab_size"]) * 0.1)
    lora.save_lora(model, tmp_path / "a.safetensors", bias="all")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert "lm_head.bias" in f.keys() and f.metadata()["bias"] == "all"
    fresh = hf_model()
    fresh.lm_head.bias = nn.Parameter(torch.zeros(TINY["vocab_size"]))
    lora.load_lora(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), logits(model))


# ---------------------------------------------------------------------------------------------------------------
# 3. Never unpickle


def test_library_never_unpickles():
    sources = sorted(Path(lora.__file__).parent.rglob("*.py"))
    assert sources
    calls = 0
    for path in sources:
        text = path.read_text()
        assert not re.search(r"\bimport\s+(c?pickle|dill|joblib)\b|\bpickle\.", text), path
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            call = text[m.start() : i]
            assert re.search(r"weights_only\s*=\s*True", call), f"{path}: {call}"
            calls += 1
    assert calls >= 1  # the legacy adapter_model.bin reader


_UNPICKLED: list[str] = []


def _side_effect() -> None:
    _UNPICKLED.append("code ran")


class _Evil:
    def __reduce__(self):
        return (_side_effect, ())


def test_legacy_bin_is_read_without_running_pickled_code(tmp_path):
    model = adapted_phi3(fused=True)
    lora.export_peft(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    fresh = hf_model()
    lora.import_peft(fresh, tmp_path)
    assert max_diff(logits(fresh), logits(model)) <= PEFT_TOL

    torch.save({"x": _Evil()}, tmp_path / "adapter_model.bin")
    fresh = hf_model()
    snap = snapshot(fresh)
    with pytest.raises(ValueError, match="could not be read as a tensor file"):
        lora.import_peft(fresh, tmp_path)
    assert _UNPICKLED == []
    assert_unchanged(fresh, snap)


# ---------------------------------------------------------------------------------------------------------------
# 4. PEFT export, checked by PEFT itself

EXPORT_CASES = {
    "per_slice_qkv": {},
    "per_slice_q_v": {"qkv_slices": ("q", "v")},
    "fused": {"fused": True},
    "per_slice_q_v_uniform_rank": {"qkv_slices": ("q", "v"), "uniform_rank": True},
    "per_slice_rslora": {"use_rslora": True, "r": 3, "lora_alpha": 5},
    "fused_rslora_uniform_rank": {"fused": True, "use_rslora": True, "uniform_rank": True},
}


def peft_logits(adapter_dir) -> torch.Tensor:
    peft = pytest.importorskip("peft")
    model = peft.PeftModel.from_pretrained(hf_model(), str(adapter_dir)).eval()
    return logits(model)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_peft_matches_peft(tmp_path, base, case):
    peft = pytest.importorskip("peft")
    kwargs = dict(EXPORT_CASES[case])
    uniform = kwargs.pop("uniform_rank", False)
    model = adapted_phi3(base, **kwargs)
    config = lora.export_peft(model, tmp_path, uniform_rank=uniform)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk == config
    assert set(on_disk) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}
    if uniform:
        assert on_disk["rank_pattern"] == {} and on_disk["alpha_pattern"] == {}
    want = logits(model)
    got = peft_logits(tmp_path)
    diff = max_diff(got, want)
    print(f"\nexport_peft -> PeftModel.from_pretrained [{case}, {base.__name__}]: max |logit diff| = {diff:.3g}")
    assert diff <= PEFT_TOL
    assert max_diff(want, logits(hf_model())) > 1e-2  # the adapter does change the logits


def test_export_peft_shapes_and_patterns(tmp_path):
    model = adapted_phi3(r=4, lora_alpha=8, qkv_slices=("q", "v"))
    config = lora.export_peft(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    p = "base_model.model.model.layers.0."
    assert tensors[p + "self_attn.qkv_proj.lora_A.weight"].shape == (8, 64)  # 2 slices x r=4, stacked
    B = tensors[p + "self_attn.qkv_proj.lora_B.weight"]
    assert B.shape == (128, 8)
    assert torch.equal(B[64:96], torch.zeros(32, 8))  # k rows: not adapted
    assert torch.equal(B[:64, 4:], torch.zeros(64, 4)) and torch.equal(B[96:, :4], torch.zeros(32, 4))
    assert tensors[p + "mlp.gate_up_proj.lora_A.weight"].shape == (8, 64)
    assert tensors[p + "self_attn.o_proj.lora_A.weight"].shape == (4, 64)
    # slices count double in rank and alpha (alpha / rank == 8 / 4 everywhere), as exact integers
    ranks = {config["r"], *config["rank_pattern"].values()}
    assert ranks == {4, 8} and set(config["rank_pattern"]) in ({"qkv_proj", "gate_up_proj"}, {"o_proj", "down_proj"})
    assert config["alpha_pattern"] == {k: 2 * v for k, v in config["rank_pattern"].items()}
    assert isinstance(config["lora_alpha"], int)
    assert config["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_export_per_module_ranks_and_alphas_to_peft(tmp_path):
    # Modules of one leaf name with different ranks/alphas get full-name pattern keys, anchored: PEFT matches keys as
    # regexes "(.*\.)?(key)$" in file order, so a bare key "fc" would also give "blk.fc" the rank of "fc".
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.blk = nn.Linear(4, 6), nn.Module()
            self.blk.fc = nn.Linear(6, 5)
            self.head1, self.head2 = nn.Linear(5, 5), nn.Linear(5, 5)

        def forward(self, x):
            return self.head2(self.head1(self.blk.fc(self.fc(x))))

    model = Net()
    lora.inject(model, ["head1", "head2"], r=3, lora_alpha=4)  # the most common (r, alpha): the config's default
    model.fc = lora.Linear.from_module(model.fc, r=2, lora_alpha=3)
    model.blk.fc = lora.Linear.from_module(model.blk.fc, r=5, lora_alpha=7, use_rslora=True)
    randomize_lora(model)
    config = lora.export_peft(model, tmp_path, task_type=None)
    assert (config["r"], config["lora_alpha"]) == (3, 4)
    assert list(config["rank_pattern"]) == ["^fc", "^blk\\.fc"]
    theirs = peft.PeftModel.from_pretrained(Net(), str(tmp_path)).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        diff = max_diff(theirs(x), model(x))
    print(f"\nexport_peft -> PEFT [per-module ranks/alphas, suffix names]: max |diff| = {diff:.3g}")
    assert diff <= PEFT_TOL
    back = Net()
    lora.import_peft(back, tmp_path)
    assert (back.fc.r, back.blk.fc.r, back.head1.r) == (2, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=1e-6)


def test_transformers_load_adapter_reads_the_export(tmp_path):
    pytest.importorskip("peft")
    model = adapted_phi3(qkv_slices=("q", "v"))
    lora.export_peft(model, tmp_path)
    hf = hf_model()
    hf.load_adapter(str(tmp_path))
    diff = max_diff(logits(hf), logits(model))
    print(f"\nexport_peft -> transformers load_adapter [per_slice_q_v]: max |logit diff| = {diff:.3g}")
    assert diff <= PEFT_TOL


class Mixed(nn.Module):
    """Embedding, Conv2d, Linear and a fused Linear in one small model (PEFT supports all as LoRA targets)."""

    def __init__(self, fused_sizes=(6, 4, 2), groups=1, dilation=1, padding_mode="zeros", max_norm=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8, max_norm=max_norm)
        self.conv = nn.Conv2d(4, 6, (3, 2), padding=1, groups=groups, dilation=dilation, padding_mode=padding_mode)
        self.qkv = nn.Linear(8, sum(fused_sizes))
        self.out = nn.Linear(sum(fused_sizes), 5)

    def forward(self, tokens, image):
        h = self.emb(tokens)  # (B, T, 8)
        return self.out(torch.relu(self.qkv(h))), self.conv(image)


def mixed_inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 11, (2, 5), generator=g), torch.randn(2, 4, 5, 6, generator=g)


def adapted_mixed(**kwargs):
    model = Mixed(**kwargs)
    lora.inject(
        model,
        {
            "emb": {"r": 3},
            "conv": {"r": 2, "lora_alpha": 5},
            "qkv": {"split_sizes": (6, 4, 2), "enable_lora": [True, False, True]},
            "out": {"use_rslora": True},
        },
        r=4,
        lora_alpha=8,
    )
    randomize_lora(model)
    return model


def test_export_embedding_conv_merged_to_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted_mixed()
    lora.export_peft(model, tmp_path, task_type=None)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.emb.lora_embedding_A"].shape == (3, 11)
    assert tensors["base_model.model.emb.lora_embedding_B"].shape == (8, 3)
    assert tensors["base_model.model.conv.lora_A.weight"].shape == (2, 4, 3, 2)
    assert tensors["base_model.model.conv.lora_B.weight"].shape == (6, 2, 1, 1)
    theirs = peft.PeftModel.from_pretrained(Mixed(), str(tmp_path)).eval()
    x = mixed_inputs()
    with torch.no_grad():
        for name, a, b in zip(("linear", "conv"), model(*x), theirs(*x)):
            diff = max_diff(a, b)
            print(f"\nexport_peft -> PEFT [embedding+merged+rslora linear / conv2d]: {name} max |diff| = {diff:.3g}")
            assert diff <= PEFT_TOL


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"groups": 2}, "groups=2"),
        ({"dilation": 2}, "dilation"),
        ({"padding_mode": "reflect"}, "padding_mode"),
        ({"max_norm": 1.0}, "max_norm"),
    ],
)
def test_export_refuses_what_peft_computes_differently(tmp_path, kwargs, fragment):
    model = adapted_mixed(**kwargs)
    with pytest.raises(ValueError, match=fragment):
        lora.export_peft(model, tmp_path / "out", task_type=None)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. PEFT import, of adapters PEFT made

ALL_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@torch.no_grad()
def randomize_peft(model: nn.Module, seed: int = 5) -> None:
    """Random values for PEFT's LoRA parameters (named ``...lora_A.default.weight``, ``...lora_embedding_B.default``)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if re.search(r"\.lora_(A|B|embedding_A|embedding_B)\.", name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_adapter(tmp_path, **config_kwargs):
    """Save a PEFT adapter (random B) made on hf_model(); return (adapter dir, PEFT's logits)."""
    peft = pytest.importorskip("peft")
    kwargs = dict(r=4, lora_alpha=8, target_modules=ALL_TARGETS, lora_dropout=0.0)
    kwargs.update(config_kwargs)
    model = peft.get_peft_model(hf_model(), peft.LoraConfig(**kwargs)).eval()
    randomize_peft(model)
    model.save_pretrained(str(tmp_path))
    return tmp_path, logits(model)


IMPORT_CASES = {
    "plain": {},
    "patterns": {"rank_pattern": {"qkv_proj": 8, "model.layers.1.mlp.down_proj": 2}, "alpha_pattern": {"o_proj": 3}},
    "rslora": {"use_rslora": True},
    "rslora_patterns": {
        "use_rslora": True,
        "rank_pattern": {"^model.layers.0.mlp.gate_up_proj": 6},
        "alpha_pattern": {"layers\\.1\\..*proj": 5},
    },
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_peft_matches_peft(tmp_path, case):
    adapter, want = peft_adapter(tmp_path, **IMPORT_CASES[case])
    model = hf_model()
    names = lora.import_peft(model, adapter)
    assert len(names) == 8 and all(type(model.get_submodule(n)) is lora.Linear for n in names)
    diff = max_diff(logits(model), want)
    print(f"\nPEFT save_pretrained -> import_peft [{case}]: max |logit diff| = {diff:.3g}")
    assert diff <= PEFT_TOL
    assert max_diff(want, logits(hf_model())) > 1e-2
    if case == "patterns":
        assert model.model.layers[0].self_attn.qkv_proj.r == 8 and model.model.layers[1].mlp.down_proj.r == 2
        assert model.model.layers[0].self_attn.o_proj.lora_alpha == 3


def test_import_peft_embedding_and_conv(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(Mixed(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["emb", "conv", "qkv"]))
    randomize_peft(theirs)
    theirs.eval().save_pretrained(str(tmp_path))
    ours = Mixed()
    lora.import_peft(ours, tmp_path)
    assert type(ours.emb) is lora.Embedding and type(ours.conv) is lora.Conv2d
    x = mixed_inputs()
    with torch.no_grad():
        for a, b in zip(ours(*x), theirs(*x)):
            diff = max_diff(a, b)
            print(f"\nPEFT save_pretrained -> import_peft [embedding+conv2d+linear]: max |diff| = {diff:.3g}")
            assert diff <= PEFT_TOL


def _import_fails(adapter, *fragments, model=None):
    model = hf_model() if model is None else model
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        lora.import_peft(model, adapter)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head'] is not supported"),
        ({"bias": "all"}, "bias='all' is not supported"),
    ],
)
def test_import_refuses_peft_options_it_does_not_implement(tmp_path, config, fragment):
    adapter, _ = peft_adapter(tmp_path, **config)
    _import_fails(adapter, fragment)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (
            {"use_dora": True},
            "says use_dora=True but the adapter lacks its lora_magnitude_vector",
        ),  # DoRA: test_dora.py
        ({"init_lora_weights": "pissa"}, "rewrite the base weights"),
        ({"init_lora_weights": "olora"}, "rewrite the base weights"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
        ({"use_qalora": True}, "use_qalora"),
        ({"peft_type": "LOHA"}, "only LORA adapters"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"rank_pattern": {"qkv_proj": 8}}, "lora_A has rank 4 but adapter_config.json says r=8"),
    ],
)
def test_import_refuses_edited_configs(tmp_path, edit, fragment):
    adapter, _ = peft_adapter(tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(edit)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    _import_fails(adapter, fragment)


def test_import_refuses_tensor_for_a_module_the_model_lacks(tmp_path):
    adapter, _ = peft_adapter(tmp_path)
    # A base with one layer fewer: PEFT itself drops the layer-1 tensors with at most a warning.
    _import_fails(
        adapter,
        "model.layers.1.self_attn.qkv_proj: the adapter has tensors for it but",
        "model.layers.1.mlp.down_proj: the adapter has tensors for it but",
        model=hf_model(num_hidden_layers=1),
    )
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"] = torch.zeros(96, 4)
    tensors["base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector"] = torch.zeros(64)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    _import_fails(
        adapter,
        "model.layers.0.mlp.up_proj: the adapter has tensors for it but",
        "down_proj: adapter_config.json says use_dora=False but the adapter has its lora_magnitude_vector",
    )


def test_import_refuses_wrong_base_and_already_adapted_model(tmp_path):
    adapter, _ = peft_adapter(tmp_path)
    _import_fails(
        adapter,
        "model.layers.0.self_attn.qkv_proj: lora_B shape expected (192, 4), found (128, 4)",
        model=hf_model(num_key_value_heads=4),
    )
    model = hf_model()
    lora.phi3.inject(model, r=4, fused=True)
    _import_fails(adapter, "already has LoRA", model=model)


# ---------------------------------------------------------------------------------------------------------------
# 6. loralib compatibility


def test_loralib_state_dict_loads_into_our_layers_and_our_files(tmp_path):
    loralib = pytest.importorskip("loralib")

    class Net(nn.Module):
        def __init__(self, merged, linear):
            super().__init__()
            self.qkv, self.out = merged, linear

        def forward(self, x):
            return self.out(torch.tanh(self.qkv(x)))

    torch.manual_seed(0)
    theirs = Net(
        loralib.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]),
        loralib.Linear(12, 6, r=3, lora_alpha=6),
    )
    randomize_lora(theirs)
    theirs.train()  # loralib merges into the weight on eval(); train mode is its unmerged forward
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = theirs(x)
    adapter = loralib.lora_state_dict(theirs)
    assert set(adapter) == {"qkv.lora_A", "qkv.lora_B", "out.lora_A", "out.lora_B"}

    ours = Net(
        lora.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]),
        lora.Linear(12, 6, r=3, lora_alpha=6),
    )
    base = {k: v for k, v in theirs.state_dict().items() if k.rpartition(".")[2] in ("weight", "bias")}
    ours.load_state_dict(base, strict=False)
    missing, unexpected = ours.load_state_dict(adapter, strict=False)
    assert unexpected == [] and set(missing) == set(base)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-6)

    lora.save_lora(ours, tmp_path / "ours.safetensors")
    plain = Net(nn.Linear(8, 12), nn.Linear(12, 6))
    plain.load_state_dict(base)
    lora.load_lora(plain, tmp_path / "ours.safetensors")
    assert type(plain.qkv) is lora.MergedLinear and plain.qkv.enable_lora == [True, False, True]
    with torch.no_grad():
        assert torch.equal(plain(x), ours(x))
        torch.testing.assert_close(plain(x), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 7. Properties

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Zoo(nn.Module):
    """One module of each kind; which get LoRA, with what rank, layout and dtype, is drawn by hypothesis."""

    def __init__(self, split_sizes, conv_groups=1, padding_mode="zeros"):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(13, 6)
        self.lin = nn.Linear(6, 7)
        self.merged = nn.Linear(6, sum(split_sizes))
        self.conv = nn.Conv2d(4, 4, (2, 3), padding=1, groups=conv_groups, padding_mode=padding_mode)

    def forward(self, tokens, image):
        h = self.emb(tokens)  # (B, T, 6)
        return self.lin(h), self.merged(h), self.conv(image)


@st.composite
def zoo_specs(draw, peft_compatible: bool = False):
    n_slices = draw(st.integers(1, 4))
    sizes = tuple(draw(st.lists(st.integers(1, 5), min_size=n_slices, max_size=n_slices)))
    enable = draw(st.lists(st.booleans(), min_size=n_slices, max_size=n_slices).filter(any))
    kinds = draw(st.sets(st.sampled_from(["emb", "lin", "merged", "conv"]), min_size=1))
    dtype = draw(st.sampled_from(DTYPES))
    targets = {}
    for kind in sorted(kinds):
        kw = {
            "r": draw(st.integers(1, 4)),
            "lora_alpha": draw(st.sampled_from([1, 2.5, 8, 16])),
            "use_rslora": draw(st.booleans()),
            "lora_dtype": dtype,
        }
        if kind == "merged":
            kw.update(split_sizes=sizes, enable_lora=enable)
        targets[kind] = kw
    conv = (
        {}
        if peft_compatible
        else {"conv_groups": draw(st.sampled_from([1, 2])), "padding_mode": draw(st.sampled_from(["zeros", "reflect"]))}
    )
    return sizes, conv, targets


def build_zoo(spec, seed: int = 0, inject: bool = True):
    sizes, conv, targets = spec
    model = Zoo(sizes, **conv)
    if inject:
        lora.inject(model, targets)
        randomize_lora(model, seed)
    return model


def zoo_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 13, (2, 5), generator=g), torch.randn(1, 4, 5, 6, generator=g)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=zoo_specs(), onto_injected=st.booleans())
def test_property_save_load_is_identity(tmp_path, spec, onto_injected):
    model = build_zoo(spec)
    path = tmp_path / "zoo.safetensors"
    lora.save_lora(model, path)
    target = build_zoo(spec, seed=1) if onto_injected else build_zoo(spec, inject=False)
    lora.load_lora(target, path)
    ours, theirs = lora.lora_state_dict(model), lora.lora_state_dict(target)
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        assert theirs[k].dtype == v.dtype and torch.equal(theirs[k], v), k
    with torch.no_grad():
        for a, b in zip(model(*zoo_inputs()), target(*zoo_inputs())):
            assert torch.equal(a, b)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=zoo_specs(peft_compatible=True), uniform=st.booleans())
def test_property_export_import_peft_is_identity(tmp_path, spec, uniform):
    model = build_zoo(spec)
    out = tmp_path / "peft"
    lora.export_peft(model, out, uniform_rank=uniform, task_type=None)
    back = build_zoo(spec, inject=False)
    lora.import_peft(back, out)
    dtype = spec[2][next(iter(spec[2]))]["lora_dtype"]
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    with torch.no_grad():
        for a, b in zip(model(*zoo_inputs()), back(*zoo_inputs())):
            torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    for name, m in model.named_modules():
        if type(m) is lora.Linear and not uniform:  # a fused Linear travels through PEFT's format unchanged
            got = back.get_submodule(name)
            assert torch.equal(got.lora_A, m.lora_A) and torch.equal(got.lora_B, m.lora_B)
            assert got.lora_A.dtype == m.lora_A.dtype
            assert got.scaling == pytest.approx(m.scaling, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Round 2: what the bad-input probe found


def _rewrite(path: Path, out: Path, change) -> None:
    """Copy an adapter file with ``change(tensors)`` applied to its tensors, keeping the metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(out), metadata=meta)


def test_tensor_of_another_dtype_than_the_metadata_is_refused(phi3_adapter, tmp_path):
    path, _ = phi3_adapter
    key = "model.layers.0.self_attn.o_proj.lora_A"
    _rewrite(path, tmp_path / "bf16.safetensors", lambda t: t.update({key: t[key].bfloat16()}))
    _load_fails(
        hf_model(),
        tmp_path / "bf16.safetensors",
        f"{key}: dtype bfloat16 differs from the metadata's lora_dtype='float32'",
    )


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_tensor_values_are_refused_unless_allowed(phi3_adapter, tmp_path, bad):
    path, _ = phi3_adapter
    key = "model.layers.1.mlp.down_proj.lora_B"

    def poison(t):
        t[key][0, 0] = bad

    _rewrite(path, tmp_path / "bad.safetensors", poison)
    _load_fails(hf_model(), tmp_path / "bad.safetensors", f"{key}: holds 1 inf/nan values", "allow_nonfinite=True")
    model = hf_model()
    lora.load_lora(model, tmp_path / "bad.safetensors", allow_nonfinite=True)
    value = model.get_submodule("model.layers.1.mlp.down_proj").lora_B[0, 0]
    assert not torch.isfinite(value)


def test_a_directory_is_reported_as_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        lora.load_lora(nn.Sequential(nn.Linear(2, 2)), tmp_path)
