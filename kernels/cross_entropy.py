"""Cross-entropy over a large vocabulary in Triton, plain and fused with the lm_head matmul.

`cross_entropy(logits, targets)`: one program per row walks the vocabulary in chunks with an
online log-sum-exp (Milakov & Gimelshein 2018), in fp32 registers, so no fp32 copy of the logits
is ever made. The forward keeps one fp32 LSE per row; the backward writes
    dlogits = (softmax(logits) - onehot(target)) * grad / n_valid
straight into a fresh tensor of the logits' dtype.

`linear_cross_entropy(hidden, weight, targets)` follows Liger-Kernel's FusedLinearCrossEntropy:
rows are processed in chunks; each chunk's logits = hidden_c @ weight.T live only for that chunk,
their gradient is written over them in place, and grad_hidden / grad_weight are accumulated right
away with two matmuls. The full (N, V) logits never exist; the backward only scales the stored
gradients by the incoming grad. Loss: mean over targets != ignore_index (NaN if there are none,
as torch does). grad_weight is accumulated in the weight's dtype, one rounding per chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.utils import check_device, interpreting, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _ce_fwd_kernel(LOGITS, TARGETS, LOSS, LSE, stride_row, V, ignore_index,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    # First chunk outside the loop (it gives the running max its type). Chunks of only -inf
    # logits (a masked vocabulary) leave the max at -inf: shift by 0 then, not by -inf, or
    # (-inf) - (-inf) = NaN.
    x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32) * 1.4426950408889634
    x = tl.where(cols < V, x, float("-inf"))
    m = tl.max(x, axis=0)
    s = tl.sum(tl.exp2(x - tl.where(m == float("-inf"), 0.0, m)), axis=0)
    for start in range(BLOCK_V, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe), axis=0)
        m = m_new
    lse = (m + tl.log2(s)) * 0.6931471805599453  # back to natural log
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    x_t = tl.load(base + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_grad_kernel(LOGITS, TARGETS, LSE, GRAD, SCALE, stride_row, stride_grad, V,
                    ignore_index, BLOCK_V: tl.constexpr):
    """GRAD may alias LOGITS: every element is read before the same program writes it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    x = tl.load(LOGITS + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + row)
    target = tl.load(TARGETS + row)
    scale = tl.load(SCALE)
    scale = tl.where(target != ignore_index, scale, 0.0)
    g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
    tl.store(GRAD + row * stride_grad + cols, g.to(GRAD.dtype.element_ty), mask=mask)


def _check_targets(N: int, V: int, targets: torch.Tensor, ignore_index: int) -> None:
    if targets.shape != (N,):
        raise ValueError(f"cross_entropy: targets must be ({N},), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy: targets must be int64 or int32, got {targets.dtype}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):  # an out-of-range id would read outside the row
        raise ValueError(f"cross_entropy: target ids must be in [0, {V}) or {ignore_index}")


def _block_v(V: int) -> int:
    return min(64 if interpreting() else 4096, next_pow2(V))


def ce_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Launcher. logits (N, V) -> per-row loss (N,) fp32 (0 for ignored rows), lse (N,) fp32."""
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        _ce_fwd_kernel[(N,)](logits, targets, loss, lse, logits.stride(0), V, ignore_index,
                             BLOCK_V=_block_v(V), num_warps=8 if V >= 8192 else 4)
    return loss, lse


def ce_grad(logits, targets, lse, scale, ignore_index, out=None) -> torch.Tensor:
    """Launcher. (softmax - onehot) * scale (a 1-element fp32 tensor) into `out` (or new)."""
    N, V = logits.shape
    grad = torch.empty_like(logits) if out is None else out
    if N:
        block = _block_v(V)
        _ce_grad_kernel[(N, triton.cdiv(V, block))](logits, targets, lse, grad, scale,
                                                    logits.stride(0), grad.stride(0), V,
                                                    ignore_index, BLOCK_V=block, num_warps=4)
    return grad


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        if logits.dim() != 2:
            raise ValueError(f"cross_entropy: logits must be (N, V), got {tuple(logits.shape)}")
        _check_targets(*logits.shape, targets, ignore_index)
        check_device(logits, targets)
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        targets = targets.contiguous()
        loss_rows, lse = ce_forward(logits, targets, ignore_index)
        n_valid = (targets != ignore_index).sum().float()
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index = ignore_index
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse, n_valid = ctx.saved_tensors
        scale = (grad.float() / n_valid.clamp(min=1)).reshape(1)
        return ce_grad(logits, targets, lse, scale, ctx.ignore_index), None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy (fp32 scalar) of logits (N, V) against targets (N,)."""
    return CrossEntropyFunction.apply(logits, targets, ignore_index)


def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int = -100) -> torch.Tensor:
    """PyTorch reference: materializes fp32 logits."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def _chunk_rows(N: int, V: int, H: int) -> int:
    """Liger's rule: a chunk's logits (C, V) about as large as hidden (N, H)."""
    return next_pow2(triton.cdiv(N, triton.cdiv(V, H)))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size):
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"linear_cross_entropy: hidden must be (N, H) and weight (V, H), "
                             f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
        if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            raise ValueError(f"linear_cross_entropy: hidden and weight dtypes differ "
                             f"({hidden.dtype} vs {weight.dtype}) outside autocast")
        (N, H), V = hidden.shape, weight.shape[0]
        _check_targets(N, V, targets, ignore_index)
        check_device(hidden, weight, targets)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        targets = targets.contiguous()
        n_valid = (targets != ignore_index).sum().float()
        scale = (1.0 / n_valid.clamp(min=1)).reshape(1)
        loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty((N, H), dtype=hidden.dtype, device=hidden.device) if need_dh else None
        grad_w = torch.zeros_like(weight) if need_dw else None
        C = chunk_size or _chunk_rows(N, V, H)
        for start in range(0, N, C):
            end = min(start + C, N)
            h_c, t_c = hidden[start:end], targets[start:end]
            # (C, V): the only logits that exist at a time; under autocast in its dtype (bf16)
            logits_c = h_c @ weight.t()
            loss_rows[start:end], lse_c = ce_forward(logits_c, t_c, ignore_index)
            if need_dh or need_dw:
                ce_grad(logits_c, t_c, lse_c, scale, ignore_index, out=logits_c)  # in place
                if need_dh:
                    grad_h[start:end] = logits_c @ weight  # (C, H), cast to hidden's dtype
                if need_dw:  # (V, H) += (V, C) @ (C, H), in the weight's dtype (in-place ops
                    # are not autocast: under it, bf16 logits meet an fp32 weight here)
                    grad_w.addmm_(logits_c.t().to(grad_w.dtype), h_c.to(grad_w.dtype))
        ctx.save_for_backward(grad_h, grad_w)
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        # each in its own dtype: under autocast grad_h is bf16 but grad_w fp32, and a bf16
        # copy of grad (1/3 -> 0.334) would bias the fp32 weight gradient
        return (grad_h * grad.to(grad_h.dtype) if grad_h is not None else None,
                grad_w * grad.to(grad_w.dtype) if grad_w is not None else None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of hidden (N, H) @ weight (V, H).T against targets (N,), chunked."""
    if not torch.is_grad_enabled():
        # Function.apply reports needs_input_grad for inputs that require grad even under
        # no_grad (an eval loop over trainable weights), and the forward computes the
        # gradients eagerly: 3x the matmuls and a (V, H) grad_weight that no one reads
        hidden, weight = hidden.detach(), weight.detach()
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, chunk_size)


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int = -100) -> torch.Tensor:
    """PyTorch reference: full logits, then fp32 cross-entropy."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)
