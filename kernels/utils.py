"""Small helpers shared by the Triton kernels (no kernels here).

Interpreter notes (TRITON_INTERPRET=1, Triton 3.9), found by probing and reading
triton/runtime/interpreter.py:
- bfloat16 values live in numpy as raw uint16 bit patterns, so any arithmetic on a bf16 block
  (`x * 2`, `tl.dot` of bf16 operands) computes garbage. Casting bf16 -> fp32 right after the
  load is exact, so every kernel here upcasts loads first; the matmul kernels take an `UPCAST`
  constexpr that makes their `tl.dot` operands fp32 when interpreting bf16 (on a GPU the dots
  stay bf16 on tensor cores).
- fp32 -> bf16 casts truncate (round toward zero) instead of rounding to nearest even, so bf16
  outputs can differ from PyTorch by one bf16 ulp. Tolerances in the tests allow for that.
"""
from __future__ import annotations

import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (checked at call time)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether matmul kernels must feed fp32 to tl.dot (bf16 is broken in the interpreter)."""
    return interpreting() and dtype == torch.bfloat16


def num_warps_for(block: int) -> int:
    """Warps for a one-row-per-program kernel over `block` elements (Liger's heuristic)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs(device: torch.device, cap: int) -> int:
    """How many persistent programs to launch: one per SM on CUDA, a few in the interpreter."""
    if device.type == "cuda":
        return max(1, min(cap, sm_count(device.index if device.index is not None else 0)))
    return max(1, min(cap, 4))


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA, or on CPU tensors only under the interpreter."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {dev}")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))
