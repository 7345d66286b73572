"""Where the time of a LoRA layer's training step goes: its sub-operations timed one by one, interleaved.

Issue 21's profile of the layers above or near their targets: ``Conv2d`` 64 -> 64, k=3, r=8 on 16 x 64 x 56 x 56
(what the fused conv runs, and the alternatives measured for it), the dropout path of ``Linear`` 3072, r=16,
4096 tokens, p=0.05 (what it costs next to the frozen layer's two GEMMs), and the fused qkv 1024 -> 3 x 1024 with
q and v adapted (r=16 each), p=0.05, 4096 tokens: each product of the fused path's per-slice bookkeeping, and the
whole step of both layers for a check that the parts add up. Every sub-operation runs once per
round, in a shuffled order; the table gives the median and min over rounds, and each median over the frozen
layer's forward GEMM/conv of the same rounds.

    python benchmarks/profile_layers.py                       # all three, torch's threads, wall-clock time
    python benchmarks/profile_layers.py --threads 1 --cpu-time   # one thread, CPU time of that thread

``--cpu-time`` (with one thread only) times each operation by the CPU time of the calling thread, which a
competing process on a shared machine disturbs far less than the wall clock (it still shares caches and memory
bandwidth).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import _timing  # noqa: F401  (puts the checkout on sys.path)
from _timing import header
from lora.functional import _masked_chunks, dropout_positions, fused_lora_linear

CONV = dict(batch=16, channels=64, size=56, r=8)
LINEAR = dict(tokens=4096, hidden=3072, r=16, p=0.05)
QKV = dict(tokens=4096, hidden=1024, r=16, p=0.05)  # q and v adapted: slices 0 and 2 of 3


def conv_ops() -> dict[str, Callable[[], object]]:
    n, c, s, r = CONV["batch"], CONV["channels"], CONV["size"], CONV["r"]
    torch.manual_seed(0)
    x, g = torch.randn(n, c, s, s), torch.randn(n, c, s, s)
    W, A, B = torch.randn(c, c, 3, 3) * 0.05, torch.randn(r, c, 3, 3) * 0.05, torch.randn(c, r) * 0.05
    A16 = torch.cat([A, A.new_zeros(16 - r, c, 3, 3)])  # padded to 16 filters, as lora.functional runs it
    gh = torch.randn(n, r, s, s)
    cl = torch.channels_last
    x_cl, A_cl = x.contiguous(memory_format=cl), A.contiguous(memory_format=cl)
    g3 = g.flatten(2)
    args = dict(
        bias_sizes=None, stride=[1, 1], padding=[1, 1], dilation=[1, 1], transposed=False, output_padding=[0, 0]
    )

    def h_padded():
        return F.conv2d(x, A16, None, 1, 1)[:, :r]

    def backward(grad, weight, mask):
        return torch.ops.aten.convolution_backward(grad, x, weight, output_mask=mask, groups=1, **args)

    return {
        "conv: frozen forward, conv(x, W) [reference]": lambda: F.conv2d(x, W, None, 1, 1),
        "conv: frozen backward, input gradient": lambda: backward(g, W, [True, False, False]),
        "conv: A's responses h = conv(x, A), A padded to 16 filters (used)": h_padded,
        "conv: h through the r filters unpadded": lambda: F.conv2d(x, A, None, 1, 1),
        "conv: h in channels_last, x converted first": lambda: F.conv2d(
            x.contiguous(memory_format=cl), A_cl, None, 1, 1
        ),
        "conv: h in channels_last, x already so": lambda: F.conv2d(x_cl, A_cl, None, 1, 1),
        "conv: x to channels_last (copy)": lambda: x.contiguous(memory_format=cl),
        "conv: A's weight gradient, r channels (used)": lambda: backward(gh, A, [False, True, False]),
        "conv: full weight gradient dW (loralib's)": lambda: backward(g, W, [False, True, False]),
        "conv: gh = s B^T g": lambda: torch.matmul(B.T * 2.0, g3),
        "conv: grad_B = s g h^T": lambda: torch.bmm(g3, gh.flatten(2).transpose(1, 2)).sum(0),
        "conv: merged filters W + s B A": lambda: torch.add(W, (B @ A.flatten(1)).view_as(W), alpha=2.0),
    }


def linear_ops() -> dict[str, Callable[[], object]]:
    n, d, r, p = LINEAR["tokens"], LINEAR["hidden"], LINEAR["r"], LINEAR["p"]
    torch.manual_seed(0)
    x, g = torch.randn(n, d), torch.randn(n, d)
    W, A, gh = torch.randn(d, d) * 0.01, torch.randn(r, d) * 0.01, torch.randn(n, r)
    pos = dropout_positions(x.numel(), p, dtype=torch.int32)

    def h_dropout() -> torch.Tensor:
        h = torch.empty(n, r)
        for start, stop, chunk in _masked_chunks(x, pos, x.dtype):
            torch.mm(chunk, A.T, out=h[start:stop])
        return h

    def grad_a_dropout() -> torch.Tensor:
        grad = torch.zeros(r, d)
        for start, stop, chunk in _masked_chunks(x, pos, x.dtype):
            torch.addmm(grad, gh[start:stop].T, chunk, out=grad)
        return grad

    def grad_x_zero_dropped() -> torch.Tensor:
        t = torch.mm(gh, A)
        t.view(-1)[pos] = 0
        return t

    return {
        "linear: frozen forward GEMM x W^T [reference]": lambda: x @ W.T,
        "linear: frozen backward GEMM g W": lambda: g @ W,
        "linear: dropout positions (n p of n)": lambda: dropout_positions(x.numel(), p, dtype=torch.int32),
        "linear: h = x A^T, no dropout": lambda: x @ A.T,
        "linear: h = dropout(x) A^T, masked chunks": h_dropout,
        "linear: grad_A = gh^T x, no dropout": lambda: gh.T @ x,
        "linear: grad_A = gh^T dropout(x), masked chunks": grad_a_dropout,
        "linear: grad_x LoRA term gh A": lambda: torch.mm(gh, A),
        "linear: grad_x LoRA term, dropped entries zeroed": grad_x_zero_dropped,
    }


def qkv_ops() -> dict[str, Callable[[], object]]:
    n, d, r, p = QKV["tokens"], QKV["hidden"], QKV["r"], QKV["p"]
    torch.manual_seed(0)
    x, g = torch.randn(n, d), torch.randn(n, 3 * d)
    W = torch.randn(3 * d, d) * 0.01
    A, B = torch.randn(2 * r, d) * 0.01, torch.randn(2 * d, r) * 0.01  # rows of A and B: q's, then v's
    blocks = ((0, d, 0, 0), (2 * d, d, d, r))  # (output column, columns, first row of B, first row of A)
    pos = dropout_positions(x.numel(), p, dtype=torch.int32)
    h, gh, out = torch.randn(n, 2 * r), torch.randn(n, 2 * r), x @ W.T
    xg, Wg, Ag, Bg = (t.clone().requires_grad_() for t in (x, W, A, B))
    Wg.requires_grad_(False)

    def h_dropout() -> torch.Tensor:
        h = torch.empty(n, 2 * r)
        for start, stop, chunk in _masked_chunks(x, pos, x.dtype):
            torch.mm(chunk, A.T, out=h[start:stop])  # (rows, in) @ (in, 2r)
        return h

    def out_slices() -> None:
        for col, size, b_row, a_row in blocks:  # (N, r) @ (r, size) into the slice's columns
            out[:, col : col + size].addmm_(h[:, a_row : a_row + r], B[b_row : b_row + size].T)

    def gh_slices() -> torch.Tensor:
        t = torch.empty(n, 2 * r)
        for col, size, b_row, a_row in blocks:  # (N, size) @ (size, r)
            torch.mm(g[:, col : col + size], B[b_row : b_row + size], out=t[:, a_row : a_row + r])
        return t

    def grad_b_slices() -> torch.Tensor:
        t = torch.empty(2 * d, r)
        for col, size, b_row, a_row in blocks:  # (size, N) @ (N, r)
            torch.mm(g[:, col : col + size].T, h[:, a_row : a_row + r], out=t[b_row : b_row + size])
        return t

    def grad_a_dropout() -> torch.Tensor:
        grad = torch.zeros(2 * r, d)
        for start, stop, chunk in _masked_chunks(x, pos, x.dtype):
            torch.addmm(grad, gh[start:stop].T, chunk, out=grad)  # (2r, rows) @ (rows, in)
        return grad

    def grad_x_lora() -> torch.Tensor:
        t = torch.mm(gh, A)  # (N, 2r) @ (2r, in)
        t.view(-1)[pos] = 0
        return torch.addmm(t, g, W, out=t)  # the frozen input gradient accumulated into it

    def frozen_step() -> None:
        xg.grad = None
        (xg @ Wg.T).backward(g)

    def lora_step() -> None:
        xg.grad = Ag.grad = Bg.grad = None
        fused_lora_linear(xg, Wg.T, None, Ag, Bg, 2.0, p, blocks, r).backward(g)

    return {
        "qkv: frozen forward GEMM x W^T [reference]": lambda: x @ W.T,
        "qkv: frozen backward GEMM g W": lambda: g @ W,
        "qkv: dropout positions (n p of n)": lambda: dropout_positions(x.numel(), p, dtype=torch.int32),
        "qkv: h = dropout(x) A^T, 2 x 16 ranks, masked chunks": h_dropout,
        "qkv: out[:, slice] += h_i B_i^T, 2 slices": out_slices,
        "qkv: gh_i = g[:, slice] B_i, 2 slices": gh_slices,
        "qkv: grad_B_i = g[:, slice]^T h_i, 2 slices": grad_b_slices,
        "qkv: grad_A = gh^T dropout(x), masked chunks": grad_a_dropout,
        "qkv: grad_x = gh A, dropped zeroed, + g W in place": grad_x_lora,
        "qkv: whole frozen step (forward, input gradient)": frozen_step,
        "qkv: whole LoRA step (fused_lora_linear forward + backward)": lora_step,
    }


def run(ops: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    for fn in ops.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in ops}
    names, rng = list(ops), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            t0 = clock()
            ops[name]()
            times[name].append(clock() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true", help="time by the thread's CPU time (needs --threads 1)")
    p.add_argument(
        "--cases", default="conv,linear,qkv", help="comma-separated subset of: conv, linear, qkv (default: all)"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and torch.get_num_threads() != 1:
        p.error("--cpu-time needs --threads 1: other threads' CPU time would not be counted")
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases = {"conv": conv_ops, "linear": linear_ops, "qkv": qkv_ops}
    if set(wanted) - set(cases):
        p.error(f"unknown cases {sorted(set(wanted) - set(cases))}")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print("## profile_layers: sub-operations of a LoRA layer's training step\n")
    print(header(torch.float32))
    print(f"rounds: {args.rounds} interleaved | clock: {'thread CPU time' if args.cpu_time else 'wall'}\n")
    print("| operation | ms median | ms min | / reference |")
    print("|---|---|---|---|")
    for case in wanted:
        times = run(cases[case](), args.rounds, clock)
        ref = next(v for k, v in times.items() if k.endswith("[reference]"))
        for name, ts in times.items():
            share = statistics.median(a / b for a, b in zip(ts, ref))
            print(f"| {name} | {statistics.median(ts) * 1e3:.2f} | {min(ts) * 1e3:.2f} | {share:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
