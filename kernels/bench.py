"""python -m kernels.bench: every Triton kernel against its PyTorch reference, one table.

On CUDA: measures the device's copy bandwidth and bf16 matmul throughput first, then for each
kernel at SmolLM2-135M, Llama-2-7B and Llama-3-8B layer shapes (sequence 512-8k) times
  triton  the kernel;   eager  the *_ref PyTorch function;
  best    the best PyTorch offers: scaled_dot_product_attention (flash) for attention,
          torch.compile of the reference for the others (dequantize + F.linear for NF4),
reporting the median ms (triton.testing.do_bench), TFLOP/s or GB/s, percent of the measured
peak, speedup over eager, and peak memory. Prints a markdown table and appends JSON lines (GPU,
versions, commit, date) to benchmarks/results/bench.jsonl.
Without CUDA: says so and runs a small correctness pass through the Triton interpreter
(exit status 0 when every kernel matches its reference).

    python -m kernels.bench [--quick] [--only attention,nf4] [--no-compile] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit (kernel imports)
    os.environ["TRITON_INTERPRET"] = "1"

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels import attention as attn, cross_entropy as ce, nf4, rmsnorm, rope, swiglu  # noqa

MODELS = {  # hidden, heads, kv heads, head_dim, intermediate, vocab
    "SmolLM2-135M": (576, 9, 3, 64, 1536, 49152),
    "Llama-2-7B": (4096, 32, 32, 128, 11008, 32000),
    "Llama-3-8B": (4096, 32, 8, 128, 14336, 128256),
}
SEQS = (512, 2048, 8192)
TOKENS = 8192  # tokens per batch for the per-token kernels


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def measure_peaks() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s) measured on this device."""
    x = torch.empty(256 * 2 ** 20, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    copy = 2 * x.numel() * 2 / ms / 1e6
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ a, return_mode="median")
    return copy, 2 * 8192 ** 3 / ms / 1e9


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def leaves(*args, grad: bool):
    """Fresh leaf copies of the tensor arguments (others pass through)."""
    return [t.detach().clone().requires_grad_(grad and t.is_floating_point())
            if torch.is_tensor(t) else t for t in args]


def runner(fn, args, mode: str, upstream=None):
    """A no-argument callable running fn(*args), plus its backward in 'fwd+bwd' mode."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*args)
        return run

    def run_bwd():
        out = fn(*args)
        out.backward(upstream if out.dim() else None)
    return run_bwd


def bench_case(rows, peaks, kernel, model, shape, mode, impls, work, unit, args, upstream=None):
    """Time each implementation of one case; append result dicts to rows."""
    grad = mode == "fwd+bwd"
    eager_ms, first = None, len(rows)
    for impl, fn in impls.items():
        if fn is None:
            continue
        a = leaves(*args, grad=grad)
        run = runner(fn, a, mode, upstream)
        try:
            run()  # compile / warm up
            grads = [t for t in a if torch.is_tensor(t) and t.requires_grad]
            ms = do_bench(run, grad_to_none=grads or None, return_mode="median")
            mem = peak_mib(run)
        except torch.cuda.OutOfMemoryError:
            ms = mem = None
            torch.cuda.empty_cache()
        except Exception as e:  # e.g. a backend that rejects this shape
            print(f"  {kernel} {shape} {impl}: {type(e).__name__}: {str(e)[:120]}")
            ms = mem = None
        if impl == "eager":
            eager_ms = ms
        rate = None if ms is None else work / ms / (1e9 if unit == "TFLOP/s" else 1e6)
        peak = peaks[1] if unit == "TFLOP/s" else peaks[0]
        rows.append(dict(kernel=kernel, model=model, shape=shape, mode=mode, impl=impl, ms=ms,
                         rate=rate, unit=unit, pct_peak=None if rate is None else 100 * rate / peak,
                         peak_mib=mem))
        del a
    for r in rows[first:]:
        r["speedup_vs_eager"] = (eager_ms / r["ms"]) if eager_ms and r["ms"] else None


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
def compiled(fn, enabled):
    return torch.compile(fn, dynamic=False) if enabled else None


def run_benchmarks(models, seqs, only, use_compile, peaks):
    rows = []
    dt, dev = torch.bfloat16, "cuda"
    r = lambda *s: torch.randn(*s, device=dev, dtype=dt)  # noqa: E731
    modes = ("fwd", "fwd+bwd")
    for name, (hid, nh, nkv, hd, inter, vocab) in models.items():
        print(f"# {name}", flush=True)
        if "rmsnorm" in only:
            x, w = r(TOKENS, hid), r(hid)
            for mode in modes:
                work = (2 if mode == "fwd" else 5) * x.numel() * 2
                bench_case(rows, peaks, "rmsnorm", name, f"{TOKENS}x{hid}", mode,
                           dict(triton=lambda a, b: rmsnorm.rms_norm(a, b, 1e-5),
                                eager=lambda a, b: rmsnorm.rms_norm_ref(a, b, 1e-5),
                                best=compiled(lambda a, b: rmsnorm.rms_norm_ref(a, b, 1e-5),
                                              use_compile)),
                           work, "GB/s", (x, w), upstream=torch.randn_like(x))
        if "rope" in only:
            T = 2048
            q = r(TOKENS // T, nh, T, hd)
            cos, sin = torch.randn(T, hd, device=dev), torch.randn(T, hd, device=dev)
            for mode in modes:
                work = (2 if mode == "fwd" else 4) * q.numel() * 2
                bench_case(rows, peaks, "rope", name, f"{tuple(q.shape)}", mode,
                           dict(triton=rope.apply_rope, eager=rope.apply_rope_ref,
                                best=compiled(rope.apply_rope_ref, use_compile)),
                           work, "GB/s", (q, cos, sin), upstream=torch.randn_like(q))
        if "swiglu" in only:
            g, u = r(TOKENS, inter), r(TOKENS, inter)
            for mode in modes:
                work = (3 if mode == "fwd" else 8) * g.numel() * 2
                bench_case(rows, peaks, "swiglu", name, f"{TOKENS}x{inter}", mode,
                           dict(triton=swiglu.swiglu, eager=swiglu.swiglu_ref,
                                best=compiled(swiglu.swiglu_ref, use_compile)),
                           work, "GB/s", (g, u), upstream=torch.randn_like(g))
        if "cross_entropy" in only:
            N = 4096
            logits, t = r(N, vocab), torch.randint(0, vocab, (N,), device=dev)
            for mode in modes:
                bench_case(rows, peaks, "cross_entropy", name, f"{N}x{vocab}", mode,
                           dict(triton=ce.cross_entropy, eager=ce.cross_entropy_ref,
                                best=compiled(ce.cross_entropy_ref, use_compile)),
                           (1 if mode == "fwd" else 3) * logits.numel() * 2, "GB/s",
                           (logits, t))
            h, w = r(N, hid), r(vocab, hid) * hid ** -0.5
            for mode in modes:
                bench_case(rows, peaks, "linear_cross_entropy", name, f"{N}x{hid}x{vocab}", mode,
                           dict(triton=ce.linear_cross_entropy, eager=ce.linear_cross_entropy_ref,
                                best=compiled(ce.linear_cross_entropy_ref, use_compile)),
                           (2 if mode == "fwd" else 6) * N * hid * vocab, "TFLOP/s", (h, w, t))
        if "attention" in only:
            for T in seqs:
                B = max(1, 16384 // T)
                q, k, v = r(B, nh, T, hd), r(B, nkv, T, hd), r(B, nkv, T, hd)
                for mode in modes:
                    flops = 2 * 2 * B * nh * T * T * hd * 0.5 * (1 if mode == "fwd" else 3.5)
                    bench_case(rows, peaks, "attention", name, f"B{B} T{T} causal", mode,
                               dict(triton=attn.attention, eager=attn.attention_ref,
                                    best=sdpa_flash),
                               flops, "TFLOP/s", (q, k, v), upstream=torch.randn_like(q))
            for S in seqs:  # decode: one query per sequence against an S-long cache
                B = 8
                q, k, v = r(B, nh, 1, hd), r(B, nkv, S, hd), r(B, nkv, S, hd)
                bench_case(rows, peaks, "attention_decode", name, f"B{B} T1 S{S}", "fwd",
                           dict(triton=attn.attention, eager=attn.attention_ref,
                                best=sdpa_flash),
                           2 * k.numel() * 2, "GB/s", (q, k, v))
        if "nf4" in only:
            for N, K in ((inter, hid), (hid, hid)):
                fields = random_nf4(N, K, dev)
                numel = N * K
                deq = lambda *f: nf4.nf4_dequantize(*f, (N, K), dt)  # noqa: E731
                deq_ref = lambda *f: nf4.nf4_dequantize_ref(*f, (N, K), dt)  # noqa: E731
                bench_case(rows, peaks, "nf4_dequantize", name, f"{N}x{K}", "fwd",
                           dict(triton=deq, eager=deq_ref, best=compiled(deq_ref, use_compile)),
                           numel * 2.5 + numel / 64, "GB/s", fields)
                for M in (1, 16, 256, 4096):
                    x = r(M, K)
                    mm = lambda a, *f: nf4.nf4_matmul(a, *f, (N, K))  # noqa: E731
                    mm_ref = lambda a, *f: nf4.nf4_matmul_ref(a, *f, (N, K))  # noqa: E731
                    impls = dict(triton=mm, eager=mm_ref, best=compiled(mm_ref, use_compile))
                    if 16 < M <= 1024:  # tune FUSED_MAX_M: the fused kernel vs dequant + mm
                        impls["triton-fused"] = lambda a, *f: nf4.nf4_matmul_fused(a, *f, (N, K))
                        impls["triton-dequant+mm"] = lambda a, *f: F.linear(a, deq(*f))
                    gemv = M <= 16
                    work = numel * 0.5 + numel / 64 if gemv else 2 * M * N * K
                    bench_case(rows, peaks, "nf4_matmul", name, f"M{M} {N}x{K}", "fwd", impls,
                               work, "GB/s" if gemv else "TFLOP/s", (x, *fields))
    return rows


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
# Output
# ---------------------------------------------------------------------------------------------
def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(rows, peaks) -> str:
    lines = [f"Measured peaks: copy {peaks[0]:.0f} GB/s, bf16 matmul {peaks[1]:.0f} TFLOP/s", "",
             "| kernel | model | shape | mode | impl | ms | rate | % peak | x eager | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['model']} | {r['shape']} | {r['mode']} | {r['impl']} "
                     f"| {fmt(r['ms'], '.3f')} | {fmt(r['rate'], '.1f')} {r['unit']} "
                     f"| {fmt(r['pct_peak'], '.0f')} | {fmt(r['speedup_vs_eager'], '.2f')} "
                     f"| {fmt(r['peak_mib'], '.0f')} |")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(os.path.abspath(__file__))
                              ).stdout.strip()
    except Exception:
        return "unknown"


def append_jsonl(path: str, rows: list[dict], meta: dict) -> None:
    """Append atomically: write old content + new lines to a temp file, then rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old = open(path).read() if os.path.exists(path) else ""
    new = "".join(json.dumps({**meta, **r}) + "\n" for r in rows)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(old + new)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# No GPU: correctness through the interpreter
# ---------------------------------------------------------------------------------------------
def compare(name, fn, ref, args, tol, grad=True, results=None):
    """Run fn on args and ref on fp32 copies; compare output and every input gradient."""
    a = leaves(*args, grad=grad)
    af = [t.detach().float().requires_grad_(grad) if torch.is_tensor(t) and t.is_floating_point()
          else t for t in args]
    out, want = fn(*a), ref(*af)
    checks = [("out", out, want)]
    if grad:
        up = torch.randn_like(want)
        out.backward(up.to(out.dtype) if out.dim() else None)
        want.backward(up if want.dim() else None)
        checks += [(f"grad{i}", x.grad, y.grad) for i, (x, y) in enumerate(zip(a, af))
                   if x.requires_grad]
    for what, got, exp in checks:
        err = (got.float() - exp.float()).abs().max().item()
        ok = bool(torch.allclose(got.float(), exp.float(), atol=tol, rtol=tol))
        results.append((name, what, err, ok))


def interpreter_check() -> bool:
    torch.manual_seed(0)
    res: list = []
    bf = torch.bfloat16
    compare("rms_norm fp32", lambda x, w: rmsnorm.rms_norm(x, w, 1e-6),
            lambda x, w: rmsnorm.rms_norm_ref(x, w, 1e-6), (torch.randn(5, 48), torch.rand(48)),
            1e-5, results=res)
    compare("rms_norm bf16", lambda x, w: rmsnorm.rms_norm(x, w, 1e-6),
            lambda x, w: rmsnorm.rms_norm_ref(x, w, 1e-6),
            (torch.randn(5, 48).to(bf), torch.rand(48).to(bf)), 3e-2, results=res)
    cos, sin = torch.randn(7, 16), torch.randn(7, 16)
    compare("apply_rope", lambda x: rope.apply_rope(x, cos, sin),
            lambda x: rope.apply_rope_ref(x, cos, sin), (torch.randn(2, 3, 7, 16),), 1e-5,
            results=res)
    compare("swiglu", swiglu.swiglu, swiglu.swiglu_ref, (torch.randn(3, 40), torch.randn(3, 40)),
            1e-5, results=res)
    t = torch.tensor([3, -100, 250, 7, 0])
    compare("cross_entropy", lambda x: ce.cross_entropy(x, t), lambda x: ce.cross_entropy_ref(x, t),
            (3 * torch.randn(5, 300),), 1e-5, results=res)
    compare("linear_cross_entropy", lambda h, w: ce.linear_cross_entropy(h, w, t, chunk_size=2),
            lambda h, w: ce.linear_cross_entropy_ref(h, w, t),
            (torch.randn(5, 32), torch.randn(300, 32) / 4), 1e-5, results=res)
    for causal, (T, S) in ((True, (21, 37)), (False, (19, 19))):
        compare(f"attention causal={causal} GQA", lambda q, k, v: attn.attention(q, k, v, causal),
                lambda q, k, v: attn.attention_ref(q, k, v, causal),
                (torch.randn(1, 4, T, 16), torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)),
                2e-5, results=res)
    compare("attention decode", lambda q, k, v: attn.attention_decode(q, k, v, True, 0.25, 3),
            lambda q, k, v: attn.attention_ref(q, k, v, True),
            (torch.randn(2, 4, 2, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)),
            2e-5, grad=False, results=res)
    fields = random_nf4(24, 128, "cpu")
    compare("nf4_dequantize", lambda: nf4.nf4_dequantize(*fields, (24, 128), torch.float32),
            lambda: nf4.nf4_dequantize_ref(*fields, (24, 128), torch.float32), (), 0.0,
            grad=False, results=res)
    for M in (1, 20):
        compare(f"nf4_matmul M={M}", lambda x: nf4.nf4_matmul(x, *fields, (24, 128)),
                lambda x: nf4.nf4_matmul_ref(x, *fields, (24, 128)), (torch.randn(M, 128),),
                1e-4, results=res)
    print("| kernel | check | max abs err | ok |\n|---|---|---|---|")
    for name, what, err, ok in res:
        print(f"| {name} | {what} | {err:.2e} | {'yes' if ok else 'NO'} |")
    return all(ok for *_, ok in res)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Llama-3-8B shapes, seq 2048 only")
    p.add_argument("--only", default="rmsnorm,rope,swiglu,cross_entropy,attention,nf4",
                   help="comma-separated kernels to run")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "bench.jsonl"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: no timings. Running the correctness pass in the Triton "
              "interpreter (TRITON_INTERPRET=1) instead.\n")
        ok = interpreter_check()
        print("\nall kernels match their references" if ok else "\nMISMATCH: see the table")
        print("To check that every kernel also compiles natively for a GPU (registers, spills, "
              "shared memory): python -m kernels.compile_check")
        return 0 if ok else 1
    only = set(args.only.split(","))
    models = {"Llama-3-8B": MODELS["Llama-3-8B"]} if args.quick else MODELS
    seqs = (2048,) if args.quick else SEQS
    peaks = measure_peaks()
    print(f"peak copy {peaks[0]:.0f} GB/s, bf16 matmul {peaks[1]:.0f} TFLOP/s", flush=True)
    rows = run_benchmarks(models, seqs, only, not args.no_compile, peaks)
    print(markdown(rows, peaks))
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                peak_copy_gbs=peaks[0], peak_bf16_tflops=peaks[1])
    append_jsonl(args.out, rows, meta)
    print(f"\nappended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
