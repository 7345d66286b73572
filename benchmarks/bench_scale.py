"""Real-size Phi-3-mini-4k (3.8B parameters, bf16, random weights) on the CPU: load a sharded checkpoint from disk,
then train LoRA with gradient checkpointing. Reports load time, peak resident memory against the weight bytes, seconds
per step and peak memory while training.

    python benchmarks/bench_scale.py                 # ~8 GB written to a temporary directory, minutes per step
    python benchmarks/bench_scale.py --tiny          # a tiny config: a smoke test of the whole path
    python benchmarks/bench_scale.py --dir CKPT      # reuse (or create and keep) a checkpoint directory
    python benchmarks/bench_scale.py --impl both     # also transformers' from_pretrained, for comparison

The checkpoint has Hugging Face's layout (``config.json``, ``model-0000k-of-0000n.safetensors``,
``model.safetensors.index.json``) with shards of at most 5 GB, like the published Phi-3-mini-4k (two shards). Each
shard is streamed to disk one tensor at a time (a shard built in memory and passed to ``safetensors.torch.save_file``
would be held twice, ~10 GB). The pages written are dropped from the page cache (``posix_fadvise``), so the load
reads the disk. Loading and training run in a fresh process; memory is that process's ``VmHWM`` (see _timing.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import _impls
import _timing

R, ALPHA, DROPOUT = 16, 32, 0.05
TOKENS = 512
STEPS = 3
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size "5GB"
LOAD_TARGET = 1.10  # peak RSS during the load, over the weight bytes
TRAIN_TARGET_GIB = 11.0  # peak RSS of the whole process while training
# QLoRA (issue 11): the load's peak RSS (whole process) <= 1.3x the NF4 model's bytes + 1 GiB, training <= 3.5 GiB,
# a step <= 1.3x the bf16 LoRA step (--quantize both measures the two one after the other)
NF4_LOAD_FACTOR, NF4_LOAD_EXTRA = 1.3, 2**30
NF4_TRAIN_TARGET_GIB = 3.5
NF4_STEP_TARGET = 1.3
TINY = _impls.phi3_config_dict(hidden=256, layers=2, heads=4, intermediate=512, vocab=1024)
TINY_TOKENS = 64
GiB = 2**30
RESULT_TAG = "SCALE_JSON "


# ---------------------------------------------------------------------------------------------------------------
# Writing the checkpoint


def weight_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """transformers' Phi-3 parameter names and shapes, in file order."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    qkv = h + 2 * cfg["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.qkv_proj.weight", (qkv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_up_proj.weight", (2 * inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_shard(path: Path, items: list[tuple[str, tuple[int, ...]]], gen: torch.Generator, std: float) -> None:
    """A safetensors file (8-byte header length, JSON header, raw little-endian data), one bf16 tensor at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in items:
        size = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in items:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=gen)
            f.write(t.view(torch.uint8).numpy().data)  # (..., n) bf16 -> (..., 2n) bytes, no copy
            del t
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the load should read the disk


def write_checkpoint(directory: Path, cfg: dict[str, Any], shard_bytes: int = SHARD_BYTES) -> int:
    """Write config.json, the shards and the index into ``directory``; return the total weight bytes."""
    shapes = weight_shapes(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(2 * _numel(s) for _, s in shapes)
    free = shutil.disk_usage(directory).free
    if free < total * 1.05:
        raise SystemExit(f"{directory}: {free / GiB:.1f} GiB free, the checkpoint needs {total / GiB:.1f} GiB")
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, items in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        print(f"  writing {fname} ({sum(2 * _numel(s) for _, s in items) / GiB:.2f} GiB)", file=sys.stderr, flush=True)
        _write_shard(directory / fname, items, gen, cfg.get("initializer_range", 0.02))
        weight_map.update({name: fname for name, _ in items})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (directory / "config.json").write_text(
        json.dumps(
            {**cfg, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "torch_dtype": "bfloat16"}, indent=2
        ),
        encoding="utf-8",
    )
    return total


# ---------------------------------------------------------------------------------------------------------------
# The measured process


def child(directory: Path, impl: str, steps: int, tokens: int, quantize: str | None = None) -> None:
    """Load, inject LoRA, train; print one ``SCALE_JSON {...}`` line."""
    if impl == "transformers":
        from transformers import Phi3ForCausalLM

        def load() -> torch.nn.Module:
            return Phi3ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    else:
        cls, _, why = _impls.our_phi3()
        if cls is None:
            raise SystemExit(why)

        def load() -> torch.nn.Module:
            if quantize:  # QLoRA: each linear weight quantized as it is read
                return cls.from_pretrained(directory, dtype=torch.bfloat16, quantize=quantize)
            return cls.from_pretrained(directory, dtype=torch.bfloat16)

    index = json.loads((directory / "model.safetensors.index.json").read_text(encoding="utf-8"))
    weight_bytes = index["metadata"]["total_size"]
    _timing._trim()
    rss0 = _timing.rss_bytes() or 0
    with _timing.PeakMeter() as load_meter:
        t0 = time.perf_counter()
        model = load()
        load_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "impl": impl,
        "quantize": quantize,
        "weight_bytes": weight_bytes,
        "load_s": load_s,
        "rss_before_load": rss0,
        "load_peak": load_meter.peak,
        "method": load_meter.method,
        # what the loaded model holds (parameters and buffers: the NF4 codes and statistics of a 4-bit model)
        "model_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
    }

    lora_names = __import__("lora").phi3.inject(model, r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT)
    out["gradient_checkpointing"] = _impls.gradient_checkpointing(model)
    model.train()
    out["lora_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["lora_layers"] = len(lora_names)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    step = _impls.model_train_step(model, ids)
    times, losses = [], []
    with _timing.PeakMeter() as train_meter:
        for i in range(steps):
            t0 = time.perf_counter()
            losses.append(float(step()))
            times.append(time.perf_counter() - t0)
            print(f"  step {i + 1}/{steps}: {times[-1]:.1f} s, loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    out.update(step_s=times, losses=losses, train_peak=train_meter.peak, final_hwm=_timing.hwm_bytes())
    print(RESULT_TAG + json.dumps(out), flush=True)


def run_child(directory: Path, impl: str, args: argparse.Namespace, quantize: str | None) -> dict[str, Any] | None:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(directory),
        "--impl",
        impl,
        "--steps",
        str(args.steps),
        "--tokens",
        str(args.tokens),
    ]
    cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--quantize", quantize] if quantize else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=_timing.ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    print(f"{impl}: the measured process exited {proc.returncode} without a result:\n{proc.stdout[-2000:]}")
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


def seconds_per_step(res: dict[str, Any]) -> float:
    steady = res["step_s"][1:] or res["step_s"]  # the first step is warm-up
    return sorted(steady)[len(steady) // 2]


def report(res: dict[str, Any], tokens: int, tiny: bool, bf16_step_s: float | None = None) -> str:
    w = res["weight_bytes"]
    load_delta = (res["load_peak"] or 0) - res["rss_before_load"]
    load_ratio = load_delta / w
    s_per_step = seconds_per_step(res)
    train_gib = (res["train_peak"] or 0) / GiB
    name = "this library" if res["impl"] == "ours" else "transformers"
    if res.get("quantize"):
        return report_nf4(res, tokens, tiny, bf16_step_s)
    rows = [
        ("weights in the checkpoint (bf16)", _size(w), "", ""),
        (
            "model in memory after the load" + (f" ({res['quantize']})" if res.get("quantize") else ""),
            _size(res.get("model_bytes") or 0),
            "",
            "",
        ),
        (f"load time ({name} from_pretrained)", f"{res['load_s']:.1f} s", "", ""),
        (
            "peak RSS during load, over RSS before it",
            f"{_size(load_delta)} = {load_ratio:.2f}x the weights",
            f"<= {LOAD_TARGET:.2f}x",
            "yes" if load_ratio <= LOAD_TARGET else "**no**",
        ),
        ("LoRA", f"{res['lora_layers']} layers, {res['lora_params']:,} trainable parameters, r={R}", "", ""),
        ("gradient checkpointing", "on" if res["gradient_checkpointing"] else "not available", "", ""),
        (
            f"seconds per step (batch 1 x {tokens})",
            f"{s_per_step:.1f} s (all steps: " + ", ".join(f"{t:.1f}" for t in res["step_s"]) + ")",
            "",
            "",
        ),
        ("tokens/s", f"{tokens / s_per_step:.1f}", "", ""),
        (
            "peak RSS while training (whole process)",
            _size(res["train_peak"] or 0),
            f"<= {TRAIN_TARGET_GIB:.0f} GiB",
            "yes" if train_gib <= TRAIN_TARGET_GIB else "**no**",
        ),
        ("losses", ", ".join(f"{x:.4f}" for x in res["losses"]), "", ""),
    ]
    if tiny:  # fixed costs dominate a tiny model: the targets are for the real size
        rows = [(a, b, "", "") for a, b, _, _ in rows]
    lines = ["| metric | value | target | met? |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def report_nf4(res: dict[str, Any], tokens: int, tiny: bool, bf16_step_s: float | None) -> str:
    """The QLoRA rows: the load against the 4-bit model's own bytes, training memory, the step against bf16's."""
    model_bytes = res["model_bytes"]
    load_peak = res["load_peak"] or 0
    load_limit = NF4_LOAD_FACTOR * model_bytes + NF4_LOAD_EXTRA
    train_peak = res["train_peak"] or 0
    s_per_step = seconds_per_step(res)
    step_ratio = s_per_step / bf16_step_s if bf16_step_s else None
    rows = [
        ("weights in the checkpoint (bf16)", _size(res["weight_bytes"]), "", ""),
        ("model in memory after the load (NF4 linears; embeddings, norms, head bf16)", _size(model_bytes), "", ""),
        ("load time (from_pretrained, quantize='nf4')", f"{res['load_s']:.1f} s", "", ""),
        (
            "peak RSS during the load, whole process",
            f"{_size(load_peak)} (RSS before the load: {_size(res['rss_before_load'])})",
            f"<= 1.3 x {_size(model_bytes)} + 1 GiB = {_size(int(load_limit))}",
            "yes" if load_peak <= load_limit else "**no**",
        ),
        ("LoRA", f"{res['lora_layers']} layers, {res['lora_params']:,} trainable parameters, r={R}", "", ""),
        ("gradient checkpointing", "on" if res["gradient_checkpointing"] else "not available", "", ""),
        (
            f"seconds per step (batch 1 x {tokens})",
            f"{s_per_step:.1f} s (all steps: " + ", ".join(f"{t:.1f}" for t in res["step_s"]) + ")",
            "",
            "",
        ),
        (
            "step time over the bf16 LoRA step (same command, run just before)",
            f"{step_ratio:.2f}x" if step_ratio else "not measured (use --quantize both)",
            f"<= {NF4_STEP_TARGET}x",
            "" if step_ratio is None else ("yes" if step_ratio <= NF4_STEP_TARGET else "**no**"),
        ),
        (
            "peak RSS while training, whole process",
            _size(train_peak),
            f"<= {NF4_TRAIN_TARGET_GIB} GiB",
            "yes" if train_peak <= NF4_TRAIN_TARGET_GIB * GiB else "**no**",
        ),
        ("losses", ", ".join(f"{x:.4f}" for x in res["losses"]), "", ""),
    ]
    if tiny:
        rows = [(a, b, "", "") for a, b, _, _ in rows]
    lines = ["| metric | value | target | met? |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="a tiny config (seconds): a smoke test")
    p.add_argument("--dir", type=Path, default=None, help="checkpoint directory to reuse, or to create and keep")
    p.add_argument(
        "--impl",
        choices=["ours", "transformers", "both"],
        default="ours",
        help="whose from_pretrained loads the checkpoint (LoRA is this library's in every case)",
    )
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS}; the first is warm-up)")
    p.add_argument(
        "--tokens", type=int, default=None, help=f"sequence length, batch 1 (default {TOKENS}, tiny {TINY_TOKENS})"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--quantize",
        choices=["nf4", "both"],
        default=None,
        help="ours only: load with quantize='nf4' (QLoRA), or 'both': bf16 then nf4, and the step-time ratio "
        "(default: bf16 only)",
    )
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.tokens = args.tokens or (TINY_TOKENS if args.tiny else TOKENS)
    if args.child:
        child(args.child, args.impl, args.steps, args.tokens, args.quantize)
        return 0

    cfg = TINY if args.tiny else _impls.PHI3_MINI
    print("## bench_scale: Phi-3-mini-4k from a sharded checkpoint, LoRA with gradient checkpointing\n")
    print(_timing.header(torch.bfloat16))
    print(
        f"config: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, intermediate "
        f"{cfg['intermediate_size']}, vocab {cfg['vocab_size']}{' (--tiny)' if args.tiny else ''}; LoRA r={R}, "
        f"alpha {ALPHA}, dropout {DROPOUT} on qkv/o/gate_up/down; AdamW\n"
    )
    impls = ["ours", "transformers"] if args.impl == "both" else [args.impl]
    if "ours" in impls and _impls.our_phi3()[0] is None:
        print(f"{_impls.our_phi3()[2]}; measuring transformers' from_pretrained instead\n")
        impls = ["transformers"]

    tmp = None
    directory = args.dir
    if directory is None:
        tmp = tempfile.mkdtemp(prefix="phi3-scale-")
        directory = Path(tmp)
    try:
        if not (directory / "model.safetensors.index.json").is_file():
            t0 = time.perf_counter()
            print(f"writing the checkpoint to {directory} ...", file=sys.stderr, flush=True)
            total = write_checkpoint(directory, cfg, SHARD_BYTES if not args.tiny else 2**20)
            print(f"checkpoint: {total / GiB:.2f} GiB written in {time.perf_counter() - t0:.0f} s to {directory}\n")
        else:
            print(f"checkpoint: reusing {directory}\n")
        failed = False
        runs = [(impl, None if args.quantize == "both" else args.quantize) for impl in impls]
        if args.quantize == "both":
            runs.append(("ours", "nf4"))
        bf16_step_s = None
        for impl, quantize in runs:
            print(f"loading and training with {impl} ({quantize or 'bf16'}) ...", file=sys.stderr, flush=True)
            res = run_child(directory, impl, args, quantize)
            if res is None:
                failed = True
                continue
            if quantize is None and impl == "ours":
                bf16_step_s = seconds_per_step(res)
            print(f"### {impl} from_pretrained{', ' + quantize if quantize else ''} (memory: {res['method']})\n")
            print(report(res, args.tokens, args.tiny, bf16_step_s) + "\n")
        return 1 if failed else 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
