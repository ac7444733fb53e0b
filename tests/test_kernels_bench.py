"""kernels/bench.py at tiny shapes: every benchmark case through the interpreter (and natively
on CUDA, `gpu`), so a wrong argument in code that only a GPU session runs costs no device time;
the targets verdict on made-up rows, the time budget, and the no-GPU correctness pass of main()."""
import json
import math
import time

import pytest
import torch

from tests.kernel_utils import DEVICES, HAS_CUDA  # first: turns the interpreter on
from kernels import bench

TINY = {"tiny": (64, 4, 2, 16, 96, 320)}  # hidden, heads, kv heads, head_dim, inter, vocab
SIZES = dict(tokens=12, rope_seq=6, ce_rows=10, attn_tokens=48, decode_batch=2, nf4_m=(1, 20))


def cpu_bench(device="cpu", **kw) -> bench.Bench:
    """On CUDA the bench's own timers; elsewhere the host clock (the figures are not the
    point) with two input sets rotating through the stand-in for the graph replay."""
    if device == "cuda":
        return bench.Bench(peaks=(1.0, 1.0), device=device, **kw)

    def time_ms(run, grads):
        t = time.perf_counter()
        run()
        return (time.perf_counter() - t) * 1e3

    def graph_ms(runs):
        assert len(runs) == 2
        return time_ms(lambda: [run() for run in runs], ()) / 2

    def peak_mib(run):
        run()
        return 1.0
    return bench.Bench(peaks=(1.0, 1.0), device=device, time_ms=time_ms, peak_mib=peak_mib,
                       graph_ms=graph_ms, input_sets=lambda args: 2, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_every_case_runs_and_triton_matches_eager(device):
    streamed = []
    b = cpu_bench(device, on_rows=streamed.append)
    bench.run_benchmarks(b, TINY, (24,), set(bench.KERNELS), use_compile=False, sizes=SIZES)
    assert sum(len(c) for c in streamed) == len(b.rows)  # every case reached the sink
    assert {r["kernel"] for r in b.rows} == {
        "attention", "attention_decode", "nf4_dequantize", "nf4_matmul", "rmsnorm", "rope",
        "swiglu", "cross_entropy", "linear_cross_entropy"}
    failed = [(r["kernel"], r["mode"], r["impl"]) for r in b.rows if r["ms"] is None]
    assert not failed, f"cases that raised: {failed}"
    graphed = {r["kernel"] for r in b.rows if r["graph_ms"] is not None}
    assert graphed == {"attention_decode", "nf4_dequantize", "nf4_matmul", "rmsnorm", "rope",
                       "swiglu"}
    assert all(r["graph_ms"] is None for r in b.rows if r["mode"] == "fwd+bwd")
    for r in b.rows:
        if r["impl"].startswith("triton"):
            assert r["rel_err"] is not None and r["rel_err"] < 2e-2, r
        assert r["rate"] > 0 and r["speedup_vs_eager"] > 0
    # fwd+bwd compares the gradients too: the attention case returns dq, dk, dv
    modes = {(r["kernel"], r["mode"]) for r in b.rows}
    assert ("attention", "fwd+bwd") in modes and ("rope", "fwd+bwd") in modes
    assert {r["M"] for r in b.rows if r["kernel"] == "nf4_matmul"} == {1, 20}
    impls = {r["impl"] for r in b.rows if r["kernel"] == "nf4_matmul" and r["M"] == 20}
    assert impls == {"eager", "triton", "triton-fused", "triton-dequant+mm"}
    impls = {r["impl"] for r in b.rows if r["kernel"] == "nf4_matmul" and r["M"] == 1}
    assert impls == {"eager", "triton", "triton-split1", "triton-dequant+mm"}


def test_rel_err_catches_a_wrong_gradient():
    b = cpu_bench()
    wrong = lambda x, w: bench.rmsnorm.rms_norm_ref(x, w * 1.1, 1e-5)  # noqa: E731
    x, w = torch.randn(4, 32), torch.rand(32)
    bench.bench_case(b, "rmsnorm", "m", "4x32", "fwd+bwd",
                     dict(eager=lambda x, w: bench.rmsnorm.rms_norm_ref(x, w, 1e-5), triton=wrong),
                     1.0, "GB/s", (x, w), (0, 1), torch.randn(4, 32))
    assert b.rows[0]["rel_err"] is None and b.rows[1]["rel_err"] > 0.05


def test_budget_stops_new_cases():
    b = cpu_bench(deadline=time.monotonic() - 1)
    bench.run_benchmarks(b, TINY, (24,), {"rmsnorm", "swiglu"}, use_compile=False, sizes=SIZES)
    assert b.rows == [] and b.skipped == 4


def row(kernel, impl, ms, mode="fwd+bwd", shape="s", unit="GB/s", work=1e9, pct=None,
        mem=None, err=1e-3, **info):
    return dict(kernel=kernel, model="M", shape=shape, mode=mode, impl=impl, ms=ms, unit=unit,
                work=work, pct_peak=pct, peak_mib=mem, rel_err=err if impl != "eager" else None,
                **info)


def test_targets_judge_each_goal():
    rows = [
        row("attention", "best", 1.0, head_dim=128, seq=2048),
        row("attention", "triton", 0.9, head_dim=128, seq=2048),      # 1.11x SDPA: met
        row("attention", "triton", 0.9, shape="short", head_dim=128, seq=512),  # not judged
        row("nf4_dequantize", "triton", 1.0, mode="fwd", pct=79.0),    # under 80%
        row("nf4_matmul", "triton", 1.0, mode="fwd", pct=75.0, M=1),
        row("nf4_matmul", "triton-dequant+mm", 1.5, mode="fwd", M=1),  # only 1.5x
        row("rmsnorm", "triton", 1.0, pct=85.0),
        row("rope", "triton", 1.0, pct=10.0, work=1e6),                # too small to judge
        row("linear_cross_entropy", "eager", 2.0, mem=1000.0, unit="TFLOP/s", vocab=128256),
        row("linear_cross_entropy", "triton", 1.9, mem=200.0, unit="TFLOP/s", vocab=128256),
        row("swiglu", "triton", None, err=None),                       # failed: not measured
    ]
    got = {(v["target"].split(" ")[0] + " " + v["target"].split(" ")[-1], v["met"])
           for v in bench.targets(rows)}
    assert got == {("attention flash", True), ("NF4 bandwidth", False), ("NF4 bandwidth", True),
                   ("NF4 matmul", False), ("rmsnorm bandwidth", True),
                   ("fused eager's", True), ("fused eager", True),
                   ("swiglu bandwidth", None), ("worst reference", True)}
    table = bench.targets_table(bench.targets(rows))
    assert "| **no** |" in table and "not measured" in table


def test_targets_flag_a_bad_rel_err():
    rows = [row("rmsnorm", "triton", 1.0, pct=90.0, err=0.5)]
    worst = bench.targets(rows)[-1]
    assert worst["target"].startswith("worst rel err") and worst["met"] is False


@pytest.mark.skipif(HAS_CUDA, reason="the no-GPU path")
def test_main_without_cuda_runs_the_interpreter_pass(capsys):
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert "No CUDA device" in out and "all kernels match their references" in out
    assert "| NO |" not in out
    for kernel in ("rms_norm", "apply_rope", "swiglu", "cross_entropy", "attention", "nf4"):
        assert f"| {kernel}" in out
    assert bench.main(["--only", "rope,nf4"]) == 0  # --only picks the checks too
    rows = [ln.split("|")[1].strip() for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("| ") and "kernel" not in ln]
    assert {r.split()[0] for r in rows} == {"apply_rope", "nf4_dequantize", "nf4_matmul"}


def test_main_rejects_bad_flags(capsys):
    for argv in (["--only", "attention,flash"], ["--budget-min", "0"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
    assert "unknown kernel(s) flash" in capsys.readouterr().err


def test_append_jsonl_keeps_earlier_lines(tmp_path):
    path = tmp_path / "r" / "bench.jsonl"
    bench.append_jsonl(str(path), [{"a": 1}], {"gpu": "g"})
    bench.append_jsonl(str(path), [{"a": 2, "x": math.pi}], {"gpu": "g"})
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert [r["a"] for r in lines] == [1, 2] and lines[0]["gpu"] == "g"


def test_attention_candidates_only_natively_where_the_target_is_judged(monkeypatch):
    """The dK/dV candidates join attention's fwd+bwd cases at head_dim 128 and seq >= 2048 on a
    GPU (the target's cases), nowhere else: they cost compiles and --budget-min time."""
    cands = bench.attention_candidates("fwd+bwd", 128, 2048, interpret=False)
    assert cands == bench.ATTN_DKDV_CANDIDATES
    assert cands["triton-dkdv16"] == dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=3)
    assert cands["triton-dkdv-2st"] == dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2)
    assert bench.attention_candidates("fwd+bwd", 128, 8192, interpret=False) == cands
    for mode, hd, seq in (("fwd", 128, 2048), ("fwd+bwd", 64, 2048), ("fwd+bwd", 128, 512)):
        assert bench.attention_candidates(mode, hd, seq, interpret=False) == {}
    assert bench.attention_candidates("fwd+bwd", 128, 2048, interpret=True) == {}
    # the default they are timed against: M=32 N=128, 8 warps, 3 stages (what NOTES.md names)
    monkeypatch.setattr(bench.attn, "interpreting", lambda: False)
    default = bench.attn._configs("dkdv", 128, torch.bfloat16)[0]
    assert default == dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3)
    assert default not in cands.values()


@pytest.mark.parametrize("device", DEVICES)
def test_attention_candidate_rows_run_and_match(device, monkeypatch):
    """The candidate impls as run_benchmarks builds them, forced into the tiny fwd+bwd case
    (through the interpreter on CPU): every candidate row is timed and its output and
    gradients match eager's; the forward case gets none."""
    monkeypatch.setattr(bench, "attention_candidates", lambda mode, hd, seq: (
        dict(bench.ATTN_DKDV_CANDIDATES) if mode == "fwd+bwd" else {}))
    b = cpu_bench(device)
    bench.run_benchmarks(b, TINY, (24,), {"attention"}, use_compile=False, sizes=SIZES)
    impls = {(r["mode"], r["impl"]) for r in b.rows if r["kernel"] == "attention"}
    assert impls == {(m, i) for m in ("fwd", "fwd+bwd") for i in ("eager", "best", "triton")} | {
        ("fwd+bwd", "triton-dkdv16"), ("fwd+bwd", "triton-dkdv-2st")}
    for r in b.rows:
        if r["impl"].startswith("triton-dkdv"):
            assert r["ms"] is not None and r["rel_err"] < 2e-2, r
    assert {v["impl"] for v in bench.candidates(b.rows)} == set(bench.ATTN_DKDV_CANDIDATES)


def test_candidates_line_says_which_beats_and_by_how_much():
    rows = [row("attention", impl, ms, shape=shape, head_dim=128, seq=2048)
            for shape, times in (("T2048", (1.0, 0.8, 1.01)), ("T8192", (4.0, 3.5, 4.2)))
            for impl, ms in zip(("triton", "triton-dkdv16", "triton-dkdv-2st"), times)]
    rows.append(row("rmsnorm", "triton-dkdv16", 0.1))  # other kernels are not candidates
    got = {v["impl"]: v for v in bench.candidates(rows)}
    assert set(got) == {"triton-dkdv16", "triton-dkdv-2st"}
    assert got["triton-dkdv16"]["cases"] == {"M T2048 fwd+bwd": 1.25,
                                             "M T8192 fwd+bwd": 4.0 / 3.5}
    assert got["triton-dkdv16"]["beats"] and not got["triton-dkdv-2st"]["beats"]
    assert math.isclose(got["triton-dkdv16"]["speedup"], math.sqrt(1.25 * 4.0 / 3.5))
    line = bench.candidates_line(list(got.values()))
    assert "triton-dkdv16 (BLOCK_M=16 BLOCK_N=128 num_warps=8 num_stages=3) beats the default " \
           "by 1.195x" in line and "_configs" in line and "\n" not in line
    slower = [dict(r, ms=r["ms"] * (2 if r["impl"] == "triton-dkdv16" else 1)) for r in rows]
    line = bench.candidates_line(bench.candidates(slower))
    assert line.startswith("attention dK/dV: no candidate beats the default") and "keep" in line
    assert bench.candidates_line(bench.candidates([row("attention", "triton", 1.0)])) is None
    failed = [dict(r, ms=None) if r["impl"] != "triton" else r for r in rows]
    assert bench.candidates(failed) == []  # a candidate that raised is not judged
