"""Plot one benchmarks/results/<device>.csv as <device>.png: per op, the speedup of normext over
torch eager per case and mode (left) and GB/s of normext, torch and the plain copy (right).
By default it takes the newest CSV and, in it, the rows of the last commit benchmarked (the
latest run wins where a case was run more than once).

    python benchmarks/plot.py [--csv benchmarks/results/X.csv] [--commit abc1234] [--mode full]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import common
from matplotlib.figure import Figure  # no pyplot: no GUI backend, works headless


def load(path: Path, commit: str | None) -> tuple[str, list[dict]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    commit = commit or rows[-1]["commit"]
    latest = {}
    for r in rows:
        if r["commit"] == commit:
            r["ms"], r["gbps"] = float(r["ms"]), float(r["gbps"])
            latest[(r["op"], r["mode"], r["shape"], r["dtype"], r["layout"], r["provider"])] = r
    return commit, list(latest.values())


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, help="default: the newest CSV in benchmarks/results")
    ap.add_argument("--commit", help="default: the commit of the CSV's last row")
    ap.add_argument("--mode", default="full", choices=common.MODES, help="mode of the GB/s panel")
    args = ap.parse_args(argv)
    path = args.csv or max(
        common.RESULTS.glob("*.csv"), key=lambda p: p.stat().st_mtime, default=None
    )
    if path is None:
        raise SystemExit("no CSV in benchmarks/results; run `make bench` first")
    commit, rows = load(path, args.commit)
    ops = [op for op in ("layer_norm", "batch_norm") if any(r["op"] == op for r in rows)]
    copy = max((r["gbps"] for r in rows if r["op"] == "copy"), default=None)

    def case(r: dict) -> str:
        return f"{r['shape']} {r['dtype']}" + (
            "" if r["layout"] == "contiguous" else f" {r['layout']}"
        )

    cases = {op: list(dict.fromkeys(case(r) for r in rows if r["op"] == op)) for op in ops}
    fig = Figure(figsize=(13, 1 + sum(0.45 * len(c) + 0.8 for c in cases.values())))
    axes = fig.subplots(
        len(ops),
        2,
        squeeze=False,
        gridspec_kw={"height_ratios": [len(cases[op]) + 2 for op in ops]},
    )
    for (left, right), op in zip(axes, ops):
        labels = cases[op]
        ms = {(case(r), r["mode"], r["provider"]): r for r in rows if r["op"] == op}
        height = 0.8 / len(common.MODES)
        for i, mode in enumerate(common.MODES):
            ys = [y + (i - 1) * height for y in range(len(labels))]
            sp = [
                ms[(c, mode, "torch")]["ms"] / ms[(c, mode, "normext")]["ms"]
                if (c, mode, "normext") in ms and (c, mode, "torch") in ms
                else 0
                for c in labels
            ]
            left.barh(ys, sp, height, label=mode)
        left.axvline(1, color="black", lw=0.8)
        left.set(yticks=range(len(labels)), title=f"{op}: speedup (torch ms / normext ms)")
        left.set_yticklabels(labels, fontsize=8)
        left.invert_yaxis()
        left.legend(fontsize=8, loc="lower right")
        height = 0.4
        for i, provider in enumerate(("normext", "torch")):
            ys = [y + (i - 0.5) * height for y in range(len(labels))]
            bw = [ms.get((c, args.mode, provider), {}).get("gbps", 0) for c in labels]
            right.barh(ys, bw, height, label=provider)
        if copy:
            right.axvline(copy, color="black", ls="--", lw=0.8, label=f"copy {copy:.1f}")
        right.set(
            yticks=range(len(labels)), yticklabels=[], title=f"{op}: effective GB/s, {args.mode}"
        )
        right.invert_yaxis()
        right.legend(fontsize=8, loc="lower right")
    first = rows[0]
    fig.suptitle(
        f"normext vs torch on {first['device']} (torch {first['torch_version']}, commit {commit})"
    )
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out.relative_to(common.ROOT) if out.is_relative_to(common.ROOT) else out}")
    return out


if __name__ == "__main__":
    main()
