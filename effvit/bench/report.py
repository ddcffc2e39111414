"""Benchmark output: the terminal report (a table that fits the terminal, what was not timed, a headline), JSON,
CSV and Markdown files, and comparisons of two runs."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import sys
import textwrap

# Every column of the files; the terminal shows SHORT_COLUMNS (what a reader needs first) unless --wide.
COLUMNS = [("case", "case"), ("impl", "impl"), ("median_us", "median"), ("vs_eager", "× eager"),
           ("vs_compile", "× compile"), ("vs_floor", "floor"), ("spread", "p10-p90"), ("gbps", "GB/s"),
           ("frac_copy_peak", "% copy peak"), ("items_per_s", "img/s"), ("peak_memory_bytes", "peak MiB")]
SHORT_COLUMNS = ("case", "impl", "median_us", "vs_eager", "vs_compile", "vs_floor")
LEFT = ("case", "impl")
DEFAULT_WIDTH = 100  # where the output is not a terminal (a pipe, a file, CI logs)
MIN_CASE_WIDTH = 16


def _unit(us: float) -> tuple[str, float]:
    """The unit that keeps ``us`` under 1000 (seconds past that)."""
    for unit, scale in (("µs", 1.0), ("ms", 1e3)):
        if us / scale < 999.5:
            return unit, scale
    return "s", 1e6


def _digits(value: float) -> str:
    return f"{value:.{2 if value < 9.995 else 1 if value < 99.95 else 0}f}"


def format_time(us: float) -> str:
    """19.3 µs, 1.33 ms, 85.2 ms: three significant digits in the unit that keeps the number under 1000."""
    unit, scale = _unit(us)
    return f"{_digits(us / scale)} {unit}"


def format_range(low_us: float, high_us: float) -> str:
    """18.3-20.3 µs: both ends in the higher one's unit."""
    unit, scale = _unit(high_us)
    return f"{_digits(low_us / scale)}-{_digits(high_us / scale)} {unit}"


def _cell(rec: dict, field: str, label: str = "") -> str:
    if field == "case":
        return label
    if field == "impl":
        return rec["impl"]
    if rec["status"] != "ok":
        return rec["status"] if field == "median_us" else ""
    value = rec.get(field)
    if field == "spread":
        return format_range(rec["p10_us"], rec["p90_us"]) if rec.get("p10_us") is not None else ""
    if value is None:
        return ""
    if field == "median_us":
        return format_time(value)
    if field in ("vs_eager", "vs_compile"):
        return "" if rec["impl"] == field[3:] else f"{value:.2f}"  # a peer against itself says nothing
    if field in ("frac_copy_peak", "vs_floor"):
        return f"{100 * value:.0f}%"
    if field == "items_per_s":
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    if field == "peak_memory_bytes":
        return f"{value / 2**20:.1f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


# ---- readable case labels ------------------------------------------------------------------------------

def _params(rec: dict) -> dict:
    return {k[len("param_"):]: v for k, v in rec.items() if k.startswith("param_") and v is not None}


def _shape_words(rec: dict) -> list[str]:
    """The case's shape in words, e.g. ['56×56×96', '3 heads', 'window 7', 'shift 3'] (H×W×C, as the suites'
    shape names)."""
    p = _params(rec)
    p.pop("B", None)
    words = []
    if {"H", "W", "C"} <= p.keys():
        words.append(f"{p.pop('H')}×{p.pop('W')}×{p.pop('C')}")
    if "N" in p and "M" in p:
        words.append(f"{p.pop('N')} queries, {p.pop('M')} keys")
    elif "N" in p:
        words.append(f"{p.pop('N')} tokens" + (f" of {p.pop('C')}" if "C" in p else ""))
    head_dim = p.pop("D", None) or p.pop("head_dim", None)
    if "heads" in p:
        words.append(f"{p.pop('heads')} heads" + (f" of {head_dim}" if head_dim else ""))
    if "ws" in p:
        words.append(f"window {p.pop('ws')}")
    if "shift" in p:
        shift = p.pop("shift")
        if shift:
            words.append(f"shift {shift}")
    if "model" in p:
        model, img = p.pop("model"), p.pop("img", None)
        words.append(str(model) + (f", {img} px" if img and not str(model).endswith(str(img)) else ""))
    words += [f"{k} {v}" for k, v in p.items()]
    return words


def case_label(rec: dict, varying: tuple[str, ...] = ()) -> str:
    """A case in words: 'swin_tiny_patch4_window7_224, batch 1', 'window/core 56×56×96, 3 heads, window 7,
    batch 1'; ``varying``: the record fields ("dtype", "direction") that differ within the run, named too."""
    if rec.get("title"):
        what = rec["title"]
    else:
        what = f"{rec['family']}/{rec['op']} " + ", ".join(_shape_words(rec))
    parts = [what.strip()]
    if rec.get("param_B") is not None:
        parts.append(f"batch {rec['param_B']}")
    parts += [str(rec[field]) for field in varying]
    return ", ".join(parts)


def _varying(records: list[dict]) -> tuple[str, ...]:
    return tuple(f for f in ("dtype", "direction") if len({r[f] for r in records}) > 1)


def _uniform(records: list[dict], settings: dict) -> list[str]:
    """What every case of the run shares (said once, in the title): dtype, direction, the CPU allocator."""
    out = []
    for field in ("dtype", "direction"):
        values = {r[field] for r in records}
        if len(values) == 1:
            value = values.pop()
            out.append({"fwd": "forward", "fwd+bwd": "forward+backward"}.get(value, value))
    return out + ([_allocator(settings)] if settings.get("device") == "cpu" else [])


# ---- the terminal report -------------------------------------------------------------------------------

def terminal_width(file=None) -> int:
    """The terminal's columns when ``file`` is one (or $COLUMNS), else DEFAULT_WIDTH."""
    file = file or sys.stdout
    try:
        if file.isatty():
            return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    except (AttributeError, ValueError, OSError):
        pass
    return int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else DEFAULT_WIDTH


def _wrap(text: str, width: int, indent: str = "", hanging: str = "") -> list[str]:
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=hanging or indent,
                         break_on_hyphens=False) or [""]


NBSP = "\u00a0"  # textwrap does not break at it


def _keep_short_parts(label: str, longest: int = 14) -> str:
    """Joins the words of a label's short comma-separated parts ('batch 1', '3 heads') so a wrap keeps them whole."""
    return ", ".join(part.replace(" ", NBSP) if len(part) <= longest else part for part in label.split(", "))


def table_lines(records: list[dict], width: int, wide: bool = False) -> list[str]:
    """The timed implementations of each case, a case's label wrapped in its first column beside its rows,
    fitted to ``width`` columns (with ``wide``, every column, however wide)."""
    shown = [r for r in records if r["status"] != "skipped"]
    if not shown:
        return []
    fields = [f for f, _ in COLUMNS if wide or f in SHORT_COLUMNS]
    fields = [f for f in fields if f in LEFT or any(_cell(r, f) for r in shown)]  # drop columns empty everywhere
    headers = dict(COLUMNS)
    varying = _varying(records)
    groups: dict[str, list[dict]] = {}
    for r in shown:
        groups.setdefault(r["key"], []).append(r)
    labels = {key: case_label(recs[0], varying) for key, recs in groups.items()}
    cells = {key: [[_cell(r, f) for f in fields[1:]] for r in recs] for key, recs in groups.items()}
    widths = [max([len(headers[f])] + [len(row[i]) for rows in cells.values() for row in rows])
              for i, f in enumerate(fields[1:])]
    gap = "  "
    rest = sum(widths) + len(gap) * len(widths)
    case_width = max(MIN_CASE_WIDTH, min(width - rest, max(len(label) for label in labels.values())))

    def line(first: str, row: list[str]) -> str:
        out = first.ljust(case_width)
        for f, w, text in zip(fields[1:], widths, row):
            out += gap + (text.ljust(w) if f in LEFT else text.rjust(w))
        return out.rstrip()

    lines = [line(headers["case"], [headers[f] for f in fields[1:]]), "-" * min(width, case_width + rest)]
    for n, key in enumerate(groups):
        label_lines = [text.replace(NBSP, " ")
                       for text in _wrap(_keep_short_parts(labels[key]), case_width, hanging="  ")]
        rows = cells[key]
        if n:
            lines.append("")
        for i in range(max(len(label_lines), len(rows))):
            lines.append(line(label_lines[i] if i < len(label_lines) else "",
                              rows[i] if i < len(rows) else [""] * len(widths)))
    return lines


def skipped_lines(records: list[dict], width: int) -> list[str]:
    """What was not timed, and why: each implementation and reason once."""
    out, seen = [], set()
    for r in records:
        if r["status"] == "ok":
            continue
        text = f"{r['impl']} ({r['status']}): {r['reason']}"
        if text not in seen:
            seen.add(text)
            out += _wrap(text, width, indent="  ", hanging="      ")
    return (["Not timed:"] + out) if out else []


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _impl_counts(names: list[str]) -> str:
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    if len(counts) == 1:
        return names[0]
    return ", ".join(f"{n} {c}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1]))


def _aligned(rows: list[list[str]], indent: str = "  ", gap: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [(indent + gap.join(c.ljust(w) for c, w in zip(row, widths))).rstrip() for row in rows]


def headline(result: dict) -> list[str]:
    """A few unwrapped lines: per family (and direction, dtype where the run has several), effvit's speed-up
    (its fastest backend in each case) over the official code run eagerly and over the fastest peer of each
    case, as a geometric mean over the family's cases with their range; then each whole model's images/s and
    its speed-ups over its peers."""
    records = [r for r in result["records"] if r["status"] == "ok" and r.get("median_us")]
    varying = _varying(records)
    by_case: dict[str, list[dict]] = {}
    for r in records:
        by_case.setdefault(r["key"], []).append(r)
    families: dict[tuple, list[tuple]] = {}
    models, backends = [], []
    for recs in by_case.values():
        ours = [r for r in recs if r["kind"] == "effvit"]
        peers = [r for r in recs if r["kind"] == "peer"]
        if not ours or not peers:
            continue
        best = min(ours, key=lambda r: r["median_us"])
        backends.append(best["impl"])
        if recs[0]["op"] == "model":
            ratios = ", ".join(f"{p['median_us'] / best['median_us']:.2f}× {p['impl']}" for p in peers)
            models.append(f"  {case_label(best, varying)}: {_cell(best, 'items_per_s')} img/s, {ratios}")
            continue
        fastest = min(peers, key=lambda r: r["median_us"])
        eager = next((p["median_us"] / best["median_us"] for p in peers if p["impl"] == "eager"), None)
        group = (best["family"],) + tuple(str(best[f]) for f in varying)
        families.setdefault(group, []).append((eager, fastest["median_us"] / best["median_us"], fastest["impl"]))
    if not families and not models:
        return []
    m, s = result["machine"], result["settings"]
    lines = [f"effvit {m.get('effvit')} ({_impl_counts(backends)}), {m.get('gpu') or m.get('cpu')}, "
             f"{s.get('threads')} threads, " + ", ".join(_uniform(records, s)) + ": speed-up "
             "over the official code (eager) and over the fastest peer, geometric mean of a family's cases (range)"]
    if families:
        rows = [["family", "× eager", "× fastest peer", "cases", "fastest peer"]]
        order = list(dict.fromkeys(group[0] for group in families))  # families as they ran; directions together
        for group, cases in sorted(families.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1:])):
            eager = [e for e, _, _ in cases if e is not None]
            peer = [p for _, p, _ in cases]
            rows.append([" ".join(group), f"{_geomean(eager):.2f}{_range(eager)}" if eager else "",
                         f"{_geomean(peer):.2f}{_range(peer)}", str(len(cases)),
                         _impl_counts([n for _, _, n in cases])])
        lines += _aligned(rows)
    if models:
        lines += ["Whole models (images/s, speed-ups):"] + models
    return lines


def _range(values: list[float]) -> str:
    return f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""


def print_table(result: dict, file=None, width: int | None = None, wide: bool = False) -> None:
    """The run for a person: title, table, what was not timed, and the headline, every line within ``width``
    (default: the terminal's; without a terminal, DEFAULT_WIDTH)."""
    file = file or sys.stdout
    width = width or terminal_width(file)
    records = result["records"]
    out = _wrap(_title(result), width) + [""]
    out += table_lines(records, width, wide)
    legend = ("median: of the repeats after warm-up; × eager, × compile: speed-up over the official code run "
              "eagerly and over torch.compile of it, same run (> 1: faster)")
    if any(r.get("vs_floor") for r in records):
        legend += "; floor: a plain copy's time over this one (100%: as fast as copying the input)"
    if not wide:
        legend += "; --wide adds p10-p90, GB/s, img/s and peak memory (all in the files --out writes)"
    out += [""] + _wrap(legend + ".", width)
    skipped = skipped_lines(records, width)
    if skipped:
        out += [""] + skipped
    head = headline(result)
    if head:
        out += [""] + [w for h in head for w in _wrap(h, width, hanging="      " if h.startswith("  ") else "  ")]
    print("\n".join(out), file=file)


def _allocator(settings: dict) -> str:
    """The allocator a run's CPU tensors had (runs recorded before it was written down: from the mallopt flag)."""
    if settings.get("allocator"):
        return f"allocator: {settings['allocator']}"
    return "allocator: glibc keeping freed memory" if settings.get("retain_freed_memory") else "allocator: system"


def _title(result: dict) -> str:
    m, s, p = result["machine"], result["settings"], result.get("peaks") or {}
    where = m.get("gpu") or m.get("cpu")
    peak = f"; copy peak {p['copy_gbps']:.1f} GB/s, sgemm {p['sgemm_gflops']:.0f} GFLOP/s" if p else ""
    shared = ", ".join(_uniform(result["records"], s))
    return (f"effvit {m['effvit']} on {where} ({s['device']}, {s['threads']} threads{peak}); torch {m['torch']}; "
            f"{shared}")


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
    head = headline(result)
    if head:
        lines += ["```text"] + head + ["```", ""]
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
        f"{s['policy']['max_input_sets']} sets; {_allocator(s)}",
        f"- started {s['started']}, finished {s['finished']}",
        "",
        "`× eager` / `× compile`: speed-up over the eager reference (the official code) and over "
        "torch.compile of it, in the same run. `floor`: the time of a plain copy of the input (`floor:clone`, "
        "the memory floor of a pure data-movement op) over this one. `GB/s`: the op's minimum memory traffic "
        "over the median time; `% copy peak`: that as a share of the measured memory-copy peak, which is taken "
        "on buffers far larger than the caches, so cases that fit in cache can pass 100%. The headline's "
        "fastest peer is the fastest implementation of the same computation that is not effvit's; other "
        "designs (softmax attention beside linear attention, the HiLo paper's attentions) are not peers.",
        "",
    ]
    records = [r for r in result["records"] if r["status"] != "skipped"]
    fields = [f for f, _ in COLUMNS if f in LEFT or any(_cell(r, f) for r in records)]
    headers = dict(COLUMNS)
    lines.append("| " + " | ".join(headers[f] for f in fields) + " |")
    lines.append("|" + "|".join("---" if f in LEFT else "---:" for f in fields) + "|")
    varying = _varying(result["records"])
    previous = None
    for r in records:
        label = case_label(r, varying) if r["key"] != previous else ""
        previous = r["key"]
        lines.append("| " + " | ".join(_cell(r, f, label) for f in fields) + " |")
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
