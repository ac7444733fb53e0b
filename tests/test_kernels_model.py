"""Model-level kernel parity: a tiny Llama-style model with the Triton kernels on (the
interpreter on CPU, native on CUDA) and off gives the same logits, loss, gradients and 20-step
loss curve; also under bf16 autocast, which is how train.py runs on a GPU, and for QLoRA (NF4
matmul kernels under LoRA adapters)."""
from kernel_utils import DEVICES, assert_close  # first: sets TRITON_INTERPRET

import pytest
import torch

from engine import ops
from engine.config import ModelConfig
from engine.generation import decode_one_token, prefill
from engine.lora import apply_lora
from engine.model import Transformer
from engine.nf4 import quantize_model

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def make_model(device, qlora=False):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY)).to(device)
    if qlora:  # K = 64 layers take the fused NF4 kernel, down_proj (K = 96) dequantizes
        quantize_model(model)
        apply_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                   "up_proj", "down_proj"), r=4, alpha=8)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # nonzero B: the adapters take part from step 0
                torch.nn.init.normal_(p, std=0.02)
    return model


def autocast(device, on):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=on)


def batch(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (2, 21), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    return ids.to(device), labels.to(device)


def forward_backward(mode, device, bf16, qlora=False):
    model = make_model(device, qlora)
    ids, labels = batch(device)
    with ops.use_kernels(mode), autocast(device, bf16):
        logits = model(ids)
        loss = model(ids, labels=labels)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits, loss, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16,qlora", [(False, False), (True, False), (False, True)],
                         ids=["fp32", "bf16-autocast", "qlora"])
def test_kernels_on_and_off_give_the_same_logits_loss_and_grads(device, bf16, qlora):
    ref = forward_backward("torch", device, bf16, qlora)
    got = forward_backward("triton", device, bf16, qlora)
    # fp32: the kernels' own tolerance; bf16: one bf16 rounding apart in many places
    tol = (3e-2, 3e-2) if bf16 else (1e-4, 1e-4)
    assert_close(got[0], ref[0], tol, "logits")
    assert_close(got[1], ref[1], (1e-2, 1e-2) if bf16 else (1e-5, 1e-5), "loss")
    assert got[2].keys() == ref[2].keys() and len(got[2]) > 0
    for name in ref[2]:
        scale = ref[2][name].abs().max().item()  # compare at the gradient's own magnitude
        assert_close(got[2][name], ref[2][name], (tol[0] * scale, tol[1]), name)


def loss_curve(mode, device, steps=20):
    model = make_model(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    curve = []
    for step in range(steps):
        ids, labels = batch(device, seed=step % 4)
        with ops.use_kernels(mode):
            loss = model(ids, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_on_and_off_train_along_the_same_20_step_loss_curve(device):
    ref, got = loss_curve("torch", device), loss_curve("triton", device)
    assert ref[-1] < ref[0] - 0.3  # it learns, so the curves compare real training
    assert_close(got, ref, (2e-3, 2e-3), "loss curve")


def cached_decode_logits(mode, device, steps=6):
    """Greedy decoding with a KV cache: prefill (the forward kernel) then one token at a time
    (the split-KV decode kernel). Returns the (steps + 1, B, V) logits."""
    model = make_model(device).eval()
    ids, _ = batch(device)
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    out = []
    with ops.use_kernels(mode), torch.inference_mode():
        logits = prefill(model, ids, cache)  # (B, V)
        for _ in range(steps):
            out.append(logits)
            logits = decode_one_token(model, logits.argmax(-1)[:, None], cache)
    return torch.stack(out + [logits])


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_on_and_off_decode_the_same_with_a_kv_cache(device):
    ref, got = cached_decode_logits("torch", device), cached_decode_logits("triton", device)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert_close(got, ref, (1e-4, 1e-4), "logits per step")
