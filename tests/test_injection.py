"""lora.injection (lora.inject): exact-name / dotted-suffix matching, weight adoption, all-or-nothing validation."""

import pytest
import torch
import torch.nn as nn

import lora
from lora.injection import matches


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.down_proj = nn.Linear(8, 8, bias=False)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(8, 20)
        self.flora_head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = b.down_proj(b.proj(h)) + b.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.lm_head(h)


def test_matches_whole_components_only():
    assert matches("blocks.0.proj", "proj")
    assert matches("blocks.0.proj", "0.proj")
    assert matches("proj", "proj")
    assert not matches("blocks.0.down_proj", "proj")
    assert not matches("blocks.0.proj", "s.0.proj")


def test_inject_adopts_weights_and_keeps_output():
    torch.manual_seed(0)
    net = Net()
    ids = torch.randint(0, 20, (2, 5))
    before = net(ids)
    weights = {n: p for n, p in net.named_parameters()}
    names = lora.inject(net, ["proj", "embed", "conv"], r=2, lora_alpha=4)
    assert names == ["embed", "blocks.0.proj", "blocks.0.conv", "blocks.1.proj", "blocks.1.conv"]
    assert isinstance(net.blocks[0].proj, lora.Linear) and isinstance(net.embed, lora.Embedding)
    assert isinstance(net.blocks[0].conv, lora.Conv1d)
    assert type(net.blocks[0].down_proj) is nn.Linear and type(net.lm_head) is nn.Linear
    # the very same Parameter objects: no second copy, no re-initialisation
    for n, p in net.named_parameters():
        if n in weights:
            assert p is weights[n], n
    assert torch.equal(net(ids), before)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == set(lora.lora_parameter_names(net)) and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_per_target_overrides_and_merged_linear():
    net = Net()
    lora.inject(
        net, {"0.proj": {"r": 3, "lora_alpha": 6}, "1.proj": {"split_sizes": (6, 2), "enable_lora": [True, False]}}, r=2
    )
    assert net.blocks[0].proj.r == 3 and net.blocks[0].proj.scaling == 2
    m = net.blocks[1].proj
    assert isinstance(m, lora.MergedLinear) and m.split_sizes == (6, 2) and m.lora_B.shape == (6, 2)


def test_lm_head_only_when_named():
    net = Net()
    lora.inject(net, ["proj"], r=2)
    assert type(net.lm_head) is nn.Linear
    lora.inject(net, ["lm_head"], r=2)
    assert isinstance(net.lm_head, lora.Linear)


@pytest.mark.parametrize(
    "targets, error, match",
    [
        (["proj", "nothing_here"], ValueError, "nothing_here"),
        (["proj", "0.proj"], ValueError, "several targets"),
        ([], ValueError, "empty"),
        ("proj", TypeError, "string"),
        ({"proj": {"rank": 3}}, ValueError, "rank"),
        ({"proj": {"r": -1}}, ValueError, "r=-1"),
        ({"conv": {"split_sizes": (4, 4), "enable_lora": [True, True]}}, TypeError, "conv"),
    ],
)
def test_bad_targets_raise_and_change_nothing(targets, error, match):
    net = Net()
    before = {n: (type(m), id(m)) for n, m in net.named_modules()}
    with pytest.raises(error, match=match):
        lora.inject(net, targets, r=2)
    assert {n: (type(m), id(m)) for n, m in net.named_modules()} == before
    assert all(p.requires_grad for p in net.parameters())


def test_refuses_module_that_already_has_lora():
    net = Net()
    lora.inject(net, ["proj"], r=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.inject(net, ["0.proj"], r=2)


def test_refuses_unsupported_module_type():
    net = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(TypeError, match="LayerNorm"):
        lora.inject(net, ["0"], r=2)


def test_meta_device_injection_counts_parameters():
    with torch.device("meta"):
        net = Net()
    lora.inject(net, ["proj"], r=4)
    assert net.blocks[0].proj.lora_A.is_meta
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 2 * 4 * (8 + 8)


def test_bf16_model_gets_fp32_adapters_and_trains():
    torch.manual_seed(0)
    net = Net().to(torch.bfloat16)
    lora.inject(net, ["proj"], r=2)
    assert net.blocks[0].proj.lora_A.dtype == torch.float32
    out = net(torch.randint(0, 20, (2, 5)))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert net.blocks[0].proj.lora_B.grad is not None and net.blocks[0].proj.weight.grad is None
