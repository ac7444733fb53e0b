"""python -m kernels.compile_check: build every Triton kernel for a GPU, on a machine without one.

Triton compiles ahead of time for any target its backends know (the NVIDIA backend ships its own
ptxas), so the launchers' GPU code path can be checked on a CPU. Each public kernel function
runs at the benchmark's model shapes (few rows: builds depend on feature sizes, dtypes and the
launcher's choices, not on the row count) with CPU tensors standing in for CUDA ones, and every
launch becomes a compile for the target that never runs; outputs are garbage, only builds matter.
For each distinct build it reports registers per thread, spilled bytes per thread and shared
memory against the target's per-block limit (`cuobjdump --dump-resource-usage` on the cubin;
spills are its local + stack bytes: Triton kernels make no calls, so the stack frame ptxas gives
a thread holds spilled registers), and from the PTX the matrix instruction its dots became
(wgmma on Hopper, mma.sync before) and its global load instructions, how many moving 16 bytes.

A build that needs more shared memory than the target has raises OutOfResources, as loading it
on that GPU would, so launchers that fall back to smaller tiles are exercised too. Exit status 1
when a case fails (a compile error, or no config fits); spills are reported, not failed (they
cost speed, not correctness).

    python -m kernels.compile_check [--arch 80,89,90] [--quick] [--only attention,nf4]
                                    [--dtypes bf16,fp32] [--head-dims 64,128] [--json PATH]
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.pop("TRITON_INTERPRET", None) == "1":  # must precede the kernel imports
    print("compile_check: ignoring TRITON_INTERPRET=1 (it builds native code)", file=sys.stderr)

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.errors import CompilationError  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import kernels.utils  # noqa: E402
from kernels import attention as attn, cross_entropy as ce, nf4, rmsnorm, rope, swiglu  # noqa
from kernels import bench  # noqa: E402
from kernels.bench import MODELS, random_nf4  # noqa: E402

os.environ.pop("TRITON_INTERPRET", None)  # kernels.bench sets it on a machine without CUDA

KERNELS = set(bench.KERNELS)
# compute capability -> (GPUs, max shared memory per block with opt-in in bytes, SMs)
TARGETS = {
    80: ("A100", 166912, 108),
    86: ("RTX 30xx, A10, A40", 101376, 84),
    89: ("RTX 40xx, L4, L40", 101376, 128),
    90: ("H100, H200", 232448, 132),
    100: ("B200", 232448, 148),
    120: ("RTX 50xx", 101376, 170),
}


class _CompileOnlyDriver:
    """What JITFunction.run asks of Triton's active driver, for a GPU that is not here."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compile_only(arch: int):
    """Within: every @triton.jit launch compiles for sm_`arch` and returns without running.
    Yields the list that collects (kernel name, launch kwargs, CompiledKernel) per launch."""
    if arch not in TARGETS:
        raise ValueError(f"compile_check: unknown arch {arch}; known: {sorted(TARGETS)}")
    if not isinstance(attn._attn_fwd_kernel, JITFunction):
        raise RuntimeError("compile_check: kernels were imported under TRITON_INTERPRET=1; "
                           "run it in a process without that variable")
    launches, touched = [], set()
    original_run = JITFunction.run
    smem_limit = TARGETS[arch][1]

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self.fn.__name__, kwargs, kernel))
        touched.add(self)
        if kernel.metadata.shared > smem_limit:  # what loading it on that GPU would raise
            raise OutOfResources(kernel.metadata.shared, smem_limit, "shared memory")
        return kernel

    previous_driver = driver._active  # None on a machine without a GPU: no driver to reset to
    JITFunction.run = run
    driver.set_active(_CompileOnlyDriver(arch))
    kernels.utils.COMPILE_ONLY_SMS = TARGETS[arch][2]
    try:
        yield launches
    finally:
        JITFunction.run = original_run
        driver.set_active(previous_driver)
        kernels.utils.COMPILE_ONLY_SMS = None
        kernels.utils._fitting.clear()
        for fn in touched:  # builds for a fake device must never serve a real one
            fn.device_caches.clear()


def resource_usage(cubin: bytes) -> dict:
    """Registers, local and stack bytes per thread, static shared memory of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in fields.items()}


_LOAD = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld\.global\S*|cp\.async\.c[ag]\.shared\.global)"
                   r"([^;]*);", re.M)


def ptx_stats(ptx: str) -> dict:
    """What the PTX says about speed: the matrix instruction the dots became (wgmma is
    Hopper's warpgroup MMA; mma.sync the older per-warp one; '-' none) and the global load
    instructions (static count per thread), how many of them move 16 bytes."""
    mma = ("wgmma" if "wgmma.mma_async" in ptx
           else "mma.sync" if re.search(r"\bmma\.sync", ptx) else "-")
    loads = _LOAD.findall(ptx)
    wide = sum(bool(re.search(r"\.v4\.(b|f|u|s)32|\.v2\.(b|f|u|s)64", op)) if op.startswith("ld")
               else operands.rstrip().endswith("0x10") or ", 0x10," in operands
               for op, operands in loads)
    return dict(mma=mma, global_loads=len(loads), loads_16B=wide)


# ---------------------------------------------------------------------------------------------
# Cases: each runs public kernel functions (forward and backward) once
# ---------------------------------------------------------------------------------------------
def _backward(out):
    out.backward(torch.ones_like(out) if out.dim() else None)


def cases(models: dict, dtypes, head_dims, only):
    """(label, no-argument callable) pairs covering every kernel and launcher branch."""
    out = [case for dt in dtypes for case in _cases_for(dt, models, head_dims, only)]
    if "cross_entropy" in only:  # the fused lm_head variant launches the same two kernels
        hid, vocab = MODELS["SmolLM2-135M"][0], MODELS["SmolLM2-135M"][5]
        h = torch.randn(4, hid, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(vocab, hid, dtype=torch.bfloat16, requires_grad=True)
        out.append(("linear_cross_entropy SmolLM2-135M bfloat16", lambda: _backward(
            ce.linear_cross_entropy(h, w, torch.randint(0, vocab, (4,))))))
    return out


def _cases_for(dt: torch.dtype, models: dict, head_dims, only):
    e = lambda *s: torch.empty(*s, dtype=dt).normal_()  # noqa: E731
    g = lambda *s: e(*s).requires_grad_()  # noqa: E731
    dn = str(dt).removeprefix("torch.")
    out = []
    for name, (hid, nh, nkv, hd, inter, vocab) in models.items():
        if "rmsnorm" in only:
            out.append((f"rmsnorm {name} {dn}", lambda hid=hid: _backward(
                rmsnorm.rms_norm(g(4, hid), g(hid), 1e-5))))
        if "swiglu" in only:
            out.append((f"swiglu {name} {dn}", lambda inter=inter: _backward(
                swiglu.swiglu(g(4, inter), g(4, inter)))))
        if "rope" in only:
            out.append((f"rope {name} {dn}", lambda nh=nh, hd=hd: _backward(
                rope.apply_rope(g(1, nh, 8, hd), torch.randn(8, hd), torch.randn(8, hd)))))
        if "cross_entropy" in only:
            out.append((f"cross_entropy {name} {dn}", lambda vocab=vocab: _backward(
                ce.cross_entropy(g(4, vocab), torch.randint(0, vocab, (4,))))))
        if "nf4" in only:
            shape = (inter, hid)
            fields = random_nf4(*shape, "cpu")
            out.append((f"nf4_dequantize {name} {dn}", lambda f=fields, s=shape:
                        nf4.nf4_dequantize(*f, s, dt)))
            for M in (1, nf4.GEMV_MAX_M, nf4.FUSED_MAX_M):  # GEMV and tiled branches
                # backward (a dequantize) once: its CPU matmul on the never-written weight is
                # slow at M = 256 (fp16 on a CPU, denormal garbage)
                run = _backward if M == 1 else lambda y: None
                out.append((f"nf4_matmul M={M} {name} {dn}", lambda f=fields, s=shape, M=M, run=run:
                            run(nf4.nf4_matmul(g(M, s[1]), *f, s))))
    if "attention" in only:
        for D in head_dims:
            for causal in (True, False):
                out.append((f"attention D={D} causal={causal} {dn}", lambda D=D, c=causal:
                            _backward(attn.attention(g(1, 4, 80, D), g(1, 2, 80, D),
                                                     g(1, 2, 80, D), c))))
            out.append((f"attention decode D={D} {dn}", lambda D=D: attn.attention(
                e(2, 8, 1, D), e(2, 2, 300, D), e(2, 2, 300, D), True)))
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def describe(kwargs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in kwargs.items() if k != "debug")


def _reason(e: BaseException) -> str:
    """One line: where the kernel's compile failed (the line in the kernel, and the @jit
    function it called that failed) and the innermost error."""
    chain = [e]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    errors = [c for c in chain if isinstance(c, CompilationError)]
    if not errors:
        return f"{type(e).__name__}: {e}"

    def line(c):
        return c.src.split("\n")[c.node.lineno - 1].strip() if c.src and c.node else "?"
    where = f"CompilationError at `{line(errors[0])}`"
    inner = errors[-1]
    if inner is not errors[0] and isinstance(inner.node, ast.FunctionDef):
        where += f" (in @jit {inner.node.name})"
    elif inner is not errors[0]:
        where += f" (at `{line(inner)}`)"
    message = inner.error_message or (repr(chain[-1]) if chain[-1] is not inner else "")
    return f"{where}: {message}"


def check(arch: int, case_list, verbose=True) -> tuple[list[dict], list[str]]:
    """Build every case for sm_`arch`; return (one row per distinct build, errors)."""
    smem_limit = TARGETS[arch][1]
    rows, errors, seen = [], [], set()
    for label, fn in case_list:
        with compile_only(arch) as launches:
            try:
                fn()
            except Exception as e:
                errors.append(f"{label}: {_reason(e)}")
        for name, kwargs, kernel in launches:
            key = kernel.hash
            if key in seen:
                continue
            seen.add(key)
            use = resource_usage(kernel.asm["cubin"])
            shared = kernel.metadata.shared  # dynamic + static shared memory the launch needs
            row = dict(arch=arch, case=label, kernel=name, config=describe(kwargs),
                       tiles={k: v for k, v in kwargs.items() if k.startswith("BLOCK_")},
                       num_warps=kernel.metadata.num_warps,
                       num_stages=kernel.metadata.num_stages, registers=use.get("reg"),
                       spill_bytes=use.get("local", 0) + use.get("stack", 0),
                       shared_bytes=shared, fits=shared <= smem_limit,
                       **ptx_stats(kernel.asm["ptx"]))
            rows.append(row)  # a build that does not fit was rejected: the launcher fell back
        if verbose:
            print(f"  built {label}", file=sys.stderr, flush=True)
    return rows, errors


def markdown(rows, arch) -> str:
    gpus, limit, _ = TARGETS[arch]
    lines = [f"sm_{arch} ({gpus}); shared memory limit {limit // 1024} KiB per block", "",
             "| kernel | case | tiles | warps | stages | regs | spill B | shared KiB | fits | mma "
             "| loads (16 B) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tiles = " ".join(f"{k[6:]}={v}" for k, v in sorted(r["tiles"].items())) or "-"
        lines.append(f"| {r['kernel']} | {r['case']} | {tiles} | {r['num_warps']} "
                     f"| {r['num_stages']} "
                     f"| {r['registers']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} "
                     f"| {'yes' if r['fits'] else 'no: fell back'} | {r['mma']} "
                     f"| {r['global_loads']} ({r['loads_16B']}) |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="90",
                   help=f"comma-separated compute capabilities, of {sorted(TARGETS)} "
                        "(default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="SmolLM2 and Llama-3-8B shapes, bf16, head dims 64 and 128")
    p.add_argument("--only", default=",".join(sorted(KERNELS)),
                   help="comma-separated kernels to build")
    p.add_argument("--dtypes", help="comma-separated, of bf16,fp16,fp32 (default: all; "
                   "--quick: bf16)")
    p.add_argument("--head-dims", help="attention head dims, comma-separated (default: 16,32,"
                   "64,128,256; --quick: 64,128)")
    p.add_argument("--json", help="write the rows as JSON lines to this path")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        p.error(f"--arch takes numbers like 90 or 80,90, got {args.arch!r}")
    if any(a not in TARGETS for a in archs):
        p.error(f"--arch: known targets are {sorted(TARGETS)}, got {args.arch}")
    only = set(args.only.split(","))
    unknown = only - KERNELS
    if unknown:
        p.error(f"--only: unknown kernels {sorted(unknown)}; known: {sorted(KERNELS)}")
    models = {k: MODELS[k] for k in ("SmolLM2-135M", "Llama-3-8B")} if args.quick else MODELS
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtypes = args.dtypes or ("bf16" if args.quick else "bf16,fp16,fp32")
    if any(d not in names for d in dtypes.split(",")):
        p.error(f"--dtypes takes {','.join(names)}, got {dtypes!r}")
    dtypes = [names[d] for d in dtypes.split(",")]
    head_dims = args.head_dims or ("64,128" if args.quick else "16,32,64,128,256")
    try:
        head_dims = [int(d) for d in head_dims.split(",")]
    except ValueError:
        p.error(f"--head-dims takes numbers like 64,128, got {head_dims!r}")
    torch.manual_seed(0)
    all_rows, all_errors = [], []
    for arch in archs:
        rows, errors = check(arch, cases(models, dtypes, head_dims, only))
        print(markdown(rows, arch), "\n")
        all_rows += rows
        all_errors += errors
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in all_rows)
    spills = sum(r["spill_bytes"] > 0 for r in all_rows)
    rejected = sum(not r["fits"] for r in all_rows)
    print(f"{len(all_rows)} builds, {spills} with register spills, {rejected} too large for "
          f"shared memory (the launcher fell back to a smaller config), {len(all_errors)} errors")
    for e in all_errors:
        print("ERROR", e)
    return 1 if all_errors else 0


if __name__ == "__main__":
    sys.exit(main())
