"""QLoRA benchmark: the frozen NF4 linear (lora.qlora.Linear4bit) against the frozen bf16 nn.Linear it came from and
bitsandbytes' CPU Linear4bit (nf4, double-quantized, bf16 compute), side by side in one process.

One case, the issue's: a 3072 -> 8192 projection (Phi-3-mini's hidden -> intermediate), 4096 tokens, bf16 input
requiring grad, forward + backward (the weight gets no gradient). Each round runs every implementation once, in a
shuffled order; the table gives each one's time over the bf16 linear's of the same round (median, min, max).
The NF4 weights of ours and bitsandbytes are the same bits (tests/test_qlora.py checks it). It also prints the
bytes each weight takes and the time of one dequantization.

    python benchmarks/bench_qlora.py                  # the issue's sizes (slow on a CPU without native bf16 GEMM)
    python benchmarks/bench_qlora.py --tokens 1024    # fewer tokens: the dequantization weighs more
    python benchmarks/bench_qlora.py --quick          # tiny sizes, seconds: a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn

import _timing
from _timing import Row

import lora.qlora

IN, OUT, TOKENS = 3072, 8192, 4096  # Phi-3-mini's gate/up projection, the token count
ROUNDS = 3


def build(impl: str, linear: nn.Linear, x: torch.Tensor):
    """A forward + backward step of ``impl`` over ``linear``'s weight; ``x`` requires grad."""
    if impl == "bf16":
        layer = linear
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=TOKENS, help=f"tokens per step (default: {TOKENS})")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed rounds (default: {ROUNDS})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each before the rounds (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: a smoke test (default: off)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    d_in, d_out, tokens = (256, 512, 128) if args.quick else (IN, OUT, args.tokens)
    rounds = 2 if args.quick else args.rounds
    impls = ["bf16", "ours"] + (["bitsandbytes"] if _timing.optional_import("bitsandbytes") else [])

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
    targets = {"ours": ("<= 1.50x", lambda m: m <= 1.5), "bitsandbytes": ("", None)}
    for impl in impls[1:]:
        s = _timing.ratio_stats(times, impl, "bf16")
        text, test = targets[impl]
        rows.append(
            Row(
                case, impl, s, _timing.median_ms(times[impl]), target=text, met=None if test is None else test(s.median)
            )
        )
    if "bitsandbytes" in times:
        s = _timing.ratio_stats(times, "ours", "bitsandbytes")
        rows.append(Row(case, "ours / bitsandbytes", s, None, target="< 1.00x", met=s.median < 1.0))
    print(_timing.markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
