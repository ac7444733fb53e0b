"""RMSNorm forward and backward in Triton (Zhang & Sennrich 2019), with HF Llama semantics.

    y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)      # statistics in fp32

The forward saves the fp32 reciprocal std per row. The backward recomputes the normalized row
and gives
    dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * weight,  xhat = x * rstd
    dweight = sum over rows of dy * xhat.to(x.dtype)
with dweight accumulated per persistent program in fp32 and summed at the end (Liger-Kernel's
layout: one program per SM, each over a contiguous range of rows).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.utils import check_device, next_pow2, num_programs, num_warps_for


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    # HF: round the normalized row to x's dtype before the weight multiply.
    xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xn * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx,
                         M, N, rows_per_program, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # Walk the rows by pointer increments (64-bit pointer math, no int32 row * stride overflow).
    x_ptr = X + row_start.to(tl.int64) * stride_x
    dy_ptr = DY + row_start.to(tl.int64) * stride_dy
    dx_ptr = DX + row_start.to(tl.int64) * stride_dx
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"rms_norm: needs float tensors, got {x.dtype} and {weight.dtype}")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Launcher. x: (..., N) -> (y (..., N), x2d (M, N), rstd (M,) fp32)."""
    _check(x, weight)
    check_device(x, weight)
    weight = weight.contiguous()  # the kernels read W + cols: a strided view would be misread
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)  # as `weight * y.to(x.dtype)`
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        block = next_pow2(N)
        _rms_norm_fwd_kernel[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps,
                                   BLOCK_N=block, num_warps=num_warps_for(block))
    return y.view(*x.shape[:-1], N), x2, rstd


def rms_norm_backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor):
    """Launcher. dy: (..., N) -> (dx (M, N) in x's dtype, dweight (N,) in weight's dtype)."""
    M, N = x2.shape
    weight = weight.contiguous()
    dy2 = dy.reshape(-1, N)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    dx = torch.empty_like(x2)
    programs = num_programs(x2.device, M)
    rows_per_program = math.ceil(M / programs) if M else 0
    dw_part = torch.empty((programs, N), dtype=torch.float32, device=x2.device)
    if M > 0:
        block = next_pow2(N)
        _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0),
                                          x2.stride(0), dx.stride(0), M, N, rows_per_program,
                                          BLOCK_N=block, num_warps=num_warps_for(block))
    else:
        dw_part.zero_()
    return dx, dw_part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, x2, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x2, weight, rstd)
        return dx.view(ctx.x_shape), (dw if ctx.needs_input_grad[1] else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim with the Triton kernel; same result as `rms_norm_ref`."""
    return RMSNormFunction.apply(x, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch reference (HF LlamaRMSNorm)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)
