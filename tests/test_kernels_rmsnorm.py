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


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_strided_weight_and_input(device):
    """A weight that is a strided view (every other element of a buffer) and a transposed x:
    the kernel read the weight as if contiguous (max error 4.7 before the fix)."""
    w = (1 + 0.1 * torch.randn(64, device=device))[::2].requires_grad_()
    x = torch.randn(32, 3, device=device).t().requires_grad_()
    dy = torch.randn(3, 32, device=device)
    rms_norm(x, w, 1e-6).backward(dy)
    xf, wf = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = rms_norm_ref(xf, wf, 1e-6)
    y.backward(dy)
    assert_close(rms_norm(x, w, 1e-6), y, TOL[torch.float32], "y")
    assert_close(x.grad, xf.grad, TOL[torch.float32], "dx")
    assert_close(w.grad, wf.grad, TOL[torch.float32], "dweight")


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32),
                                             (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32)])
def test_rms_norm_ref_matches_transformers(x_dtype, w_dtype):
    """The reference itself is transformers' LlamaRMSNorm bit for bit, dtype casts included
    (fp32 statistics, round to x's dtype, then the weight multiply with promotion)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = llama.LlamaRMSNorm(48, eps=1e-6)
    norm.weight.data = (1 + 0.1 * torch.randn(48)).to(w_dtype)
    x = torch.randn(3, 48).to(x_dtype)
    with torch.no_grad():
        want = norm(x)
    got = rms_norm_ref(x, norm.weight.detach(), 1e-6)
    assert got.dtype == want.dtype and torch.equal(got, want)
