"""Shared helpers for the benchmarks: an interleaved timer, ratio statistics, a header, peak memory, tables.

Timing. :func:`interleaved` warms every implementation up, then runs ``rounds`` rounds; in each round every
implementation runs once, in an order shuffled by a seeded RNG, timed with ``time.perf_counter``. A slow spell
of the machine (another process, thermal throttling) then hits every implementation of that round alike.
:func:`ratio_stats` divides, round by round, an implementation's time by the baseline's time *of the same
round* and returns the median, min and max of those per-round ratios.

Peak memory. :func:`peak_in_subprocess` runs one case in a fresh Python process, so that nothing another
implementation allocated (or the allocator kept) is counted. The child (:func:`child_report`) records its
resident set size after its imports, builds the case, runs one warm-up step, frees what it can
(``gc.collect`` and glibc's ``malloc_trim``), resets the kernel's high-water mark (writing ``5`` to
``/proc/self/clear_refs`` sets ``VmHWM`` back to the current ``VmRSS``), runs the measured step and reads
``VmHWM``. It reports ``VmHWM - RSS after imports``: the case's weights, inputs, optimizer state and the step's
transient memory, but not the interpreter and libraries. ``ru_maxrss`` is not used: it is inherited across
``fork``/``exec`` and never reset. Where ``clear_refs`` cannot be written, a thread samples ``VmRSS`` every
millisecond instead (it can miss a short spike), and the report says so.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

__all__ = [
    "ROOT",
    "Stats",
    "Row",
    "interleaved",
    "ratio_stats",
    "median_ms",
    "header",
    "rss_bytes",
    "hwm_bytes",
    "PeakMeter",
    "child_report",
    "peak_in_subprocess",
    "markdown_table",
    "fmt_ratio",
    "optional_import",
]

MB = 2**20
PEAK_TAG = "PEAK_JSON "  # the child's result line on stdout


# ---------------------------------------------------------------------------------------------------------------
# Timing


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    seed: int = 0,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Time each callable ``rounds`` times, interleaved; return ``{name: [seconds per round]}``.

    Every callable first runs ``warmup`` times. Each round then runs every callable once, in an order drawn by
    ``random.Random(seed)``. ``sync`` (e.g. ``torch.cuda.synchronize``) is called before starting and before
    stopping each clock, so asynchronous device work is inside the measurement.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got rounds={rounds}")
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    rng = random.Random(seed)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            gc.collect()  # outside the clock: a collection triggered mid-step would land on one implementation
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


@dataclass(frozen=True)
class Stats:
    """Median, min and max of per-round ratios (or of any per-round values)."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        return cls(statistics.median(values), min(values), max(values))


def ratio_stats(times: Mapping[str, Sequence[float]], name: str, baseline: str) -> Stats:
    """Statistics of ``times[name][i] / times[baseline][i]`` over rounds ``i`` (same round, same conditions)."""
    return Stats.of([t / b for t, b in zip(times[name], times[baseline], strict=True)])


def median_ms(values: Sequence[float]) -> float:
    return 1e3 * statistics.median(values)


# ---------------------------------------------------------------------------------------------------------------
# Header


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def header(dtype: torch.dtype, device: str = "cpu") -> str:
    """One block of text: device (CPU model or GPU name), threads, dtype, torch and oracle versions, load."""
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})"
    else:
        dev = f"cpu ({_cpu_model()}, {os.cpu_count()} cores)"
    versions = [f"torch {torch.__version__}"] + [
        f"{d} {v}" for d in ("loralib", "peft", "transformers") if (v := _version(d)) is not None
    ]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"device: {dev} | torch threads: {torch.get_num_threads()} | dtype: {str(dtype).removeprefix('torch.')}\n"
        f"{' | '.join(versions)} | python {platform.python_version()} | load average at start: {load}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Memory (Linux /proc; see the module docstring)


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident set size now (``VmRSS``), or None off Linux."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def hwm_bytes() -> int | None:
    """This process's resident high-water mark (``VmHWM``), or None off Linux."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024


def _trim() -> None:
    gc.collect()
    try:  # return freed heap pages to the kernel, so the reset starts from what is really in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """``with PeakMeter() as m: ...`` then ``m.peak``: the largest RSS (bytes) inside the block; ``m.method`` says how.

    Uses ``VmHWM`` after a reset through ``/proc/self/clear_refs``; falls back to sampling ``VmRSS`` every
    millisecond from a thread (``method == "sampled"``), and to ``None`` where neither is available.
    """

    def __init__(self, interval_s: float = 1e-3) -> None:
        self.interval_s = interval_s
        self.peak: int | None = None
        self.method = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes()
            if rss is not None:
                self.peak = max(self.peak or 0, rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMeter:
        _trim()
        if _reset_hwm() and hwm_bytes() is not None:
            self.method = "clear_refs"
        elif rss_bytes() is not None:
            self.method = "sampled"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "clear_refs":
            self.peak = hwm_bytes()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = rss_bytes()
            self.peak = max(self.peak or 0, rss or 0)


def _prime() -> None:
    """Run tiny versions of the usual ops once, so one-time set-up (thread pools, BLAS/oneDNN state, the autograd
    engine) lands before the baseline RSS and is not counted as the case's memory."""
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    lin = torch.nn.Linear(16, 16)
    y = lin(torch.nn.functional.dropout(conv(x), 0.1)).sum()
    y.backward()
    torch.optim.AdamW(lin.parameters()).step()


def child_report(build: Callable[[], Callable[[], object]], warmup: int = 1, steps: int = 1) -> None:
    """The child side of :func:`peak_in_subprocess`: build a case, measure one step's peak, print the result.

    Call it after the imports the case needs. ``build()`` makes the case and returns the step callable.
    Prints one line ``PEAK_JSON {"peak_bytes": ..., "method": ...}`` where ``peak_bytes`` is the high-water mark
    during the measured steps minus the RSS before ``build()``.
    """
    _prime()
    _trim()
    rss0 = rss_bytes()
    step = build()
    for _ in range(warmup):
        step()
    with PeakMeter() as meter:
        for _ in range(steps):
            step()
    peak = None if meter.peak is None or rss0 is None else meter.peak - rss0
    print(PEAK_TAG + json.dumps({"peak_bytes": peak, "method": meter.method, "rss_after_imports": rss0}), flush=True)


@dataclass
class PeakResult:
    mb: float | None
    method: str
    error: str | None = None


def peak_in_subprocess(script: str | Path, args: Sequence[str], timeout_s: float = 600) -> PeakResult:
    """Run ``python script --child *args`` in a fresh process and return the peak it reports (MB)."""
    cmd = [sys.executable, str(script), "--child", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return PeakResult(None, "none", f"timed out after {timeout_s:.0f}s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PEAK_TAG):
            d = json.loads(line[len(PEAK_TAG) :])
            return PeakResult(None if d["peak_bytes"] is None else d["peak_bytes"] / MB, d["method"])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return PeakResult(None, "none", f"child exited {proc.returncode}: {' / '.join(tail)}")


# ---------------------------------------------------------------------------------------------------------------
# Results and tables


@dataclass
class Row:
    """One line of a results table. ``stats`` are ratios to the case's baseline (None for the baseline itself)."""

    case: str
    impl: str
    stats: Stats | None
    ms: float | None
    peak_mb: float | None = None
    target: str = ""
    met: bool | None = None
    extra: dict[str, str] = field(default_factory=dict)


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(rows: Iterable[Row], extra_columns: Sequence[str] = ()) -> str:
    """Columns: case | impl | median ratio | min | max | ms median | peak MB | *extra* | target | met?"""
    cols = ["case", "impl", "median ratio", "min", "max", "ms median", "peak MB", *extra_columns, "target", "met?"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        s = r.stats
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        cells = [
            r.case,
            r.impl,
            "1.00x (baseline)" if s is None and r.ms is not None else fmt_ratio(s.median if s else None),
            fmt_ratio(s.min if s else None),
            fmt_ratio(s.max if s else None),
            _fmt(r.ms, ".1f"),
            _fmt(r.peak_mb, ".0f"),
            *[r.extra.get(c, "") for c in extra_columns],
            r.target,
            met,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def optional_import(name: str):
    """``import name`` or None if it is not installed (an oracle the benchmark can skip)."""
    try:
        return __import__(name)
    except ImportError:
        return None


def add_common_args(p: argparse.ArgumentParser, rounds: int, quick_rounds: int, cases: Sequence[str]) -> None:
    """The flags every layer/model benchmark script takes (bench_layers.py, bench_phi3.py)."""
    p.add_argument("--quick", action="store_true", help="tiny sizes and few rounds: a seconds-long smoke run")
    p.add_argument(
        "--rounds", type=int, default=None, help=f"interleaved rounds (default {rounds}, quick {quick_rounds})"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; 1 with --quick)")
    p.add_argument("--cases", default=",".join(cases), help="comma-separated subset of: " + ", ".join(cases))
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    p.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)


def apply_common_args(args: argparse.Namespace, rounds: int, quick_rounds: int) -> None:
    """Thread count and round count from the common flags."""
    if args.quick and args.threads is None:
        args.threads = 1  # tiny ops on a shared machine: OpenMP's barriers would dominate with more threads
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (quick_rounds if args.quick else rounds)
