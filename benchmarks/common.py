"""Shared benchmark machinery: CLI flags, timing, byte counts, the plain-copy bandwidth, the
mode runner (fwd / bwd / full), the printed table and the CSV in benchmarks/results/."""

from __future__ import annotations

import argparse
import csv
import math
import re
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = [
    "op",
    "mode",
    "shape",
    "dtype",
    "layout",
    "provider",
    "ms",
    "gbps",
    "device",
    "torch_version",
    "commit",
]
MODES = ("fwd", "bwd", "full")
BLOCK = 4  # CPU: consecutive calls per provider in a timing block (see time_ms)
FAULTS: list[float] = []  # minor page faults per call of each fn in the last CPU time_ms
PAGE_FAULTS: dict[tuple, float] = {}  # (op, mode, shape, dtype, layout, provider) -> faults/call
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: str
    layout: str


# ---- CLI ----------------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every bench script shares; scripts add their own (e.g. --layouts)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default="fp32,bf16", help="comma list of " + ",".join(DTYPES))
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd,bwd,full")
    p.add_argument("--shapes", help="comma list of shapes like 4096x1024 (default: the suite)")
    p.add_argument("--quick", action="store_true", help="first shape only, short timing budget")
    p.add_argument("--compile", action="store_true", help="add torch.compile as a provider")
    p.add_argument(
        "--budget", type=float, default=0.3, help="seconds of timed reps per measurement"
    )
    p.add_argument("--no-csv", action="store_true", help="print only, do not append to the CSV")
    return p


def split(arg: str) -> list[str]:
    return [s.strip() for s in arg.split(",") if s.strip()]


def parse_shapes(arg: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in s.split("x")) for s in split(arg)]


def check_args(args: argparse.Namespace) -> None:
    bad = [d for d in split(args.dtype) if d not in DTYPES] + [
        m for m in split(args.modes) if m not in MODES
    ]
    if bad:
        raise SystemExit(f"unknown dtype/mode: {', '.join(bad)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.quick:
        args.budget = min(args.budget, 0.05)


# ---- timing and bytes ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    budget_s: float = 0.3,
    min_reps: int = 5,
    max_reps: int = 200,
) -> list[float]:
    """Median wall time of one call of each of ``fns``, in milliseconds.

    The fns are timed in interleaved rounds (f0, f1, ..., f0, f1, ...), so load from other
    processes falls on every provider alike. A first call (allocator, lazy init, compilation)
    and a few warmup calls are not timed; the number of rounds fits ``budget_s`` per fn.
    CUDA: a pair of events around each call, one synchronize at the end, and a 256 MiB buffer
    zeroed before each call so inputs come from HBM, not L2. CPU: time.perf_counter around each
    call in blocks of BLOCK calls per fn, no cache flush (inputs of 8-32 MB are about the size of
    the last-level cache); the minor page faults per call go to FAULTS."""
    est = []
    for fn in fns:
        fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        est.append(max(time.perf_counter() - start, 1e-6))
        for _ in range(max(1, min(10, int(0.2 * budget_s / est[-1])))):
            fn()
    reps = max(min_reps, min(max_reps, int(budget_s * len(fns) / sum(est))))
    if device.type == "cuda":
        flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
        events = [
            [tuple(torch.cuda.Event(enable_timing=True) for _ in "be") for _ in fns]
            for _ in range(reps)
        ]
        for round_ in events:
            for fn, (begin, end) in zip(fns, round_):
                flush.zero_()
                begin.record()
                fn()
                end.record()
        sync(device)
        times = [[begin.elapsed_time(end) for begin, end in round_] for round_ in events]
    else:
        # Blocks of BLOCK consecutive calls per fn, the blocks interleaved: within a block each
        # provider meets the allocator in its own steady state (interleaving single calls lets
        # one provider's frees decide whether the other's next output is page-faulted in).
        # Minor page faults are counted per fn (FAULTS: faults per call, for the table).
        per_fn = [[] for _ in fns]
        faults = [0] * len(fns)
        for _ in range(max(1, reps // BLOCK)):
            for i, fn in enumerate(fns):
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(BLOCK):
                    start = time.perf_counter()
                    fn()
                    per_fn[i].append((time.perf_counter() - start) * 1e3)
                faults[i] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        FAULTS[:] = [f / len(t) for f, t in zip(faults, per_fn)]
        return [statistics.median(t) for t in per_fn]
    return [statistics.median(col) for col in zip(*times)]


def io_bytes(mode: str, x: torch.Tensor, weight: torch.Tensor | None) -> int:
    """Bytes a kernel must move at least, for the effective GB/s.

    fwd: read x, write y, read weight and bias. bwd: read x and dy, write dx, read weight,
    write dweight and dbias. full: both. Saved statistics (mean/rstd, a few bytes per row or
    channel) are left out: under 0.2% of the total for every suite shape."""
    xb = x.numel() * x.element_size()
    pb = 0 if weight is None else weight.numel() * weight.element_size()
    fwd, bwd = 2 * xb + 2 * pb, 3 * xb + 3 * pb
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def copy_gbps(device: torch.device, budget_s: float) -> tuple[str, float, float]:
    """Plain-copy bandwidth ``y.copy_(x)`` (read + write) on a buffer much larger than the
    last-level cache: the practical ceiling for the GB/s of a memory-bound op.
    Returns (shape, ms, GB/s)."""
    n = 1 << 28 if device.type == "cuda" else 1 << 24  # float32: 1 GiB on CUDA, 64 MiB on CPU
    x = torch.rand(n, device=device)
    y = torch.empty_like(x)
    (ms,) = time_ms([lambda: y.copy_(x)], device, budget_s)
    return str(n), ms, gbps(2 * x.nbytes, ms)


# ---- modes --------------------------------------------------------------------------------------


def mode_fn(
    mode: str, forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor]
) -> Callable[[], object]:
    """What is timed for each mode. ``forward()`` runs the op on tensors that require grad (the
    training forward: it saves what backward needs); ``inputs`` are x, weight and bias.

    bwd: one forward builds the graph; each timed call runs autograd.grad over it with
    retain_graph=True, so only the backward nodes run (grads are returned, never accumulated
    into .grad, so there is no extra add). The autograd engine's own overhead is included for
    every provider alike. full: forward plus that backward, each call."""
    if mode == "fwd":
        return forward
    y = forward()
    dy = torch.randn_like(y)
    if mode == "bwd":
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), inputs, dy)


# ---- the run: cases x modes x providers -> rows, table, CSV -------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def file_stem(device: str) -> str:
    """The device name made safe for a file name: 'AMD EPYC 7R13' -> 'AMD-EPYC-7R13'."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", device).strip("-") or "unknown"


def git_commit() -> str:
    """Short HEAD, plus '-dirty' when tracked files differ from it. Changes under
    benchmarks/results/ do not count: results committed after a run describe that commit."""

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


Setup = Callable[[Case, str, torch.device], tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]


def run(op: str, cases: list[Case], setup: Setup, args: argparse.Namespace) -> list[dict]:
    """Time every case x mode x provider; print the table; append to the CSV; return the rows.

    ``setup(case, provider, device)`` returns (forward, [x, weight, bias]) for a fresh set of
    tensors. The copy bandwidth is measured first and recorded as op=copy rows."""
    device = torch.device(args.device)
    modes = [m for m in MODES if m in split(args.modes)]
    providers = ["normext", "torch"] + (["compile"] if args.compile else [])
    meta = {
        "device": device_name(device),
        "torch_version": torch.__version__,
        "commit": git_commit(),
    }
    shape, ms, bw = copy_gbps(device, args.budget)
    copy = {"op": "copy", "mode": "fwd", "shape": shape, "dtype": "fp32", "layout": "contiguous"}
    rows = [{**copy, "provider": "torch", "ms": ms, "gbps": bw, **meta}]
    for case, mode in tqdm([(c, m) for c in cases for m in modes], desc=op, leave=False):
        if args.compile:
            torch.compiler.reset()  # one compiled graph per case: no recompile limit to hit
        setups = [setup(case, p, device) for p in providers]
        fns = [mode_fn(mode, forward, inputs) for forward, inputs in setups]
        key = {"op": op, "mode": mode, "shape": shape_str(case.shape), "dtype": case.dtype,
               "layout": case.layout}  # fmt: skip
        times = time_ms(fns, device, args.budget)
        faults = FAULTS[:] if device.type == "cpu" else [float("nan")] * len(fns)
        for provider, (_, inputs), t, f in zip(providers, setups, times, faults):
            bw = gbps(io_bytes(mode, inputs[0], inputs[1]), t)
            rows.append({**key, "provider": provider, "ms": t, "gbps": bw, **meta})
            PAGE_FAULTS[(*key.values(), provider)] = f
        del setups, fns
    print_table(op, rows, providers)
    if not args.no_csv:
        append_csv(rows)
    return rows


def print_table(op: str, rows: list[dict], providers: list[str]) -> None:
    copy = next(r["gbps"] for r in rows if r["op"] == "copy")
    by_key = {
        (r["shape"], r["dtype"], r["layout"], r["mode"], r["provider"]): r
        for r in rows
        if r["op"] == op
    }
    head = (
        ["shape", "dtype", "layout", "mode"]
        + [f"{p} ms" for p in providers]
        + [f"{p}/normext" for p in providers[1:]]
        + [f"{p} GB/s" for p in providers]
        + ["copy GB/s"]
        + [f"{p} faults" for p in providers]
    )
    body = []
    for key in dict.fromkeys(k[:4] for k in by_key):
        r = {p: by_key[(*key, p)] for p in providers}
        body.append(
            [*key]
            + [f"{r[p]['ms']:.3f}" for p in providers]
            + [f"{r[p]['ms'] / r['normext']['ms']:.2f}x" for p in providers[1:]]
            + [f"{r[p]['gbps']:.1f}" for p in providers]
            + [f"{copy:.1f}"]
            + [f"{PAGE_FAULTS.get((op, key[3], *key[:3], p), float('nan')):.0f}" for p in providers]
        )
    width = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    print(
        f"\n{op} on {rows[0]['device']} (torch {rows[0]['torch_version']}, "
        f"commit {rows[0]['commit']}); speedup = provider ms / normext ms"
    )
    for line in [head, ["-" * w for w in width], *body]:
        print("  ".join(str(c).rjust(w) for c, w in zip(line, width)))


def csv_path(device: str) -> Path:
    return RESULTS / f"{file_stem(device)}.csv"


def append_csv(rows: list[dict]) -> Path:
    path = csv_path(rows[0]["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**r, "ms": f"{r['ms']:.5f}", "gbps": f"{r['gbps']:.2f}"})
    print(f"appended {len(rows)} rows to {path.relative_to(ROOT)}")
    return path


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
