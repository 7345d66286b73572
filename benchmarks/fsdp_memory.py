"""Memory per GPU for LoRA fine-tuning of Phi-3-mini and Phi-3-medium with DDP and with FSDP2 at 1, 2, 4 and 8 GPUs,
computed from the parameter counts of this library's Phi-3 (built on the meta device: nothing is allocated), then
checked two ways: the real-size Phi-3-medium sharded over 2 ranks on the meta device (each rank's parameter bytes),
and a smaller Phi-3 trained one step on the CPU over 2 gloo ranks (each rank's tensor bytes, measured).

    python benchmarks/fsdp_memory.py                # all three (a minute on a CPU)
    python benchmarks/fsdp_memory.py --table-only   # the table alone (seconds)

The recipe is examples/finetune_phi3.py's defaults with ``--bf16``: the base frozen in bf16 (2 bytes a parameter),
LoRA r=16 on qkv_proj, o_proj, gate_up_proj and down_proj in fp32 (4 bytes), its gradient (4) and AdamW's two
moments (8). Counted per GPU:

* DDP: the whole base + LoRA state on every GPU, plus DDP's gradient buckets (a copy of the LoRA gradients).
* FSDP2 (``fully_shard`` per decoder layer, then the root): the base and the LoRA state divided by N (FSDP2 pads each
  tensor's rows to a multiple of N; negligible), plus what is gathered whole while it computes: the root (the
  embedding, final norm and head, which FSDP2 keeps unsharded from the forward to the backward) and two decoder
  layers (the one computing and the one prefetched).

Activations are not in the table: they depend on the batch and the sequence length, not on N (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora  # noqa: E402
from lora.phi3 import Phi3Config, Phi3ForCausalLM  # noqa: E402

# From the published config.json files (microsoft/Phi-3-mini-4k-instruct, microsoft/Phi-3-medium-4k-instruct).
MODELS = {
    "Phi-3-mini": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
    ),
    "Phi-3-medium": dict(
        hidden_size=5120,
        intermediate_size=17920,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=10,
        vocab_size=32064,
    ),
}
# One step of this fits a CPU: ~110M parameters.
SMALL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=6,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32064,
)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)  # finetune_phi3.py's defaults (dropout adds no state)
GPUS = (1, 2, 4, 8)
GB = 1e9


def build(shape: dict, device: str = "meta") -> Phi3ForCausalLM:
    """Phi-3 of ``shape`` with bf16 base weights and fp32 LoRA (finetune_phi3.py --bf16), on the meta device."""
    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config(**shape)).to(torch.bfloat16)
    lora.phi3.inject(model, **LORA)
    return model


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def counts(model: Phi3ForCausalLM) -> dict[str, int]:
    """Bytes of: the frozen base, the LoRA parameters, one decoder layer (base + LoRA) and the root's own."""
    lora_params = [p for p in model.parameters() if p.requires_grad]
    layer = model.model.layers[0]
    in_layers = {id(p) for block in model.model.layers for p in block.parameters()}
    return {
        "base": _bytes(p for p in model.parameters() if not p.requires_grad),
        "lora": _bytes(lora_params),
        "n_base": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "n_lora": sum(p.numel() for p in lora_params),
        "layer": _bytes(layer.parameters()),
        "root": _bytes(p for p in model.parameters() if id(p) not in in_layers),
    }


def per_gpu(c: dict[str, int], n: int) -> dict[str, float]:
    """Bytes per GPU: DDP, and FSDP2's sharded state and its peak with the gathered units."""
    lora_state = c["lora"] * 4  # fp32 parameter, its gradient, AdamW's exp_avg and exp_avg_sq: 4 + 4 + 4 + 4 bytes
    ddp = c["base"] + lora_state + (c["lora"] if n > 1 else 0)  # + DDP's bucketed copy of the gradients
    sharded = (c["base"] + lora_state) / n
    return {"ddp": ddp, "fsdp_sharded": sharded, "fsdp_peak": sharded + c["root"] + 2 * c["layer"]}


def table() -> None:
    print("Per GPU, parameters + gradients + AdamW state (no activations); LoRA r=16 on all four projections,")
    print("base bf16, LoRA fp32. FSDP2 peak adds the root (embedding + head) and two decoder layers gathered whole.\n")
    print("| model | parameters (LoRA) | GPUs | DDP | FSDP2 sharded | FSDP2 peak |")
    print("|---|---|---|---|---|---|")
    for name, shape in MODELS.items():
        c = counts(build(shape))
        for n in GPUS:
            m = per_gpu(c, n)
            ddp = f"{m['ddp'] / GB:.1f} GB" if n > 1 else f"{m['ddp'] / GB:.1f} GB (one GPU, no DDP)"
            print(
                f"| {name} | {c['n_base'] / 1e9:.2f}B ({c['n_lora'] / 1e6:.1f}M) | {n} | {ddp} | "
                f"{m['fsdp_sharded'] / GB:.1f} GB | {m['fsdp_peak'] / GB:.1f} GB |"
            )
    print()


def _local_bytes(model) -> int:
    """This rank's bytes of parameter storage (the local shards, FSDP2's padding included; meta tensors too)."""
    return sum(
        p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else p.numel() * p.element_size()
        for p in model.parameters()
    )


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # 1. the real-size Phi-3-medium, sharded on the meta device: nothing allocated
        medium = build(MODELS["Phi-3-medium"])
        lora.distributed.shard(medium, medium.model.layers)
        queue.put(("meta", rank, _local_bytes(medium), _bytes(medium.parameters())))
        del medium
        # 2. a smaller Phi-3 materialised on the CPU, one AdamW step: measured tensor bytes on this rank
        model = build(SMALL)
        lora.distributed.shard(model, model.model.layers)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().normal_(0, 0.02)
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
        lora.distributed.init_lora(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        ids = torch.randint(0, SMALL["vocab_size"], (1, 64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        grads = sum(p.grad.to_local().numel() * p.grad.element_size() for p in trainable)
        state = sum(
            t.to_local().numel() * t.element_size()
            for s in opt.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )
        queue.put(("cpu", rank, _local_bytes(model) + grads + state, _vm_hwm()))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checks() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_worker, args=(2, _free_port(), queue), nprocs=2, join=True)
    got = {}
    while not queue.empty():
        kind, rank, *values = queue.get()
        got[kind, rank] = values
    total = got["meta", 0][1]
    print(
        f"Phi-3-medium with LoRA on the meta device, 2 ranks (fully_shard per layer, then the root): "
        f"{total / GB:.2f} GB of parameters"
    )
    for rank in range(2):
        local = got["meta", rank][0]
        print(f"  rank {rank}: {local / GB:.3f} GB ({local / total:.4f} of the model)")
    c = counts(build(SMALL))
    predicted = per_gpu(c, 2)["fsdp_sharded"]
    print(
        f"\nMeasured on the CPU (torch {torch.__version__}, gloo, 2 processes): a {c['n_base'] / 1e6:.0f}M-parameter "
        f"Phi-3, bf16 base, LoRA r=16, one AdamW step"
    )
    print(f"  predicted per rank (parameters + gradients + AdamW state): {predicted / 1e6:.1f} MB")
    for rank in range(2):
        measured, hwm = got["cpu", rank]
        print(
            f"  rank {rank}: measured tensor bytes {measured / 1e6:.1f} MB ({measured / predicted:.3f} of predicted); "
            f"process peak RSS {hwm / 1e6:.0f} MB (interpreter, libraries and activations included)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table-only", action="store_true", help="print the table alone (default: off)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; bytes counted from the model built on the meta device\n")
    table()
    if not args.table_only:
        checks()


if __name__ == "__main__":
    main()
