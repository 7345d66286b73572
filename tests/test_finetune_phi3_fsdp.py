"""examples/finetune_phi3.py --fsdp: FSDP2 on the CPU with gloo, 2 processes under torchrun, against one process.

The reference is the ordinary (unsharded) one-process run with the same global batch: the same data order and loss
normalisation give the same losses, and the adapter files agree to fp32 rounding.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora.phi3 import ByteTokenizer, Phi3Config, Phi3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_phi3.py"
WORLD_CHATS = ROOT / "examples" / "data" / "world_chat_train.jsonl"
spec = importlib.util.spec_from_file_location("finetune_phi3", SCRIPT)
finetune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# 10 steps, a checkpoint at 5 (resumed below) and at 10. lr 1e-4 (a real Phi-3 LoRA's order): Adam divides each
# gradient element by its own running norm, so an element whose gradient is near zero turns fp32 rounding (2 ranks
# sum in another order than 1 process) into a visible step; at the tiny model's default 2e-3 a handful of the
# ~200k adapter values then differ by ~1e-5 after 4 steps, while the losses still agree to 1e-7.
COMMON = (
    "--max_steps 10 --learning_rate 1e-4 --lora_dropout 0 --gradient_accumulation_steps 2 --logging_steps 1 "
    "--save_steps 5 --eval_steps 100 --num_samples 0 --max_seq_length 96"
).split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-phi3")
    tok = ByteTokenizer()
    # 3 layers, odd widths: rows that 2 ranks do not split evenly
    config = Phi3Config(
        vocab_size=tok.vocab_size,
        hidden_size=36,
        intermediate_size=60,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(WORLD_CHATS.read_text().splitlines(keepends=True)[:120]))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, model: Path, data: Path, out: Path, *extra: str) -> None:
    """The example with ``nproc`` processes and a global batch of 8 conversations per micro-batch: 2 under
    torchrun, 1 in this process (``--fsdp`` then shards over a process group of one)."""
    argv = [
        "--model",
        str(model),
        "--data",
        str(data),
        "--output_dir",
        str(out),
        *COMMON,
        "--per_device_train_batch_size",
        str(8 // nproc),
        *extra,
    ]
    if nproc == 1:
        finetune.main(argv)
        assert not torch.distributed.is_initialized()
        return
    torchrun = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    done = subprocess.run(
        [sys.executable, *torchrun, str(SCRIPT), *argv], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def runs(tiny_model, chats, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    _run(2, tiny_model, chats, root / "fsdp2", "--fsdp", "--gradient_checkpointing")  # AC must not change a loss
    _run(1, tiny_model, chats, root / "one")
    return root


def test_two_fsdp_processes_match_one_process(runs):
    fsdp, one = _losses(runs / "fsdp2"), _losses(runs / "one")
    assert list(fsdp) == list(range(1, 11))  # one line per step: rank 0 alone writes
    for step in one:
        assert abs(fsdp[step] - one[step]) <= 1e-5, (step, fsdp[step], one[step])
    for name in (
        "adapter.safetensors",
        "peft/adapter_model.safetensors",
        "checkpoints/step-0000005/adapter.safetensors",
    ):
        a, b = _tensors(runs / "fsdp2" / name), _tensors(runs / "one" / name)
        assert a.keys() == b.keys(), name  # every module, gathered from both ranks' shards
        for k in a:
            assert a[k].shape == b[k].shape, k
            assert (a[k] - b[k]).abs().max() <= 1e-6, (name, k, (a[k] - b[k]).abs().max())
    assert any(t.abs().max() > 0 for k, t in _tensors(runs / "fsdp2" / "adapter.safetensors").items() if "lora_B" in k)
    assert (runs / "fsdp2" / "peft" / "adapter_config.json").read_text() == (
        runs / "one" / "peft" / "adapter_config.json"
    ).read_text().replace(str(runs / "one"), str(runs / "fsdp2"))
    assert not [p for p in (runs / "fsdp2").rglob("*") if p.name.startswith(".")]  # no writer left a temporary


@pytest.mark.parametrize("nproc", [1, 2])
def test_fsdp_checkpoint_resumes_with_any_number_of_processes(runs, tiny_model, chats, tmp_path, nproc):
    run = tmp_path / "resumed"
    shutil.copytree(runs / "fsdp2", run)
    shutil.rmtree(run / "checkpoints" / "step-0000010")  # as if killed after the checkpoint of step 5
    (run / "results.json").unlink()
    _run(nproc, tiny_model, chats, run, "--fsdp", "--resume")
    resumed, straight = _losses(run), _losses(runs / "fsdp2")
    assert list(resumed) == list(range(1, 11))
    for step in range(6, 11):
        assert abs(resumed[step] - straight[step]) <= 1e-5, (step, resumed[step], straight[step])
    a, b = _tensors(run / "adapter.safetensors"), _tensors(runs / "fsdp2" / "adapter.safetensors")
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k


@pytest.mark.parametrize("flag, match", [("--merge", "does not merge"), ("--full_finetune", "trains LoRA adapters")])
def test_fsdp_refuses_what_needs_the_whole_model(flag, match):
    with pytest.raises(finetune.UsageError, match=f"--fsdp on: {match}"):
        finetune.parse_settings(["--fsdp", flag])
    assert "shard the model over the processes with FSDP2" in finetune.build_parser().format_help()
