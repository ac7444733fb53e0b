"""SwiGLU kernel vs the fp32 PyTorch reference: output, d_gate, d_up (interpreter on CPU)."""
from kernel_utils import DEVICES, DTYPES, assert_close  # first: sets TRITON_INTERPRET

import pytest
import torch

from kernels.swiglu import swiglu, swiglu_ref

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 24), (7, 96), (1, 1000)])
def test_swiglu_matches_reference(device, dtype, shape):
    g = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    u = torch.randn(shape, device=device).to(dtype).requires_grad_()
    dh = torch.randn(shape, device=device).to(dtype)
    h = swiglu(g, u)
    h.backward(dh)
    gf, uf = g.detach().float().requires_grad_(), u.detach().float().requires_grad_()
    hf = swiglu_ref(gf, uf)
    hf.backward(dh.float())
    assert h.dtype == dtype and h.shape == g.shape
    assert_close(h, hf, TOL[dtype], "h")
    assert_close(g.grad, gf.grad, TOL[dtype], "d_gate")
    assert_close(u.grad, uf.grad, TOL[dtype], "d_up")


def test_swiglu_shape_mismatch():
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(2, 4), torch.randn(2, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_strided_halves_of_a_fused_projection(device):
    """gate and up as the two halves of one (.., 2I) projection (non-contiguous views) and a
    transposed upstream gradient: the launchers copy what the flat kernels cannot index."""
    B, T, inter = 2, 3, 40
    gu = torch.randn(B, T, 2 * inter, device=device, requires_grad=True)
    g, u = gu[..., :inter], gu[..., inter:]
    dh = torch.randn(B, inter, T, device=device).transpose(1, 2)
    swiglu(g, u).backward(dh)
    guf = gu.detach().clone().requires_grad_()
    swiglu_ref(guf[..., :inter], guf[..., inter:]).backward(dh)
    assert_close(gu.grad, guf.grad, (1e-5, 1e-5), "d_gate_up")
