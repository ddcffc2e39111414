"""effvit-bench: time effvit's kernels against the code they replace.

    effvit-bench                          # a tour: one telling shape per family (2-20 minutes on a 2-core CPU)
    effvit-bench --all                    # every family's whole suite (7-60 minutes on a 2-core CPU)
    effvit-bench --list                   # what would run, and why any implementation is skipped
    effvit-bench --family shift --shape 7x7x768 --batch 64 --backward --out results/
    effvit-bench --compare old/bench.json --fail-if-regression 10
    effvit-bench --family token_drop --out results/ --plot     # also PNG plots (matplotlib)
    effvit-bench --wide                   # every column in the terminal (the files always have them)
    effvit-bench --keep-freed-memory      # CPU: glibc keeps freed memory, as jemalloc would (default: the
                                          # system allocator, as in a user's process)

Exit status: 0 on success, 1 when --fail-if-regression finds a regression, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import torch

from effvit import backends as backends_mod
from effvit.bench import cases as cases_mod
from effvit.bench import report, runner, timing


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit 2 with a one-line reason, never a traceback
        self.print_usage(sys.stderr)
        print(f"effvit-bench: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="effvit-bench", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--family", action="append",
                   help="family to run, its whole suite (repeatable); default: a tour of every family")
    p.add_argument("--all", action="store_true",
                   help="every family's whole suite instead of the tour a bare effvit-bench runs")
    p.add_argument("--op", action="append", help="op within a family (repeatable), e.g. shift_group_norm")
    p.add_argument("--backend", action="append", choices=backends_mod.KERNEL_BACKENDS,
                   help="effvit backend to time (repeatable); default: every one that can run")
    p.add_argument("--dtype", action="append", choices=sorted(runner.DTYPES), help="default: float32")
    p.add_argument("--shape", action="append", help="a shape name of the family's suite (see --list)")
    p.add_argument("--batch", action="append", type=int, help="batch size (repeatable)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if there is a GPU")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--backward-only", action="store_true", help="time forward+backward only")
    p.add_argument("--no-peers", action="store_true", help="skip the eager and torch.compile peers")
    p.add_argument("--list", "--dry-run", dest="list", action="store_true",
                   help="list the cases and implementations that would run, and why any is skipped")
    p.add_argument("--quick", action="store_true", help="fewer repeats and batches: a smoke run")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--budget", type=float, help="seconds of timed repeats per implementation and case")
    p.add_argument("--out", help="write bench.json, bench.csv and bench.md into this folder")
    p.add_argument("--compare", metavar="OLD.json", help="compare with an earlier run's JSON")
    p.add_argument("--fail-if-regression", metavar="PCT", type=float,
                   help="with --compare: exit 1 if any implementation is more than PCT%% slower")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="GPU: time CUDA graph replays of each step (no launch overhead, as in a CUDA-graphed "
                        "model); a step that cannot be captured is timed eagerly, with a warning")
    p.add_argument("--plot", action="store_true",
                   help="with --out: also write PNG plots (speed-up bars, latency per case, roofline; needs "
                        "matplotlib)")
    allocator = p.add_mutually_exclusive_group()
    allocator.add_argument("--keep-freed-memory", action="store_true",
                           help="CPU: make glibc keep freed memory for reuse (as jemalloc or tcmalloc do) instead of "
                                "the system allocator a user's process has, so large outputs do not pay page faults "
                                "on fresh memory; the report says which allocator a run had")
    allocator.add_argument("--system-malloc", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--wide", action="store_true",
                   help="every column in the terminal (p10-p90, GB/s, img/s, peak MiB), however wide; the files "
                        "--out writes always have them")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    return p


def _validate(p: argparse.ArgumentParser, args) -> str:
    suites = cases_mod.suites()
    for fam in args.family or ():
        if fam not in suites:
            p.error(f"unknown family {fam!r}; known: {', '.join(sorted(suites))}")
    families = args.family or sorted(suites)
    for shape in args.shape or ():
        if not any(shape in cases_mod.shapes(f) for f in families):
            known = sorted({s for f in families for s in cases_mod.shapes(f)})
            p.error(f"unknown shape {shape!r} for {', '.join(families)}; known: {', '.join(known)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA GPU here"
                + ("" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"))
    if args.fail_if_regression is not None and not args.compare:
        p.error("--fail-if-regression needs --compare OLD.json")
    if args.cuda_graphs and device != "cuda":
        p.error("--cuda-graphs times GPU cases; this run is on the CPU (--device cuda on a machine with a GPU)")
    if args.plot and not args.out:
        p.error("--plot needs --out DIR (the PNGs go beside bench.json)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib (pip install matplotlib, or effvit[bench])")
    if args.compare and not os.path.exists(args.compare):
        p.error(f"--compare: no such file {args.compare!r}")
    for b in args.batch or ():
        if b < 1:
            p.error(f"--batch must be >= 1, got {b}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return device


def _tour(args) -> bool:
    """A bare run (nothing chosen) is the tour."""
    return not (args.all or args.family or args.op or args.shape or args.batch)


def _list(args, device: str) -> None:
    opts = cases_mod.SuiteOptions(
        device=device, dtypes=tuple(runner.DTYPES[d] for d in (args.dtype or ["float32"])),
        batches=tuple(args.batch) if args.batch else None, shapes=tuple(args.shape) if args.shape else None,
        directions=_directions(args), backends=tuple(args.backend) if args.backend else None,
        peers=not args.no_peers, quick=args.quick)
    found = runner.collect_cases(args.family, opts, args.op, _tour(args))
    for case in found:
        print(case.key)
        for name in case.impls:
            print(f"    run   {name}")
        for name, reason in case.skipped.items():
            print(f"    skip  {name}: {reason}")
    print(f"{len(found)} cases, {sum(len(c.impls) for c in found)} timings")
    for fam in (args.family or sorted(cases_mod.suites())):
        print(f"shapes of {fam}: {', '.join(cases_mod.shapes(fam))}")


def _directions(args) -> tuple[str, ...]:
    if args.backward_only:
        return ("fwd+bwd",)
    return ("fwd", "fwd+bwd") if args.backward else ("fwd",)


def _progress():
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        def plain(done, total, what):
            print(f"[{done}/{total}] {what}", file=sys.stderr, flush=True)
        return None, plain
    bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=12), MofNCompleteColumn(),
                   TimeElapsedColumn(), transient=True)
    task = bar.add_task("effvit-bench", total=None)
    room = max(20, bar.console.width - 32)  # what the bar, the count and the clock leave of a line

    def update(done, total, what):
        short = what if len(what) <= room else what[:room - 1] + "…"
        bar.update(task, completed=done, total=total, description=short)
    return bar, update


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_NO_CUDA_RUNTIME = _DropMessage("No CUDA runtime is found")


def _quiet_unrelated_warnings() -> None:
    """torch.utils.cpp_extension, imported when torch.compile builds the first peer, warns "No CUDA runtime is
    found, using CUDA_HOME=..." wherever a CUDA toolkit is installed without a GPU: it is about building
    extensions, not this run, and read like a failure of it."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NO_CUDA_RUNTIME)  # once: the same filter object


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _validate(parser, args)
    if args.list:
        _list(args, device)
        return 0
    _quiet_unrelated_warnings()
    policy = None
    if args.budget or args.cuda_graphs:
        base = timing.default_policy(args.quick)
        policy = dataclasses.replace(base, budget_s=args.budget or base.budget_s, cuda_graphs=args.cuda_graphs)
    bar, progress = _progress()
    directions = _directions(args)
    kwargs = dict(ops=args.op, backends=args.backend, dtypes=args.dtype or ["float32"], shapes=args.shape,
                  batches=args.batch, device=device, forward="fwd" in directions, backward="fwd+bwd" in directions,
                  quick=args.quick, threads=args.threads, peers=not args.no_peers, policy=policy,
                  retain_freed_memory=args.keep_freed_memory, memory=not args.no_memory, tour=_tour(args),
                  progress=progress)
    if bar is not None:
        with bar:
            result = runner.run(args.family, **kwargs)
    else:
        result = runner.run(args.family, **kwargs)
    command = report.command_line(argv)
    report.print_table(result, wide=args.wide)
    if args.out:
        paths = list(report.write_all(result, args.out, command).values())
        if args.plot:
            from effvit.bench import plot

            paths += plot.plot_all(dict(result, command=command), args.out)
        print("wrote " + ", ".join(paths))
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)
        slower = report.print_comparison(report.compare(result, old), args.fail_if_regression)
        if slower and args.fail_if_regression is not None:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
