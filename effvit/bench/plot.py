"""PNG plots of an effvit-bench run (``effvit-bench --plot --out DIR``, or ``python -m effvit.bench.plot bench.json``).

Per family: ``speedup-<family>.png``, every implementation's speed-up over the eager reference per case (bars,
one panel per direction); ``latency-<family>.png``, median time against the case (log scale, one line per
implementation, p10-p90 as error bars). Per run: ``roofline.png``, effvit's kernels at their arithmetic
intensity (counted FLOPs over counted bytes) and achieved GFLOP/s under this machine's measured sgemm and
memory-copy peaks. Needs matplotlib (``pip install matplotlib``; in effvit's ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("effvit-bench --plot needs matplotlib (pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and r.get("median_us")]


def _case_label(r: dict) -> str:
    return f"{r['op']} {r['shape']} {r['dtype']}"


def _title(result: dict, what: str) -> str:
    m = result.get("machine", {})
    return f"{what} — {m.get('gpu') or m.get('cpu') or m.get('machine_name', '')}"


def _impl_order(records: list[dict]) -> list[str]:
    """effvit backends first, then the peers, eager last."""
    names = sorted({r["impl"] for r in records})
    return sorted(names, key=lambda n: (0 if n.startswith("effvit:") else 2 if n == "eager" else 1, n))


def plot_speedup(result: dict, family: str, path: str) -> str | None:
    plt = _pyplot()
    records = [r for r in _ok(result["records"]) if r["family"] == family and r.get("vs_eager") and
               r["impl"] != "eager"]
    if not records:
        return None
    directions = sorted({r["direction"] for r in records})
    impls = _impl_order(records)
    cases = list(dict.fromkeys(_case_label(r) for r in records))
    height = min(60.0, max(3.0, 0.16 * len(cases) * len(impls) + 1.5))
    fig, axes = plt.subplots(1, len(directions), figsize=(5.5 * len(directions) + 3.0, height), squeeze=False,
                             sharey=True)
    bar = 0.8 / len(impls)
    for ax, direction in zip(axes[0], directions):
        for i, impl in enumerate(impls):
            by_case = {_case_label(r): r["vs_eager"] for r in records if r["impl"] == impl and
                       r["direction"] == direction}
            ys = [c + i * bar for c, case in enumerate(cases) if case in by_case]
            ax.barh(ys, [by_case[case] for case in cases if case in by_case], bar, label=impl)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"× eager reference ({direction})")
        ax.legend(fontsize=7)
    axes[0, 0].set_yticks([c + 0.4 - bar / 2 for c in range(len(cases))])
    axes[0, 0].set_yticklabels(cases, fontsize=7)
    axes[0, 0].invert_yaxis()
    fig.suptitle(_title(result, f"{family}: speed-up over the eager reference (1 = eager)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_latency(result: dict, family: str, path: str) -> str | None:
    plt = _pyplot()
    records = [r for r in _ok(result["records"]) if r["family"] == family]
    if not records:
        return None
    groups = sorted({(r["op"], r["direction"]) for r in records})
    widest = max(len({r["shape"] + r["dtype"] for r in records if (r["op"], r["direction"]) == g}) for g in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(min(40.0, max(7.5, 0.45 * widest + 3)), 3.2 * len(groups)),
                             squeeze=False)
    for ax, (op, direction) in zip(axes[:, 0], groups):
        rows = [r for r in records if r["op"] == op and r["direction"] == direction]
        cases = list(dict.fromkeys(f"{r['shape']} {r['dtype']}" for r in rows))
        for impl in _impl_order(rows):
            pts = {f"{r['shape']} {r['dtype']}": r for r in rows if r["impl"] == impl}
            xs = [i for i, c in enumerate(cases) if c in pts]
            med = [pts[cases[i]]["median_us"] for i in xs]
            lo = [m - (pts[cases[i]].get("p10_us") or m) for i, m in zip(xs, med)]
            hi = [(pts[cases[i]].get("p90_us") or m) - m for i, m in zip(xs, med)]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=2, label=impl)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"{op} {direction}: median µs")
        ax.legend(fontsize=7)
    axes[0, 0].set_title(_title(result, f"{family}: time per call (p10-p90 bars)"))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_roofline(result: dict, path: str) -> str | None:
    plt = _pyplot()
    records = [r for r in _ok(result["records"]) if r["impl"].startswith("effvit:") and r.get("flops") and
               r.get("bytes")]
    peaks = result.get("peaks") or {}
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for family in sorted({r["family"] for r in records}):
        rows = [r for r in records if r["family"] == family]
        ax.scatter([r["flops"] / r["bytes"] for r in rows], [r["flops"] / r["median_us"] / 1e3 for r in rows],
                   label=family, s=18)
    intensities = [r["flops"] / r["bytes"] for r in records]
    lo, hi = min(intensities) / 2, max(intensities) * 2
    if peaks.get("copy_gbps") and peaks.get("sgemm_gflops"):
        bw, top = peaks["copy_gbps"], peaks["sgemm_gflops"]
        xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        ax.plot(xs, [min(top, bw * x) for x in xs], color="black", linewidth=1,
                label=f"roof: {bw:.0f} GB/s copy, {top:.0f} GFLOP/s sgemm")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (counted FLOP / counted byte)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(_title(result, "effvit kernels against this machine's measured peaks"))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_all(result: dict, out_dir: str) -> list[str]:
    """Every plot of a run into out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    by_family = defaultdict(list)
    for r in result["records"]:
        by_family[r["family"]].append(r)
    paths = []
    for family in sorted(by_family):
        paths.append(plot_speedup(result, family, os.path.join(out_dir, f"speedup-{family}.png")))
        paths.append(plot_latency(result, family, os.path.join(out_dir, f"latency-{family}.png")))
    paths.append(plot_roofline(result, os.path.join(out_dir, "roofline.png")))
    return [p for p in paths if p]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effvit.bench.plot",
                                     description="PNG plots of a recorded effvit-bench run (its bench.json).")
    parser.add_argument("json", help="bench.json written by effvit-bench --out")
    parser.add_argument("--out", help="folder for the PNGs; default: the JSON's folder")
    args = parser.parse_args(argv)
    try:
        with open(args.json) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: cannot read {args.json}: {e}\n")
    try:
        paths = plot_all(result, args.out or os.path.dirname(os.path.abspath(args.json)))
    except ImportError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
