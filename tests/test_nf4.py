"""engine/nf4.py against bitsandbytes (test-only reference, CPU backend) and against the layout
facts of shared/FORMATS.md section 1."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.nf4 import (DYNAMIC_LUT, DYNAMIC_MAP, NF4_CODE, NF4Linear, NF4Weight, block_absmax,
                        dequantize_nf4, from_bnb_state_dict, quantize_model, quantize_nf4,
                        to_bnb_state_dict)


@pytest.fixture(scope="module")
def BF():
    bnb = pytest.importorskip("bitsandbytes")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    return bnb.functional


def _cases():
    g = torch.Generator().manual_seed(1)
    normal = torch.randn(128, 256, generator=g) * 0.02
    outliers = torch.randn(96, 200, generator=g) * 0.02
    outliers.view(-1)[torch.randperm(outliers.numel(), generator=g)[:7]] *= 300
    mids = ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).repeat(4)        # 60 exact midpoints
    midpoint_block = torch.cat([torch.tensor([1.0, -1.0, 0.0, 0.5]), mids]).view(2, 32)
    return {
        "normal": normal,
        "uniform": torch.rand(64, 64, generator=g) * 2 - 1,
        "outliers": outliers,
        "odd_7x9": torch.randn(7, 9, generator=g),               # 63: partial block, odd count
        "partial_3x100": torch.randn(3, 100, generator=g),       # 300 = 4 blocks + 44
        "many_groups_300x70": torch.randn(300, 70, generator=g),  # 329 blocks: 2 nested groups
        "exact_midpoints": midpoint_block,
        "one_block_constant": torch.full((4, 8), 0.25),          # nested group of one: 0/0 path
        # subnormal block scales: the nested group scale was clamped to 1e-38 before dividing,
        # which bitsandbytes does not do (absmax codes 63/57/53 vs its 56/46/39)
        "subnormal": torch.randn(4, 50, generator=g) * 1e-39,
        "zeros": torch.zeros(16, 16),
        "bf16": (torch.randn(64, 96, generator=g) * 0.05).to(torch.bfloat16),
        "fp16": (torch.randn(48, 80, generator=g) * 0.05).to(torch.float16),
    }


CASES = _cases()


def test_code_tables_match_bitsandbytes(BF):
    assert torch.equal(NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))
    from kernels.nf4 import NF4_CODE as KERNEL_CODE  # the Triton side keeps its own copy
    assert torch.equal(torch.tensor(KERNEL_CODE, dtype=torch.float32), NF4_CODE)
    dyn = BF.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    assert torch.equal(DYNAMIC_MAP, dyn)
    assert DYNAMIC_MAP[127] == 0 and DYNAMIC_MAP[255] == 1 and abs(DYNAMIC_MAP[0] + 0.99297) < 1e-5


def test_nested_lut_matches_bitsandbytes_on_every_entry(BF):
    """bitsandbytes' CPU 8-bit quantizer maps v in [-1, 1] through a 65536-entry table; probe the
    centre of every bucket (each group starts with 1.0 so that its absmax is exactly 1)."""
    j = torch.arange(65536, dtype=torch.float64)
    v = (j / 65535 * 2 - 1).float()
    ours = DYNAMIC_LUT[(((v + 1.0) * 0.5) * 65535.0 + 0.5).long()]
    groups = F.pad(v, (0, 255 * 258 - v.numel())).view(-1, 255)
    A = torch.cat([torch.ones(groups.shape[0], 1), groups], dim=1).reshape(-1)
    q, _ = BF.quantize_blockwise(A, code=DYNAMIC_MAP.clone(), blocksize=256)
    theirs = q.view(-1, 256)[:, 1:].reshape(-1)[: v.numel()]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_bit_identical_to_bitsandbytes(BF, name, double_quant):
    W = CASES[name]
    packed, st = BF.quantize_4bit(W, blocksize=64, quant_type="nf4",
                                  compress_statistics=double_quant)
    q = quantize_nf4(W, blocksize=64, double_quant=double_quant)
    assert torch.equal(q.packed, packed.view(-1))
    if double_quant:
        assert torch.equal(q.absmax_q, st.absmax)
        assert torch.equal(q.nested_absmax, st.state2.absmax)
        assert torch.equal(q.nested_code, st.state2.code)
        assert q.offset == st.offset.item()
    else:
        assert torch.equal(q.absmax, st.absmax)
    # Dequantization in the original dtype, bit for bit. bitsandbytes' native CPU kernel (0.50)
    # finds a block from (row, column), which is wrong when a row's length is not a multiple
    # of the blocksize (64 x 96 here): dequantize the flat tensor, where the two agree.
    st.shape = torch.Size([W.numel()])
    ref = BF.dequantize_4bit(packed, st)
    ours = dequantize_nf4(q)
    assert ours.dtype == W.dtype and ours.shape == W.shape
    assert torch.equal(ours, ref.view(W.shape))


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_other_blocksizes_bit_identical_to_bitsandbytes(BF, blocksize, double_quant):
    W = torch.randn(37, 129, generator=torch.Generator().manual_seed(4))  # odd count, tail block
    packed, st = BF.quantize_4bit(W, blocksize=blocksize, quant_type="nf4",
                                  compress_statistics=double_quant)
    q = quantize_nf4(W, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax_q if double_quant else q.absmax, st.absmax)
    if double_quant:
        assert torch.equal(q.nested_absmax, st.state2.absmax) and q.offset == st.offset.item()
    st.shape = torch.Size([W.numel()])                         # see the test above
    assert torch.equal(dequantize_nf4(q).view(-1), BF.dequantize_4bit(packed, st).view(-1))


def test_bits_per_param_with_double_quant():
    q = quantize_nf4(torch.randn(128, 256))                    # 512 blocks, 2 nested groups
    assert q.bits_per_param() == 4 + 8 / 64 + 32 / (64 * 256)  # 4.127
    plain = quantize_nf4(torch.randn(128, 256), double_quant=False)
    assert abs(plain.bits_per_param() - 4.5) < 1e-12


def test_packing_layout_and_exact_round_trip():
    # FORMATS: [1.0, -1.0] packs to 0xF0 (element 2i in the high nibble)
    assert quantize_nf4(torch.tensor([1.0, -1.0])).packed.tolist() == [0xF0]
    # Values that are exactly code * (power-of-two block scale) survive a round trip exactly.
    idx = torch.randint(0, 16, (4, 64))
    idx[:, 0] = 15                                             # absmax of each block = its scale
    scales = torch.tensor([0.5, 2.0, 0.125, 8.0]).view(4, 1)
    W = (NF4_CODE[idx] * scales).view(2, 128)
    q = quantize_nf4(W, double_quant=False)
    assert torch.equal(dequantize_nf4(q), W)
    assert torch.equal(q.absmax, scales.view(-1))


def test_quantization_error_is_bounded():
    W = torch.randn(64, 128)
    absmax = W.abs().view(-1, 64).amax(-1, keepdim=True)
    max_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max()
    err = (dequantize_nf4(quantize_nf4(W, double_quant=False)) - W).abs().view(-1, 64)
    assert (err <= absmax * max_gap / 2 * (1 + 1e-6)).all()   # nearest code: half the widest gap
    # Double quantization perturbs each block scale by well under 1 %
    assert torch.allclose(block_absmax(quantize_nf4(W)), absmax.view(-1), rtol=1e-2, atol=0)


def test_bnb_state_dict_export_matches_quant_state_as_dict(BF):
    W = CASES["many_groups_300x70"].to(torch.bfloat16)
    packed, st = BF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = {"weight": packed, **{"weight." + k: v for k, v in st.as_dict(packed=True).items()}}
    ours = to_bnb_state_dict(quantize_nf4(W), prefix="")
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    # ... and bitsandbytes reads our export back to the same weights
    st2 = BF.QuantState.from_dict({k[len("weight."):]: v for k, v in ours.items() if k != "weight"},
                                  device=torch.device("cpu"))
    assert torch.equal(BF.dequantize_4bit(ours["weight"], st2), dequantize_nf4(quantize_nf4(W)))


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_state_dict_import_round_trip(double_quant):
    q = quantize_nf4(torch.randn(33, 65), double_quant=double_quant)
    q2 = from_bnb_state_dict(to_bnb_state_dict(q, "layer."), "layer.")
    assert isinstance(q2, NF4Weight) and q2.shape == (33, 65) and q2.offset == q.offset
    assert torch.equal(dequantize_nf4(q2), dequantize_nf4(q))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        quantize_nf4(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.ones(64), blocksize=48)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="not a bitsandbytes NF4"):
        from_bnb_state_dict({"weight": torch.zeros(2, 1, dtype=torch.uint8)})


def _with_meta(sd, **kw):
    import json
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = {**json.loads(bytes(sd[key].numpy().tobytes()).decode()), **kw}
    return {**sd, key: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


def test_damaged_bnb_state_dict_is_one_value_error():
    """Each of these raised KeyError / RuntimeError / AttributeError from deep inside."""
    sd = to_bnb_state_dict(quantize_nf4(torch.randn(8, 64)))
    cases = [
        ({k: v for k, v in sd.items() if k != "weight.absmax"}, "lacks weight.absmax"),
        ({k: v for k, v in sd.items() if k != "weight.nested_quant_map"},
         "lacks weight.nested_quant_map"),
        (_with_meta(sd, shape=[16, 64]), r"weight has 256 elements but a \[16, 64\] weight"),
        ({**sd, "weight.absmax": sd["weight.absmax"][:3]}, "weight.absmax has 3 elements"),
        (_with_meta(sd, blocksize=48), "blocksize must be one of"),
        (_with_meta(sd, dtype="float64x"), "dtype 'float64x' is not"),
        (_with_meta(sd, quant_type="fp4"), "quant_type 'fp4' is not 'nf4'"),
        (_with_meta(sd, nested_offset=None), "unreadable quantization state"),
        ({**sd, "weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2], dtype=torch.uint8)},
         "unreadable quantization state"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            from_bnb_state_dict(bad)


# ---------------------------------------------------------------------------------------------
# NF4Linear
# ---------------------------------------------------------------------------------------------
def test_nf4_linear_forward_backward_and_no_dense_weight_saved():
    lin = nn.Linear(96, 40, bias=True)
    layer = NF4Linear.from_linear(lin)
    W = layer.dequantized_weight(torch.float32)
    assert torch.equal(W, dequantize_nf4(quantize_nf4(lin.weight)))
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 5, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        y = layer(x)
    assert W.numel() not in saved                              # no dense (out, in) copy kept
    assert torch.allclose(y, F.linear(x, W, lin.bias), atol=1e-6, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ W, atol=1e-6, rtol=0)
    # A trainable bias gets its gradient too
    layer.bias.requires_grad_(True)
    layer(x).backward(g)
    assert torch.allclose(layer.bias.grad, g.sum((0, 1)), atol=1e-5)


def test_nf4_linear_state_dict_round_trip_and_dtype_casts():
    layer = NF4Linear.from_linear(nn.Linear(64, 48, bias=True))
    sd = layer.state_dict()
    assert set(sd) == {"packed", "absmax_q", "nested_absmax", "nested_code", "offset", "bias"}
    fresh = NF4Linear(64, 48, bias=True)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.to_bnb_state_dict()["weight.absmax"], layer.absmax_q)
    # model.to(bf16) casts the bias and the compute, never the fp32 scales
    layer.to(torch.bfloat16)
    assert layer.nested_absmax.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.nested_absmax, fresh.nested_absmax)
    yb = layer(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), fresh(x), atol=0.05, rtol=0.02)


def _tiny_llama_like():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self.self_attn, n, nn.Linear(64, 64, bias=False))
    m = nn.Module()
    m.model = nn.Module()
    m.model.embed_tokens = nn.Embedding(100, 64)
    m.model.layers = nn.ModuleList([Block(), Block()])
    m.lm_head = nn.Linear(64, 100, bias=False)
    return m


def test_quantize_model_report_and_skip():
    m = _tiny_llama_like()
    q_before = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    report = quantize_model(m)
    assert report["layers"] == 8 and report["params"] == 8 * 64 * 64
    assert report["skipped"] == ["lm_head"]
    assert isinstance(m.lm_head, nn.Linear) and isinstance(m.model.embed_tokens, nn.Embedding)
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, NF4Linear)
    assert torch.equal(q.dequantized_weight(), dequantize_nf4(quantize_nf4(q_before)))
    assert report["bytes_before"] == 8 * 64 * 64 * 4
    # 4096 params per layer = 64 blocks = one nested group: 4 + 8/64 + 32/4096 bits
    assert report["bits_per_param"] == pytest.approx(4 + 8 / 64 + 32 / 4096)
    assert report["bytes_after"] < report["bytes_before"] / 5
    with pytest.raises(ValueError, match="blocksize"):
        quantize_model(_tiny_llama_like(), blocksize=3)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_quantize_while_loading_equals_quantize_after_loading(tmp_path, arch):
    """load_model(quantize="nf4") quantizes each linear as its weight is read (Qwen2's q/k/v
    biases arrive after or before their weights): the same NF4 model, bit for bit."""
    from engine.checkpoint import save_model
    from engine.config import ModelConfig
    from engine.hub import load_model
    from engine.model import Transformer
    cfg = ModelConfig(vocab_size=80, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, architectures=[arch])
    torch.manual_seed(0)
    src = Transformer(cfg)
    if cfg.attention_bias:
        for name, p in src.named_parameters():
            if name.endswith(".bias"):
                nn.init.normal_(p)
    save_model(src, str(tmp_path))
    after, _ = load_model(str(tmp_path))
    report = quantize_model(after)
    during, _ = load_model(str(tmp_path), quantize="nf4")
    assert during.nf4_report == report and report["layers"] == 14
    want, got = after.state_dict(), during.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ids = torch.randint(0, 80, (2, 9))
    assert torch.equal(during(ids), after(ids))
    with pytest.raises(ValueError, match="quantize must be None or 'nf4'"):
        load_model(str(tmp_path), quantize="int8")


@pytest.mark.slow
def test_smollm2_quantized_while_loading_peaks_at_a_third_of_load_then_quantize():
    """Peak RSS growth of a fresh process loading the demo model for QLoRA, quantizing while
    loading vs loading fp32 then quantizing (figures printed; seen: 223 vs 615 MiB). glibc keeps
    freed buffers in a fragmented heap, which makes the default peak wander by 200 MiB between
    runs; MALLOC_MMAP_THRESHOLD_ gives large buffers back at once, so RSS follows live memory."""
    import os
    import subprocess
    import sys
    from engine.hub import fetch
    fetch("smollm2-135m-instruct")
    code = ("import re, sys, torch\n"
            "from engine.hub import load_model\n"
            "from engine.nf4 import quantize_model\n"
            "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
            "base = hwm()\n"
            "if sys.argv[1] == 'load':\n"
            "    m, _ = load_model('smollm2-135m-instruct', quantize='nf4')\n"
            "else:\n"
            "    m, _ = load_model('smollm2-135m-instruct'); quantize_model(m)\n"
            "print((hwm() - base) * 1024)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    peak = {how: int(subprocess.run([sys.executable, "-c", code, how], capture_output=True,
                                    text=True, cwd=root, env=env, check=True).stdout)
            for how in ("load", "after")}
    print(f"\nSmolLM2 QLoRA load peak RSS growth: quantizing while loading "
          f"{peak['load'] / 2**20:.0f} MiB, loading fp32 then quantizing "
          f"{peak['after'] / 2**20:.0f} MiB")
    assert peak["load"] < 0.5 * peak["after"]
