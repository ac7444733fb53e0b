"""The one dispatch point between the engine and the Triton kernels.

Each op has a PyTorch path (the reference, used on CPU, whenever Triton is unusable, and for
inputs a kernel does not take, such as fp64) and, when the tensors are on CUDA and Triton
imports, the kernel from `kernels/`. The environment
variable WHETSTONE_KERNELS=triton|torch|auto (unset or empty: auto, kernels on GPUs of compute
capability 8.0 or newer) forces a choice (triton where the kernels cannot run warns once, then
uses the reference); `use_kernels(...)` does the same from
Python. The kernels package is imported lazily, only on the Triton path.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

_forced: str | None = None  # set by use_kernels(); overrides the environment variable


def kernel_mode() -> str:
    # unset or empty (WHETSTONE_KERNELS= to clear it) means auto
    mode = (_forced or os.environ.get("WHETSTONE_KERNELS") or "auto").strip().lower()
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
    except Exception:
        return False
    return _our_kernels()


def _our_kernels() -> bool:
    """Whether `import kernels` gives this repository's kernels/: PyPI's `kernels` (Hugging
    Face's hub kernels, which transformers >= 5.25 requires) has its import name, and when it
    comes first on sys.path every op would fail to import its kernel."""
    try:
        import kernels
    except Exception:
        return False
    if getattr(kernels, "WHETSTONE", False):
        return True
    warnings.warn(f"`import kernels` finds {getattr(kernels, '__file__', None) or kernels}, not "
                  "Whetstone's kernels/ (PyPI's `kernels` has the same name; pip uninstall "
                  "kernels): using the PyTorch reference")
    return False


def _use_triton(t: torch.Tensor) -> bool:
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        # Forced: also on CPU, where the kernels need TRITON_INTERPRET=1 (tests do this).
        if not triton_available():
            _forced_but_unusable("Triton or Whetstone's kernels do not import")
            return False
        if not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            _forced_but_unusable(f"{t.device.type} tensors need CUDA or TRITON_INTERPRET=1")
            return False
        return True
    return t.is_cuda and triton_available() and kernels_supported(t.device)


# The dtypes every kernel computes in (fp32 math inside): an fp64 tensor (a double-precision
# gradient check, say) would silently come back at fp32 precision, so it takes the PyTorch path.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_dtypes(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in KERNEL_DTYPES for t in tensors)


def kernels_supported(device: torch.device) -> bool:
    """Auto mode's GPU rule: the kernels are built and checked for compute capability 8.0 and
    newer (kernels.compile_check: sm_80 to sm_120). Older GPUs (T4, V100) have no bf16
    tensor-core dots, so they run the PyTorch path; WHETSTONE_KERNELS=triton still tries."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _forced_but_unusable(why: str) -> None:
    """Say once why WHETSTONE_KERNELS=triton still runs the PyTorch path: a silent fallback
    would pass for the kernels."""
    warnings.warn(f"WHETSTONE_KERNELS=triton, but {why}: using the PyTorch reference")


# ---------------------------------------------------------------------------------------------
# RMSNorm: fp32 math, cast back, then scale (HF LlamaRMSNorm)
# ---------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _kernel_dtypes(x, weight) and _use_triton(x):
        from kernels.rmsnorm import rms_norm as k
        return k(x, weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# RoPE, rotate_half convention: dim i pairs with i + d/2
# ---------------------------------------------------------------------------------------------
def _rope_table(c: torch.Tensor, x: torch.Tensor) -> bool:
    if x.dim() != 4 or c.shape[-2:] != x.shape[-2:]:
        return False
    return c.dim() == 2 or (c.dim() == 4 and c.shape[1] == 1 and c.shape[0] in (1, x.shape[0]))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D), or (B, 1, T, D) for per-row positions (both halves
    repeated). Returns a new tensor."""
    # the kernel reads each table as (T, D) or (B|1, 1, T, D) with its own batch stride
    # (per-row tables: packed sequences' position_ids); other broadcasts take PyTorch
    if _rope_table(cos, x) and _rope_table(sin, x) and _kernel_dtypes(x, cos, sin) and \
            _use_triton(x):
        from kernels.rope import apply_rope as k
        return k(x, cos, sin)
    d = x.shape[-1] // 2
    rotated = torch.cat((-x[..., d:], x[..., :d]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# SwiGLU gate: silu(gate) * up
# ---------------------------------------------------------------------------------------------
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # the kernel is elementwise over same-shape, same-dtype tensors; PyTorch broadcasts/promotes
    if gate.shape == up.shape and gate.dtype == up.dtype and _kernel_dtypes(gate) and \
            _use_triton(gate):
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
    if window is not None and S <= window:  # every key is inside the window (Mistral's 4096 at
        window = None                       # shorter lengths): plain causal, kernel included
    # The kernel covers power-of-two head dims, fp16/bf16/fp32 shared by q, k, v, and S >= T
    # when causal; others (an fp64 model, say) use PyTorch.
    kernel_ok = (q.shape[-1] in (16, 32, 64, 128, 256) and (S >= T or not causal)
                 and _kernel_dtypes(q) and q.dtype == k.dtype == v.dtype)
    if mask is None and window is None and kernel_ok and _use_triton(q):
        from kernels.attention import attention as kern
        return kern(q, k, v, causal=causal)
    if causal and window is None and mask is None and T in (1, S):
        # one decode query sees every cached key: no mask at all; T == S: plain causal
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
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
    """logits: (N, V) any float dtype; targets: (N,) int64 or int32. Loss in fp32."""
    if _use_triton(logits):
        from kernels.cross_entropy import cross_entropy as k
        return k(logits, targets, ignore_index=ignore_index)
    return F.cross_entropy(logits.float(), _long(targets), ignore_index=ignore_index)


def _long(targets: torch.Tensor) -> torch.Tensor:
    """int32 ids as int64: the kernels take both, F.cross_entropy and gather only int64."""
    return targets.long() if targets.dtype == torch.int32 else targets


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Loss of `hidden @ weight.T` against targets, never holding the full fp32 logits (Triton
    kernel on CUDA, chunked PyTorch otherwise). hidden: (N, H); weight: (V, H); targets: (N,)."""
    if _use_triton(hidden):
        from kernels.cross_entropy import linear_cross_entropy as k
        return k(hidden, weight, targets, ignore_index=ignore_index)
    targets = _long(targets)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCE.apply(hidden, weight, targets, ignore_index)
    return _chunked_linear_ce(hidden, weight, targets, ignore_index, False, False)[0]


def _chunk_rows(V: int) -> int:
    """Rows per chunk of the PyTorch loss paths: (rows, V) fp32 logits of about 32 MB."""
    return max(1, (8 << 20) // V)


def _chunked_linear_ce(hidden, weight, targets, ignore_index: int, need_dh: bool, need_dw: bool):
    """The PyTorch path of the fused loss (kernels/cross_entropy.py's algorithm with torch ops):
    rows in chunks whose fp32 logits stay near 32 MB, the gradient computed with the loss.
    On a CPU at vocab 49k and 1k tokens this replaces ~600 MB of logits, log-softmax and their
    gradients with one chunk's worth. Returns (mean loss, grad_hidden (N, H) | None,
    grad_weight (V, H) | None), gradients of the mean loss."""
    N, V = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    n_valid = valid.sum()
    grad_h = torch.empty_like(hidden) if need_dh else None
    grad_w = torch.zeros_like(weight) if need_dw else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    C = _chunk_rows(V)
    for s in range(0, N, C):
        h, ok = hidden[s:s + C], valid[s:s + C]
        t = torch.where(ok, targets[s:s + C], 0)
        with torch.no_grad():
            logits = (h @ weight.t()).float()  # (C, V)
            lse = torch.logsumexp(logits, dim=-1)  # (C,)
            total += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * ok).sum()
            if need_dh or need_dw:
                # d(mean loss)/d logits = (softmax - onehot) / n_valid on valid rows, 0 elsewhere
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                g = g.mul_((ok / n_valid.clamp(min=1))[:, None]).to(weight.dtype)
                if need_dh:  # (C, H); hidden and weight dtypes may differ under autocast
                    grad_h[s:s + C] = g @ weight
                if need_dw:
                    grad_w.addmm_(g.t(), h.to(weight.dtype))  # (V, H) += (V, C) @ (C, H)
    return total / n_valid, grad_h, grad_w  # NaN when nothing is valid, as F.cross_entropy


def linear_token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     ignore_index: int = -100) -> torch.Tensor:
    """(N,) fp32 NLL per row of `hidden @ weight.T` against targets, 0 where ignored (what
    F.cross_entropy(..., reduction="none") gives), in row chunks of ~32 MB of logits. With grad
    each chunk is checkpointed: backward recomputes its logits, so the full (N, V) logits and
    their gradient never exist (DPO's sequence log-probs at vocab 49k: ~1 GB saved per step)."""
    N, C = hidden.shape[0], _chunk_rows(weight.shape[0])
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for s in range(0, N, C):
        args = (hidden[s:s + C], weight, targets[s:s + C], ignore_index)
        parts.append(checkpoint(_token_nll, *args, use_reentrant=False) if grad else _token_nll(*args))
    return torch.cat(parts)


def _token_nll(h, w, t, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy((h @ w.t()).float(), t, ignore_index=ignore_index, reduction="none")


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        loss, grad_h, grad_w = _chunked_linear_ce(hidden, weight, targets, ignore_index,
                                                  ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad.to(grad_h.dtype) if grad_h is not None else None,
                grad_w * grad.to(grad_w.dtype) if grad_w is not None else None, None, None)


# ---------------------------------------------------------------------------------------------
# NF4 (QLoRA) weights, bitsandbytes layout (shared/FORMATS.md section 1)
# ---------------------------------------------------------------------------------------------
# The 16 NF4 codes, exact float32 values (quantiles of N(0, 1) normalised to [-1, 1]); the one
# copy on the engine side (engine/nf4.py builds its tensor from it; kernels/nf4.py has its own).
NF4_CODE_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                   -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                   0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                   0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                   0.7229568362236023, 1.0)


def nf4_dequantize(packed: torch.Tensor, absmax_q: torch.Tensor,
                   nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                   offset, shape, dtype: torch.dtype = torch.bfloat16,
                   blocksize: int = 64) -> torch.Tensor:
    """NF4 weight (N, K) -> dense `dtype`. packed: uint8 [(N*K+1)//2], element 2i in the high
    nibble; absmax_q: uint8 [n_blocks] with double quant (absmax = nested_code[absmax_q] *
    nested_absmax[b // 256] + offset) or the float32 absmax itself (nested_* then unused)."""
    if _use_triton(packed):
        from kernels.nf4 import nf4_dequantize as k
        return k(packed, absmax_q, nested_absmax, nested_code, offset, shape, dtype, blocksize)
    N, K = shape
    n = N * K
    p = packed.reshape(-1)
    if absmax_q.dtype == torch.uint8:
        # nested_code[q] * nested_absmax[group] + offset with each group's scale broadcast
        # over its 256 rows (same fp32 ops as a gathered group index, one pass less)
        code = nested_code.index_select(0, absmax_q.int())  # (n_blocks,)
        code = F.pad(code, (0, -code.numel() % 256)).view(-1, 256)  # (n_groups, 256)
        absmax = (code * nested_absmax.view(-1, 1)).view(-1)[:absmax_q.numel()] + float(offset)
    else:
        absmax = absmax_q.float()
    # One 8-byte gather per packed byte (both its codes at once) instead of one per nibble:
    # QLoRA on a CPU dequantizes every weight at every use. index_select with int32 indices,
    # not take with int64 ones: the same values, ~2-3x faster on a CPU (no 8-byte index copy,
    # a contiguous fast path).
    w = _code_pairs(p.device).index_select(0, p.int()).view(torch.float32)  # (2 * len(p),)
    if w.numel() % blocksize:  # a last block shorter than blocksize (or the odd nibble)
        w = F.pad(w, (0, -w.numel() % blocksize))
    w = w.view(-1, blocksize).mul_(absmax.view(-1, 1)).view(-1)[:n]  # fp32 (in place), one cast
    return w.to(dtype).view(N, K)


_CODE_PAIRS: dict[torch.device, torch.Tensor] = {}


def _code_pairs(device: torch.device) -> torch.Tensor:
    """int64 (256,): entry b holds the two fp32 codes of byte b (high nibble's first in
    memory), so viewing a gather of it as float32 gives the codes in weight order."""
    if device not in _CODE_PAIRS:
        code = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)
        b = torch.arange(256)
        pairs = torch.stack([code[b >> 4], code[b & 15]], dim=1)  # (256, 2)
        _CODE_PAIRS[device] = pairs.contiguous().view(torch.int64).view(256).to(device)
    return _CODE_PAIRS[device]


class _NF4LinearTorch(torch.autograd.Function):
    """x W^T + b, W dequantized again in backward (no full-size W kept); grad for x, b only."""

    @staticmethod
    def forward(ctx, x, bias, *fields):
        ctx.fields = fields
        return F.linear(x, nf4_dequantize(*fields[:6], x.dtype, fields[6]), bias)

    @staticmethod
    def backward(ctx, grad):
        f = ctx.fields
        gx = grad @ nf4_dequantize(*f[:6], grad.dtype, f[6]) if ctx.needs_input_grad[0] else None
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return (gx, gb) + (None,) * len(f)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax_q: torch.Tensor,
               nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset,
               shape, bias: torch.Tensor | None = None, blocksize: int = 64) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias) for an NF4 weight W of `shape` (N, K), in x's dtype. Fields as
    in nf4_dequantize. The kernel path fuses dequantization into the matmul."""
    if torch.is_autocast_enabled(x.device.type):  # compute in the autocast dtype, as F.linear
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if bias is not None:
        bias = bias.to(x.dtype)
    # fp64 takes PyTorch, as in the other ops (the fused kernel does not build for it)
    if _kernel_dtypes(x) and _use_triton(x):
        from kernels.nf4 import nf4_matmul as k
        return k(x, packed, absmax_q, nested_absmax, nested_code, offset, shape, bias, blocksize)
    return _NF4LinearTorch.apply(x, bias, packed, absmax_q, nested_absmax, nested_code, offset,
                                 tuple(shape), blocksize)
