"""RMSNorm kernel vs the fp32 PyTorch reference: output, dx, dweight (interpreter on CPU)."""
from kernel_utils import DEVICES, DTYPES, assert_close  # first: sets TRITON_INTERPRET

import pytest
import torch

from kernels.rmsnorm import rms_norm, rms_norm_ref

# (atol, rtol) per dtype, for output and every gradient, against the fp32 reference.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
SHAPES = [(3, 5, 48), (7, 64), (2, 130), (2, 4096)]  # odd rows, non-power-of-two, a wide row


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(device, dtype, shape):
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=device).to(dtype)
    y = rms_norm(x, w, 1e-6)
    y.backward(dy)
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yf = rms_norm_ref(xf, wf, 1e-6)
    yf.backward(dy.float())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, yf, TOL[dtype], "y")
    assert_close(x.grad, xf.grad, TOL[dtype], "dx")
    # dweight sums over rows: scale the absolute tolerance by sqrt(rows).
    rows = x.numel() // shape[-1]
    atol, rtol = TOL[dtype]
    assert_close(w.grad, wf.grad, (atol * rows ** 0.5, rtol), "dweight")


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_fp32_weight_bf16_input(device):
    """Mixed dtypes promote like `weight * y.to(x.dtype)`."""
    x = torch.randn(4, 32, device=device).to(torch.bfloat16)
    w = torch.rand(32, device=device)
    y = rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32
    assert_close(y, rms_norm_ref(x, w, 1e-5), TOL[torch.bfloat16], "y")


def test_rms_norm_bad_weight():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)
