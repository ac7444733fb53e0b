"""Chunked cross-entropy and fused linear cross-entropy vs the fp32 PyTorch reference."""
from kernel_utils import DEVICES, DTYPES, assert_close  # first: sets TRITON_INTERPRET

import math

import pytest
import torch

from kernels.cross_entropy import (cross_entropy, cross_entropy_ref, linear_cross_entropy,
                                   linear_cross_entropy_ref)

# (atol, rtol) for the loss and every gradient, against the fp32 reference.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (4e-3, 2e-2)}


def make_targets(N, V, device, ignored=(2,)):
    t = torch.randint(0, V, (N,), device=device)
    for i in ignored:
        if i < N:
            t[i] = -100
    return t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(7, 300), (5, 64), (3, 1000), (2, 5003)])
def test_cross_entropy_matches_reference(device, dtype, N, V):
    x = (3 * torch.randn(N, V, device=device)).to(dtype).requires_grad_()
    t = make_targets(N, V, device)
    loss = cross_entropy(x, t)
    loss.backward()
    xf = x.detach().float().requires_grad_()
    ref = cross_entropy_ref(xf, t)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref, TOL[dtype], "loss")
    assert_close(x.grad, xf.grad, TOL[dtype], "dlogits")
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_all_ignored_is_nan_with_zero_grad(device):
    x = torch.randn(3, 50, device=device, requires_grad=True)
    t = torch.full((3,), -100, device=device)
    loss = cross_entropy(x, t)
    assert math.isnan(loss.item()) and math.isnan(cross_entropy_ref(x, t).item())
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_linear_cross_entropy_matches_reference(device, dtype, chunk_size):
    N, H, V = 13, 32, 200
    h = torch.randn(N, H, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device) / 4).to(dtype).requires_grad_()
    t = make_targets(N, V, device, ignored=(0, 5))
    loss = linear_cross_entropy(h, w, t, chunk_size=chunk_size)
    loss.backward()
    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = linear_cross_entropy_ref(hf, wf, t)
    ref.backward()
    assert_close(loss, ref, TOL[dtype], "loss")
    assert_close(h.grad, hf.grad, TOL[dtype], "dhidden")
    assert_close(w.grad, wf.grad, TOL[dtype], "dweight")


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_no_grad_and_scaled_grad(device):
    """Inference computes no gradients; a non-unit upstream grad scales both gradients."""
    h, w = torch.randn(6, 16, device=device), torch.randn(40, 16, device=device)
    t = make_targets(6, 40, device)
    with torch.no_grad():
        assert_close(linear_cross_entropy(h, w, t), linear_cross_entropy_ref(h, w, t),
                     TOL[torch.float32], "loss")
    h.requires_grad_()
    (2.5 * linear_cross_entropy(h, w, t)).backward()
    hf = h.detach().clone().requires_grad_()
    (2.5 * linear_cross_entropy_ref(hf, w, t)).backward()
    assert_close(h.grad, hf.grad, TOL[torch.float32], "dhidden")


def test_cross_entropy_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match="target ids must be in"):
        cross_entropy(torch.randn(2, 10), torch.tensor([1, 10]))
