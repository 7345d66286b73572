"""lora.distributed: LoRA on an FSDP2-sharded model, on the CPU with gloo, 2 processes (torch.multiprocessing)."""

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

import lora
from lora import distributed as lora_dist
from lora.phi3 import Phi3Config, Phi3ForCausalLM

SETTINGS = dict(r=4, lora_alpha=8, lora_dropout=0.0, targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))


def _config() -> Phi3Config:
    # odd sizes: row counts that 2 ranks do not split evenly (FSDP2 pads the last shard)
    return Phi3Config(
        vocab_size=67,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )


def _medium() -> Phi3ForCausalLM:
    """Phi-3-medium-4k (its published config.json's shape), bf16 base and LoRA as finetune_phi3.py, on meta."""
    config = Phi3Config(
        hidden_size=5120,
        intermediate_size=17920,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=10,
        vocab_size=32064,
    )
    with torch.device("meta"):
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    lora.phi3.inject(model, r=16, lora_alpha=32)
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _sharded_model(model_dir: Path) -> Phi3ForCausalLM:
    """The FSDP2 recipe of examples/finetune_phi3.py --fsdp: meta device, inject, shard, load, init LoRA."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config.from_json_file(model_dir / "config.json"))
    lora.phi3.inject(model, **SETTINGS)
    lora_dist.shard(model, model.model.layers)
    model.to_empty(device="cpu")
    lora_dist.load_into_shards(model, [model_dir / "model.safetensors"])
    model.model.rotary_emb.inv_freq.copy_(type(model.model.rotary_emb)(model.config).inv_freq)
    lora_dist.init_lora(model)
    return model


def _worker(rank: int, world: int, port: int, model_dir: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _sharded_model(model_dir)
        assert lora_dist.is_sharded(model)
        local = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
        torch.save(local, out / f"local-rows-{rank}.pt")
        # one training step, so that B is not zero, on rank-dependent data (the gradient is averaged)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        ids = torch.randint(0, 67, (2, 7), generator=torch.Generator().manual_seed(rank))
        model(ids).logits.float().pow(2).mean().backward()
        opt.step()
        state = lora.lora_state_dict(model)  # collective
        torch.save({k: v.clone() for k, v in state.items()}, out / f"state-{rank}.pt")
        lora.save_lora(model, out / "adapter.safetensors")  # collective, rank 0 writes
        lora.export_peft(model, out / "peft")
        for fn in (lora.merge_and_unload, lora.merge_lora):
            try:
                fn(model)
            except ValueError as err:
                (out / f"{fn.__name__}-error-{rank}.txt").write_text(str(err))
        assert lora_dist.is_sharded(model)  # the refusals changed nothing
        # the real-size Phi-3-medium, sharded on the meta device: nothing is allocated
        medium = _medium()
        lora_dist.shard(medium, medium.model.layers)
        local = sum(p.to_local().numel() * p.element_size() for p in medium.parameters())
        torch.save(
            {"local": local, "device": str(next(medium.parameters()).to_local().device)}, out / f"medium-{rank}.pt"
        )
    except BaseException:
        (out / f"failed-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("phi3-odd")
    torch.manual_seed(1)
    Phi3ForCausalLM(_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded_run(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(2, _free_port(), model_dir, out), nprocs=2, join=True)
    return out


def _reference(model_dir: Path) -> Phi3ForCausalLM:
    """The same step unsharded, one process: the average of the two ranks' gradients is the gradient of the mean
    of their losses."""
    torch.manual_seed(0)
    model = Phi3ForCausalLM.from_pretrained(model_dir)
    lora.phi3.inject(model, **SETTINGS)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = [
        model(torch.randint(0, 67, (2, 7), generator=torch.Generator().manual_seed(r))).logits.float().pow(2).mean()
        for r in range(2)
    ]
    (sum(losses) / 2).backward()
    opt.step()
    return model


def test_shards_hold_half_the_rows(sharded_run, model_dir):
    rows = [torch.load(sharded_run / f"local-rows-{r}.pt", weights_only=True) for r in range(2)]
    full = dict(_reference(model_dir).named_parameters())
    for name, p in full.items():
        assert rows[0][name] + rows[1][name] == p.shape[0], name
        assert rows[0][name] == -(-p.shape[0] // 2), name  # torch.chunk's split: rank 0 gets ceil(n / 2)


def test_sharded_lora_state_dict_equals_unsharded(sharded_run, model_dir):
    expected = lora.lora_state_dict(_reference(model_dir))
    for rank in range(2):
        got = torch.load(sharded_run / f"state-{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5)
    assert any(v.abs().sum() > 0 for k, v in expected.items() if k.endswith("lora_B"))  # the step moved B


def test_sharded_save_and_export_equal_unsharded(sharded_run, model_dir, tmp_path):
    reference = _reference(model_dir)
    lora.save_lora(reference, tmp_path / "adapter.safetensors")
    lora.export_peft(reference, tmp_path / "peft")
    for got, want in (
        (sharded_run / "adapter.safetensors", tmp_path / "adapter.safetensors"),
        (sharded_run / "peft" / "adapter_model.safetensors", tmp_path / "peft" / "adapter_model.safetensors"),
    ):
        a, b = _tensors(got), _tensors(want)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert (sharded_run / "peft" / "adapter_config.json").read_text() == (
        tmp_path / "peft" / "adapter_config.json"
    ).read_text()
    assert not list(sharded_run.glob(".*.tmp"))  # one writer: no temporary left by a second one


def test_merge_on_sharded_model_is_refused_naming_the_way(sharded_run):
    for fn in ("merge_and_unload", "merge_lora"):
        for rank in range(2):
            text = (sharded_run / f"{fn}-error-{rank}.txt").read_text()
            assert "sharded" in text and "lora.save_lora" in text and f"{fn}(base)" in text


def test_phi3_medium_plan_on_two_ranks_holds_half_the_bytes_each(sharded_run):
    model = _medium()  # unsharded, on meta: the whole model's bytes
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 27e9 < total < 29e9  # 14B parameters in bf16
    per_rank = [torch.load(sharded_run / f"medium-{r}.pt", weights_only=True) for r in range(2)]
    for got in per_rank:
        assert got["device"] == "meta"
        assert abs(got["local"] / total - 0.5) < 1e-3  # half, up to FSDP2's padding of odd row counts
    assert per_rank[0]["local"] + per_rank[1]["local"] >= total


def test_unsharded_model_is_not_sharded(model_dir):
    model = Phi3ForCausalLM.from_pretrained(model_dir)
    assert not lora_dist.is_sharded(model) and lora_dist.is_writer()


def _plain(model_dir: Path) -> Phi3ForCausalLM:
    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config.from_json_file(model_dir / "config.json"))
    return model.to_empty(device="cpu")


def test_load_into_shards_unsharded_equals_from_pretrained(model_dir):
    model = _plain(model_dir)
    lora.phi3.inject(model, **SETTINGS)
    lora_dist.load_into_shards(model, [model_dir / "model.safetensors"])
    reference = Phi3ForCausalLM.from_pretrained(model_dir)
    for name, p in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name


@pytest.mark.parametrize(
    "change, match",
    [
        ("extra", "'extra.weight' is not a parameter or buffer of Phi3ForCausalLM"),
        ("shape", r"'lm_head.weight' has shape \(66, 24\), the model's is \(67, 24\)"),
        ("missing", "no file holds 1 parameter"),
    ],
)
def test_load_into_shards_names_what_does_not_fit(model_dir, tmp_path, change, match):
    from safetensors.torch import save_file

    tensors = _tensors(model_dir / "model.safetensors")
    if change == "extra":
        tensors["extra.weight"] = torch.zeros(2)
    elif change == "shape":
        tensors["lm_head.weight"] = tensors["lm_head.weight"][:66].clone()
    else:
        del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=match):
        lora_dist.load_into_shards(_plain(model_dir), [tmp_path / "bad.safetensors"])
