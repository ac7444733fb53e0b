"""NF4 (QLoRA, Dettmers et al. 2023) dequantize and fused 4-bit matmul in Triton.

Layout (bitsandbytes-compatible, shared/FORMATS.md section 1), for a weight W of shape (N, K)
flattened row-major:
    packed         uint8 [(N*K + 1) // 2], element 2i in the HIGH nibble, 2i + 1 in the low one
    absmax_q       uint8 [n_blocks] (double quant) -- or float32 absmax [n_blocks] without it
    nested_absmax  float32 [ceil(n_blocks / 256)];  nested_code float32 [256];  offset float
    absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b // 256] + offset
    W[i] = NF4_CODE[nibble(i)] * absmax[i // blocksize]   (fp32, then cast)
The kernels read only the 4-bit data and the uint8 scales; the fp32 absmax is rebuilt in
registers per block.

`nf4_matmul(x, ...)` = x @ W.T (+ bias). One kernel serves decode and prefill: each step of its
K loop covers min(blocksize, 64) columns of one quantization block, loads the packed bytes of
BLOCK_N rows, dequantizes the high nibbles (even columns) and low nibbles (odd columns) in
registers, and multiplies them with the even / odd columns of x. M <= 16 runs it as a GEMV
(BLOCK_M = 16, split-K for parallelism); medium M as a tiled GEMM; large M (and fp32 past GEMV
sizes, fp64, and K not a multiple of blocksize) dequantizes with the kernel and calls the
library matmul, where cuBLAS wins. The codes come from a 256-entry table of (high, low) nibble
pairs: one gather per byte. The backward gives the input gradient only (grad @ W, W dequantized
again), as QLoRA needs; the 4-bit weight is frozen.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.utils import check_device, interpreting, num_programs, upcast_dots

NF4_CODE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
NESTED_BLOCKSIZE = 256
GEMV_MAX_M = 16     # rows of x up to which the GEMV configuration runs
FUSED_MAX_M = 256   # above this, dequantize + library matmul (cuBLAS beats a dequant-GEMM)
MAX_CHUNK = 64      # K columns per step of the fused kernel (its tiles were tuned at 64)


@triton.jit
def _block_absmax(AQ, NABS, NCODE, OFFSET, offset_val, blk, mask,
                  DOUBLE_QUANT: tl.constexpr, OFFSET_PTR: tl.constexpr):
    """fp32 scale of quantization blocks `blk`: two fp32 roundings, like bitsandbytes."""
    # One return, if/else on the constexprs: Triton type-checks every return statement, even
    # one after a constexpr branch that returned (uint8 AQ vs fp32 scale fails to compile).
    if DOUBLE_QUANT:
        qi = tl.load(AQ + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(NCODE + qi, mask=mask, other=0.0) * \
            tl.load(NABS + blk // 256, mask=mask, other=0.0)
        if OFFSET_PTR:
            scale = scale + tl.load(OFFSET)
        else:
            scale = scale + offset_val
    else:
        scale = tl.load(AQ + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def _codes(PAIRS, packed):
    """NF4 codes (fp32) of the high and low nibbles of the bytes `packed` (int32): one 8-byte
    gather per byte from a 256-entry table instead of two 4-byte ones from the 16 codes (the
    gathers, not the bytes, bound the load instructions of these kernels)."""
    pair = tl.load(PAIRS + packed)  # int64: low word = high nibble's code, high word = low's
    hi = pair.to(tl.int32).to(tl.float32, bitcast=True)
    lo = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _nf4_dequant_kernel(P, AQ, NABS, NCODE, OFFSET, PAIRS, OUT, offset_val, numel, n_bytes,
                        n_blocks, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
                        DOUBLE_QUANT: tl.constexpr, OFFSET_PTR: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) quant blocks
    j = tl.arange(0, HALF)
    byte = blk[:, None] * HALF + j[None, :]  # (ROWS, HALF)
    # n_bytes is an argument, not (numel + 1) // 2: Triton then knows it is a multiple of 16
    # when it is, and loads 16 bytes per instruction instead of one
    bmask = byte < n_bytes
    packed = tl.load(P + byte, mask=bmask, other=0).to(tl.int32)
    scale = _block_absmax(AQ, NABS, NCODE, OFFSET, offset_val, blk, blk < n_blocks,
                          DOUBLE_QUANT, OFFSET_PTR)[:, None]
    hi, lo = _codes(PAIRS, packed)
    w = tl.interleave(hi * scale, lo * scale)  # (ROWS, BLOCKSIZE) in memory order
    idx = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(OUT + idx, w.to(OUT.dtype.element_ty), mask=idx < numel)


@triton.jit
def _nf4_matmul_kernel(X, P, AQ, NABS, NCODE, OFFSET, PAIRS, BIAS, OUT, offset_val, M, N, K,
                       spn, sxm, sxk, BLOCKSIZE: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                       DOUBLE_QUANT: tl.constexpr, OFFSET_PTR: tl.constexpr,
                       HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # Each K step covers CHUNK columns (CHUNK divides BLOCKSIZE): the tiles are (BLOCK_N,
    # CHUNK / 2) whatever the blocksize. One step per quantization block needed up to 1.8 MB
    # of shared memory at blocksize 4096 (sm_90 has 227 KiB; python -m kernels.compile_check).
    HALF: tl.constexpr = CHUNK // 2
    PER_BLOCK: tl.constexpr = BLOCKSIZE // CHUNK
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    j = tl.arange(0, HALF)
    mmask, nmask = offs_m < M, offs_n < N
    groups = K // BLOCKSIZE  # quantization blocks per weight row
    x_rows = X + offs_m[:, None].to(tl.int64) * sxm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for c in range(pid_k, K // CHUNK, SPLIT_K):
        packed = tl.load(P + offs_n[:, None] * spn + c * HALF + j[None, :],
                         mask=nmask[:, None], other=0).to(tl.int32)  # (BN, HALF)
        scale = _block_absmax(AQ, NABS, NCODE, OFFSET, offset_val,
                              offs_n * groups + c // PER_BLOCK, nmask, DOUBLE_QUANT,
                              OFFSET_PTR)[:, None]
        cols = c * CHUNK + 2 * j
        x_even = tl.load(x_rows + cols[None, :] * sxk, mask=mmask[:, None], other=0.0)
        x_odd = tl.load(x_rows + (cols + 1)[None, :] * sxk, mask=mmask[:, None], other=0.0)
        if UPCAST:
            x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
        # Dequantize in registers: fp32 code * absmax, rounded once to x's dtype (= reference).
        hi, lo = _codes(PAIRS, packed)
        w_hi, w_lo = (hi * scale).to(x_even.dtype), (lo * scale).to(x_even.dtype)
        acc += tl.dot(x_even, tl.trans(w_hi), input_precision=PREC)
        acc += tl.dot(x_odd, tl.trans(w_lo), input_precision=PREC)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    out = OUT + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _code_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _pair_table(device: torch.device) -> torch.Tensor:
    """int64 [256]: entry b holds the fp32 codes of byte b's high nibble (low word, as the
    little-endian GPUs and CPUs we run on store element 0 of a pair) and low nibble."""
    code = _code_table(device)
    b = torch.arange(256, device=device)
    return torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous().view(torch.int64)[:, 0]


def _fields(packed, absmax_q, nested_absmax, nested_code, offset, shape, blocksize):
    """Validate the layout; return (N, K, numel, n_blocks, double_quant, kernel args)."""
    if len(shape) != 2:
        raise ValueError(f"nf4: shape must be (N, K), got {tuple(shape)}")
    N, K = int(shape[0]), int(shape[1])
    numel = N * K
    if blocksize < 32 or blocksize & (blocksize - 1):
        raise ValueError(f"nf4: blocksize must be a power of two >= 32, got {blocksize}")
    n_blocks = math.ceil(numel / blocksize)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
        raise ValueError(f"nf4: packed must be uint8 with {(numel + 1) // 2} bytes for shape "
                         f"{(N, K)}, got {packed.dtype} with {packed.numel()}")
    if absmax_q.numel() != n_blocks:
        raise ValueError(f"nf4: need {n_blocks} block scales for shape {(N, K)} and blocksize "
                         f"{blocksize}, got {absmax_q.numel()}")
    double_quant = absmax_q.dtype == torch.uint8
    if double_quant:
        if nested_absmax is None or nested_code is None or offset is None:
            raise ValueError("nf4: uint8 absmax_q needs nested_absmax, nested_code and offset")
        if nested_absmax.numel() != math.ceil(n_blocks / NESTED_BLOCKSIZE) or \
                nested_code.numel() != 256:
            raise ValueError(f"nf4: nested_absmax must have {math.ceil(n_blocks / 256)} values "
                             f"and nested_code 256, got {nested_absmax.numel()} and "
                             f"{nested_code.numel()}")
        nabs, ncode = nested_absmax.float().contiguous(), nested_code.float().contiguous()
        check_device(packed, absmax_q, nabs, ncode)
    elif absmax_q.dtype == torch.float32:
        nabs = ncode = absmax_q  # unused placeholders
        offset = 0.0
        check_device(packed, absmax_q)
    else:
        raise ValueError(f"nf4: absmax_q must be uint8 (double quant) or float32, "
                         f"got {absmax_q.dtype}")
    # A device tensor offset is read by the kernel (no GPU sync); a float or CPU tensor is
    # passed by value.
    offset_ptr = torch.is_tensor(offset) and offset.device == packed.device
    off_t = offset.float().reshape(1) if offset_ptr else nabs
    off_v = 0.0 if offset_ptr else float(offset)
    # The kernels index the bytes and scales as contiguous (a strided 1-D view reshapes to
    # itself, so reshape alone is not enough)
    args = (packed.reshape(-1).contiguous(), absmax_q.reshape(-1).contiguous(), nabs, ncode,
            off_t, _pair_table(packed.device))
    return N, K, numel, n_blocks, double_quant, args, off_v, offset_ptr


def nf4_dequantize(packed: torch.Tensor, absmax_q: torch.Tensor,
                   nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                   offset, shape, dtype: torch.dtype = torch.bfloat16,
                   blocksize: int = 64) -> torch.Tensor:
    """Dequantize to a (N, K) tensor of `dtype`. absmax_q: uint8 (double quant, the nested
    fields used) or the float32 absmax itself (nested fields ignored)."""
    N, K, numel, n_blocks, dq, args, off_v, off_ptr = _fields(
        packed, absmax_q, nested_absmax, nested_code, offset, shape, blocksize)
    out = torch.empty((N, K), dtype=dtype, device=packed.device)
    if numel:
        rows = 4 if interpreting() else max(1, 4096 // blocksize)
        _nf4_dequant_kernel[(triton.cdiv(n_blocks, rows),)](
            *args, out, off_v, numel, (numel + 1) // 2, n_blocks, BLOCKSIZE=blocksize, ROWS=rows,
            DOUBLE_QUANT=dq, OFFSET_PTR=off_ptr, num_warps=4)
    return out


def nf4_matmul_fused(x2, packed, absmax_q, nested_absmax, nested_code, offset, shape,
                     bias=None, blocksize=64, split_k: int | None = None) -> torch.Tensor:
    """Launcher for the dequant-in-registers kernel. x2: (M, K) -> (M, N) in x2's dtype."""
    N, K, numel, n_blocks, dq, args, off_v, off_ptr = _fields(
        packed, absmax_q, nested_absmax, nested_code, offset, shape, blocksize)
    if K % blocksize:
        raise ValueError(f"nf4: fused matmul needs K % blocksize == 0, got K={K}")
    M = x2.shape[0]
    interp = interpreting()
    chunk = min(blocksize, MAX_CHUNK)  # columns per K step of the kernel
    if M <= GEMV_MAX_M:  # decode: weight-bandwidth bound, spread K across programs
        # fp32 dots run on FMA units (IEEE precision), not tensor cores: 4 warps spill 224
        # bytes per thread on sm_90, 8 none (python -m kernels.compile_check --dtypes fp32)
        warps = 8 if x2.dtype == torch.float32 else 4
        BM, BN, stages = 16, (16 if interp else 64), (1 if interp else 4)
        if split_k is None:
            tiles = triton.cdiv(N, BN)
            programs = 2 * num_programs(x2.device, 1 << 20)  # two waves of SMs
            split_k = max(1, min(K // chunk // 4, triton.cdiv(programs, tiles)))
    else:
        BM, BN, warps, stages = (16, 16, 4, 1) if interp else (64, 128, 4, 3)
        split_k = split_k or 1
    if bias is not None:
        bias = bias.contiguous()  # (N,), read with unit stride
    out_dtype = x2.dtype if split_k == 1 else torch.float32
    out = torch.empty((split_k, M, N), dtype=out_dtype, device=x2.device)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), split_k)
    _nf4_matmul_kernel[grid](
        x2, *args, bias if bias is not None else x2, out, off_v, M, N, K, K // 2, x2.stride(0),
        x2.stride(1), BLOCKSIZE=blocksize, CHUNK=chunk, BLOCK_M=BM, BLOCK_N=BN, SPLIT_K=split_k,
        DOUBLE_QUANT=dq, OFFSET_PTR=off_ptr, HAS_BIAS=bias is not None,
        UPCAST=upcast_dots(x2.dtype), PREC="ieee" if x2.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages)
    return out[0] if split_k == 1 else out.sum(0).to(x2.dtype)


class NF4MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, packed, absmax_q, nested_absmax, nested_code, offset, shape,
                blocksize):
        N, K = shape
        if x.shape[-1] != K:
            raise ValueError(f"nf4_matmul: x has {x.shape[-1]} features, weight expects {K}")
        check_device(x, packed)
        x2 = x.reshape(-1, K)
        fields = (packed, absmax_q, nested_absmax, nested_code, offset, shape)
        if bias is not None:
            bias = bias.to(x.dtype)
        # fp32 beyond GEMV sizes: the FMA-dot tiles spill kilobytes per thread, cuBLAS does not
        fused_max = GEMV_MAX_M if x.dtype == torch.float32 else FUSED_MAX_M
        # fp64 dequantizes too: its dots are fp64, and the fused kernel's fp32 `acc +=` of them
        # does not build
        fused_dtype = x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        if x2.shape[0] <= fused_max and K % blocksize == 0 and fused_dtype:
            y = nf4_matmul_fused(x2, *fields, bias=bias, blocksize=blocksize)
        else:
            y = F.linear(x2, nf4_dequantize(*fields, x.dtype, blocksize), bias)
        ctx.fields, ctx.blocksize = fields, blocksize  # frozen buffers: no full-size copy kept
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, grad):
        gx = gb = None
        if ctx.needs_input_grad[0]:
            w = nf4_dequantize(*ctx.fields, grad.dtype, ctx.blocksize)  # (N, K)
            gx = grad @ w
        if ctx.needs_input_grad[1]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gb, None, None, None, None, None, None, None


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax_q: torch.Tensor,
               nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset,
               shape, bias: torch.Tensor | None = None, blocksize: int = 64) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias) -> (..., N) in x's dtype, W the NF4 weight of `shape` (N, K).
    Gradient flows to x (and bias), never to the 4-bit weight."""
    return NF4MatmulFunction.apply(x, bias, packed, absmax_q, nested_absmax, nested_code,
                                   offset, tuple(shape), blocksize)


# ---------------------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------------------
def nf4_dequantize_ref(packed, absmax_q, nested_absmax, nested_code, offset, shape,
                       dtype=torch.bfloat16, blocksize=64) -> torch.Tensor:
    """Pure PyTorch: the same math as the kernel, fp32 then cast."""
    N, K = shape
    numel = N * K
    p = packed.reshape(-1)
    nibbles = torch.stack([p >> 4, p & 15], dim=-1).reshape(-1)[:numel].long()
    if absmax_q.dtype == torch.uint8:
        groups = torch.arange(absmax_q.numel(), device=p.device) // NESTED_BLOCKSIZE
        absmax = nested_code.float()[absmax_q.long()] * nested_absmax.float()[groups] \
            + float(offset)
    else:
        absmax = absmax_q.float()
    w = _code_table(p.device)[nibbles] * absmax.repeat_interleave(blocksize)[:numel]
    return w.to(dtype).view(N, K)


def nf4_matmul_ref(x, packed, absmax_q, nested_absmax, nested_code, offset, shape, bias=None,
                   blocksize=64) -> torch.Tensor:
    """Pure PyTorch: dequantize to x's dtype, then F.linear."""
    w = nf4_dequantize_ref(packed, absmax_q, nested_absmax, nested_code, offset, shape, x.dtype,
                           blocksize)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
