"""Every Triton kernel builds natively for GPUs this machine does not have (kernels.compile_check).

The interpreter runs kernels as numpy and accepts code Triton's compiler rejects (it did: the
NF4 kernels returned uint8 from one constexpr branch and fp32 from another). Compiling to cubins
for sm_90 (H100) and sm_89 (RTX 40xx) on the CPU catches that, and shows that each launch fits
the target's shared memory or falls back to smaller tiles. compile_check runs in a subprocess:
it needs the kernels imported without TRITON_INTERPRET, which this test process sets.
"""
import json
import os
import subprocess
import sys

import pytest
from triton.runtime.errors import OutOfResources

from kernels.utils import launch_fitting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_KERNELS = {
    "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
    "_rope_kernel", "_ce_fwd_kernel", "_ce_grad_kernel", "_nf4_dequant_kernel",
    "_nf4_matmul_kernel", "_attn_fwd_kernel", "_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
    "_attn_bwd_dq_kernel", "_attn_decode_kernel", "_attn_decode_reduce_kernel"}


def compile_check(tmp_path, *args):
    out = tmp_path / "builds.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", *args, "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()], proc.stdout


def test_every_kernel_builds_for_h100_and_rtx_40xx(tmp_path):
    rows, stdout = compile_check(tmp_path, "--quick", "--arch", "90,89")
    assert "0 errors" in stdout
    for arch in (90, 89):
        built = {r["kernel"] for r in rows if r["arch"] == arch}
        assert built == ALL_KERNELS, ALL_KERNELS - built
    # bf16 at head dims 64 and 128 (every model this engine loads) needs no fallback there
    assert all(r["fits"] for r in rows), [r for r in rows if not r["fits"]]
    assert all(r["registers"] and r["registers"] <= 255 for r in rows)
    # What the PTX shows about speed on Hopper: attention's dots are warpgroup MMAs, and NF4
    # dequantize reads its packed bytes 16 at a time with one table gather per byte (it had
    # 16 byte loads and 32 gathers: 51 global loads per thread, now about 20)
    h100 = [r for r in rows if r["arch"] == 90]
    for r in h100:
        if r["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
            assert r["mma"] == "wgmma", r
        if r["kernel"] == "_nf4_dequant_kernel":
            assert r["loads_16B"] >= 1 and r["global_loads"] <= 24, r


def test_attention_falls_back_to_smaller_tiles_on_an_rtx_40xx(tmp_path):
    # fp32 at head dim 128: the H100 tiles need ~104 KiB of shared memory, sm_89 has 99
    rows, _ = compile_check(tmp_path, "--arch", "89", "--only", "attention", "--dtypes", "fp32",
                            "--head-dims", "128")
    for kernel in ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_decode_kernel"):
        builds = [r for r in rows if r["kernel"] == kernel]
        assert not builds[0]["fits"] and builds[-1]["fits"], builds
    assert all(r["shared_bytes"] <= 101376 for r in rows if r["fits"])


class FakeKernel:
    """kernel[grid](...) that fails like Triton when BLOCK > the 'device' allows."""

    def __init__(self, limit):
        self.limit, self.launches = limit, []

    def __getitem__(self, grid):
        def launch(*args, BLOCK, **kwargs):
            self.launches.append((grid, BLOCK))
            if BLOCK > self.limit:
                raise OutOfResources(BLOCK, self.limit, "shared memory")
        return launch


def test_launch_fitting_takes_the_first_config_that_fits_and_remembers_it():
    import torch
    x = torch.zeros(3)
    configs = [dict(BLOCK=128), dict(BLOCK=64), dict(BLOCK=32)]
    kernel = FakeKernel(limit=64)
    grid = lambda c: (c["BLOCK"] // 32,)  # noqa: E731
    assert launch_fitting(kernel, grid, configs, x, FLAG=True) == dict(BLOCK=64)
    assert kernel.launches == [((4,), 128), ((2,), 64)]
    assert launch_fitting(kernel, grid, configs, x, FLAG=True) == dict(BLOCK=64)
    assert kernel.launches[2:] == [((2,), 64)]  # no second try of the build that failed
    with pytest.raises(OutOfResources):
        launch_fitting(FakeKernel(limit=16), grid, configs, x, FLAG=True)


BROKEN = '''
import torch, triton, triton.language as tl
from kernels import compile_check as cc

@triton.jit
def _mixed_returns(X, FLAG: tl.constexpr):  # the NF4 bug: uint8 from one path, fp32 from another
    if FLAG:
        return tl.load(X).to(tl.float32)
    return tl.load(X)

@triton.jit
def _broken_kernel(X, OUT):
    tl.store(OUT, _mixed_returns(X, True))

def case():
    x, out = torch.zeros(1, dtype=torch.uint8), torch.zeros(1)
    _broken_kernel[(1,)](x, out)

rows, errors = cc.check(90, [("broken", case)], verbose=False)
print(errors)
'''


def test_a_kernel_that_only_the_interpreter_accepts_is_reported_in_one_line(tmp_path):
    script = tmp_path / "broken.py"  # @triton.jit needs its source in a file
    script.write_text(BROKEN)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("broken: CompilationError at `tl.store(OUT, _mixed_returns(X, True))` (in @jit "
            "_mixed_returns): TypeError('Return type mismatch" in out.stdout), out.stdout
