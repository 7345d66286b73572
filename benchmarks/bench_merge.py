"""Memory of merging: peak resident memory above the model while ``merge_and_unload`` runs on a real-size Phi-3-mini
(bf16, random weights, LoRA of trained magnitude on every projection), and while ``merge_lora`` + ``unmerge_lora``
run on one 3072 -> 8192 bf16 layer, with the bytes of the undo record ``merge_lora`` keeps.

    python benchmarks/bench_merge.py            # real size: ~7.6 GB of weights, a minute or two on 2 cores
    python benchmarks/bench_merge.py --small    # 4 narrow layers: a smoke test

Targets (issue "one home per layer kind"): merge_and_unload's peak growth <= 1.1x the largest layer's fp32 size,
and within 24 GiB in all; merge_lora's record <= 1 byte per weight. Peaks are the process's ``VmHWM`` after a reset
(``_timing.PeakMeter``), minus the resident size just before.
"""

from __future__ import annotations

import argparse
import time

import torch

import _impls
import _timing
import lora
from lora.phi3 import Phi3Config, Phi3ForCausalLM

STD = 0.02  # trained magnitudes: weights and adapter factors ~N(0, 0.02)
GiB, MiB = 2**30, 2**20


def _fill(tensors, gen: torch.Generator) -> None:
    with torch.no_grad():
        for t in tensors:
            t.normal_(0, STD, generator=gen)


def one_layer(in_f: int, out_f: int) -> str:
    gen = torch.Generator().manual_seed(0)
    layer = lora.Linear(in_f, out_f, r=16, lora_alpha=32, dtype=torch.bfloat16, bias=False)
    _fill([layer.weight, layer.lora_A, layer.lora_B], gen)
    w0 = layer.weight.detach().clone()
    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    before = _timing.rss_bytes()
    with _timing.PeakMeter() as merge_meter:
        lora.merge_lora(layer)
    record = layer._merge_record.nbytes if layer._merge_record is not None else 0
    after_merge = _timing.rss_bytes()
    with _timing.PeakMeter() as unmerge_meter:
        lora.unmerge_lora(layer)
    exact = torch.equal(layer.weight.view(torch.int16), w0.view(torch.int16))
    fp32_delta = layer.weight.numel() * 4
    return (
        f"merge_lora + unmerge_lora, Linear({in_f} -> {out_f}) bf16, r=16: weight {weight_bytes / MiB:.0f} MiB, "
        f"undo record {record / MiB:.1f} MiB = {record / layer.weight.numel():.3f} bytes/weight "
        f"(target <= 1); peak growth merge {(merge_meter.peak - before) / fp32_delta:.2f}x, "
        f"unmerge {(unmerge_meter.peak - after_merge) / fp32_delta:.2f}x one fp32 delta "
        f"({fp32_delta / MiB:.0f} MiB); unmerge bit-exact: {exact}"
    )


def whole_model(cfg_dict: dict) -> str:
    cfg = Phi3Config(**cfg_dict)
    with torch.device("meta"):
        model = Phi3ForCausalLM(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    _fill(model.parameters(), gen)
    lora.phi3.inject(model, r=16, lora_alpha=32, lora_dropout=0.0)
    _fill([p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))], gen)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(m.weight.numel() for m in model.modules() if isinstance(m, lora.LoRABase))
    before = _timing.rss_bytes()
    t0 = time.perf_counter()
    with _timing.PeakMeter() as meter:
        lora.merge_and_unload(model)
    seconds = time.perf_counter() - t0
    growth = meter.peak - before
    return (
        f"merge_and_unload, Phi-3 ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}) bf16 + LoRA r=16 "
        f"per slice: model {model_bytes / GiB:.2f} GiB, peak RSS {meter.peak / GiB:.2f} GiB, growth "
        f"{growth / MiB:.0f} MiB = {growth / (largest * 4):.2f}x the largest layer's fp32 size "
        f"({largest * 4 / MiB:.0f} MiB; target <= 1.1x) [{meter.method}], {seconds:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="4 narrow layers instead of real size (default: off)")
    args = parser.parse_args()
    print(_timing.header(torch.bfloat16))
    if args.small:
        print(one_layer(768, 2048))
        print(whole_model(_impls.phi3_config_dict(hidden=768, layers=4, heads=8, intermediate=2048, vocab=4096)))
    else:
        print(one_layer(3072, 8192))
        print(whole_model(_impls.PHI3_MINI))


if __name__ == "__main__":
    main()
