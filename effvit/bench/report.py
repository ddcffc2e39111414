"""Benchmark output: the terminal table, JSON, CSV and Markdown files, and comparisons of two runs."""

from __future__ import annotations

import csv
import json
import os
import shlex
import sys

COLUMNS = [("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("direction", "dir"), ("impl", "impl"),
           ("median_us", "median us"), ("spread", "p10-p90 us"), ("vs_eager", "x eager"),
           ("vs_compile", "x compile"), ("items_per_s", "img/s"), ("gbps", "GB/s"), ("frac_copy_peak", "% copy peak"),
           ("peak_memory_bytes", "peak MiB")]


def _cell(rec: dict, field: str) -> str:
    if rec["status"] != "ok" and field in ("median_us", "spread"):
        return rec["status"]
    value = rec.get(field)
    if field == "spread":
        return f"{rec['p10_us']:.1f}-{rec['p90_us']:.1f}" if rec.get("p10_us") is not None else ""
    if value is None:
        return ""
    if field in ("vs_eager", "vs_compile"):
        return f"{value:.2f}"
    if field == "frac_copy_peak":
        return f"{100 * value:.0f}%"
    if field == "items_per_s":
        return f"{value:,.0f}"
    if field == "peak_memory_bytes":
        return f"{value / 2**20:.1f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def rows(records: list[dict]) -> list[list[str]]:
    """Table rows of the implementations that ran (the skipped ones are listed apart)."""
    return [[_cell(r, f) for f, _ in COLUMNS] for r in records if r["status"] != "skipped"]


def print_table(result: dict, file=None) -> None:
    file = file or sys.stdout
    records = result["records"]
    title = _title(result)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        for _, header in COLUMNS:
            table.add_column(header, justify="right" if header not in ("op", "shape", "dtype", "dir", "impl") else "left")
        previous = None
        shown = [r for r in records if r["status"] != "skipped"]
        for rec, row in zip(shown, rows(shown)):
            if previous is not None and rec["key"] != previous:
                table.add_section()
            previous = rec["key"]
            table.add_row(*row)
        Console(file=file, width=max(160, Console().width)).print(table)
    except ImportError:
        print(title, file=file)
        print(plain_table(records), file=file)
    skipped = [r for r in records if r["status"] != "ok"]
    if skipped:
        print("not timed:", file=file)
        seen = set()
        for r in skipped:
            line = f"  {r['impl']} ({r['status']}): {r['reason']}"
            if line not in seen:
                seen.add(line)
                print(line, file=file)


def plain_table(records: list[dict]) -> str:
    header = [h for _, h in COLUMNS]
    body = rows(records)
    widths = [max(len(x) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in body])


def _title(result: dict) -> str:
    m, s, p = result["machine"], result["settings"], result.get("peaks") or {}
    where = m.get("gpu") or m.get("cpu")
    peak = f", copy peak {p['copy_gbps']:.1f} GB/s, sgemm {p['sgemm_gflops']:.0f} GFLOP/s" if p else ""
    return (f"effvit {m['effvit']} on {where} ({s['device']}, {s['threads']} threads{peak}); "
            f"torch {m['torch']}; median of repeats, speed-ups > 1 are faster than the peer")


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def write_csv(records: list[dict], path: str) -> None:
    fields = [k for k in records[0] if k not in ("samples_us", "traceback")] if records else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow(r)


def markdown(result: dict, command: str | None = None) -> str:
    m, s, p = result["machine"], result["settings"], result.get("peaks") or {}
    lines = [f"# effvit benchmark: {m.get('gpu') or m.get('cpu')}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [
        f"- machine: {m.get('cpu')}, {m.get('cpu_count')} CPUs, {s['threads']} threads"
        + (f"; GPU {m['gpu']} (sm {m['gpu_sm']})" if m.get("gpu") else ""),
        f"- software: torch {m['torch']} (CUDA {m['torch_cuda']}), triton {m.get('triton')}, "
        f"python {m['python']}, effvit {m['effvit']} at {m.get('effvit_commit')}; CPU kernels use {m.get('effvit_cpu_isa')}",
        f"- measured peaks: memory copy {p.get('copy_gbps', 0):.1f} GB/s (read + write), "
        f"sgemm {p.get('sgemm_gflops', 0):.0f} GFLOP/s" if p else "- peaks not measured",
        f"- method: {s['policy']['warmup']} warm-up calls, then the implementations of a case take turns in "
        f"blocks of about 50 ms (the first call of a block not kept) for {s['policy']['budget_s']} s each (at "
        f"least {s['policy']['min_repeats']} calls; on a GPU each is timed alone with CUDA events"
        f"{', replaying CUDA graphs' if s['policy'].get('cuda_graphs') else ''}); median and "
        f"p10-p90; inputs rotated over up to "
        f"{s['policy']['max_input_sets']} sets; freed memory retained: {s['retain_freed_memory']}",
        f"- started {s['started']}, finished {s['finished']}",
        "",
        "`x eager` / `x compile`: speed-up over the eager reference (the official code) and over "
        "torch.compile of it, in the same run. `GB/s`: the op's minimum memory traffic over the median time; "
        "`% copy peak`: that as a share of the measured memory-copy peak, which is taken on buffers far larger "
        "than the caches, so cases that fit in cache can pass 100%. `floor:clone` rows time a copy of the "
        "input at the same size: the memory floor of a pure data-movement op.",
        "",
    ]
    header = [h for _, h in COLUMNS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for r in rows(result["records"]):
        lines.append("| " + " | ".join(r) + " |")
    skipped = {(r["impl"], r["reason"]) for r in result["records"] if r["status"] != "ok"}
    if skipped:
        lines += ["", "Not timed:", ""] + [f"- {impl}: {reason}" for impl, reason in sorted(skipped)]
    return "\n".join(lines) + "\n"


def write_all(result: dict, out_dir: str, command: str | None = None, stem: str = "bench") -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "csv", "md")}
    result = dict(result, command=command)
    write_json(result, paths["json"])
    write_csv(result["records"], paths["csv"])
    with open(paths["md"], "w") as f:
        f.write(markdown(result, command))
    return paths


# environment variables that change what a run measures: recorded in front of the command
MEASURED_ENV = ("EFFVIT_CPU_ISA", "TRITON_INTERPRET")


def command_line(argv: list[str]) -> str:
    env = [f"{name}={shlex.quote(os.environ[name])} " for name in MEASURED_ENV if os.environ.get(name)]
    return "".join(env) + "effvit-bench " + " ".join(shlex.quote(a) for a in argv)


# ---- comparing runs ----------------------------------------------------------------------------------

def compare(new: dict, old: dict) -> list[dict]:
    """Per case and implementation in both runs: old and new medians and new/old."""
    old_by = {(r["key"], r["impl"]): r for r in old["records"] if r["status"] == "ok"}
    out = []
    for r in new["records"]:
        if r["status"] != "ok":
            continue
        o = old_by.get((r["key"], r["impl"]))
        if o is None:
            continue
        out.append({"key": r["key"], "impl": r["impl"], "old_us": o["median_us"], "new_us": r["median_us"],
                    "ratio": r["median_us"] / o["median_us"]})
    return out


def print_comparison(rows_: list[dict], threshold_pct: float | None, file=None) -> list[dict]:
    """Prints new/old per row; returns the rows slower than the threshold."""
    file = file or sys.stdout
    slower = []
    print("comparison with the earlier run (new / old median; > 1 is slower):", file=file)
    for r in rows_:
        flag = ""
        if threshold_pct is not None and r["ratio"] > 1 + threshold_pct / 100:
            flag = f"  REGRESSION (> {threshold_pct:g}%)"
            slower.append(r)
        print(f"  {r['key']} {r['impl']}: {r['old_us']:.1f} -> {r['new_us']:.1f} us  x{r['ratio']:.2f}{flag}",
              file=file)
    if not rows_:
        print("  no case in common", file=file)
    return slower
