"""The fixed suite (`make bench`): both op scripts with their default shapes, dtypes, layouts and
modes; results appended to benchmarks/results/<device>.csv; geometric-mean speedups printed;
benchmarks/results/summary.md (markdown for the README) and <device>.png written.

    python benchmarks/run_all.py [--device cuda] [--compile] [--quick] [--no-csv]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import bench_batch_norm
import bench_layer_norm
import common
import plot
import torch

OPS = {"layer_norm": bench_layer_norm, "batch_norm": bench_batch_norm}


def speedups(rows: list[dict], baseline: str = "torch") -> dict[tuple, float]:
    """(op, shape, dtype, layout, mode) -> baseline ms / normext ms."""
    ms = {
        (r["op"], r["shape"], r["dtype"], r["layout"], r["mode"], r["provider"]): r["ms"]
        for r in rows
        if r["op"] != "copy"
    }
    return {
        k[:5]: ms[(*k[:5], baseline)] / t
        for k, t in ms.items()
        if k[5] == "normext" and (*k[:5], baseline) in ms
    }


def geomeans(s: dict[tuple, float], op: str) -> list[float]:
    """Geometric-mean speedup of ``op`` per mode, over the cases in ``s`` (from speedups)."""
    return [
        common.geomean([v for k, v in s.items() if k[0] == op and k[4] == m]) for m in common.MODES
    ]


def summary_md(rows: list[dict], seconds: float, load: float) -> str:
    first = rows[0]
    providers = [p for p in ("torch", "compile") if any(r["provider"] == p for r in rows)]
    copies = ", ".join(f"{r['gbps']:.1f}" for r in rows if r["op"] == "copy")
    busy = load > (os.cpu_count() or 1)
    note = " (more than the cores: other processes shared the CPU, expect noise)" if busy else ""
    lines = [
        "# normext benchmarks",
        "",
        (
            f"{first['device']} ({torch.get_num_threads()} threads), "
            f"torch {first['torch_version']}, commit `{first['commit']}`, "
            f"{datetime.date.today()}; the suite took {seconds:.0f} s; 1-minute load average "
            f"{load:.1f} at the start{note}. "
            "Speedup = provider ms / normext ms (above 1: normext is faster). Median times; GB/s "
            "from the minimum bytes each mode must move. Plain copy `y.copy_(x)`: "
            f"{copies} GB/s (measured before each op's run). CPU timing runs each provider "
            f"{common.BLOCK} calls at a time, the blocks interleaved; faults = minor page faults "
            "per call (a fresh 4 KB page of output: the allocation cost, see the README)."
        ),
        "",
        "## Geometric-mean speedup",
        "",
        "| op | provider | " + " | ".join(common.MODES) + " |",
        "|---|---|" + "---:|" * len(common.MODES),
    ]
    per_provider = {p: speedups(rows, p) for p in providers}
    for op in OPS:
        for p in providers:
            means = geomeans(per_provider[p], op)
            lines.append(f"| {op} | {p} | " + " | ".join(f"{g:.2f}x" for g in means) + " |")
    head = [
        "op",
        "shape",
        "dtype",
        "layout",
        "mode",
        "normext ms",
        "torch ms",
        "speedup",
        "normext GB/s",
        "torch GB/s",
        "normext faults",
        "torch faults",
    ]
    lines += [
        "",
        "## Per case",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|---|---|---|" + "---:|" * 7,
    ]
    by_key = {
        (r["op"], r["shape"], r["dtype"], r["layout"], r["mode"], r["provider"]): r for r in rows
    }
    for key, s in per_provider["torch"].items():
        n, t = by_key[(*key, "normext")], by_key[(*key, "torch")]
        op, shape, dtype, layout, mode = key
        pf = [common.PAGE_FAULTS.get((op, mode, shape, dtype, layout, p), float("nan"))
              for p in ("normext", "torch")]  # fmt: skip
        lines.append(
            f"| {' | '.join(key)} | {n['ms']:.3f} | {t['ms']:.3f} | {s:.2f}x | "
            f"{n['gbps']:.1f} | {t['gbps']:.1f} | {pf[0]:.0f} | {pf[1]:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--compile", action="store_true", help="add torch.compile as a provider")
    ap.add_argument("--quick", action="store_true", help="first shape of each op, short timing")
    ap.add_argument("--no-csv", action="store_true", help="no CSV, summary or plot")
    args = ap.parse_args()
    flags = ["--device", args.device] + [
        f"--{f.replace('_', '-')}" for f in ("compile", "quick", "no_csv") if getattr(args, f)
    ]
    load, start = os.getloadavg()[0], time.perf_counter()
    rows = [r for module in OPS.values() for r in module.main(flags)]
    seconds = time.perf_counter() - start

    print("\ngeometric-mean speedup, torch ms / normext ms:")
    s = speedups(rows)
    for op in OPS:
        means = zip(common.MODES, geomeans(s, op))
        print(f"  {op:<10}  " + "  ".join(f"{m} {g:.2f}x" for m, g in means))
    print(f"suite took {seconds:.0f} s; load average {load:.1f} at the start")
    if args.no_csv:
        return
    path = common.RESULTS / "summary.md"
    path.write_text(summary_md(rows, seconds, load))
    print(f"wrote {path.relative_to(common.ROOT)}")
    plot.main(["--csv", str(common.csv_path(rows[0]["device"]))])


if __name__ == "__main__":
    main()
