"""The one dispatch point between the engine and the Triton kernels.

Each op has a PyTorch path (the reference, used on CPU and whenever Triton is unusable) and,
when the tensors are on CUDA and Triton imports, the kernel from `kernels/`. The environment
variable WHETSTONE_KERNELS=triton|torch|auto (default auto) forces a choice; `use_kernels(...)`
does the same from Python. The kernels package is imported lazily, only on the Triton path.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

_forced: str | None = None  # set by use_kernels(); overrides the environment variable


def kernel_mode() -> str:
    mode = _forced or os.environ.get("WHETSTONE_KERNELS", "auto").lower()
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"WHETSTONE_KERNELS must be auto, triton or torch, got {mode!r}")
    return mode


@contextlib.contextmanager
def use_kernels(mode: str):
    """Temporarily force 'triton', 'torch' or 'auto' (tests use it for kernels-on/off parity)."""
    global _forced
    prev, _forced = _forced, mode
    try:
        kernel_mode()
        yield
    finally:
        _forced = prev


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def _use_triton(t: torch.Tensor) -> bool:
    mode = kernel_mode()
    if mode == "torch" or not triton_available():
        return False
    if mode == "triton":
        # Forced: also on CPU, where the kernels need TRITON_INTERPRET=1 (tests do this).
        return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return t.is_cuda


# ---------------------------------------------------------------------------------------------
# RMSNorm: fp32 math, cast back, then scale (HF LlamaRMSNorm)
# ---------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_triton(x):
        from kernels.rmsnorm import rms_norm as k
        return k(x, weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# RoPE, rotate_half convention: dim i pairs with i + d/2
# ---------------------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D), or (B, 1, T, D) for per-row positions (both halves
    repeated). Returns a new tensor."""
    if cos.dim() == 2 and _use_triton(x):
        from kernels.rope import apply_rope as k
        return k(x, cos, sin)
    d = x.shape[-1] // 2
    rotated = torch.cat((-x[..., d:], x[..., :d]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# SwiGLU gate: silu(gate) * up
# ---------------------------------------------------------------------------------------------
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if _use_triton(gate):
        from kernels.swiglu import swiglu as k
        return k(gate, up)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------
# Attention with grouped-query heads
# ---------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              window: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq % Hkv == 0 and S >= T.

    The T queries are the last T positions of the S keys (a KV cache holds the first S - T), so
    causal masking is aligned bottom-right: query i sees keys j <= S - T + i. `window` (Mistral)
    further hides keys j <= pos_i - window. `mask` (B or 1, 1, T, S) bool, True = may attend, is
    combined with the causal rule (used for packed sequences). Returns (B, Hq, T, D).
    """
    T, S = q.shape[-2], k.shape[-2]
    if mask is None and window is None and _use_triton(q):
        from kernels.attention import attention as kern
        return kern(q, k, v, causal=causal)
    if causal and T == S and window is None and mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              enable_gqa=q.shape[1] != k.shape[1])
    allowed = None
    if causal or window is not None:
        qpos = torch.arange(S - T, S, device=q.device)[:, None]
        kpos = torch.arange(S, device=q.device)[None, :]
        allowed = kpos <= qpos if causal else torch.ones(T, S, dtype=torch.bool, device=q.device)
        if window is not None:
            allowed = allowed & (kpos > qpos - window)
    if mask is not None:
        allowed = mask if allowed is None else (mask & allowed)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                          enable_gqa=q.shape[1] != k.shape[1])


# ---------------------------------------------------------------------------------------------
# Cross-entropy over the vocabulary, mean over tokens whose target != ignore_index
# ---------------------------------------------------------------------------------------------
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int = -100) -> torch.Tensor:
    """logits: (N, V) any float dtype; targets: (N,) int64. Loss in fp32."""
    if _use_triton(logits):
        from kernels.cross_entropy import cross_entropy as k
        return k(logits, targets, ignore_index=ignore_index)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Loss of `hidden @ weight.T` against targets without keeping full fp32 logits on the
    kernel path. hidden: (N, H); weight: (V, H); targets: (N,)."""
    if _use_triton(hidden):
        from kernels.cross_entropy import linear_cross_entropy as k
        return k(hidden, weight, targets, ignore_index=ignore_index)
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)
