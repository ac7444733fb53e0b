"""NF4 dequantize and fused NF4 matmul vs the PyTorch reference and bitsandbytes."""
from kernel_utils import DEVICES, DTYPES, assert_close  # first: sets TRITON_INTERPRET

import math
import os
import subprocess
import sys

import pytest
import torch

from kernels.nf4 import (GEMV_MAX_M, FUSED_MAX_M, nf4_dequantize, nf4_dequantize_ref,
                         nf4_matmul, nf4_matmul_fused, nf4_matmul_ref)

# (atol, rtol) against the fp32 reference for matmul outputs / input grads of size O(1).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def random_fields(N, K, device, blocksize=64, double_quant=True):
    """Random but valid NF4 fields in the engine's layout (absmax_q uint8 or float32 absmax)."""
    numel = N * K
    n_blocks = math.ceil(numel / blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, device=device)
    if not double_quant:
        return packed, torch.rand(n_blocks, device=device) + 0.1, None, None, 0.0
    code = torch.sort(torch.rand(256, device=device) * 2 - 1).values
    nested = torch.rand(math.ceil(n_blocks / 256), device=device) * 0.2
    absmax_q = torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, device=device)
    return packed, absmax_q, nested, code, 0.7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,blocksize,double_quant", [(7, 64, 64, True), (3, 33, 32, True),
                                                         (5, 50, 64, False), (4, 256, 128, True)])
def test_dequantize_matches_reference(device, dtype, N, K, blocksize, double_quant):
    """Odd element counts, partial last blocks, both absmax forms. fp32/fp16 are bit-exact;
    bf16 within one ulp (the interpreter truncates instead of rounding)."""
    fields = random_fields(N, K, device, blocksize, double_quant)
    out = nf4_dequantize(*fields, (N, K), dtype, blocksize)
    ref = nf4_dequantize_ref(*fields, (N, K), torch.float32, blocksize)
    assert out.shape == (N, K) and out.dtype == dtype
    if dtype == torch.bfloat16:
        assert_close(out, ref, (0.0, 2 ** -7), "w")
    else:
        assert torch.equal(out, ref.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_matches_bitsandbytes(device):
    """The bitsandbytes layout itself (double quant, 0-dim tensor offset read by pointer)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(24, 128)
    q, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    expected = bnbf.dequantize_4bit(q, st)
    fields = [t.to(device) for t in (q, st.absmax, st.state2.absmax, st.state2.code, st.offset)]
    out = nf4_dequantize(*fields, (24, 128), torch.float32)
    assert torch.equal(out.cpu(), expected)
    out = nf4_dequantize(*fields[:4], float(st.offset), (24, 128), torch.float32)  # by value
    assert torch.equal(out.cpu(), expected)


# M = 1 and 3: GEMV configuration (3 with split-K); 20: tiled kernel; 300: dequant + F.linear.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,split_k,bias", [(1, None, False), (3, 2, True), (20, None, True),
                                            (FUSED_MAX_M + 44, None, False)])
def test_matmul_matches_reference(device, dtype, M, split_k, bias):
    N, K = 40, 128
    fields = random_fields(N, K, device)
    x = (torch.randn(M, K, device=device) / K ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(N, device=device).to(dtype).requires_grad_() if bias else None
    gy = (torch.randn(M, N, device=device) / N ** 0.5).to(dtype)
    if split_k is not None:
        assert M <= GEMV_MAX_M
        with torch.no_grad():
            assert_close(nf4_matmul_fused(x, *fields, (N, K), b, split_k=split_k),
                         nf4_matmul_ref(x.float(), *fields, (N, K),
                                        None if b is None else b.float()),
                         TOL[dtype], "y (split-K)")
    y = nf4_matmul(x, *fields, (N, K), bias=b)
    y.backward(gy)
    xf = x.detach().float().requires_grad_()
    bf = b.detach().float().requires_grad_() if bias else None
    yf = nf4_matmul_ref(xf, *fields, (N, K), bias=bf)
    yf.backward(gy.float())
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, yf, TOL[dtype], "y")
    assert_close(x.grad, xf.grad, TOL[dtype], "dx")
    if bias:
        assert_close(b.grad, bf.grad, TOL[dtype], "dbias")


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_batched_input_and_ragged_k(device):
    """x (B, T, K) keeps its leading dims; K not a multiple of the blocksize falls back."""
    for N, K in [(24, 64), (6, 50)]:
        fields = random_fields(N, K, device)
        x = torch.randn(2, 3, K, device=device) / K ** 0.5
        y = nf4_matmul(x, *fields, (N, K))
        assert y.shape == (2, 3, N)
        assert_close(y, nf4_matmul_ref(x, *fields, (N, K)), TOL[torch.float32], "y")


def test_bad_fields():
    packed, absmax_q, nested, code, offset = random_fields(4, 64, "cpu")
    with pytest.raises(ValueError, match="packed must be uint8 with 128 bytes"):
        nf4_dequantize(packed[:-1], absmax_q, nested, code, offset, (4, 64))
    with pytest.raises(ValueError, match="needs nested_absmax"):
        nf4_dequantize(packed, absmax_q, None, code, offset, (4, 64))
    with pytest.raises(ValueError, match="weight expects 64"):
        nf4_matmul(torch.randn(2, 32), packed, absmax_q, nested, code, offset, (4, 64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize,M,split_k", [(256, 1, 3), (256, 20, 1), (512, 3, None),
                                                  (32, 2, 2)])
def test_fused_matmul_large_blocksizes(device, blocksize, M, split_k):
    """Blocksizes past the kernel's 64-column K step: several steps share one block's scale
    (one step per block made tiles of blocksize / 2 bytes per row, which no GPU's shared
    memory holds at 1024 or more; at 256 the tiled config already missed sm_90's)."""
    N, K = 24, 1024
    fields = random_fields(N, K, device, blocksize)
    x = torch.randn(M, K, device=device) / K ** 0.5
    with torch.no_grad():
        y = nf4_matmul_fused(x, *fields, (N, K), blocksize=blocksize, split_k=split_k)
    want = nf4_matmul_ref(x, *fields, (N, K), blocksize=blocksize)
    assert_close(y, want, TOL[torch.float32], f"y (blocksize {blocksize})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [2, 20])
def test_matmul_strided_input(device, M):
    """x whose feature axis is not unit-stride (a transposed buffer) and a row slice of a wider
    buffer: the fused kernel reads x through its strides; dx comes back in x's shape."""
    N, K = 24, 128
    fields = random_fields(N, K, device)
    s = K ** -0.5
    for x in ((s * torch.randn(K, M, device=device)).t(),
              (s * torch.randn(M, K + 64, device=device))[:, 64:]):
        x.requires_grad_()  # a view of a tensor without grad: a leaf, strides kept
        assert not x.is_contiguous()
        gy = torch.randn(M, N, device=device)
        y = nf4_matmul(x, *fields, (N, K))
        y.backward(gy)
        xf = x.detach().clone().requires_grad_()
        yf = nf4_matmul_ref(xf, *fields, (N, K))
        yf.backward(gy)
        assert_close(y, yf, TOL[torch.float32], "y")
        assert_close(x.grad, xf.grad, TOL[torch.float32], "dx")


def strided(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of t's values with stride 2 (other values in between): .reshape(-1) returns
    such a view unchanged."""
    return torch.stack([t, t.flip(0)], dim=1)[:, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_strided_fields_and_bias(device, double_quant):
    """Strided 1-D packed bytes, block scales (uint8 or fp32 absmax) and bias give what their
    contiguous copies give, in dequantize and in both fused configurations (GEMV with split-K,
    tiled): the kernels read them as contiguous (wrong weights and bias before)."""
    N, K = 24, 128
    fields = random_fields(N, K, device, double_quant=double_quant)
    views = (strided(fields[0]), strided(fields[1])) + fields[2:]
    assert not views[0].is_contiguous() and not views[1].is_contiguous()
    assert torch.equal(nf4_dequantize(*views, (N, K), torch.float32),
                       nf4_dequantize_ref(*fields, (N, K), torch.float32))
    bias = torch.randn(N, device=device)
    for M, split_k in ((3, 2), (20, 1)):
        x = torch.randn(M, K, device=device) / K ** 0.5
        want = nf4_matmul_ref(x, *fields, (N, K), bias)
        with torch.no_grad():
            y = nf4_matmul_fused(x, *views, (N, K), strided(bias), split_k=split_k)
            assert_close(y, want, TOL[torch.float32], f"y (M={M}, strided fields and bias)")
            y = nf4_matmul(x, *fields, (N, K), strided(bias))
            assert_close(y, want, TOL[torch.float32], f"y (M={M}, strided bias)")


FP64_BUILD = '''
import torch
from kernels.compile_check import compile_only  # first: imports the kernels for native builds
from kernels import nf4
from kernels.bench import random_nf4
fields = random_nf4(64, 128, "cpu")
with compile_only(90) as launches:
    nf4.nf4_matmul(torch.randn(1, 128, dtype=torch.float64), *fields, (64, 128))
print("launched", [name for name, *_ in launches])
'''


def test_fp64_matmul_builds_for_sm90(tmp_path):
    """fp64 x dequantizes (fp64 out) and runs F.linear: the fused kernel does not build for it
    on a GPU (its fp64 dots change the fp32 accumulator's type in the K loop: a
    CompilationError before; the interpreter accepts it). Native sm_90 build on the CPU, in a
    process without TRITON_INTERPRET (kernels.compile_check)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", FP64_BUILD], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "launched ['_nf4_dequant_kernel']" in out.stdout, out.stdout
