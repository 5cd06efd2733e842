"""BatchNorm shapes outside the main suite, where per-channel work and layout, not memory
bandwidth, decide: few rows of many channels ((N, C) with small N), NCHW planes shorter than a
vector step (2 x 2, 3 x 3, (N, C, L) of small L), channels-last rows of few channels. The raw ops
below autograd (normext::batch_norm_fwd / _bwd against aten::native_batch_norm / _backward),
microseconds per call, medians over rounds in which the two providers alternate.

    python benchmarks/bench_small_bn.py [--dtype float32|bfloat16] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import normext  # noqa: F401  (registers torch.ops.normext)

# (shape, channels_last)
CASES = [
    ((2, 4096), False),
    ((8, 4096), False),
    ((4, 8192), False),
    ((2, 32768), False),
    ((2, 2048, 2, 2), False),
    ((2, 1024, 3, 3), False),
    ((16, 512, 3, 3), False),
    ((32, 256, 3), False),
    ((128, 128, 2, 2), False),
    ((256, 32, 3), False),
    ((32, 3, 32, 32), True),
    ((4, 8, 64, 64), True),
    ((1, 2, 224, 224), True),
]


def per_call(f, calls: int = 5) -> float:
    f()
    t = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t) / calls * 1e6


def run_case(shape, channels_last: bool, dtype: torch.dtype, rounds: int) -> dict[str, float]:
    c = shape[1]
    x, dy = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    w, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    nx, aten = torch.ops.normext, torch.ops.aten
    _, sm, si, _ = nx.batch_norm_fwd(x, w, b, rm, rv, True, 1e-5)
    _, tsm, tsi = aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
    fns = {
        "fwd": (lambda: nx.batch_norm_fwd(x, w, b, rm, rv, True, 1e-5),
                lambda: aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)),
        "bwd": (lambda: nx.batch_norm_bwd(dy, x, w, sm, si, True, [True] * 3),
                lambda: aten.native_batch_norm_backward(
                    dy, x, w, None, None, tsm, tsi, True, 1e-5, [True] * 3)),
        "eval": (lambda: nx.batch_norm_fwd(x, w, b, rm, rv, False, 1e-5),
                 lambda: aten.native_batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5)),
    }
    times = {(m, p): [] for m in fns for p in ("normext", "torch")}
    for r in range(rounds):
        for m, pair in fns.items():
            order = [("normext", pair[0]), ("torch", pair[1])]
            for p, f in order if r % 2 == 0 else order[::-1]:
                times[(m, p)].append(per_call(f))
    return {f"{m}-{p}": statistics.median(v) for (m, p), v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; "
          "us per call, normext / torch (speedup)")
    with torch._C._AutoDispatchBelowADInplaceOrView():  # the kernels, not autograd's wrappers
        for shape, cl in CASES:
            r = run_case(shape, cl, dtype, args.rounds)
            cells = [
                f"{m} {r[m + '-normext']:7.1f} / {r[m + '-torch']:7.1f} "
                f"({r[m + '-torch'] / r[m + '-normext']:4.2f}x)"
                for m in ("fwd", "bwd", "eval")
            ]
            name = f"{shape}{' channels_last' if cl else ''}"
            print(f"{name:32s} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
