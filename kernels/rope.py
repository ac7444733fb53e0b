"""Rotary position embedding (Su et al. 2021, RoFormer) in Triton, HF "rotate_half" layout.

Dim i pairs with dim i + D/2:
    out[:D/2] = x1 * cos[:D/2] - x2 * sin[:D/2]
    out[D/2:] = x2 * cos[D/2:] + x1 * sin[D/2:]
The backward is the transposed rotation (sin enters with the opposite sign), so one kernel does
both. One program per (batch, position) handles every head, loading cos/sin once. Inputs may be
strided views such as q.view(B, T, H, D).transpose(1, 2); the output keeps the input's layout.
Math is fp32; the result is rounded once to x's dtype. cos/sin get no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.utils import check_device, next_pow2


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, T, H,
                 sxb, sxh, sxt, sob, soh, sot, scb, ssb, sct,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BACKWARD: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    cs = COS + b * scb + t * sct
    sn = SIN + b * ssb + t * sct
    c1 = tl.load(cs + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cs + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sn + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sn + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    for h0 in range(0, H, BLOCK_H):
        hh = (h0 + heads)[:, None]
        mask = (hh < H) & dmask[None, :]
        # int64: in a contiguous (B, H, T, D) x, head * (T * D) passes 2**31 for long sequences
        h64 = hh.to(tl.int64)
        x_ptr = X + b * sxb + h64 * sxh + t * sxt + d[None, :]  # (BLOCK_H, BLOCK_HALF)
        o_ptr = OUT + b * sob + h64 * soh + t * sot + d[None, :]
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the rotation: x here is the output gradient
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(o_ptr, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptr + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


def _table(c: torch.Tensor, B: int, T: int, D: int, name: str) -> torch.Tensor:
    """(T, D) or (B|1, 1, T, D) -> (B|1, T, D) with unit last stride."""
    if c.dim() == 4 and c.shape[1] == 1:
        c = c[:, 0]
    if c.dim() == 2:
        c = c.unsqueeze(0)
    if c.dim() != 3 or c.shape[0] not in (1, B) or tuple(c.shape[1:]) != (T, D):
        raise ValueError(f"apply_rope: {name} must be ({T}, {D}) or ({B}, 1, {T}, {D}), "
                         f"got {tuple(c.shape)}")
    return c if c.stride(-1) == 1 else c.contiguous()


def rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backward: bool = False) -> torch.Tensor:
    """Launcher. x: (B, H, T, D); cos, sin: (T, D) or (B, 1, T, D). Returns a new tensor."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be (B, H, T, D) with even D, got {tuple(x.shape)}")
    B, H, T, D = x.shape
    c, s = _table(cos, B, T, D, "cos"), _table(sin, B, T, D, "sin")
    check_device(x, c, s)
    if c.stride(1) != s.stride(1):  # one position stride (sct) serves both tables
        c, s = c.contiguous(), s.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x)  # keeps x's (possibly transposed) layout
    if out.numel() == 0:
        return out
    half = D // 2
    block_h = min(next_pow2(H), max(1, 4096 // next_pow2(half)))
    # a batch stride per table: cos (T, D) may meet sin (B, 1, T, D); 0 for a shared table
    scb, ssb = (t.stride(0) if t.shape[0] > 1 else 0 for t in (c, s))
    _rope_kernel[(B * T,)](x, c, s, out, T, H, *x.stride()[:3], *out.stride()[:3], scb, ssb,
                           c.stride(1), HALF=half, BLOCK_H=block_h, BLOCK_HALF=next_pow2(half),
                           BACKWARD=backward, num_warps=4 if block_h * half <= 2048 else 8)
    return out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_launch(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rope_launch(grad, cos, sin, backward=True), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (T, D) or (B, 1, T, D), rotate_half convention."""
    return RoPEFunction.apply(x, cos, sin)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """PyTorch reference (HF apply_rotary_pos_emb with rotate_half)."""
    d = x.shape[-1] // 2
    rotated = torch.cat((-x[..., d:], x[..., :d]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
