"""DoRA training step: this library's DoRA against its plain LoRA and against PEFT's DoRA, side by side.

A training step is forward + backward + an SGD step on the trainable parameters (so that the adapter changes every
step and DoRA's cached weight norm must be recomputed each time, as in real training). The input requires grad,
as inside a network. Ratios are per round against this library's plain LoRA on the same layer (interleaved, see
benchmarks/README.md).

    python benchmarks/bench_dora.py              # Linear 3072 -> 3072, r=16, 4096 tokens (a few minutes, 1 thread)
    python benchmarks/bench_dora.py --quick      # tiny sizes: a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn as nn

import _impls
import _timing
from _timing import Row

import lora

TOKENS = 4096
HIDDEN = 3072  # Phi-3-mini's hidden size
R = 16
ALPHA = 32
ROUNDS = 7
QUICK = (512, 512, 3)  # tokens, hidden, rounds

IMPLS = ("frozen", "ours LoRA", "ours DoRA", "peft DoRA")
TARGETS = {"ours DoRA": ("<= 1.25x ours LoRA, < peft DoRA", 1.25)}


def build(impl: str, tokens: int, hidden: int, dropout: float) -> Callable[[], None]:
    torch.manual_seed(0)
    base = nn.Linear(hidden, hidden)
    if impl == "frozen":
        layer: nn.Module = base.requires_grad_(False)
    elif impl.startswith("ours"):
        layer = lora.Linear.from_module(base, r=R, lora_alpha=ALPHA, lora_dropout=dropout, use_dora="DoRA" in impl)
        lora.mark_only_lora_as_trainable(layer)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            _impls.Holder(base),
            LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["layer"], use_dora=True),
        )
        layer = model.base_model.model.layer
    layer.train()
    params = [p for p in layer.parameters() if p.requires_grad]
    with torch.no_grad():  # a non-zero B, as after some training
        for name, p in layer.named_parameters():
            if p.requires_grad and "lora_B" in name.split("."):
                p.normal_(0, 0.01)
    opt = torch.optim.SGD(params, lr=1e-6) if params else None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=g).requires_grad_()
    grad_out = torch.randn(tokens, hidden, generator=g)

    def step() -> None:
        x.grad = None
        layer(x).backward(grad_out)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test (default: off)")
    parser.add_argument("--rounds", type=int, default=None, help=f"timed rounds (default: {ROUNDS}, --quick: 3)")
    args = parser.parse_args(argv)
    tokens, hidden, rounds = QUICK if args.quick else (TOKENS, HIDDEN, ROUNDS)
    rounds = args.rounds or rounds
    have_peft = _impls.have("peft")
    impls = [i for i in IMPLS if have_peft or not i.startswith("peft")]
    print(_timing.header(torch.float32))
    rows: list[Row] = []
    for dropout in (0.0, 0.05):
        case = f"Linear {hidden}, r={R}, {tokens} tokens, dropout={dropout}, fwd+bwd+SGD"
        times = _timing.interleaved({i: build(i, tokens, hidden, dropout) for i in impls}, rounds=rounds)
        for impl in impls:
            stats = None if impl == "ours LoRA" else _timing.ratio_stats(times, impl, "ours LoRA")
            target, met = "", None
            if impl == "ours DoRA" and dropout == 0.0:
                target, limit = TARGETS[impl]
                faster = not have_peft or _timing.ratio_stats(times, impl, "peft DoRA").median < 1
                met = stats.median <= limit and faster
            rows.append(Row(case, impl, stats, _timing.median_ms(times[impl]), target=target, met=met))
        if have_peft:
            vs = _timing.ratio_stats(times, "ours DoRA", "peft DoRA")
            print(f"{case}: ours DoRA / peft DoRA = {vs.median:.2f}x (min {vs.min:.2f}, max {vs.max:.2f})")
    print(_timing.markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
