"""Several adapters in one batch: eval forward of 8 rows over 4 adapters (ranks 16, 8, 32, 16) on Phi-3-mini-shaped
decoder layers (hidden 3072, intermediate 8192, 32 heads), interleaved; see benchmarks/README.md for the method.

Both sides run transformers' Phi3ForCausalLM with the same base weights and the same four adapters (made by PEFT,
imported with lora.import_peft, so both have one LoRA over each fused matrix):

* ours: lora.adapter_batch (one gathered bmm pair per layer for all rows); "held" keeps the block open across
  forwards, as generate() does (the stacked adapters are built once), "per call" enters it for every forward;
* PEFT: its mixed-batch forward, ``model(input_ids, adapter_names=...)`` (a loop over adapters with row masks).

Ratios are to our single-adapter forward (all 8 rows on the default adapter). The vocabulary is small (512) so the
LM head does not dilute the layers' share.

    python benchmarks/bench_multi_adapter.py            # 2 real-size layers, prefill 8 x 32 and decode 8 x 1
    python benchmarks/bench_multi_adapter.py --quick    # tiny sizes: a smoke test, not a measurement
    python benchmarks/bench_multi_adapter.py --device cuda --threads 8   # on a GPU (not measured yet)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

import _impls
import _timing
from _timing import Row

import lora

RANKS = {"default": 16, "a1": 8, "a2": 32, "a3": 16}  # four adapters, alpha = 2 r (Hugging Face's Phi-3 recipe)
ROWS = ["default", "a1", "a2", "a3"] * 2  # 8 rows over 4 adapters
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
LAYERS, VOCAB = 2, 512
CASES = {"prefill": 32, "decode": 1}  # tokens per row
ROUNDS, QUICK_ROUNDS = 7, 3
MIXED_TARGET = 1.30  # issue 16: mixed batch <= 1.3x a single adapter's forward


def build(quick: bool, device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers' Phi-3 with our four adapters, the same model wrapped by PEFT with the same four)."""
    from peft import LoraConfig, get_peft_model

    if quick:
        cfg = _impls.phi3_config_dict(hidden=128, layers=2, heads=4, intermediate=256, vocab=VOCAB)
    else:
        cfg = _impls.phi3_config_dict(hidden=3072, layers=LAYERS, heads=32, intermediate=8192, vocab=VOCAB)
    hf = _impls.hf_phi3(cfg, device=device).eval()
    ours = copy.deepcopy(hf)
    peft_model = None
    for name, r in RANKS.items():
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(hf, config)
        else:
            peft_model.add_adapter(name, config)
    peft_model.set_adapter("default")
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        for name in RANKS:
            path = Path(tmp) if name == "default" else Path(tmp) / name
            lora.import_peft(ours, path, adapter_name=name)
    return ours.eval(), peft_model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _timing.add_common_args(p, ROUNDS, QUICK_ROUNDS, list(CASES))
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 on either)")
    args = p.parse_args(argv)
    _timing.apply_common_args(args, ROUNDS, QUICK_ROUNDS)
    if _timing.optional_import("peft") is None:
        sys.exit("bench_multi_adapter.py: error: needs peft and transformers (pip install -e '.[test]')")
    torch.manual_seed(0)
    ours, peft_model = build(args.quick, args.device)
    print(_timing.header(torch.float32, args.device))
    print(
        f"adapters: {RANKS} (alpha = 2 r); rows: {ROWS}; {LAYERS if not args.quick else 2} decoder layers, "
        f"vocab {VOCAB}; eval, no_grad; {args.rounds} interleaved rounds\n"
    )

    rows: list[Row] = []
    held_model = copy.deepcopy(ours)  # a second copy whose adapter_batch block stays open for the whole run
    for case in args.cases.split(","):
        rows += run_case(case, ours, held_model, peft_model, args)
    print()
    print(_timing.markdown_table(rows))


def run_case(case: str, ours, held_model, peft_model, args: argparse.Namespace) -> list[Row]:
    """Time one case (``CASES[case]`` tokens per row); return its table rows."""
    tokens = CASES[case]
    rows: list[Row] = []
    x = torch.randint(0, VOCAB, (len(ROWS), tokens), generator=torch.Generator().manual_seed(1)).to(args.device)

    @torch.no_grad()
    def ours_single():
        return ours(x, use_cache=False).logits

    @torch.no_grad()
    def ours_base():
        lora.set_adapter(ours, None)
        try:
            return ours(x, use_cache=False).logits
        finally:
            lora.set_adapter(ours, "default")

    @torch.no_grad()
    def ours_mixed_per_call():
        with lora.adapter_batch(ours, ROWS):
            return ours(x, use_cache=False).logits

    @torch.no_grad()
    def ours_mixed_held():
        return held_model(x, use_cache=False).logits  # inside the block opened below: a mixed batch

    @torch.no_grad()
    def peft_single():
        return peft_model(input_ids=x, use_cache=False).logits

    @torch.no_grad()
    def peft_mixed():
        return peft_model(input_ids=x, adapter_names=ROWS, use_cache=False).logits

    fns = {
        "ours, one adapter": ours_single,
        "ours, base only": ours_base,
        "ours, mixed (adapter_batch held)": ours_mixed_held,
        "ours, mixed (adapter_batch per call)": ours_mixed_per_call,
        "PEFT, one adapter": peft_single,
        "PEFT, mixed (adapter_names=)": peft_mixed,
    }
    with lora.adapter_batch(held_model, ROWS):
        # the mixed forwards agree with PEFT's before anything is timed
        expected = peft_mixed()
        diff = max((f() - expected).abs().max().item() for f in (ours_mixed_per_call, ours_mixed_held))
        print(f"{case}: max |ours mixed - PEFT mixed| logits = {diff:.2e}")
        if diff > 1e-3:
            sys.exit(f"bench_multi_adapter.py: error: ours and PEFT disagree on the mixed batch ({diff:.2e})")
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
        times = _timing.interleaved(fns, rounds=args.rounds, seed=args.seed, sync=sync)
    base = "ours, one adapter"
    label = f"{case} ({len(ROWS)} x {tokens})"
    for name in fns:
        stats = None if name == base else _timing.ratio_stats(times, name, base)
        target, met = "", None
        if name.startswith("ours, mixed"):
            target, met = f"<= {MIXED_TARGET:.2f}x", stats.median <= MIXED_TARGET
        rows.append(Row(label, name, stats, _timing.median_ms(times[name]), target=target, met=met))
    for name in ("ours, mixed (adapter_batch held)", "ours, mixed (adapter_batch per call)"):
        vs = _timing.ratio_stats(times, name, "PEFT, mixed (adapter_names=)")
        rows.append(
            Row(label, f"{name.removeprefix('ours, ')} / PEFT mixed", vs, None, target="< 1.00x", met=vs.median < 1.0)
        )
    return rows


if __name__ == "__main__":
    main()
