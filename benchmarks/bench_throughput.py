"""Training throughput outside the LoRA layers (issue 15): packing against length-grouped batching, and the peak
memory of a Phi-4-mini-shaped training step (vocabulary 200,064) with the chunked labelled-positions-only loss
against transformers + PEFT. fp32 on the CPU; ratios interleaved in one process (see benchmarks/README.md).

    python benchmarks/bench_throughput.py                      # both cases
    python benchmarks/bench_throughput.py --cases packing      # one
    python benchmarks/bench_throughput.py --phi4-seq 2048      # the issue's 1 x 2048 (minutes per step on 2 cores)
    python benchmarks/bench_throughput.py --cases compile --compile-dropout 0 --compile-dynamic   # one variant per run
    python benchmarks/bench_throughput.py --cases custom-op    # eager: the fused LoRA Function against its custom op
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from typing import Any

import torch

import _impls
import _timing
from _timing import Row

from lora.data import IGNORE_INDEX, collate, collate_packed, length_grouped_batches, shuffled_batches

ROUNDS = 5
QUICK_ROUNDS = 2
BATCH = 8  # the example's per_device_train_batch_size
PACK_CONVERSATIONS = 96  # conversations per timed pass (12 micro-batches of 8)
# Phi-4-mini-instruct's config.json: hidden 3072, intermediate 8192, 24 heads, 8 key/value heads, tied embeddings.
PHI4_LAYERS = 1  # of 32: the vocabulary is the point here
PHI4_SEQ = 512
PHI4_LABELLED = 1 / 3  # the reply's share of a chat row's tokens (the rest is prompt, no loss)


# ---------------------------------------------------------------------------------------------------------------
# packing vs length-grouped batches, the example's tiny Phi-3 with LoRA


def _chat_lengths(n: int, seed: int) -> list[int]:
    """Lengths drawn like a chat corpus: most conversations short, a long tail (lognormal, median ~150 tokens,
    about 5% over 600), capped at the tiny model's 1,024 positions."""
    rng = random.Random(seed)
    return [min(1024, max(8, int(rng.lognormvariate(5.0, 0.8)))) for _ in range(n)]


def _rows(kind: str) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    if kind == "built-in data":
        sys.path.insert(0, str(_timing.ROOT / "examples"))
        import finetune_phi3 as example

        from lora.phi3 import load_conversations, load_tokenizer

        convs, _ = load_conversations(example.data_file)
        rows, _ = example.tokenize_all(convs, load_tokenizer(example.model_dir), 2048)
        return rows[:PACK_CONVERSATIONS]
    rows = []
    for n in _chat_lengths(PACK_CONVERSATIONS, seed=1):
        ids = torch.randint(0, 256, (n,), generator=gen).tolist()
        prompt = n * 2 // 3  # the last third is the reply
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def build_pass(
    rows: list[dict],
    packing: bool,
    compile: bool = False,
    dropout: float = 0.05,
    fallback_random: bool = False,
    checkpointing: bool = False,
    **compile_kwargs: Any,
) -> Callable[[], float]:
    """One pass over ``rows`` in micro-batches of BATCH, as the example trains: forward with labels, backward, AdamW.
    ``compile``: ``compile_layers(**compile_kwargs)``, compiled by the warm-up pass; ``fallback_random``: inductor
    draws random numbers with torch's eager kernels, not its generated code (the LoRA dropout draws its own since
    the fused path became a custom op); ``checkpointing``: gradient checkpointing of every decoder layer."""
    import torch._inductor.config

    import lora
    from lora.phi3 import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_pretrained(_timing.ROOT / "examples" / "phi3-tiny")
    lora.phi3.inject(model, r=16, lora_alpha=32, lora_dropout=dropout)
    lora.mark_only_lora_as_trainable(model)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    if compile:
        # inductor; the warm-up pass compiles: layer 0 (whose input needs no gradient) and the others apart, each
        # once with the first batch's static shapes and once more with a dynamic sequence length
        model.compile_layers(**compile_kwargs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if packing:
        batches = [collate_packed([rows[i] for i in b], 256) for b in shuffled_batches(len(rows), BATCH, 0, 0)]
    else:
        lengths = [len(r["input_ids"]) for r in rows]
        batches = [collate([rows[i] for i in b], 256) for b in length_grouped_batches(lengths, BATCH, 0, 0)]

    def step() -> float:
        with torch._inductor.config.patch(fallback_random=fallback_random):  # read when a graph is compiled
            return one_pass()

    def one_pass() -> float:
        total = 0.0
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            extra = {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}
            loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], **extra).loss
            loss.backward()
            opt.step()
            total += loss.item()
        return total

    step.shape = (sum(b["input_ids"].numel() for b in batches), sum(len(r["input_ids"]) for r in rows))
    return step


def _table_rows(label: str, steps: dict, times: dict, baseline: str, padding: bool = False) -> list[Row]:
    """One row per pass of ``steps`` (each with ``.shape = (padded cells, real tokens)``): its median time, its ratio
    to ``baseline``'s, real tokens per second, and the padding share if asked."""
    rows = []
    for impl, step in steps.items():
        stats = None if impl == baseline else _timing.ratio_stats(times, impl, baseline)
        ms = _timing.median_ms(times[impl])
        cells, tokens = step.shape
        extra = {"tok/s": f"{tokens / (ms / 1e3):.0f}"}
        if padding:
            extra["padding"] = f"{1 - tokens / cells:.1%}"
        rows.append(Row(label, impl, stats, ms, None, "", None, extra))
    return rows


def packing_rows(args: argparse.Namespace) -> list[Row]:
    rows = []
    for kind in ("built-in data", "chat-like lengths"):
        data = _rows(kind)
        print(f"running packing on {kind} ...", file=sys.stderr, flush=True)
        steps = {"length-grouped": build_pass(data, packing=False), "packed": build_pass(data, packing=True)}
        times = _timing.interleaved(steps, args.rounds, warmup=1, seed=args.seed)
        label = f"tiny Phi-3 + LoRA, {len(data)} conversations ({kind}), batches of {BATCH}"
        rows += _table_rows(label, steps, times, "length-grouped", padding=True)
    return rows


def compile_rows(args: argparse.Namespace) -> list[Row]:
    """Compiled layers against eager (the fused LoRA path), one compile setting per run: dynamo shares compiled
    graphs between models of the same structure, so two compiled variants in one process would measure one."""
    from torch._dynamo.utils import counters

    data = _rows("built-in data")
    dropout, kwargs = args.compile_dropout, {"dynamic": True} if args.compile_dynamic else {}
    variant = ", ".join(
        [f"LoRA dropout {dropout}"]
        + (["dynamic=True"] if args.compile_dynamic else [])
        + (["fallback_random"] if args.compile_fallback_random else [])
        + (["gradient checkpointing"] if args.compile_checkpointing else [])
    )
    print(f"running compile ({variant}; the warm-up passes compile) ...", file=sys.stderr, flush=True)
    steps = {
        "eager": build_pass(data, packing=False, dropout=dropout, checkpointing=args.compile_checkpointing),
        "compiled": build_pass(
            data,
            packing=False,
            compile=True,
            dropout=dropout,
            fallback_random=args.compile_fallback_random,
            checkpointing=args.compile_checkpointing,
            **kwargs,
        ),
    }
    times = _timing.interleaved(steps, args.rounds, warmup=2, seed=args.seed)
    print(
        f"dynamo: {counters['stats']['unique_graphs']} graphs compiled, "
        f"{sum(counters['graph_break'].values())} graph breaks\n"
    )
    label = f"tiny Phi-3 + LoRA, {len(data)} conversations (built-in data), batches of {BATCH}, {variant}"
    return _table_rows(label, steps, times, "eager")


def custom_op_rows(args: argparse.Namespace) -> list[Row]:
    """Eager training with the fused LoRA linear called as the autograd Function (what eager runs) against the same
    computation through its torch.library custom op (what compiled layers run; in eager the dispatcher's per-call
    cost, and the backward draws the dropped positions again): whether eager could call the op too."""
    from unittest import mock

    import lora.functional as lf

    def via_op(x2, weight_t, bias, A, B, scaling, p, blocks, r, dense_mask, gemm_dtype=None):
        out, _, _ = torch.ops.lora.fused_lora_linear(
            x2, weight_t, bias, A, B, scaling, p, lf._flat_blocks(blocks), r, dense_mask
        )
        return out

    data = _rows("built-in data")
    dropout = args.compile_dropout
    print(f"running custom-op (LoRA dropout {dropout}) ...", file=sys.stderr, flush=True)
    function_pass, op_pass = (build_pass(data, packing=False, dropout=dropout) for _ in range(2))

    def through_op() -> float:
        with mock.patch.object(lf._FusedLoRALinear, "apply", via_op):
            return op_pass()

    through_op.shape = op_pass.shape
    steps = {"autograd Function": function_pass, "custom op": through_op}
    times = _timing.interleaved(steps, args.rounds, warmup=1, seed=args.seed)
    label = f"tiny Phi-3 + LoRA, eager, {len(data)} conversations (built-in data), LoRA dropout {dropout}"
    return _table_rows(label, steps, times, "autograd Function")


# ---------------------------------------------------------------------------------------------------------------
# Phi-4-mini-shaped training step: peak memory


def _phi4(layers: int) -> dict[str, Any]:
    cfg = _impls.phi3_config_dict(hidden=3072, layers=layers, heads=24, intermediate=8192, vocab=200064, kv_heads=8)
    return {**cfg, "tie_word_embeddings": True, "eos_token_id": 199999, "pad_token_id": 199999}


def build_phi4_step(impl: str, seq: int, layers: int) -> Callable[[], torch.Tensor]:
    cfg = _phi4(layers)
    model = _impls.ours_phi3(cfg) if impl == "ours" else _impls.hf_phi3(cfg)
    model = _impls.add_lora(model, "ours" if impl == "ours" else "peft", 16, 32, 0.05)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 199999, (1, seq), generator=gen)
    labels = ids.clone()
    labels[:, : int(seq * (1 - PHI4_LABELLED))] = IGNORE_INDEX  # a prompt, then the labelled reply
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    kwargs = {} if impl == "ours" else {"use_cache": False}

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels, **kwargs).loss
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def phi4_rows(args: argparse.Namespace) -> list[Row]:
    rows, peaks = [], {}
    for impl in ("transformers+peft", "ours"):
        print(f"running phi4 memory {impl} ...", file=sys.stderr, flush=True)
        flags = ["--phi4-seq", str(args.phi4_seq), "--phi4-layers", str(args.phi4_layers)]
        res = _timing.peak_in_subprocess(__file__, ["phi4", impl, *flags], timeout_s=3600)
        if res.error:
            print(f"  peak of {impl} not measured: {res.error}", file=sys.stderr)
        peaks[impl] = res.mb
    base = peaks["transformers+peft"]
    label = (
        f"Phi-4-mini-shaped step (vocab 200064, hidden 3072, {args.phi4_layers} layer(s), tied), "
        f"1 x {args.phi4_seq}, {PHI4_LABELLED:.0%} labelled, LoRA r=16"
    )
    for impl, mb in peaks.items():
        extra = {"peak ratio": "" if impl != "ours" or not base or not mb else f"{mb / base:.2f}x"}
        met = None if impl != "ours" or not base or not mb else mb <= 0.6 * base
        rows.append(Row(label, impl, None, None, mb, "peak >= 40% below" if impl == "ours" else "", met, extra))
    return rows


CASE_NAMES = ["packing", "compile", "custom-op", "phi4"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _timing.add_common_args(p, ROUNDS, QUICK_ROUNDS, CASE_NAMES)
    p.add_argument("--phi4-seq", type=int, default=PHI4_SEQ, help=f"tokens in the Phi-4 step (default: {PHI4_SEQ})")
    p.add_argument(
        "--phi4-layers",
        type=int,
        default=PHI4_LAYERS,
        help=f"decoder layers of the Phi-4-shaped model (default: {PHI4_LAYERS})",
    )
    p.add_argument(
        "--compile-dropout",
        type=float,
        default=0.05,
        help="LoRA dropout of the compile and custom-op cases (default: 0.05)",
    )
    p.add_argument(
        "--compile-dynamic",
        action="store_true",
        help="compile case: dynamic=True (one graph for every length) instead of torch's default (default: off)",
    )
    p.add_argument(
        "--compile-fallback-random",
        action="store_true",
        help="compile case: inductor draws random numbers with torch's eager kernels (default: off)",
    )
    p.add_argument(
        "--compile-checkpointing",
        action="store_true",
        help="compile case: gradient checkpointing in both eager and compiled runs (default: off)",
    )
    args = p.parse_args(argv)
    _timing.apply_common_args(args, ROUNDS, QUICK_ROUNDS)
    if args.child:
        _, impl = args.child
        _impls.preload("transformers")
        _impls.preload("peft")
        _timing.child_report(lambda: build_phi4_step(impl, args.phi4_seq, args.phi4_layers))
        return 0
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    if set(wanted) - set(CASE_NAMES):
        p.error(f"unknown cases {sorted(set(wanted) - set(CASE_NAMES))}")
    print("## bench_throughput: packing, compiled layers, and the chunked loss's peak memory\n")
    print(_timing.header(torch.float32))
    print(
        f"rounds: {args.rounds} interleaved (ratios per round, then median/min/max); tok/s counts real tokens; "
        "peak MB: fresh subprocess per implementation, VmHWM during one step minus RSS after imports\n"
    )
    rows: list[Row] = []
    for name in wanted:
        cases = {"packing": packing_rows, "compile": compile_rows, "custom-op": custom_op_rows, "phi4": phi4_rows}
        rows += cases[name](args)
    print(_timing.markdown_table(rows, extra_columns=["tok/s", "padding", "peak ratio"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
