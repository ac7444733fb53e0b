"""SwiGLU gate (Shazeer 2020, "GLU Variants Improve Transformer") in Triton.

    h = silu(gate) * up,   silu(a) = a * sigmoid(a)
Backward recomputes sigmoid from the saved inputs instead of storing activations:
    d_up   = dh * silu(a)
    d_gate = dh * up * sigmoid(a) * (1 + a * (1 - sigmoid(a)))
Elementwise over the flattened tensors, fp32 math, one rounding to the input dtype per output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.utils import check_device, interpreting


@triton.jit
def _swiglu_fwd_kernel(A, U, H, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    h = a * tl.sigmoid(a) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DH, A, U, DA, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    da = dh * u * sig * (1.0 + a * (1.0 - sig))
    tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)


def _block() -> int:
    return 256 if interpreting() else 1024


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launcher: silu(gate) * up for same-shape, same-dtype tensors."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must match, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    check_device(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    h = torch.empty_like(gate)
    n = h.numel()
    if n:
        block = _block()
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, h, n, BLOCK=block, num_warps=4)
    return h


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Launcher: (d_gate, d_up) as fresh tensors."""
    dh = dh.contiguous()
    da, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        block = _block()
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dh, gate, up, da, du, n, BLOCK=block,
                                                      num_warps=4)
    return da, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dh, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with the Triton kernel; same result as `swiglu_ref`."""
    return SwiGLUFunction.apply(gate, up)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """PyTorch reference."""
    return torch.nn.functional.silu(gate) * up
