"""python -m kernels.bench: every Triton kernel against its PyTorch reference, one table.

On CUDA: measures the device's copy bandwidth and bf16 matmul throughput first, then for each
kernel at Llama-3-8B, Llama-2-7B and SmolLM2-135M layer shapes (sequence 512-8k) times
  eager   the *_ref PyTorch function (also the correctness reference: `rel err` is the
          worst ||out - ref|| / ||ref|| over the output and every input gradient);
  triton  the kernel (and, for attention's fwd+bwd at head_dim 128 and seq >= 2048, the same
          with other dK/dV tiles, `triton-dkdv*`: ATTN_DKDV_CANDIDATES);
  best    the best PyTorch offers: scaled_dot_product_attention (flash) for attention,
          torch.compile of the reference for the others (dequantize + F.linear for NF4),
reporting the median ms (triton.testing.do_bench), TFLOP/s or GB/s, percent of the measured
peak, speedup over eager, and peak memory. Forward cases of kernels that take microseconds
(NF4, the per-token kernels, decode) are also timed replayed from a CUDA graph (`graph ms`,
input sets rotating past the L2 cache): kernel time without Python's launch overhead, which
their rates and ratios then use. Rows print and append to benchmarks/results/
bench.jsonl (with GPU, versions, commit, date) as each case finishes, so a run cut short keeps
what it measured; `--budget-min` stops starting new cases after that many minutes. Llama-3-8B
comes first: its shapes alone decide every target of issue 5, judged in the table printed last
(then one line on whether a dK/dV candidate beat the default tiles, and by how much).
Without CUDA: says so and runs a small correctness pass through the Triton interpreter
(exit status 0 when every kernel matches its reference).

    python -m kernels.bench [--quick] [--only attention,nf4] [--no-compile] [--budget-min M]
                            [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit (kernel imports)
    os.environ["TRITON_INTERPRET"] = "1"

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels import attention as attn, cross_entropy as ce, nf4, rmsnorm, rope, swiglu  # noqa
from kernels.utils import interpreting  # noqa: E402

MODELS = {  # hidden, heads, kv heads, head_dim, intermediate, vocab
    "Llama-3-8B": (4096, 32, 8, 128, 14336, 128256),
    "Llama-2-7B": (4096, 32, 32, 128, 11008, 32000),
    "SmolLM2-135M": (576, 9, 3, 64, 1536, 49152),
}
SEQS = (512, 2048, 8192)
KERNELS = ("attention", "nf4", "rmsnorm", "rope", "swiglu", "cross_entropy")  # run in this order
SIZES = dict(tokens=8192,        # rows of the per-token kernels (rmsnorm, swiglu)
             rope_seq=2048,      # rope: (tokens / rope_seq, heads, rope_seq, head_dim)
             ce_rows=4096,       # tokens of the cross-entropy cases
             attn_tokens=16384,  # attention batch * seq
             decode_batch=8,
             nf4_m=(1, 16, 256, 4096))
BIG_BYTES = 25e6  # bandwidth targets are judged from here up: below, launch overhead dominates
# Other dK/dV tiles for attention's backward, timed beside the default (M=32 N=128, 8 warps,
# 3 stages, which spills at D=128 causal on sm_90; benchmarks/NOTES.md). Only where the
# attention target is judged (fwd+bwd, head_dim 128, seq >= 2048) and natively: each adds a
# compile and a few seconds of timing per case, and the cases after attention (nf4, the
# per-token kernels) must still fit --budget-min.
ATTN_DKDV_CANDIDATES = {
    "triton-dkdv16": dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=3),  # no spill
    "triton-dkdv-2st": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
}
ATTN_CANDIDATE_MIN_SEQ = 2048


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def measure_peaks() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s) measured on this device."""
    x = torch.randn(256 * 2 ** 20, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    copy = 2 * x.numel() * 2 / ms / 1e6
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ a, return_mode="median")
    return copy, 2 * 8192 ** 3 / ms / 1e9


def cuda_ms(run, grads) -> float:
    return do_bench(run, grad_to_none=grads or None, return_mode="median")


def cuda_graph_ms(runs: list) -> float:
    """Median ms per call of the no-argument callables `runs` (one per input set), replayed
    from a CUDA graph: kernel time without the Python launch overhead that dominates
    do_bench for kernels of a few microseconds. Rotating input sets larger than L2 together
    keep replays from reading a cache-resident weight."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (compiles, allocator pools)
        t0 = time.perf_counter()
        for run in runs:
            run()
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / len(runs) * 1e3
    reps = max(1, min(1000, int(10 / max(per_call, 1e-3))) // len(runs))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for run in runs:
                run()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (reps * len(runs)))
    return sorted(times)[len(times) // 2]


def input_sets(args) -> int:
    """How many copies of args rotate through a graph: together at least 3x the L2 cache."""
    nbytes = sum(t.numel() * t.element_size() for t in args if torch.is_tensor(t))
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2 ** 20)
    return max(1, min(16, -(-3 * l2 // max(nbytes, 1))))


def cuda_peak_mib(run) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


@dataclass
class Bench:
    """Where and how the cases run. The defaults time on CUDA; tests pass a CPU clock."""
    peaks: tuple[float, float]             # measured copy GB/s, bf16 matmul TFLOP/s
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    time_ms: Callable = cuda_ms            # (run, grads to reset) -> median ms
    peak_mib: Callable = cuda_peak_mib     # run -> peak MiB allocated above the start
    graph_ms: Callable | None = cuda_graph_ms  # forward runs, one per input set -> ms per call
    input_sets: Callable = input_sets      # args -> how many input sets graph_ms rotates
    deadline: float = math.inf             # time.monotonic() after which no case starts
    on_rows: Callable = lambda rows: None  # called with each finished case's rows
    rows: list = field(default_factory=list)
    skipped: int = 0


def leaves(args, diff):
    """Fresh copies of the arguments; those at the indices in `diff` require grad."""
    return [t.detach().clone().requires_grad_(i in diff) if torch.is_tensor(t) else t
            for i, t in enumerate(args)]


def runner(fn, args, mode: str, upstream=None):
    """A no-argument callable running fn(*args) (and its backward in 'fwd+bwd' mode)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*args)
        return run

    def run_bwd():
        out = fn(*args)
        out.backward(upstream if out.dim() else None)
        return out
    return run_bwd


def rel_err(got: list, ref: list) -> float:
    """Worst ||got - ref|| / ||ref|| over the output and the gradients (inf for NaN)."""
    worst = 0.0
    for g, r in zip(got, ref):
        e = ((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item()
        worst = max(worst, e if math.isfinite(e) else math.inf)
    return worst


def _ratio(num: dict, den: dict):
    """num's time / den's time (a speedup of den over num), both timed the same way."""
    key = "graph_ms" if num.get("graph_ms") and den.get("graph_ms") else "ms"
    return num[key] / den[key] if num.get(key) and den.get(key) else None


def bench_case(b: Bench, kernel, model, shape, mode, impls, work, unit, args, diff=(),
               upstream=None, graph=False, **info):
    """Time each implementation of one case. The first of eager / best to run is the
    reference the others' rel_err is measured against, so list those first. graph: also
    time the forward from a CUDA graph (kernels of microseconds; none that syncs the host)."""
    if time.monotonic() > b.deadline:
        b.skipped += 1
        return
    diff = diff if mode == "fwd+bwd" else ()
    case, ref = [], None
    for impl, fn in impls.items():
        if fn is None:
            continue
        a = leaves(args, diff)
        grads = [a[i] for i in diff]
        run = runner(fn, a, mode, upstream)
        ms = mem = err = graph_ms = None
        try:
            got = [run().detach()] + [t.grad for t in grads]  # also compiles / warms up
            if ref is None and impl in ("eager", "best"):
                ref = got
            elif ref is not None:
                err = rel_err(got, ref)
            del got
            for t in grads:
                t.grad = None
            ms = b.time_ms(run, grads)
            for t in grads:
                t.grad = None
            mem = b.peak_mib(run)
            if graph and mode == "fwd" and b.graph_ms is not None:
                sets = [a] + [leaves(args, ()) for _ in range(b.input_sets(args) - 1)]
                graph_ms = b.graph_ms([runner(fn, x, mode) for x in sets])
                del sets
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
        except Exception as e:  # e.g. a backend that rejects this shape
            print(f"  {kernel} {shape} {mode} {impl}: {type(e).__name__}: {str(e)[:160]}")
        # rates from the graph replay where there is one (kernel time), else from do_bench
        best_ms = graph_ms or ms
        rate = None if best_ms is None else work / best_ms / (1e9 if unit == "TFLOP/s" else 1e6)
        peak = b.peaks[1] if unit == "TFLOP/s" else b.peaks[0]
        case.append(dict(kernel=kernel, model=model, shape=shape, mode=mode, impl=impl, ms=ms,
                         graph_ms=graph_ms, rate=rate, unit=unit,
                         pct_peak=None if rate is None else 100 * rate / peak,
                         peak_mib=mem, rel_err=err, work=work, **info))
        del a, grads, run
    eager = next((r for r in case if r["impl"] == "eager"), {})
    for r in case:
        r["speedup_vs_eager"] = _ratio(eager, r)
    b.rows.extend(case)
    b.on_rows(case)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
def run_benchmarks(b: Bench, models: dict, seqs, only, use_compile: bool, sizes=SIZES):
    dt, dev = b.dtype, b.device
    r = lambda *s: torch.randn(*s, device=dev, dtype=dt)  # noqa: E731
    modes = ("fwd", "fwd+bwd")
    best = lambda fn: torch.compile(fn, dynamic=False) if use_compile else None  # noqa: E731
    N_tok = sizes["tokens"]
    for name, (hid, nh, nkv, hd, inter, vocab) in models.items():
        print(f"# {name}", flush=True)
        if "attention" in only:
            for T in seqs:
                B = max(1, sizes["attn_tokens"] // T)
                q, k, v = r(B, nh, T, hd), r(B, nkv, T, hd), r(B, nkv, T, hd)
                for mode in modes:
                    flops = 2 * 2 * B * nh * T * T * hd * 0.5 * (1 if mode == "fwd" else 3.5)
                    impls = dict(eager=attn.attention_ref, best=sdpa_flash, triton=attn.attention)
                    # the first model only (Llama-3-8B: its shapes decide the targets), so the
                    # candidates' compiles leave the budget to the other kernels
                    cands = attention_candidates(mode, hd, T) if name == next(iter(models)) else {}
                    for impl, cfg in cands.items():
                        impls[impl] = lambda q, k, v, c=cfg: attn.attention(
                            q, k, v, configs={"dkdv": c})
                    bench_case(b, "attention", name, f"B{B} T{T} causal", mode, impls,
                               flops, "TFLOP/s", (q, k, v), (0, 1, 2), torch.randn_like(q),
                               head_dim=hd, seq=T)
            for S in seqs:  # decode: one query per sequence against an S-long cache
                B = sizes["decode_batch"]
                q, k, v = r(B, nh, 1, hd), r(B, nkv, S, hd), r(B, nkv, S, hd)
                bench_case(b, "attention_decode", name, f"B{B} T1 S{S}", "fwd",
                           dict(eager=attn.attention_ref, best=sdpa_flash, triton=attn.attention),
                           2 * k.numel() * k.element_size(), "GB/s", (q, k, v), graph=True)
        if "nf4" in only:
            for N, K in ((inter, hid), (hid, hid)):
                fields = random_nf4(N, K, dev)
                numel = N * K
                deq = lambda *f: nf4.nf4_dequantize(*f, (N, K), dt)  # noqa: E731
                deq_ref = lambda *f: nf4.nf4_dequantize_ref(*f, (N, K), dt)  # noqa: E731
                bench_case(b, "nf4_dequantize", name, f"{N}x{K}", "fwd",
                           dict(eager=deq_ref, best=best(deq_ref), triton=deq),
                           numel * 2.5 + numel / 64, "GB/s", fields, graph=True)
                for M in sizes["nf4_m"]:
                    mm_ref = lambda a, *f: nf4.nf4_matmul_ref(a, *f, (N, K))  # noqa: E731
                    impls = dict(eager=mm_ref, best=best(mm_ref),
                                 triton=lambda a, *f: nf4.nf4_matmul(a, *f, (N, K)))
                    if 16 < M <= 1024:  # tunes FUSED_MAX_M: the fused kernel vs dequant + mm
                        impls["triton-fused"] = lambda a, *f: nf4.nf4_matmul_fused(a, *f, (N, K))
                    if M <= 16:  # is split-K (more loads in flight, two more launches) worth it?
                        impls["triton-split1"] = lambda a, *f: nf4.nf4_matmul_fused(
                            a, *f, (N, K), split_k=1)
                    impls["triton-dequant+mm"] = lambda a, *f: F.linear(a, deq(*f))
                    gemv = M <= 16  # bound by reading the 4-bit weight once
                    bench_case(b, "nf4_matmul", name, f"M{M} {N}x{K}", "fwd", impls,
                               numel * 0.5 + numel / 64 if gemv else 2 * M * N * K,
                               "GB/s" if gemv else "TFLOP/s", (r(M, K), *fields), graph=True,
                               M=M)
        if "rmsnorm" in only:
            x, w = r(N_tok, hid), r(hid)
            for mode in modes:
                rms = lambda a, w: rmsnorm.rms_norm(a, w, 1e-5)  # noqa: E731
                rms_ref = lambda a, w: rmsnorm.rms_norm_ref(a, w, 1e-5)  # noqa: E731
                bench_case(b, "rmsnorm", name, f"{N_tok}x{hid}", mode,
                           dict(eager=rms_ref, best=best(rms_ref), triton=rms),
                           (2 if mode == "fwd" else 5) * x.numel() * 2, "GB/s", (x, w), (0, 1),
                           torch.randn_like(x), graph=True)
        if "rope" in only:
            T = min(sizes["rope_seq"], N_tok)
            q = r(N_tok // T, nh, T, hd)
            cos, sin = torch.randn(T, hd, device=dev), torch.randn(T, hd, device=dev)
            for mode in modes:
                bench_case(b, "rope", name, f"{tuple(q.shape)}", mode,
                           dict(eager=rope.apply_rope_ref, best=best(rope.apply_rope_ref),
                                triton=rope.apply_rope),
                           (2 if mode == "fwd" else 4) * q.numel() * 2, "GB/s", (q, cos, sin),
                           (0,), torch.randn_like(q), graph=True)
        if "swiglu" in only:
            g, u = r(N_tok, inter), r(N_tok, inter)
            for mode in modes:
                bench_case(b, "swiglu", name, f"{N_tok}x{inter}", mode,
                           dict(eager=swiglu.swiglu_ref, best=best(swiglu.swiglu_ref),
                                triton=swiglu.swiglu),
                           (3 if mode == "fwd" else 8) * g.numel() * 2, "GB/s", (g, u), (0, 1),
                           torch.randn_like(g), graph=True)
        if "cross_entropy" in only:
            N = sizes["ce_rows"]
            logits, t = r(N, vocab), torch.randint(0, vocab, (N,), device=dev)
            for mode in modes:
                bench_case(b, "cross_entropy", name, f"{N}x{vocab}", mode,
                           dict(eager=ce.cross_entropy_ref, best=best(ce.cross_entropy_ref),
                                triton=ce.cross_entropy),
                           (1 if mode == "fwd" else 3) * logits.numel() * 2, "GB/s",
                           (logits, t), (0,), vocab=vocab)
            h, w = r(N, hid), r(vocab, hid) * hid ** -0.5
            for mode in modes:
                bench_case(b, "linear_cross_entropy", name, f"{N}x{hid}x{vocab}", mode,
                           dict(eager=ce.linear_cross_entropy_ref,
                                best=best(ce.linear_cross_entropy_ref),
                                triton=ce.linear_cross_entropy),
                           (2 if mode == "fwd" else 6) * N * hid * vocab, "TFLOP/s", (h, w, t),
                           (0, 1), vocab=vocab)
    return b.rows


def attention_candidates(mode: str, head_dim: int, seq: int, interpret: bool | None = None):
    """{impl name: dK/dV launch config} to time beside the default in this attention case:
    ATTN_DKDV_CANDIDATES where the attention target is judged, natively; {} elsewhere."""
    interpret = interpreting() if interpret is None else interpret
    if interpret or mode != "fwd+bwd" or head_dim != 128 or seq < ATTN_CANDIDATE_MIN_SEQ:
        return {}
    return dict(ATTN_DKDV_CANDIDATES)


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    T, S = q.shape[2], k.shape[2]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        # SDPA's is_causal is top-left aligned: only use it for T == S (decode: T=1 sees all).
        return F.scaled_dot_product_attention(q, k, v, is_causal=T == S and T > 1,
                                              enable_gqa=q.shape[1] != k.shape[1])


def random_nf4(N, K, device, blocksize=64):
    n_blocks = triton.cdiv(N * K, blocksize)
    packed = torch.randint(0, 256, ((N * K + 1) // 2,), dtype=torch.uint8, device=device)
    absmax_q = torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, device=device)
    nested = torch.rand(triton.cdiv(n_blocks, 256), device=device) * 0.05
    code = torch.sort(torch.rand(256, device=device) * 2 - 1).values
    return packed, absmax_q, nested, code, 0.01


# ---------------------------------------------------------------------------------------------
# Issue 5's targets, judged on the measured rows
# ---------------------------------------------------------------------------------------------
def targets(rows: list[dict]) -> list[dict]:
    """One verdict per (target, case): measured value, goal, met (None: not measured).
    Bandwidth targets are judged where the kernel moves BIG_BYTES or more."""
    index = {(r["kernel"], r["model"], r["shape"], r["mode"], r["impl"]): r for r in rows}
    out = []

    def ms_ratio(r, num_impl, den_impl):  # time of num_impl / time of den_impl
        return _ratio(index.get((r["kernel"], r["model"], r["shape"], r["mode"], num_impl), {}),
                      index.get((r["kernel"], r["model"], r["shape"], r["mode"], den_impl), {}))

    def judge(target, r, value, goal, less=False):
        met = None if value is None else (value <= goal if less else value >= goal)
        out.append(dict(target=target, case=f"{r['model']} {r['kernel']} {r['shape']} "
                        f"{r['mode']}", value=value, goal=goal, met=met))

    for r in rows:
        if r["impl"] != "triton":
            continue
        k, big = r["kernel"], r["unit"] == "GB/s" and r["work"] >= BIG_BYTES
        if k == "attention" and r["mode"] == "fwd+bwd" and r["head_dim"] >= 128 \
                and r["seq"] >= 2048:
            judge("attention speedup over SDPA flash", r, ms_ratio(r, "best", "triton"), 1.0)
        elif k == "nf4_dequantize" and big:
            judge("NF4 dequantize % of copy bandwidth", r, r["pct_peak"], 80)
        elif k == "nf4_matmul" and r["M"] == 1 and big:
            judge("NF4 GEMV (M=1) % of bandwidth", r, r["pct_peak"], 70)
            judge("NF4 GEMV speedup over dequantize + matmul", r,
                  ms_ratio(r, "triton-dequant+mm", "triton"), 2.0)
        elif k in ("rmsnorm", "rope", "swiglu") and big:
            judge(f"{k} % of copy bandwidth", r, r["pct_peak"], 80)
        elif k == "linear_cross_entropy" and r["vocab"] >= 49000:
            eager = index.get((k, r["model"], r["shape"], r["mode"], "eager"), {})
            mem = (r["peak_mib"] / eager["peak_mib"]
                   if r["peak_mib"] is not None and eager.get("peak_mib") else None)
            judge("fused cross-entropy peak memory / eager's", r, mem, 0.25, less=True)
            judge("fused cross-entropy speedup over eager", r, ms_ratio(r, "eager", "triton"), 1.0)
    errs = [r for r in rows if r["impl"].startswith("triton") and r["rel_err"] is not None]
    if errs:
        worst = max(errs, key=lambda r: r["rel_err"])
        judge(f"worst rel err of {len(errs)} triton rows vs the reference", worst,
              worst["rel_err"], 2e-2, less=True)
    return out


NOISE = 1.02  # a candidate "beats" the default only past this speedup (run-to-run noise)


def candidates(rows: list[dict]) -> list[dict]:
    """For each attention dK/dV candidate: its speedup over the default `triton` row of the same
    case (default ms / candidate ms), per case and as a geometric mean over the cases both ran."""
    index = {(r["model"], r["shape"], r["mode"], r["impl"]): r for r in rows
             if r["kernel"] == "attention"}
    out = []
    for impl, cfg in ATTN_DKDV_CANDIDATES.items():
        cases = {}
        for (model, shape, mode, i), r in index.items():
            base = index.get((model, shape, mode, "triton"), {})
            speedup = _ratio(base, r) if i == impl else None  # fwd+bwd rows: plain ms
            if speedup:
                cases[f"{model} {shape} {mode}"] = speedup
        if cases:
            mean = math.exp(sum(math.log(x) for x in cases.values()) / len(cases))
            out.append(dict(impl=impl, config=cfg, cases=cases, speedup=mean,
                            beats=mean >= NOISE))
    return out


def candidates_line(verdicts: list[dict]) -> str | None:
    """One line on the dK/dV candidates (None when none was timed): the best one's speedup
    over the default, and what to do with it."""
    if not verdicts:
        return None
    best = max(verdicts, key=lambda v: v["speedup"])
    per_case = ", ".join(f"{c} {x:.3f}x" for c, x in best["cases"].items())
    if best["beats"]:
        cfg = " ".join(f"{k}={v}" for k, v in best["config"].items())
        return (f"attention dK/dV: {best['impl']} ({cfg}) beats the default by "
                f"{best['speedup']:.3f}x on fwd+bwd ({per_case}): make it the first 'dkdv' "
                "config of kernels/attention.py _configs at head_dim 128")
    others = ", ".join(f"{v['impl']} {v['speedup']:.3f}x" for v in verdicts)
    return (f"attention dK/dV: no candidate beats the default by {NOISE - 1:.0%} or more on "
            f"fwd+bwd ({others}): keep M=32 N=128, 3 stages")


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def fmt(v, spec):
    return "-" if v is None else format(v, spec)


ROW_HEADER = ("| kernel | model | shape | mode | impl | ms | graph ms | rate | % peak | x eager "
              "| peak MiB | rel err |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def row_line(r: dict) -> str:
    return (f"| {r['kernel']} | {r['model']} | {r['shape']} | {r['mode']} | {r['impl']} "
            f"| {fmt(r['ms'], '.3f')} | {fmt(r['graph_ms'], '.4f')} "
            f"| {fmt(r['rate'], '.1f')} {r['unit']} "
            f"| {fmt(r['pct_peak'], '.0f')} | {fmt(r['speedup_vs_eager'], '.2f')} "
            f"| {fmt(r['peak_mib'], '.0f')} | {fmt(r['rel_err'], '.1e')} |")


def targets_table(verdicts: list[dict]) -> str:
    lines = ["| target | case | measured | goal | met |", "|---|---|---|---|---|"]
    for v in verdicts:
        met = {True: "yes", False: "**no**", None: "not measured"}[v["met"]]
        lines.append(f"| {v['target']} | {v['case']} | {fmt(v['value'], '.3g')} "
                     f"| {v['goal']:g} | {met} |")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(os.path.abspath(__file__))
                              ).stdout.strip()
    except Exception:
        return "unknown"


def append_jsonl(path: str, rows: list[dict], meta: dict) -> None:
    """Append the rows as JSON lines in one write. Called once per case: appending never
    rewrites (or risks) the lines of earlier cases and runs, where copying the whole file
    each time would grow with the results' history."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps({**meta, **r}) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# No GPU: correctness through the interpreter
# ---------------------------------------------------------------------------------------------
def compare(name, fn, ref, args, tol, grad=True, results=None):
    """Run fn on args and ref on fp32 copies; compare output and every input gradient."""
    diff = [i for i, t in enumerate(args) if grad and t.is_floating_point()]
    a = leaves(args, diff)
    af = leaves([t.float() if t.is_floating_point() else t for t in args], diff)
    out, want = fn(*a), ref(*af)
    checks = [("out", out, want)]
    if grad:
        up = torch.randn_like(want)
        out.backward(up.to(out.dtype) if out.dim() else None)
        want.backward(up if want.dim() else None)
        checks += [(f"grad{i}", a[i].grad, af[i].grad) for i in diff]
    for what, got, exp in checks:
        err = (got.float() - exp.float()).abs().max().item()
        ok = bool(torch.allclose(got.float(), exp.float(), atol=tol, rtol=tol))
        results.append((name, what, err, ok))


def interpreter_check(only=KERNELS) -> bool:
    """Each kernel of `only` (KERNELS names) against its reference at small shapes."""
    torch.manual_seed(0)
    res: list = []
    bf = torch.bfloat16

    def check(kernel, *args, **kw):  # --only: the named kernels' checks
        if kernel in only:
            compare(*args, results=res, **kw)

    check("rmsnorm", "rms_norm fp32", lambda x, w: rmsnorm.rms_norm(x, w, 1e-6),
          lambda x, w: rmsnorm.rms_norm_ref(x, w, 1e-6), (torch.randn(5, 48), torch.rand(48)),
          1e-5)
    check("rmsnorm", "rms_norm bf16", lambda x, w: rmsnorm.rms_norm(x, w, 1e-6),
          lambda x, w: rmsnorm.rms_norm_ref(x, w, 1e-6),
          (torch.randn(5, 48).to(bf), torch.rand(48).to(bf)), 3e-2)
    cos, sin = torch.randn(7, 16), torch.randn(7, 16)
    check("rope", "apply_rope", lambda x: rope.apply_rope(x, cos, sin),
          lambda x: rope.apply_rope_ref(x, cos, sin), (torch.randn(2, 3, 7, 16),), 1e-5)
    check("swiglu", "swiglu", swiglu.swiglu, swiglu.swiglu_ref,
          (torch.randn(3, 40), torch.randn(3, 40)), 1e-5)
    t = torch.tensor([3, -100, 250, 7, 0])
    check("cross_entropy", "cross_entropy", lambda x: ce.cross_entropy(x, t),
          lambda x: ce.cross_entropy_ref(x, t), (3 * torch.randn(5, 300),), 1e-5)
    check("cross_entropy", "linear_cross_entropy",
          lambda h, w: ce.linear_cross_entropy(h, w, t, chunk_size=2),
          lambda h, w: ce.linear_cross_entropy_ref(h, w, t),
          (torch.randn(5, 32), torch.randn(300, 32) / 4), 1e-5)
    for causal, (T, S) in ((True, (21, 37)), (False, (19, 19))):
        check("attention", f"attention causal={causal} GQA",
              lambda q, k, v: attn.attention(q, k, v, causal),
              lambda q, k, v: attn.attention_ref(q, k, v, causal),
              (torch.randn(1, 4, T, 16), torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)),
              2e-5)
    check("attention", "attention decode",
          lambda q, k, v: attn.attention_decode(q, k, v, True, 0.25, 3),
          lambda q, k, v: attn.attention_ref(q, k, v, True),
          (torch.randn(2, 4, 2, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)),
          2e-5, grad=False)
    fields = random_nf4(24, 128, "cpu")
    check("nf4", "nf4_dequantize", lambda: nf4.nf4_dequantize(*fields, (24, 128), torch.float32),
          lambda: nf4.nf4_dequantize_ref(*fields, (24, 128), torch.float32), (), 0.0,
          grad=False)
    for M in (1, 20):
        check("nf4", f"nf4_matmul M={M}", lambda x: nf4.nf4_matmul(x, *fields, (24, 128)),
              lambda x: nf4.nf4_matmul_ref(x, *fields, (24, 128)), (torch.randn(M, 128),), 1e-4)
    print("| kernel | check | max abs err | ok |\n|---|---|---|---|")
    for name, what, err, ok in res:
        print(f"| {name} | {what} | {err:.2e} | {'yes' if ok else 'NO'} |")
    return all(ok for *_, ok in res)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Llama-3-8B shapes, seq 2048 only")
    p.add_argument("--only", default=",".join(KERNELS),
                   help="comma-separated kernels to run (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    p.add_argument("--budget-min", type=float, default=None,
                   help="start no new case after this many minutes (the rows so far are kept)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "bench.jsonl"),
                   help="JSON lines file the results are appended to (default: %(default)s)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if only - set(KERNELS):
        p.error(f"--only: unknown kernel(s) {', '.join(sorted(only - set(KERNELS)))}; "
                f"choose from {', '.join(KERNELS)}")
    if args.budget_min is not None and args.budget_min <= 0:
        p.error("--budget-min must be positive")
    if not torch.cuda.is_available():
        print("No CUDA device: no timings (nothing is written to --out). Running the "
              "correctness pass in the Triton interpreter (TRITON_INTERPRET=1) instead.\n")
        ok = interpreter_check(only)
        print("\nall kernels match their references" if ok else "\nMISMATCH: see the table")
        print("To check that every kernel also compiles natively for a GPU (registers, spills, "
              "shared memory): python -m kernels.compile_check")
        return 0 if ok else 1
    start = time.monotonic()
    models = {"Llama-3-8B": MODELS["Llama-3-8B"]} if args.quick else MODELS
    seqs = (2048,) if args.quick else SEQS
    peaks = measure_peaks()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                peak_copy_gbs=peaks[0], peak_bf16_tflops=peaks[1])
    print(f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, commit "
          f"{meta['commit'][:10]}\nMeasured peaks: copy {peaks[0]:.0f} GB/s, bf16 matmul "
          f"{peaks[1]:.0f} TFLOP/s\n\n{ROW_HEADER}", flush=True)

    def on_rows(case):
        for r in case:
            print(row_line(r), flush=True)
        append_jsonl(args.out, [{"record": "case", **r} for r in case], meta)

    b = Bench(peaks, deadline=start + 60 * args.budget_min if args.budget_min else math.inf,
              on_rows=on_rows)
    run_benchmarks(b, models, seqs, only, not args.no_compile)
    if b.skipped:
        print(f"\n--budget-min {args.budget_min:g} reached: {b.skipped} cases not run")
    verdicts = targets(b.rows)
    tried = candidates(b.rows)
    append_jsonl(args.out, [{"record": "target", **v} for v in verdicts]
                 + [{"record": "candidate", **v} for v in tried], meta)
    print(f"\n{len(b.rows)} rows appended to {args.out} ({time.monotonic() - start:.0f} s)\n\n"
          f"Issue 5's targets ({meta['gpu']}, bf16):\n{targets_table(verdicts)}")
    line = candidates_line(tried)
    if line:
        print(f"\n{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
