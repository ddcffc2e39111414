"""The benchmark harness itself: listing, a tiny run's files, comparisons, bad arguments."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import effvit.bench
from effvit.bench import cli, plot, report, runner, timing
from effvit.bench.cases import Case

TINY = ["--family", "shift", "--shape", "7x7x768", "--batch", "1", "--budget", "0.02", "--no-memory"]


def _bench(*args) -> subprocess.CompletedProcess:
    """effvit-bench's main() in this process, with its exit status, stdout and stderr as a subprocess would
    give them: a subprocess pays for importing torch again (~20 s on a slow 2-core VM), which for this file's
    twenty calls was minutes of the suite. test_tiny_run_writes_json_csv_markdown runs the real command."""
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["effvit-bench", *args], code, stdout.getvalue(), stderr.getvalue())


def _bench_process(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "effvit.bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_list_shows_cases_and_skips():
    out = _bench("--list", "--family", "shift", "--shape", "7x7x768", "--batch", "2", "--backward")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "shift/shift B2 C768 H7 W7 n_div12 float32" in text
    assert "shift/shift_group_norm" in text and "fwd+bwd" in text
    for impl in ("eager", "compile"):
        assert f"run   {impl}" in text
    assert "skip  effvit:cuda" in text or "run   effvit:cuda" in text
    assert "4 cases" in text


def test_bare_run_is_the_tour_and_all_is_every_suite():
    tour = _bench("--list")
    assert tour.returncode == 0, tour.stderr
    keys = [line.split(" float32")[0] for line in tour.stdout.splitlines() if "/" in line and not line.startswith(" ")]
    assert sorted(keys) == sorted([
        "hilo/layer B1 H14 W14 C384 heads12 ws2 alpha0.9", "hilo/lofi B1 N196 M49 heads10 head_dim32",
        "linear/core B1 N3136 heads8 D32", "shift/shift B1 C96 H56 W56 n_div12",
        "shift/shift_group_norm B1 C96 H56 W56 n_div12", "token_drop/drop B1 N197 C384 heads6 keep138",
        "token_drop/drop B64 N197 C384 heads6 keep138", "token_drop/model B8 modelvit_small_patch16_224 img224",
        "window/core B1 H56 W56 C96 heads3 ws7 shift0", "window/core B1 H56 W56 C96 heads3 ws7 shift3",
        "window/attn B1 H56 W56 C96 heads3 ws7 shift0", "window/attn B1 H56 W56 C96 heads3 ws7 shift3",
        "window/model B1 modelswin_t img224"])
    everything = _bench("--list", "--all")
    assert everything.returncode == 0, everything.stderr
    count = lambda out: int(out.stdout.split(" cases, ")[0].rsplit("\n", 1)[-1])  # noqa: E731
    assert count(tour) == 13 and count(everything) > 40
    # choosing anything leaves the tour: a family alone is its whole suite
    window = _bench("--list", "--family", "window")
    assert "window/core B8 H28 W28 C192" in window.stdout and "hilo/" not in window.stdout


@pytest.mark.slow
def test_tiny_run_writes_json_csv_markdown(tmp_path):
    out = _bench_process(*TINY, "--out", str(tmp_path), "--no-peers")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    for key in ("settings", "machine", "peaks", "records", "command"):
        assert key in data
    assert data["machine"]["torch"] and data["machine"]["cpu"]
    ran = [r for r in data["records"] if r["status"] == "ok"]
    assert ran, data["records"]
    for r in ran:
        assert r["median_us"] > 0 and r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert len(r["samples_us"]) == r["repeats"] >= 1
        assert r["gbps"] > 0
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["records"]) and "median_us" in rows[0]
    md = (tmp_path / "bench.md").read_text()
    assert "| case | impl |" in md and "effvit-bench" in md
    assert "shift/shift 7×7×768, n_div 12, batch 1" in md
    # the CPU cases ran with the allocator a user's process has, and the files say so
    assert data["settings"]["retain_freed_memory"] is False
    assert data["settings"]["allocator"].startswith("system")
    assert "allocator: system" in md


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    out = _bench(*TINY, "--out", str(tmp_path), "--plot")
    assert out.returncode == 0, out.stderr
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["latency-shift.png", "roofline.png", "speedup-shift.png"], pngs
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same from the recorded JSON, into another folder
    assert plot.main([str(tmp_path / "bench.json"), "--out", str(tmp_path / "replot")]) == 0
    assert sorted(p.name for p in (tmp_path / "replot").glob("*.png")) == pngs


def test_python_api_returns_records():
    result = effvit.bench.run(["shift"], ops=["shift"], shapes=["7x7x768"], batches=[1], peers=False,
                              measure_peaks=False, memory=False,
                              policy=effvit.bench.timing.TimingPolicy(budget_s=0.01, min_repeats=2, warmup=1))
    records = result["records"]
    assert records and all("median_us" in r and "impl" in r for r in records)
    assert any(r["status"] == "ok" for r in records)


def test_compare_flags_a_regression(tmp_path, capsys):
    rec = {"key": "shift/shift x", "impl": "effvit:cpu", "status": "ok", "median_us": 10.0}
    old = {"records": [rec]}
    new = {"records": [dict(rec, median_us=13.0)]}
    rows = report.compare(new, old)
    assert rows[0]["ratio"] == pytest.approx(1.3)
    assert report.print_comparison(rows, 20.0)
    assert not report.print_comparison(rows, 40.0)
    # through the command line: a run compared with a faked faster old run exits 1
    out_dir = tmp_path / "run"
    first = _bench(*TINY, "--no-peers", "--op", "shift", "--out", str(out_dir))
    assert first.returncode == 0, first.stderr
    data = json.loads((out_dir / "bench.json").read_text())
    for r in data["records"]:
        if r["status"] == "ok":
            r["median_us"] = 1e-3  # pretend the old run took a nanosecond: any real run is slower
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(data))
    second = _bench(*TINY, "--no-peers", "--op", "shift", "--compare", str(old_path), "--fail-if-regression", "10")
    assert second.returncode == 1, second.stdout + second.stderr
    assert "REGRESSION" in second.stdout


@pytest.mark.parametrize("args,words", [
    (["--family", "nope"], "unknown family"),
    (["--backend", "tpu"], "invalid choice"),
    (["--dtype", "int8"], "invalid choice"),
    (["--shape", "1x1x1"], "unknown shape"),
    (["--batch", "0"], "--batch"),
    (["--fail-if-regression", "5"], "needs --compare"),
    (["--compare", "/nonexistent.json"], "no such file"),
    (["--plot"], "--plot needs --out"),
    (["--device", "cpu", "--cuda-graphs"], "--cuda-graphs times GPU cases"),
])
def test_bad_arguments_exit_2(args, words):
    out = _bench(*args)
    assert out.returncode == 2
    assert words in out.stderr and "Traceback" not in out.stderr


def test_cuda_without_gpu_exits_2():
    import torch
    if torch.cuda.is_available():
        pytest.skip("there is a GPU")
    out = _bench("--device", "cuda")
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr


def test_shapes_of_several_families():
    """--shape names may come from different --family suites: each family runs its own."""
    out = _bench("--list", "--family", "shift", "--family", "linear", "--shape", "7x7x768", "--shape", "N196",
                 "--batch", "1")
    assert out.returncode == 0, out.stderr
    assert "shift/shift B1 C768 H7 W7" in out.stdout and "linear/core B1 N196" in out.stdout


def test_window_suite_lists_peers():
    out = _bench("--list", "--family", "window", "--shape", "7x7x768", "--batch", "1")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "window/core B1 H7 W7 C768 heads24 ws7 shift0 float32" in text
    assert text.count("window/core B1 H7 W7") == 1, "shift 3 on a map of one window is the shift-0 case"
    for impl in ("eager", "timm-sdpa", "compile"):
        assert f"run   {impl}" in text
    assert "skip  flex" in text or "run   flex" in text


def test_window_core_tiny_run():
    result = effvit.bench.run(["window"], ops=["core", "attn"], shapes=["7x7x768"], batches=[1], peers=True,
                              measure_peaks=False, memory=False, backward=True,
                              policy=effvit.bench.timing.TimingPolicy(budget_s=0.01, min_repeats=2, warmup=1))
    ok = {(r["op"], r["impl"], r["direction"]) for r in result["records"] if r["status"] == "ok"}
    try:
        import timm  # noqa: F401  (the attention-path peers are timm's blocks)
        ops = ("core", "attn")
    except ImportError:
        ops = ("core",)
    for op in ops:  # the compile peers are compiled when built, not when listed: they must still run
        for impl in ("effvit:cpu", "eager", "timm-sdpa", "compile"):
            assert (op, impl, "fwd+bwd") in ok, (op, impl, sorted(ok))


def test_hilo_suite_lists_the_paper_table():
    out = _bench("--list", "--family", "hilo", "--shape", "table", "--batch", "2")
    assert out.returncode == 0, out.stderr
    assert "hilo/table B2 H14 W14 C768 heads12 ws2 alpha0.9 float32" in out.stdout
    for impl in ("eager", "sra", "local-window", "mhsa"):
        assert f"run   {impl}" in out.stdout


def test_hilo_linear_token_drop_tiny_runs():
    policy = effvit.bench.timing.TimingPolicy(budget_s=0.01, min_repeats=2, warmup=1)
    for family, ops, shapes, peers in (("hilo", ["layer", "lofi"], ["14x14x384"], ("eager", "compile")),
                                       ("linear", ["core"], ["N196"], ("eager", "sdpa-softmax", "compile")),
                                       ("token_drop", ["drop"], ["vit_s"], ("eager", "compile"))):
        result = effvit.bench.run([family], ops=ops, shapes=shapes, batches=[1], peers=True, measure_peaks=False,
                                  memory=False, backward=True, policy=policy)
        ok = {(r["op"], r["impl"], r["direction"]) for r in result["records"] if r["status"] == "ok"}
        for op in ops:
            for impl in ("effvit:cpu",) + peers:
                assert (op, impl, "fwd+bwd") in ok, (family, op, impl, sorted(ok))


def test_recorded_command_names_the_cpu_isa_it_ran_under(monkeypatch):
    """A run under EFFVIT_CPU_ISA measures another kernel variant: the recorded command says so, so it can be rerun."""
    monkeypatch.delenv("EFFVIT_CPU_ISA", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert report.command_line(["--family", "window"]) == "effvit-bench --family window"
    monkeypatch.setenv("EFFVIT_CPU_ISA", "avx2")
    assert report.command_line(["--family", "window"]) == "EFFVIT_CPU_ISA=avx2 effvit-bench --family window"


def test_compile_peer_compiles_every_case_past_dynamos_recompile_limit(monkeypatch):
    """A suite compiles one peer function per case; dynamo runs a code object eagerly past recompile_limit (8)
    entries, so each case's compile must get a frame of its own."""
    import torch._dynamo.testing

    from effvit.bench import cases

    counter = torch._dynamo.testing.CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(cases.torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, **kw))

    def peer(x, k=2):
        return torch.relu(x) * k

    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", None) or config.cache_size_limit  # the older name (torch 2.6)
    n_cases = limit + 4
    for n in range(1, n_cases + 1):
        x = torch.randn(n, 3)
        assert torch.equal(cases.compiled(peer)(x, k=3), peer(x, k=3))
    assert counter.frame_count == n_cases
    module = torch.nn.Sequential(torch.nn.ReLU())   # a module peer (as the HiLo layer's) compiles too
    assert torch.equal(cases.compiled(module)(x), module(x)) and counter.frame_count == n_cases + 1


# ---- the report a person reads -------------------------------------------------------------------------

def _case(family, op, params, direction="fwd", title=None, other_designs=()):
    return Case(family=family, op=op, params=params, dtype=torch.float32, device="cpu", direction=direction,
                make_inputs=lambda: (), impls={}, bytes=1e6, title=title, other_designs=other_designs)


def _records(case, medians_us: dict, skipped: dict | None = None, error: str | None = None) -> list[dict]:
    """Records of one case as the runner makes them: medians_us {impl: median}, with a tight spread."""
    peaks = {"copy_gbps": 50.0, "sgemm_gflops": 100.0}
    recs = [runner._timed_record(case, name, [us * 1e-6 * f for f in (0.95, 1.0, 1.1)], 0.1, 1 << 20, peaks)
            for name, us in medians_us.items()]
    if error:
        recs.append(runner._record(case, error, status="error", reason="RuntimeError: it broke"))
    recs += [runner._record(case, name, status="skipped", reason=why) for name, why in (skipped or {}).items()]
    runner._add_ratios(recs)
    return recs


def _result(records, device="cpu", allocator="system (glibc)") -> dict:
    return {"settings": {"device": device, "threads": 2, "allocator": allocator, "retain_freed_memory": False,
                         "policy": timing.TimingPolicy().__dict__, "started": "s", "finished": "f"},
            "machine": {"effvit": "0.1.0", "cpu": "Some CPU", "cpu_count": 2, "torch": "2.x", "torch_cuda": None,
                        "python": "3.11", "triton": None},
            "peaks": {"copy_gbps": 50.0, "sgemm_gflops": 100.0}, "records": records}


def _tour_like_result(direction="fwd") -> dict:
    shift = dict(B=1, C=96, H=56, W=56, n_div=12)
    window = dict(B=1, H=56, W=56, C=96, heads=3, ws=7, shift=3)
    records = []
    for d in ("fwd", "fwd+bwd") if direction == "both" else (direction,):
        records += _records(_case("shift", "shift", shift, d),
                            {"effvit:cpu": 20.0, "floor:clone": 15.0, "eager": 50.0, "compile": 70.0},
                            skipped={"effvit:cuda": "effvit._C was built without CUDA kernels (rebuild on a machine "
                                                    "with nvcc, or with EFFVIT_FORCE_CUDA=1)"})
        records += _records(_case("shift", "shift_group_norm", shift, d),
                            {"effvit:cpu": 100.0, "eager": 800.0, "compile": 200.0})
        records += _records(_case("window", "core", window, d),
                            {"effvit:cpu": 350.0, "eager": 1560.0, "timm-sdpa": 1000.0, "compile": 2190.0},
                            skipped={"flex": "FlexAttention is a GPU peer"}, error="effvit:triton")
        linear = _case("linear", "core", dict(B=1, N=3136, heads=8, D=32), d, other_designs=("sdpa-softmax",))
        records += _records(linear, {"effvit:cpu": 640.0, "eager": 1440.0, "compile": 1300.0, "sdpa-softmax": 10.0})
        records += _records(_case("window", "model", dict(B=1, model="swin_t", img=224), d,
                                  title="swin_tiny_patch4_window7_224"),
                            {"effvit:cpu": 56000.0, "eager": 60000.0},
                            skipped={"compile": "torch.compile of the whole model is left out (minutes of "
                                                "compilation)"})
    return _result(records)


@pytest.mark.parametrize("direction", ["fwd", "both"])
@pytest.mark.parametrize("width", [80, 100, 120])
def test_report_fits_the_terminal(width, direction):
    """No line of the printed report is wider than the terminal, at 80, 100 and 120 columns; the table keeps the
    columns a reader needs first, readable case labels, what was not timed and why, and the headline."""
    out = io.StringIO()
    report.print_table(_tour_like_result(direction), file=out, width=width)
    text = out.getvalue()
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert not too_long, "\n".join(too_long)
    header = next(line for line in text.splitlines() if line.startswith("case"))
    assert header.split() == ["case", "impl", "median", "×", "eager", "×", "compile", "floor"]
    unwrapped = " ".join(text.split())  # labels may wrap in their column at 80
    assert "swin_tiny_patch4_window7_224," in unwrapped and "batch 1" in unwrapped
    assert "B1 modelswin_t" not in text and "p10-p90" in text and "peak MiB" not in text  # the legend names them
    for reason in ("FlexAttention is a GPU peer", "RuntimeError: it broke", "minutes of compilation"):
        assert reason in unwrapped
    assert "20.0 µs" in text and "1.56 ms" in text and "56.0 ms" in text


def test_report_wide_has_every_column():
    out = io.StringIO()
    report.print_table(_tour_like_result(), file=out, width=200, wide=True)
    header = next(line for line in out.getvalue().splitlines() if line.startswith("case"))
    for column in ("p10-p90", "GB/s", "% copy peak", "img/s", "peak MiB"):
        assert column in header
    assert "19.2-21.6 µs" in out.getvalue()  # the effvit:cpu shift case: p10, p90 of 19, 20, 22 µs


def test_headline_per_family_and_model():
    """Per family: the geometric mean of effvit's speed-ups over eager and over each case's fastest peer (another
    design, such as softmax beside linear attention, and the copy floor are not peers); then the whole models."""
    lines = report.headline(_tour_like_result())
    by_family = {line.split()[0]: line.split() for line in lines if line.startswith("  ")}
    # shift: over eager 2.5 and 8 -> 4.47; fastest peers eager (2.5) and compile (2) -> 2.24
    assert by_family["shift"][1:6] == ["4.47", "(2.50-8.00)", "2.24", "(2.00-2.50)", "2"]
    assert " ".join(by_family["shift"][6:]) == "eager 1, compile 1"
    assert by_family["linear"][1:4] == ["2.25", "2.03", "1"] and by_family["linear"][4] == "compile"
    assert by_family["window"][1:3] == ["4.46", "2.86"]  # the core only: the model is a line of its own
    model = next(line for line in lines if "swin_tiny" in line)
    assert "swin_tiny_patch4_window7_224, batch 1: 17.9 img/s, 1.07× eager" in model
    assert "allocator: system (glibc)" in lines[0] and "forward" in lines[0]
    # with both directions timed, a line per family and direction
    both = [line.split()[:2] for line in report.headline(_tour_like_result("both")) if line.startswith("  ")]
    assert ["shift", "fwd"] in both and ["shift", "fwd+bwd"] in both and ["linear", "fwd+bwd"] in both


def test_markdown_opens_with_the_headline():
    md = report.markdown(_tour_like_result(), "effvit-bench")
    first_block = md.split("```text\n", 1)[1].split("```", 1)[0]
    assert first_block.splitlines() == report.headline(_tour_like_result())
    assert md.index("```text") < md.index("| case |")


def test_allocator_is_the_systems_unless_asked(monkeypatch):
    """effvit-bench measures with the allocator a user's process has; --keep-freed-memory is the option, and
    the run records which one it had."""
    seen = {}

    def fake_run(families, **kwargs):
        seen.update(kwargs)
        return _tour_like_result()

    monkeypatch.setattr(runner, "run", fake_run)
    assert _bench(*TINY).returncode == 0 and seen["retain_freed_memory"] is False
    assert _bench(*TINY, "--keep-freed-memory").returncode == 0 and seen["retain_freed_memory"] is True
    assert _bench(*TINY, "--keep-freed-memory", "--system-malloc").returncode == 2
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for name in timing.GLIBC_MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(timing, "_retained", False)
    assert timing.cpu_allocator().startswith("system")
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    assert timing.cpu_allocator() == "glibc tuned by MALLOC_MMAP_MAX_"
    monkeypatch.setattr(timing, "_retained", True)
    assert timing.cpu_allocator() == "glibc keeping freed memory (--keep-freed-memory)"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert timing.cpu_allocator() == "jemalloc (LD_PRELOAD)"
    out = io.StringIO()
    report.print_table(_result(_tour_like_result()["records"], allocator="jemalloc (LD_PRELOAD)"), file=out)
    assert "allocator: jemalloc (LD_PRELOAD)" in " ".join(out.getvalue().split())


def test_cuda_home_warning_is_silenced():
    """torch.utils.cpp_extension's "No CUDA runtime is found" (a CUDA toolkit without a GPU) is not about the
    run: the command drops it, and only it."""
    cli._quiet_unrelated_warnings()
    logger = logging.getLogger("torch.utils.cpp_extension")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("another warning")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "another warning\n"


def test_suites_load_every_family_after_one_suite_module():
    """Importing one family's suite module first (as a test or a notebook may) still leaves every family listed."""
    code = ("import effvit.bench.token_drop_suite\nfrom effvit.bench import cases\n"
            "print(sorted(cases.suites()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == str(sorted(["hilo", "linear", "shift", "token_drop", "window"]))
