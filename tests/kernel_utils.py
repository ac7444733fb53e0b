"""Shared setup for the kernel tests: import this BEFORE anything that imports triton kernels.

Without CUDA it turns on the Triton interpreter (TRITON_INTERPRET=1 must be set before the
@triton.jit decorators run) so the kernels run on CPU tensors. `DEVICES` parametrizes tests:
"cpu" through the interpreter when there is no GPU, "cuda" (marked `gpu`) natively otherwise.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] + (["cpu"] if INTERPRET else [])

# Dtypes the kernels support. The interpreter computes bf16 in fp32 after the load (see
# kernels/utils.py) and rounds by truncation, so bf16 runs there too, at bf16 tolerance.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float],
                 name: str) -> None:
    """torch.testing-style |a - e| <= atol + rtol * |e|, reporting the worst element."""
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    atol, rtol = tol
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    bad |= torch.isnan(a) != torch.isnan(e)
    if bad.any():
        excess = torch.where(torch.isnan(err), torch.full_like(err, float("inf")),
                             err - rtol * e.abs())
        i = int(excess.flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off (atol={atol}, rtol={rtol}); "
            f"worst at {idx}: got {a.flatten()[i].item():.6g}, want {e.flatten()[i].item():.6g}, "
            f"max abs err {err.nan_to_num(float('inf')).max().item():.3g}")
