"""Phi-3 benchmarks: LoRA on Phi-3-mini's real projection shapes, a small Phi-3's training step with LoRA against full
fine-tuning, and this library's Phi-3 + LoRA against transformers' Phi-3 + PEFT. fp32 on the CPU, interleaved; see
benchmarks/README.md for the method.

    python benchmarks/bench_phi3.py                 # real sizes (a few minutes on 2 cores)
    python benchmarks/bench_phi3.py --quick         # tiny sizes: a smoke test, not a measurement
    python benchmarks/bench_phi3.py --shape-peaks   # also the peak memory of each projection (16 more processes)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch
import torch.nn as nn

import _impls
import _timing
from _timing import Row

# Defaults; --quick shrinks them.
R, ALPHA, DROPOUT = 16, 32, 0.05  # Hugging Face's Phi-3 LoRA recipe
SHAPE_TOKENS = 1024
MINI = _impls.PHI3_MINI  # Phi-3-mini-4k: hidden 3072, intermediate 8192, 32 heads
SMALL = _impls.phi3_config_dict(hidden=512, layers=4, heads=8, intermediate=1376, vocab=32064)
SMALL_BATCH = (4, 256)  # (batch, sequence length)
ROUNDS = 5
QUICK_ROUNDS = 3

QUICK_MINI = dict(hidden_size=384, intermediate_size=1024)
QUICK_SMALL = _impls.phi3_config_dict(hidden=128, layers=2, heads=4, intermediate=344, vocab=4096)
QUICK_SHAPE_TOKENS = 256
QUICK_BATCH = (2, 64)

# chat_step: the share of next-token positions that carry a label (assistant tokens) in the example's built-in data,
# examples/data/world_chat_train.jsonl tokenized with its own template (lora.phi3.tokenize_conversation): 38.3%
# over all 1,176 conversations (per conversation: median 43.9%, 17.6% to 53.2%).
CHAT_LABELLED_SHARE = 0.383

SMALL_TARGET = 0.70  # "about 0.67x": 4N/6N of the FLOPs (no weight gradients for the frozen base)
STEP_TARGET = 0.75  # issue 15: ours <= 0.75x transformers + PEFT's step time, and <= 0.75x its peak memory
PEAK_TARGET = 0.75


def _mini(quick: bool) -> dict[str, Any]:
    return {**MINI, **QUICK_MINI} if quick else MINI


# ---------------------------------------------------------------------------------------------------------------
# Cases: Phi-3-mini projections (one case each; ratio to the frozen projection)


def _projections(quick: bool) -> dict[str, tuple[int, int, list[bool] | None, list[int] | None]]:
    """name -> (in, out, enable_lora, split_sizes) of Phi-3-mini's four adapted projections (MHA: q = k = v)."""
    h, inter = _mini(quick)["hidden_size"], _mini(quick)["intermediate_size"]
    return {
        "qkv_proj": (h, 3 * h, [True] * 3, [h] * 3),
        "o_proj": (h, h, None, None),
        "gate_up_proj": (h, 2 * inter, [True] * 2, [inter] * 2),
        "down_proj": (inter, h, None, None),
    }


def build_projection(name: str, impl: str, quick: bool) -> Callable[[], None]:
    in_f, out_f, enable, sizes = _projections(quick)[name]
    tokens = QUICK_SHAPE_TOKENS if quick else SHAPE_TOKENS
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False)  # Phi-3's projections have no bias
    layer = _impls.adapt_linear(base, impl, R, ALPHA, DROPOUT, enable, sizes if enable else None)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, in_f, generator=gen).requires_grad_()
    return _impls.layer_train_step(layer, x, torch.randn(tokens, out_f, generator=gen))


# ---------------------------------------------------------------------------------------------------------------
# Cases: whole training steps


def _ids(cfg: dict[str, Any], quick: bool) -> torch.Tensor:
    batch, seq = QUICK_BATCH if quick else SMALL_BATCH
    return torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(2))


def build_small_step(impl: str, quick: bool) -> Callable[[], torch.Tensor]:
    """transformers' Phi-3 (small config) trained as ``impl``: full fine-tuning or LoRA by ours / PEFT / loralib."""
    cfg = QUICK_SMALL if quick else SMALL
    model = _impls.add_lora(_impls.hf_phi3(cfg), impl, R, ALPHA, DROPOUT)
    return _impls.model_train_step(model, _ids(cfg, quick))


def _chat_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels as chat data has them: -100 except each row's last ``CHAT_LABELLED_SHARE`` of the positions (the
    reply); ids: (B, T) -> (B, T)."""
    labels = torch.full_like(ids, -100)
    reply = round(CHAT_LABELLED_SHARE * ids.shape[1])
    labels[:, -reply:] = ids[:, -reply:]
    return labels


def build_full_step(impl: str, quick: bool, chat: bool = False) -> Callable[[], torch.Tensor]:
    """The whole LoRA step: this library's Phi-3 + its LoRA, or transformers' Phi-3 + PEFT, same weights and data;
    every position labelled, or (``chat``) only each row's reply span, the same labels on both sides."""
    cfg = QUICK_SMALL if quick else SMALL
    hf = _impls.hf_phi3(cfg)
    if impl == "ours":
        model = _impls.ours_phi3(cfg)
        model.load_state_dict(hf.state_dict())  # same names as transformers'
        del hf
        model = _impls.add_lora(model, "ours", R, ALPHA, DROPOUT)
    else:
        model = _impls.add_lora(hf, "peft", R, ALPHA, DROPOUT)
    ids = _ids(cfg, quick)
    return _impls.model_train_step(model, ids, labels=_chat_labels(ids) if chat else None)


def build_chat_step(impl: str, quick: bool) -> Callable[[], torch.Tensor]:
    return build_full_step(impl, quick, chat=True)


@dataclass(frozen=True)
class StepCase:
    label: str
    baseline: str
    impls: tuple[str, ...]
    build: Callable[[str, bool], Callable[[], Any]]


STEP_CASES = {
    "small_step": StepCase(
        "small Phi-3 step: LoRA vs full fine-tuning (transformers' model)",
        "full",
        ("full", "ours", "peft", "loralib"),
        build_small_step,
    ),
    "full_step": StepCase(
        "small Phi-3 step: ours (model + LoRA) vs transformers + PEFT",
        "transformers+peft",
        ("transformers+peft", "ours"),
        build_full_step,
    ),
    "chat_step": StepCase(
        f"small Phi-3 step, chat labels (each row's last {CHAT_LABELLED_SHARE:.1%}): ours vs transformers + PEFT",
        "transformers+peft",
        ("transformers+peft", "ours"),
        build_chat_step,
    ),
}


def _small_desc(quick: bool) -> str:
    cfg = QUICK_SMALL if quick else SMALL
    b, t = QUICK_BATCH if quick else SMALL_BATCH
    return (
        f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads, "
        f"intermediate {cfg['intermediate_size']}, vocab {cfg['vocab_size']}, batch {b}x{t}, r={R}, "
        f"dropout {DROPOUT}, AdamW"
    )


# ---------------------------------------------------------------------------------------------------------------


def _child_flags(args: argparse.Namespace) -> list[str]:
    return (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])


def _peak(args: argparse.Namespace, case: str, impl: str) -> float | None:
    res = _timing.peak_in_subprocess(__file__, [case, impl, *_child_flags(args)])
    if res.error:
        print(f"  peak memory of {case}/{impl} not measured: {res.error}", file=sys.stderr)
    return res.mb


def projection_rows(args: argparse.Namespace) -> list[Row]:
    impls = [i for i in ("frozen", "ours", "loralib", "peft") if _impls.have(i)]
    tokens = QUICK_SHAPE_TOKENS if args.quick else SHAPE_TOKENS
    rows = []
    for name, (in_f, out_f, enable, _) in _projections(args.quick).items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        steps = {impl: build_projection(name, impl, args.quick) for impl in impls}
        times = _timing.interleaved(steps, args.rounds, warmup=1, seed=args.seed)
        del steps
        how = {
            "ours": "per slice" if enable else "",
            "loralib": "MergedLinear" if enable else "",
            "peft": "one LoRA over the fused matrix" if enable else "",
        }
        for impl in impls:
            stats = None if impl == "frozen" else _timing.ratio_stats(times, impl, "frozen")
            peak = _peak(args, name, impl) if args.shape_peaks else None
            label = f"Phi-3-mini {name} {in_f}->{out_f}, {tokens} tokens, r={R}, dropout {DROPOUT}, fwd+bwd"
            rows.append(
                Row(
                    label,
                    impl + (f" ({how[impl]})" if how.get(impl) else ""),
                    stats,
                    _timing.median_ms(times[impl]),
                    peak,
                    "report" if impl == "ours" else "",
                )
            )
    return rows


def step_rows(name: str, args: argparse.Namespace) -> list[Row]:
    case = STEP_CASES[name]
    impls = [i for i in case.impls if _impls.have(i.split("+")[-1])]
    if name in ("full_step", "chat_step"):
        cls, _, why = _impls.our_phi3()
        if cls is None:
            print(f"{name}: {why}")
            return []
    print(f"running {name} ...", file=sys.stderr, flush=True)
    steps = {impl: case.build(impl, args.quick) for impl in impls}
    first_loss = {impl: float(step()) for impl, step in steps.items()}  # also the warm-up
    times = _timing.interleaved(steps, args.rounds, warmup=0, seed=args.seed)
    if args.profile:
        profile_ops(steps, args.profile)
    del steps
    b, t = QUICK_BATCH if args.quick else SMALL_BATCH
    measure = not args.no_peak and (not args.quick or name == "full_step")  # quick: one case, to exercise the path
    peaks = {impl: _peak(args, name, impl) if measure else None for impl in impls}
    rows = []
    for impl in impls:
        stats = None if impl == case.baseline else _timing.ratio_stats(times, impl, case.baseline)
        ms = _timing.median_ms(times[impl])
        target, met = "", None
        if name == "small_step" and impl == "ours":
            target, met = f"about 0.67x (<= {SMALL_TARGET:.2f}x)", stats.median <= SMALL_TARGET
        if name in ("full_step", "chat_step") and impl == "ours":
            target = f"<= {STEP_TARGET:.2f}x, peak <= {PEAK_TARGET:.2f}x"
            base_peak, our_peak = peaks[case.baseline], peaks[impl]
            met = stats.median <= STEP_TARGET and (
                base_peak is None or our_peak is None or our_peak <= PEAK_TARGET * base_peak
            )
        extra = {"tok/s": f"{b * t / (ms / 1e3):.0f}", "first loss": f"{first_loss[impl]:.4f}"}
        rows.append(Row(case.label, impl, stats, ms, peaks[impl], target, met, extra))
    return rows


def profile_ops(steps: dict[str, Callable[[], Any]], n_steps: int) -> None:
    """torch.profiler's operators of ``n_steps`` steps of each implementation, side by side: milliseconds per step
    (self CPU time, so that nested operators are not counted twice) and calls per step, the top 20 by the larger."""
    from torch.profiler import profile

    per_impl: dict[str, dict[str, tuple[float, float]]] = {}
    for impl, step in steps.items():
        with profile() as prof:
            for _ in range(n_steps):
                step()
        per_impl[impl] = {
            e.key: (e.self_cpu_time_total / 1e3 / n_steps, e.count / n_steps) for e in prof.key_averages()
        }
    impls = list(per_impl)
    names = sorted(
        {k for ops in per_impl.values() for k in ops},
        key=lambda k: -max(o.get(k, (0, 0))[0] for o in per_impl.values()),
    )
    print(f"\noperators, self CPU ms per step (calls per step), {n_steps} profiled steps each:\n")
    print("| operator | " + " | ".join(impls) + " |")
    print("|---|" + "---|" * len(impls))
    for name in names[:20]:
        cells = [
            f"{per_impl[i][name][0]:.1f} ({per_impl[i][name][1]:.0f})" if name in per_impl[i] else "-" for i in impls
        ]
        print(f"| {name[:60]} | " + " | ".join(cells) + " |")
    totals = [f"{sum(v[0] for v in per_impl[i].values()):.1f}" for i in impls]
    print("| total | " + " | ".join(totals) + " |\n")


CASE_NAMES = ["shapes", "small_step", "full_step", "chat_step"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _timing.add_common_args(p, ROUNDS, QUICK_ROUNDS, CASE_NAMES)
    p.add_argument("--shape-peaks", action="store_true", help="also measure each projection's peak (slow)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing a step case, profile N steps of each implementation: operators side by side (default 0: off)",
    )
    args = p.parse_args(argv)
    _timing.apply_common_args(args, ROUNDS, QUICK_ROUNDS)
    if args.child:
        case, impl = args.child
        _impls.preload("transformers" if case in STEP_CASES else impl)
        _impls.preload(impl.split("+")[-1])
        if case in STEP_CASES:
            build = lambda: STEP_CASES[case].build(impl, args.quick)  # noqa: E731
        else:
            build = lambda: build_projection(case, impl, args.quick)  # noqa: E731
        _timing.child_report(build)
        return 0
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    if set(wanted) - set(CASE_NAMES):
        p.error(f"unknown cases {sorted(set(wanted) - set(CASE_NAMES))}")

    print("## bench_phi3: Phi-3 shapes and training steps\n")
    print(_timing.header(torch.float32))
    print(
        f"rounds: {args.rounds} interleaved (ratios per round, then median/min/max); peak MB: fresh subprocess per "
        f"implementation, VmHWM during one step minus RSS after imports; tok/s from the median step\n"
    )
    print(f"small Phi-3 (fp32, training mode, SDPA attention): {_small_desc(args.quick)}\n")
    if args.quick:
        print("--quick: tiny sizes, where fixed per-call overheads dominate; a smoke test, not a measurement\n")
    rows: list[Row] = []
    for name in wanted:
        rows += projection_rows(args) if name == "shapes" else step_rows(name, args)
    print(_timing.markdown_table(rows, extra_columns=["tok/s", "first loss"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
