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
from triton.runtime.errors import OutOfResources


# Set by kernels.compile_check while it compiles for a GPU it does not have: CPU tensors then
# stand in for CUDA ones, and launchers size their grids for this many SMs.
COMPILE_ONLY_SMS: int | None = None


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
    if COMPILE_ONLY_SMS:
        return max(1, min(cap, COMPILE_ONLY_SMS))
    return max(1, min(cap, 4))


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA, or on CPU tensors only under the interpreter."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type != "cuda" and not interpreting() and not COMPILE_ONLY_SMS:
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {dev}")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


_fitting: dict = {}  # (kernel, device, dtype, constexprs) -> index of the config that fits


def launch_fitting(kernel, grid, configs: list[dict], *args, **kwargs) -> dict:
    """Launch `kernel[grid(cfg)](*args, **kwargs, **cfg)` with the first of `configs` (launch
    kwargs: block sizes, num_warps, num_stages; fastest first) that the GPU can run. Triton
    raises OutOfResources before launching a build that needs more shared memory than the
    device has (H100 tiles on an RTX 4090: 227 KiB per block there, 99 KiB here); the next,
    smaller config is tried then. The choice is remembered per device, dtype and constexprs."""
    key = (kernel, args[0].device, args[0].dtype, tuple(sorted(kwargs.items())))
    for i in range(_fitting.get(key, 0), len(configs)):
        try:
            kernel[grid(configs[i])](*args, **kwargs, **configs[i])
        except OutOfResources:
            if i + 1 == len(configs):
                raise
            continue
        _fitting[key] = i
        return configs[i]
    raise ValueError("launch_fitting: no configs")
