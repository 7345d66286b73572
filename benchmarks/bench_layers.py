"""Layer benchmarks: this library's LoRA layers against the frozen torch layer, loralib and PEFT, side by side.

Every training case times forward + backward (the input requires grad, as inside a network; only the LoRA
parameters train) and divides, round by round, each implementation's time by the frozen layer's. See
benchmarks/README.md for the method.

    python benchmarks/bench_layers.py              # the real sizes (a few minutes on 2 cores)
    python benchmarks/bench_layers.py --quick      # tiny sizes, seconds: a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn as nn

import _impls
import _timing
from _timing import Row, Stats

# Defaults (the sizes); --quick divides them down.
TOKENS = 4096
HIDDEN = 3072  # Phi-3-mini's hidden size
R = 16
ALPHA = 32
DROPOUT = 0.05
QKV_IN = 1024
CONV = dict(batch=16, channels=64, size=56, r=8)  # a ResNet stage-1 3x3 convolution
ROUNDS = 7
QUICK_ROUNDS = 3

IMPLS = ("frozen", "ours", "loralib", "peft")


@dataclass(frozen=True)
class Case:
    label: str  # a template: {tokens}, {hidden}, {d}, {r}, {dropout}, {n}, {c}, {s}, {conv_r} (see _label)
    impls: tuple[str, ...]
    build: Callable[[str, bool], Callable[[], None]]  # (impl, quick) -> step
    targets: dict[str, tuple[str, Callable[[float], bool]]]  # impl -> (text, test on the median ratio)


def _at_most(x: float) -> tuple[str, Callable[[float], bool]]:
    return f"<= {x:.2f}x", lambda m: m <= x


def _sizes(quick: bool) -> tuple[int, int, int]:
    """(tokens, hidden, qkv_in)"""
    return (512, 512, 256) if quick else (TOKENS, HIDDEN, QKV_IN)


def _conv_sizes(quick: bool) -> tuple[int, int, int, int]:
    """(batch, channels, height = width, r)"""
    return (2, 64, 28, 8) if quick else (CONV["batch"], CONV["channels"], CONV["size"], CONV["r"])


def _label(template: str, quick: bool) -> str:
    tokens, hidden, d = _sizes(quick)
    n, c, s, conv_r = _conv_sizes(quick)
    return template.format(tokens=tokens, hidden=hidden, d=d, r=R, dropout=DROPOUT, n=n, c=c, s=s, conv_r=conv_r)


def _linear(in_f: int, out_f: int, impl: str, dropout: float, **kw) -> nn.Module:
    torch.manual_seed(0)
    return _impls.adapt_linear(nn.Linear(in_f, out_f), impl, R, ALPHA, dropout, **kw)


def _inputs(tokens: int, in_f: int, out_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, in_f, generator=g).requires_grad_()
    return x, torch.randn(tokens, out_f, generator=g)


def _build_linear(dropout: float) -> Callable[[str, bool], Callable[[], None]]:
    def build(impl: str, quick: bool) -> Callable[[], None]:
        tokens, hidden, _ = _sizes(quick)
        x, g = _inputs(tokens, hidden, hidden)
        return _impls.layer_train_step(_linear(hidden, hidden, impl, dropout), x, g)

    return build


def _build_qkv(impl: str, quick: bool) -> Callable[[], None]:
    tokens, _, d = _sizes(quick)
    x, g = _inputs(tokens, d, 3 * d)
    layer = _linear(d, 3 * d, impl, DROPOUT, enable_lora=[True, False, True])
    return _impls.layer_train_step(layer, x, g)


def _build_conv(impl: str, quick: bool) -> Callable[[], None]:
    n, c, s, r = _conv_sizes(quick)
    torch.manual_seed(0)
    layer = _impls.adapt_conv2d(nn.Conv2d(c, c, 3, padding=1), impl, r, 2 * r, 0.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, s, s, generator=gen).requires_grad_()
    return _impls.layer_train_step(layer, x, torch.randn(n, c, s, s, generator=gen))


def _build_conv_eval(impl: str, quick: bool) -> Callable[[], None]:
    n, c, s, r = _conv_sizes(quick)
    torch.manual_seed(0)
    layer = _impls.adapt_conv2d(nn.Conv2d(c, c, 3, padding=1), impl, r, 2 * r, 0.0)
    with torch.no_grad():  # as after training: a B of zeros would let an implementation skip the adapter
        for name, t in layer.named_parameters():
            if "lora_B" in name.split("."):
                t.normal_(std=0.02)
    x = torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(1))
    return _impls.layer_eval_step(layer, x)


def _build_eval(impl: str, quick: bool) -> Callable[[], None]:
    tokens, hidden, _ = _sizes(quick)
    x, _ = _inputs(tokens, hidden, hidden)
    layer = _linear(hidden, hidden, impl.removesuffix(" merged"), DROPOUT)
    if impl.endswith(" merged"):
        import lora

        lora.merge_lora(layer)
    return _impls.layer_eval_step(layer, x.detach())


# The targets are issue 21's.
CASES: dict[str, Case] = {
    "linear": Case(
        "Linear {hidden}, r={r}, no dropout, {tokens} tokens, fwd+bwd",
        IMPLS,
        _build_linear(0.0),
        {"ours": _at_most(1.04)},
    ),
    "linear_dropout": Case(
        "Linear {hidden}, r={r}, dropout {dropout}, {tokens} tokens, fwd+bwd",
        IMPLS,
        _build_linear(DROPOUT),
        {"ours": _at_most(1.08)},
    ),
    "qkv": Case(
        "fused qkv {d}->3x{d}, q,v adapted, r={r}, dropout {dropout}, {tokens} tokens, fwd+bwd",
        IMPLS,
        _build_qkv,
        {"ours": _at_most(1.08)},
    ),
    "conv": Case(
        "Conv2d {c}->{c} k3, r={conv_r}, input {n}x{c}x{s}x{s}, fwd+bwd", IMPLS, _build_conv, {"ours": _at_most(1.20)}
    ),
    "conv_eval": Case(
        "Conv2d eval forward (no grad, not merged), {c}->{c} k3, r={conv_r}, input {n}x{c}x{s}x{s}",
        IMPLS,
        _build_conv_eval,
        {"ours": _at_most(1.03)},
    ),
    "eval": Case(
        "eval forward (no grad), Linear {hidden}, r={r}, {tokens} tokens",
        ("frozen", "ours", "ours merged", "loralib", "peft"),
        _build_eval,
        {"ours": _at_most(1.03), "ours merged": ("1.00x (<= 1.02x)", lambda m: m <= 1.02)},
    ),
}
SAVED_TARGET = 1.10


# ---------------------------------------------------------------------------------------------------------------
# Bytes saved for backward


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward of ``layer``, parameters excluded
    (they are resident anyway); the input ``x`` counts if it is saved."""
    layer.train()
    param_storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    return sum(seen.values())


def saved_rows(quick: bool) -> list[Row]:
    tokens, hidden, _ = _sizes(quick)
    x, _ = _inputs(tokens, hidden, hidden)
    rows = []
    for impl in IMPLS:
        if not _impls.have(impl):
            continue
        off, on = (saved_bytes(_linear(hidden, hidden, impl, p), x) for p in (0.0, DROPOUT))
        ratio = on / off if off else None
        stats = None if ratio is None else Stats(ratio, ratio, ratio)
        target = f"<= {SAVED_TARGET:.2f}x" if impl == "ours" else ""
        rows.append(
            Row(
                f"saved for backward, dropout {DROPOUT} / none (Linear {hidden}, {tokens} tokens)",
                impl,
                stats,
                None,
                None,
                target,
                (ratio <= SAVED_TARGET) if impl == "ours" and ratio else None,
                {"saved MB": f"{off / 2**20:.1f} -> {on / 2**20:.1f}"},
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------


def run_case(name: str, case: Case, args: argparse.Namespace) -> list[Row]:
    impls = [i for i in case.impls if _impls.have(i.removesuffix(" merged"))]
    steps = {impl: case.build(impl, args.quick) for impl in impls}
    times = _timing.interleaved(steps, args.rounds, warmup=1, seed=args.seed)
    rows = []
    for impl in impls:
        stats = None if impl == "frozen" else _timing.ratio_stats(times, impl, "frozen")
        peak = None
        if not args.no_peak and (not args.quick or name == "linear"):  # quick: one case, to exercise the path
            res = _timing.peak_in_subprocess(__file__, [name, impl, *_child_flags(args)])
            peak = res.mb
            if res.error:
                print(f"  peak memory of {name}/{impl} not measured: {res.error}", file=sys.stderr)
        text, test = case.targets.get(impl, ("", None))
        rows.append(
            Row(
                _label(case.label, args.quick),
                impl,
                stats,
                _timing.median_ms(times[impl]),
                peak,
                text,
                test(stats.median) if test and stats else None,
            )
        )
    del steps
    return rows


def _child_flags(args: argparse.Namespace) -> list[str]:
    return (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _timing.add_common_args(p, ROUNDS, QUICK_ROUNDS, [*CASES, "saved"])
    args = p.parse_args(argv)
    _timing.apply_common_args(args, ROUNDS, QUICK_ROUNDS)
    if args.child:
        case, impl = args.child
        _impls.preload(impl)
        _timing.child_report(lambda: CASES[case].build(impl, args.quick))
        return 0
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(wanted) - set(CASES) - {"saved"}
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}")

    print("## bench_layers: LoRA layers vs the frozen layer, loralib and PEFT\n")
    print(_timing.header(torch.float32))
    print(
        f"rounds: {args.rounds} interleaved (ratios per round, then median/min/max); peak MB: fresh subprocess per "
        f"implementation, VmHWM during one step minus RSS after imports\n"
    )
    if args.quick:
        print("--quick: tiny sizes, where fixed per-call overheads dominate; a smoke test, not a measurement\n")
    missing = [i for i in ("loralib", "peft") if not _impls.have(i)]
    if missing:
        print(f"not installed, rows skipped: {', '.join(missing)}\n")
    rows: list[Row] = []
    for name in wanted:
        if name == "saved":
            rows += saved_rows(args.quick)
        else:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            rows += run_case(name, CASES[name], args)
    print(_timing.markdown_table(rows, extra_columns=["saved MB"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
