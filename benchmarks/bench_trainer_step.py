"""Training steps in 16 bits: Hugging Face Trainer's bf16 (autocast over fp32 weights) with lora vs PEFT, and the
example's --bf16 (bf16 weights, no autocast) with lora's fused path vs its plain ops. Interleaved, same process.

    python benchmarks/bench_trainer_step.py              # Phi-3 width (hidden 512), 1 layer: minutes on a CPU
    python benchmarks/bench_trainer_step.py --quick      # tiny sizes: a smoke test, not a measurement
    python benchmarks/bench_trainer_step.py --layers 4 --vocab 32064 --seq 256   # bench_phi3.py's small Phi-3

The example's step (this library's Phi-3 in bf16 weights, fp32 adapters, the forward under bf16 autocast) is timed
with lora's fused path and with its plain ops (the ops it runs under torch.compile).

A Trainer step is what transformers' Trainer does with ``bf16=True`` (accelerate's mixed precision): the forward,
with the loss, under ``torch.autocast(device, dtype=torch.bfloat16)`` over fp32 weights, then backward and AdamW
over the trainable parameters. The same step without autocast (fp32) is measured alongside, for reference.

On a CPU without native bf16 matrix units (no AVX512-BF16 / AMX) torch emulates bf16 GEMMs, many times slower than
fp32 ones; the header says which this machine has. Depth and vocabulary are reduced from bench_phi3.py's small
Phi-3 by default so that a bf16 step takes seconds, not minutes, there.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn as nn

import _impls
import _timing
from _timing import Row

R, ALPHA, DROPOUT = 16, 32, 0.05  # Hugging Face's Phi-3 LoRA recipe
HIDDEN, HEADS, INTERMEDIATE = 512, 8, 1376  # bench_phi3.py's small Phi-3 (Phi-3-mini's proportions)
LAYERS, VOCAB, BATCH, SEQ = 1, 2048, 1, 256
QUICK = dict(hidden=128, heads=4, intermediate=344, layers=1, vocab=512, batch=1, seq=64)
ROUNDS, QUICK_ROUNDS = 5, 3
TRAINER_TARGET = 0.85  # issue 20: lora's Trainer bf16 step at <= 0.85x PEFT's time


def _config(args: argparse.Namespace) -> dict:
    return _impls.phi3_config_dict(
        hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate, vocab=args.vocab
    )


def train_step(
    model: nn.Module, ids: torch.Tensor, autocast: bool, plain_ops: bool = False
) -> Callable[[], torch.Tensor]:
    """One step: forward and loss (under bf16 autocast if ``autocast``), backward, AdamW. ``plain_ops`` turns lora's
    fused path off (the ops it runs under torch.compile)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        plain = mock.patch("lora.layers._fused_dtype", return_value=None) if plain_ops else contextlib.nullcontext()
        with plain, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = _impls.lm_loss(model, ids)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def trainer_steps(args: argparse.Namespace, autocast: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """transformers' Phi-3 (fp32 weights, same seed) with PEFT, lora per slice (the default) and lora fused=True."""
    cfg, ids = _config(args), _ids(args)
    impls = {"peft": "peft", "lora (per-slice qkv / gate_up)": "ours", "lora (fused=True, PEFT's layout)": "ours-fused"}
    return {
        name: train_step(_impls.add_lora(_impls.hf_phi3(cfg), impl, R, ALPHA, DROPOUT), ids, autocast)
        for name, impl in impls.items()
    }


def bf16_weight_steps(args: argparse.Namespace) -> dict[str, Callable[[], torch.Tensor]]:
    """examples/finetune_phi3.py --bf16: this library's Phi-3 in bf16 weights, fp32 adapters, the forward under bf16
    autocast; lora's fused path vs its plain ops."""
    cfg, ids = _config(args), _ids(args)
    steps = {}
    for name, plain in (("lora plain ops", True), ("lora fused", False)):
        model = _impls.add_lora(_impls.ours_phi3(cfg, dtype=torch.bfloat16), "ours", R, ALPHA, DROPOUT)
        steps[name] = train_step(model, ids, autocast=True, plain_ops=plain)
    return steps


def _ids(args: argparse.Namespace) -> torch.Tensor:
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))


CASES = {
    "trainer_bf16": (
        "Trainer step, bf16 autocast over fp32 weights",
        "peft",
        lambda a: trainer_steps(a, autocast=True),
    ),
    "trainer_fp32": (
        "Trainer step, fp32 (autocast off), for reference",
        "peft",
        lambda a: trainer_steps(a, autocast=False),
    ),
    "bf16_weights": (
        "finetune_phi3.py --bf16 step: bf16 weights + autocast, fp32 adapters",
        "lora plain ops",
        bf16_weight_steps,
    ),
}


def rows_for(name: str, args: argparse.Namespace) -> list[Row]:
    label, baseline, build = CASES[name]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    steps = build(args)
    first_loss = {impl: float(step()) for impl, step in steps.items()}  # also the warm-up
    times = _timing.interleaved(steps, args.rounds, warmup=0, seed=args.seed)
    rows = []
    for impl in steps:
        stats = None if impl == baseline else _timing.ratio_stats(times, impl, baseline)
        target, met = "", None
        if name == "trainer_bf16" and impl != baseline:
            target, met = f"<= {TRAINER_TARGET:.2f}x", stats.median <= TRAINER_TARGET
        ms = _timing.median_ms(times[impl])
        extra = {"tok/s": f"{args.batch * args.seq / (ms / 1e3):.0f}", "first loss": f"{first_loss[impl]:.4f}"}
        rows.append(Row(label, impl, stats, ms, None, target, met, extra))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _timing.add_common_args(p, ROUNDS, QUICK_ROUNDS, list(CASES))
    for flag, default in (
        ("hidden", HIDDEN),
        ("heads", HEADS),
        ("intermediate", INTERMEDIATE),
        ("layers", LAYERS),
        ("vocab", VOCAB),
        ("batch", BATCH),
        ("seq", SEQ),
    ):
        p.add_argument(
            f"--{flag}", type=int, default=None, help=f"model / batch size (default {default}, quick {QUICK[flag]})"
        )
    args = p.parse_args(argv)
    _timing.apply_common_args(args, ROUNDS, QUICK_ROUNDS)
    defaults = (
        QUICK
        if args.quick
        else dict(
            hidden=HIDDEN, heads=HEADS, intermediate=INTERMEDIATE, layers=LAYERS, vocab=VOCAB, batch=BATCH, seq=SEQ
        )
    )
    for flag, default in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    if set(wanted) - set(CASES):
        p.error(f"unknown cases {sorted(set(wanted) - set(CASES))}")
    if "peft" in "".join(wanted) and not _impls.have("peft"):
        p.error("PEFT is not installed (pip install peft): it is the baseline of the Trainer cases")

    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    print("## bench_trainer_step: 16-bit training steps\n")
    print(_timing.header(torch.bfloat16))
    print(f"CPU bf16 GEMMs: {'native (AVX512-BF16/AMX)' if native else 'emulated (no AVX512-BF16/AMX)'}")
    print(
        f"Phi-3: hidden {args.hidden}, {args.layers} layer(s), {args.heads} heads, intermediate {args.intermediate},"
        f" vocab {args.vocab}, batch {args.batch}x{args.seq}; LoRA r={R}, alpha {ALPHA}, dropout {DROPOUT}, AdamW"
    )
    print(f"rounds: {args.rounds} interleaved (ratios per round, then median/min/max); tok/s from the median step\n")
    if args.quick:
        print("--quick: tiny sizes, where fixed per-call overheads dominate; a smoke test, not a measurement\n")
    rows: list[Row] = []
    for name in wanted:
        rows += rows_for(name, args)
    print(_timing.markdown_table(rows, extra_columns=["tok/s", "first loss"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
