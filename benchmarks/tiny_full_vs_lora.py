"""LoRA against full fine-tuning on the built-in tiny Phi-3: held-out exact match per kind of fact, and wall time.

    python benchmarks/tiny_full_vs_lora.py                          # LoRA (the example's defaults) + full FT
    python benchmarks/tiny_full_vs_lora.py --runs lora full:3e-4    # pick runs: "lora[:lr]" or "full:lr"
    python benchmarks/tiny_full_vs_lora.py --seeds 0 1 2            # repeat each run with other seeds

Each run is ``python examples/finetune_phi3.py --config <json>`` in a fresh process, the example's defaults
changed only by ``output_dir``, ``seed``, ``learning_rate`` and, for full fine-tuning, ``full_finetune`` (so the
LoRA row with no lr is exactly the default run, and its wall time is the default run's). Afterwards this script
loads the run's weights (the adapter on the base, or the fully fine-tuned model) and regenerates the greedy reply to
every held-out question (``examples/data/world_chat_heldout.jsonl``) to count exact matches per kind of fact; its
overall exact match must equal the one the example reported, which checks that the two agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import lora
from lora.phi3 import Phi3ForCausalLM, encode_prompt, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune_phi3.py"
MODEL = ROOT / "examples" / "phi3-tiny"
HELDOUT = ROOT / "examples" / "data" / "world_chat_heldout.jsonl"
RUNS = ["lora", "full:1e-3", "full:3e-4", "full:1e-4"]


def run_example(spec: str, seed: int, work: Path) -> dict:
    """Run the example once; return its results.json plus the wall time and where its weights are."""
    kind, _, lr = spec.partition(":")
    if kind not in ("lora", "full") or (kind == "full" and not lr):
        raise ValueError(f"run spec must be 'lora', 'lora:LR' or 'full:LR', got {spec!r}")
    out = work / f"{spec.replace(':', '_')}-seed{seed}"
    training = {"output_dir": str(out), "seed": seed, "full_finetune": kind == "full"}
    if lr:
        training["learning_rate"] = float(lr)
    config = work / f"{out.name}.json"
    config.write_text(json.dumps({"training_config": training}))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--config", str(config)], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} seed {seed} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    return {"spec": spec, "seed": seed, "wall_s": wall, "out": out, "full": kind == "full", **results}


def load_trained(run: dict) -> Phi3ForCausalLM:
    if run["full"]:  # the fully fine-tuned weights: out/model/ (or out/ itself in older versions of the example)
        weights = run["out"] / "model" if (run["out"] / "model" / "config.json").is_file() else run["out"]
        return Phi3ForCausalLM.from_pretrained(weights)
    model = Phi3ForCausalLM.from_pretrained(MODEL)
    lora.load_lora(model, run["out"] / "adapter.safetensors")
    return model


@torch.no_grad()
def greedy_replies(
    model: Phi3ForCausalLM, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 32
) -> list[str]:
    """Greedy reply to each prompt (batched with left padding), decoded up to the first stop token."""
    model.eval()
    stops = list(tokenizer.stop_token_ids)
    out = []
    for i in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(p, tokenizer) for p in prompts[i : i + batch_size]]
        T = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), T), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, e in enumerate(encoded):
            ids[b, T - len(e) :], mask[b, T - len(e) :] = torch.tensor(e), 1
        generated = model.generate(ids, max_new_tokens, attention_mask=mask, eos_token_id=stops)[:, T:]
        for row in generated.tolist():
            end = next((j for j, t in enumerate(row) if t in stops), len(row))
            out.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return out


def per_kind(model: Phi3ForCausalLM, tokenizer, questions: list[dict]) -> tuple[dict[str, tuple[int, int]], float]:
    """{attribute: (exact matches, questions)} and the overall exact match of the greedy replies."""
    prompts = [q["messages"][:-1] for q in questions]  # each held-out record is one question + its answer
    replies = greedy_replies(model, tokenizer, prompts)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for q, reply in zip(questions, replies):
        counts[q["attribute"]][0] += reply == q["messages"][-1]["content"].strip()
        counts[q["attribute"]][1] += 1
    hits = sum(c[0] for c in counts.values())
    return {k: (c[0], c[1]) for k, c in counts.items()}, hits / len(questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=RUNS, help="'lora', 'lora:LR' or 'full:LR' (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, fp32, {torch.get_num_threads()} threads per run, load average {load:.2f} at start"
    )
    tokenizer = load_tokenizer(MODEL)
    questions = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    kinds = list(dict.fromkeys(q["attribute"] for q in questions))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for spec in args.runs:
                run = run_example(spec, seed, Path(tmp))
                counts, exact = per_kind(load_trained(run), tokenizer, questions)
                reported = run["after"]["qa"]["exact_match"]
                if abs(exact - reported) > 1e-9:
                    raise RuntimeError(
                        f"{spec} seed {seed}: regenerated exact match {exact:.4f} != reported {reported:.4f}"
                    )
                rows.append(
                    {
                        "run": spec,
                        "seed": seed,
                        "wall_s": round(run["wall_s"], 1),
                        "before": run["before"]["qa"]["exact_match"],
                        "exact_match": exact,
                        "eval_loss": run["after"]["eval_loss"],
                        "per_kind": counts,
                    }
                )
                print(f"  {spec} seed {seed}: {exact:.1%} in {run['wall_s']:.0f} s", flush=True)

    header = ["run", "seed", "before", "after", *kinds, "eval loss", "wall s"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        cells = [
            r["run"],
            str(r["seed"]),
            f"{r['before']:.1%}",
            f"**{r['exact_match']:.1%}**",
            *(f"{r['per_kind'][k][0]}/{r['per_kind'][k][1]}" for k in kinds),
            f"{r['eval_loss']:.4f}",
            f"{r['wall_s']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")
    for seed in args.seeds:
        by_run = {r["run"]: r["exact_match"] for r in rows if r["seed"] == seed}
        full = [v for k, v in by_run.items() if k.startswith("full")]
        for name, value in by_run.items():
            if name.startswith("lora") and full:
                print(f"seed {seed}: {name} - best full fine-tuning = {100 * (value - max(full)):+.1f} points")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
