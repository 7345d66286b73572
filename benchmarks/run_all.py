"""Run every CPU benchmark, one after the other, each in its own process; print one markdown table per script.

    python benchmarks/run_all.py                  # the real sizes: under about 10 minutes on 2 quiet cores
    python benchmarks/run_all.py --quick          # tiny sizes: a smoke test of every script
    python benchmarks/run_all.py --out results.md # also write the tables to a file

``--scale`` adds benchmarks/bench_scale.py (real-size Phi-3-mini from a checkpoint on disk: long, ~8 GB in /tmp)
and ``--gpu`` adds benchmarks/bench_gpu.py (needs CUDA). Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_layers.py", "bench_phi3.py"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, few rounds: a smoke run of every script")
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds for every script (default: each script's)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every script")
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--scale", action="store_true", help="also run bench_scale.py (real-size Phi-3-mini on the CPU; long)"
    )
    p.add_argument("--gpu", action="store_true", help="also run bench_gpu.py (needs CUDA)")
    p.add_argument("--out", type=Path, default=None, help="also write the combined output to this markdown file")
    args = p.parse_args(argv)

    common: list[str] = []
    if args.quick:
        common.append("--quick")
    if args.threads:
        common += ["--threads", str(args.threads)]
    scripts = [
        (
            s,
            [
                *common,
                *(["--rounds", str(args.rounds)] if args.rounds else []),
                *(["--no-peak"] if args.no_peak else []),
            ],
        )
        for s in SCRIPTS
    ]
    if args.scale:
        scripts.append(
            (
                "bench_scale.py",
                [*(["--tiny"] if args.quick else []), *(["--threads", str(args.threads)] if args.threads else [])],
            )
        )
    if args.gpu:
        scripts.append(
            (
                "bench_gpu.py",
                [*(["--tiny"] if args.quick else []), *(["--rounds", str(args.rounds)] if args.rounds else [])],
            )
        )

    outputs, failed = [], []
    start = time.perf_counter()
    for script, flags in scripts:
        cmd = [sys.executable, str(HERE / script), *flags]
        print(f"$ {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - t0
        text = proc.stdout.rstrip() + f"\n\n({script}: {elapsed:.0f} s, exit {proc.returncode})\n"
        print(text, flush=True)
        outputs.append(text)
        if proc.returncode:
            failed.append(script)
    total = f"all benchmarks: {time.perf_counter() - start:.0f} s" + (
        f"; failed: {', '.join(failed)}" if failed else ""
    )
    print(total)
    if args.out:
        args.out.write_text("\n".join(outputs) + "\n" + total + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
