"""Per-call cost of small normalizations, where host overhead (Python, dispatcher, autograd,
thread-pool wake-ups, allocation of scratch) outweighs the arithmetic: normext vs torch eager,
microseconds per call, the minimum over several timed blocks of calls, interleaved.

    python benchmarks/bench_overhead.py [--device cuda] [--calls 2000]

Modes: fwd (no grad), full (forward with grad, then autograd.grad). On CUDA each block ends
with a synchronize, so the numbers include the kernels' time.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import normext.functional as NF

CASES = [
    ("batch_norm", (8, 16, 4, 4)),
    ("batch_norm", (8, 16)),
    ("batch_norm", (32, 64, 8, 8)),
    ("layer_norm", (8, 64)),
    ("layer_norm", (64, 768)),
]


def make(op: str, shape: tuple[int, ...], device: str, lib):
    x = torch.randn(shape, device=device, requires_grad=True)
    c = shape[1] if op == "batch_norm" else shape[-1]
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    dy = torch.randn(shape, device=device)
    if op == "batch_norm":
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)

        def fwd():
            return lib.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    else:

        def fwd():
            return lib.layer_norm(x, (c,), w, b, 1e-5)

    def fwd_nograd():
        with torch.no_grad():
            return fwd()

    return {"fwd": fwd_nograd, "full": lambda: torch.autograd.grad(fwd(), [x, w, b], dy)}


def per_call_us(fn, calls: int, device: str) -> float:
    def block() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls * 1e6

    block()  # warm-up
    return min(block() for _ in range(5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    print(f"{'op':<11} {'shape':<14} {'mode':<5} {'normext us':>11} {'torch us':>9} {'torch/normext':>14}")
    for op, shape in CASES:
        ours, theirs = make(op, shape, args.device, NF), make(op, shape, args.device, F)
        for mode in ("fwd", "full"):
            # interleaved: each library's best block of calls, alternating
            a = b = float("inf")
            for _ in range(2):
                a = min(a, per_call_us(ours[mode], args.calls, args.device))
                b = min(b, per_call_us(theirs[mode], args.calls, args.device))
            shape_s = "x".join(map(str, shape))
            print(f"{op:<11} {shape_s:<14} {mode:<5} {a:>11.1f} {b:>9.1f} {b / a:>13.2f}x")


if __name__ == "__main__":
    main()
