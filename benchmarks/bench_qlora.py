"""QLoRA benchmark: the frozen NF4 linear (lora.qlora.Linear4bit) against the frozen bf16 nn.Linear it came from and
bitsandbytes' CPU Linear4bit (nf4, double-quantized, bf16 compute), side by side in one process.

One case, the issue's: a 3072 -> 8192 projection (Phi-3-mini's hidden -> intermediate), 4096 tokens, bf16 input
requiring grad, forward + backward (the weight gets no gradient). Each round runs every implementation once, in a
shuffled order; the table gives each one's time over the bf16 linear's of the same round (median, min, max). On a
CPU without bf16 matrix units torch emulates bf16 GEMMs (many times slower) and ours multiplies the exactly upcast
operands in fp32 instead (lora.functional._gemm_dtype), so a frozen fp32 nn.Linear over the same values is timed
too: ours over it is what the 4 bits cost.
The NF4 weights of ours and bitsandbytes are the same bits (tests/test_qlora.py checks it). It also prints the
bytes each weight takes and the time of one dequantization.

    python benchmarks/bench_qlora.py                  # the issue's sizes (slow on a CPU without native bf16 GEMM)
    python benchmarks/bench_qlora.py --tokens 1024    # fewer tokens: the dequantization weighs more
    python benchmarks/bench_qlora.py --quick          # tiny sizes, seconds: a smoke test, not a measurement
    python benchmarks/bench_qlora.py --case step      # a QLoRA training step against the bf16 LoRA step

``--case step``: Phi-3-mini's real widths (hidden 3072, intermediate 8192, vocabulary 32064) with ``--layers``
decoder layers (default 2), random bf16 weights; one copy as it is and one with every linear but the head in NF4;
``lora.phi3.inject(r=16, alpha 32, dropout 0.05)`` on both, gradient checkpointing, AdamW; training steps at batch
1 x 512 tokens, interleaved, so both see the same machine. (``bench_scale.py --quantize both`` runs the full
32-layer model, one after the other, and measures its memory.)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn

import _timing
from _timing import Row

import _impls
import lora.phi3
import lora.qlora

IN, OUT, TOKENS = 3072, 8192, 4096  # Phi-3-mini's gate/up projection, the token count
ROUNDS = 3


def build(impl: str, linear: nn.Linear, x: torch.Tensor):
    """A forward + backward step of ``impl`` over ``linear``'s weight; ``x`` requires grad."""
    if impl == "bf16":
        layer = linear
    elif impl == "fp32":  # the same products in fp32: what ours computes on a CPU without bf16 matrix units
        layer = nn.Linear(linear.in_features, linear.out_features, bias=False).requires_grad_(False)
        layer.weight.copy_(linear.weight)

        def step32() -> None:
            x.grad = None
            layer(x.float()).to(x.dtype).sum().backward()

        return step32, layer
    elif impl == "ours":
        layer = lora.qlora.Linear4bit.from_linear(linear)
    else:
        bnb = _timing.optional_import("bitsandbytes")
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=False,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,
            quant_type="nf4",
        )
        layer.load_state_dict(linear.state_dict())
        layer = layer.to("cpu")  # quantizes
        layer.weight.requires_grad_(False)
        assert torch.equal(layer.weight.data.reshape(-1), lora.qlora.Linear4bit.from_linear(linear).weight.packed)

    def step() -> None:
        x.grad = None
        layer(x).sum().backward()

    return step, layer


def step_case(layers: int, tokens: int, rounds: int, warmup: int, quick: bool) -> list[Row]:
    """bf16 LoRA vs QLoRA training steps of a reduced-depth Phi-3-mini, interleaved."""
    cls, config_cls, why = _impls.our_phi3()
    if cls is None:
        raise SystemExit(why)
    widths = _impls.phi3_config_dict(hidden=256, layers=layers, heads=4, intermediate=512, vocab=1024)
    cfg = config_cls(**(widths if quick else {**_impls.PHI3_MINI, "num_hidden_layers": layers}))
    torch.manual_seed(0)
    models = {"bf16 LoRA": cls(cfg).to(torch.bfloat16)}
    models["QLoRA (NF4)"] = cls(cfg).to(torch.bfloat16)
    models["QLoRA (NF4)"].load_state_dict(models["bf16 LoRA"].state_dict())
    lora.quantize(models["QLoRA (NF4)"])
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    steps = {}
    for name, model in models.items():
        lora.phi3.inject(model, r=16, lora_alpha=32, lora_dropout=0.05)
        model.gradient_checkpointing_enable()
        steps[name] = _impls.model_train_step(model.train(), ids)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(rounds):
        one = _timing.interleaved(steps, rounds=1, warmup=warmup if i == 0 else 0, seed=i)
        for name in steps:
            times[name] += one[name]
        print(f"round {i + 1}/{rounds}: " + ", ".join(f"{n} {one[n][0]:.1f} s" for n in steps), flush=True)
    case = f"Phi-3-mini widths, {layers} layers, 1 x {tokens}, LoRA r=16 + grad ckpt, training step"
    s = _timing.ratio_stats(times, "QLoRA (NF4)", "bf16 LoRA")
    return [
        Row(case, "bf16 LoRA", None, _timing.median_ms(times["bf16 LoRA"])),
        Row(case, "QLoRA (NF4)", s, _timing.median_ms(times["QLoRA (NF4)"]), target="<= 1.30x", met=s.median <= 1.3),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--case", choices=["linear", "step"], default="linear", help="what to time (default: linear; see above)"
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers for --case step (default: 2)")
    parser.add_argument(
        "--tokens", type=int, default=TOKENS, help=f"tokens per step (default: {TOKENS}; 512 for --case step)"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed rounds (default: {ROUNDS})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each before the rounds (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: a smoke test (default: off)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case == "step":
        print(_timing.header(torch.bfloat16))
        tokens = 64 if args.quick else (512 if args.tokens == TOKENS else args.tokens)
        rows = step_case(args.layers, tokens, 2 if args.quick else args.rounds, args.warmup, args.quick)
        print(_timing.markdown_table(rows))
        return 0
    d_in, d_out, tokens = (256, 512, 128) if args.quick else (IN, OUT, args.tokens)
    rounds = 2 if args.quick else args.rounds
    impls = ["bf16", "fp32", "ours"] + (["bitsandbytes"] if _timing.optional_import("bitsandbytes") else [])

    print(_timing.header(torch.bfloat16))
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out, bias=False).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)
    steps, layers = {}, {}
    for impl in impls:
        steps[impl], layers[impl] = build(impl, linear, x)

    ours = layers["ours"].weight
    t = time.perf_counter()
    ours.dequantize(torch.bfloat16)
    deq_ms = 1e3 * (time.perf_counter() - t)
    gemm = lora.qlora._gemm_dtype(torch.bfloat16, x.device)
    print(
        "ours multiplies bf16 operands "
        + ("as fp32 GEMMs (this CPU has no bf16 matrix units)" if gemm else "with torch's bf16 GEMM")
    )
    print(
        f"weight {d_out}x{d_in}: bf16 {linear.weight.nbytes / 2**20:.1f} MiB, NF4 (double-quantized) "
        f"{ours.nbytes / 2**20:.1f} MiB ({ours.nbytes / linear.weight.nbytes:.3f}x); one dequantization to bf16: "
        f"{deq_ms:.0f} ms"
    )

    # One round at a time (each with its own shuffled order), so a slow machine shows progress.
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for i in range(rounds):
        one = _timing.interleaved(steps, rounds=1, warmup=args.warmup if i == 0 else 0, seed=i)
        for impl in impls:
            times[impl] += one[impl]
        print(
            f"round {i + 1}/{rounds}: " + ", ".join(f"{impl} {1e3 * one[impl][0]:.0f} ms" for impl in impls), flush=True
        )
    case = f"NF4 linear {d_in}->{d_out}, {tokens} tokens, fwd+bwd, bf16"
    rows = [Row(case, "bf16 (frozen nn.Linear)", None, _timing.median_ms(times["bf16"]))]
    targets = {"ours": ("<= 1.50x", lambda m: m <= 1.5), "bitsandbytes": ("", None), "fp32": ("", None)}
    for impl in impls[1:]:
        s = _timing.ratio_stats(times, impl, "bf16")
        text, test = targets[impl]
        rows.append(
            Row(
                case, impl, s, _timing.median_ms(times[impl]), target=text, met=None if test is None else test(s.median)
            )
        )
    s = _timing.ratio_stats(times, "ours", "fp32")  # what the 4 bits cost over the same GEMMs
    rows.append(Row(case, "ours / fp32 frozen nn.Linear (the 4-bit overhead)", s, None))
    if "bitsandbytes" in times:
        s = _timing.ratio_stats(times, "ours", "bitsandbytes")
        rows.append(Row(case, "ours / bitsandbytes", s, None, target="< 1.00x", met=s.median < 1.0))
    print(_timing.markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
