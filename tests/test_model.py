"""engine/model.py against the formulas of shared/FORMATS.md section 3, written out directly."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import ModelConfig, preset
from engine.model import Transformer, rope_inv_freq


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", **kw)).eval()


def test_rmsnorm_formula():
    m = tiny()
    norm = m.model.layers[0].input_layernorm
    norm.weight.data = torch.randn_like(norm.weight)
    x = torch.randn(3, 5, 64)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-6)
    # bf16 input: normalized in fp32, cast back, then scaled (HF order)
    xb = x.bfloat16()
    wb = norm.weight.data.bfloat16()
    norm.weight.data = wb
    xf = xb.float()
    want_b = wb * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).bfloat16()
    assert torch.equal(norm(xb), want_b)


def test_rope_rotate_half_pairs_i_with_i_plus_half():
    cfg = preset("tiny")
    m = tiny()
    d = cfg.head_dim
    x = torch.randn(1, 1, 7, d)
    cos, sin = m.rotary(torch.arange(7))
    from engine import ops
    y = ops.apply_rope(x, cos, sin)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d))
    for t in range(7):
        for i in range(d // 2):
            a = t * inv[i]
            x1, x2 = x[0, 0, t, i], x[0, 0, t, i + d // 2]
            torch.testing.assert_close(y[0, 0, t, i], x1 * math.cos(a) - x2 * math.sin(a), atol=1e-5, rtol=0)
            torch.testing.assert_close(y[0, 0, t, i + d // 2], x2 * math.cos(a) + x1 * math.sin(a),
                                       atol=1e-5, rtol=0)
    # relative-position property: <rope(q, m), rope(k, n)> depends only on m - n
    q, k = torch.randn(d), torch.randn(d)
    def at(v, p):
        c, s = m.rotary(torch.tensor([p]))
        return ops.apply_rope(v.view(1, 1, 1, d), c, s).flatten()
    assert torch.allclose(at(q, 5) @ at(k, 2), at(q, 13) @ at(k, 10), atol=1e-4)



def test_rotary_reads_no_position_on_the_host_and_equals_a_table():
    """cos/sin come elementwise from the positions (as transformers computes them): nothing is
    read back to size a table (was `int(positions.max())`, a host sync every decode step on a
    GPU; on the meta device it raised). Bit for bit the fp32 table of all positions at once."""
    m = tiny()
    d = m.config.head_dim
    cos, sin = m.rotary(torch.arange(5, device="meta"))
    assert cos.shape == sin.shape == (5, d) and cos.dtype == torch.float32
    cos, sin = m.rotary(torch.zeros(2, 3, dtype=torch.long, device="meta"))
    assert cos.shape == (2, 1, 3, d)
    n = 5000
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), m.rotary.inv_freq)  # (n, D/2)
    table = torch.cat((freqs, freqs), -1)  # (n, D)
    for pos in (torch.arange(7), torch.tensor([4999]), torch.arange(300, 340),
                torch.randint(0, n, (3, 1)), torch.randint(0, n, (2, 37))):
        cos, sin = m.rotary(pos)
        want_c, want_s = table.cos()[pos], table.sin()[pos]
        if pos.dim() == 2:
            want_c, want_s = want_c.unsqueeze(1), want_s.unsqueeze(1)
        assert torch.equal(cos, want_c) and torch.equal(sin, want_s), tuple(pos.shape)


def test_bf16_rope_in_the_activation_dtype_as_transformers():
    """bf16 weights: cos/sin are rounded to bf16 and q, k rotated in bf16, as transformers does
    (was fp32 math then one rounding: 0.04 off its logits). A caller handing a layer fp32
    cos/sin (serve_engine.forward_rows) gets what Transformer.forward computes."""
    m = tiny().to(torch.bfloat16)
    a = m.model.layers[0].self_attn
    x = torch.randn(2, 9, 64).bfloat16()
    cos, sin = m.rotary(torch.arange(9))
    with torch.no_grad():
        y32, y16 = a(x, cos, sin), a(x, cos.bfloat16(), sin.bfloat16())
        assert torch.equal(y32, y16), (y32.float() - y16.float()).abs().max()
        q = a.q_proj(x).view(2, 9, -1, m.config.head_dim).transpose(1, 2)
        c, s = cos.bfloat16(), sin.bfloat16()
        d = q.shape[-1] // 2
        want = q * c + torch.cat((-q[..., d:], q[..., :d]), -1) * s  # every step in bf16
        from engine import ops
        assert torch.equal(ops.apply_rope(q, c, s), want)


def test_llama3_rope_scaling_formula():
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    cfg = ModelConfig(hidden_size=128, num_attention_heads=1, head_dim=128, rope_theta=500000.0,
                      rope_scaling=rs, vocab_size=8, intermediate_size=8, num_hidden_layers=1)
    got = rope_inv_freq(cfg)
    for i, inv in enumerate(1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))):
        wl = 2 * math.pi / inv
        if wl > 8192 / 1.0:
            want = inv / 8
        elif wl < 8192 / 4.0:
            want = inv
        else:
            s = (8192 / wl - 1.0) / (4.0 - 1.0)
            want = (1 - s) * inv / 8 + s * inv
        assert math.isclose(got[i].item(), float(want), rel_tol=1e-5)


def _attention_by_hand(m, x, layer=0):
    """GQA attention written out: head h uses kv head h // (n_heads / n_kv)."""
    a = m.model.layers[layer].self_attn
    cfg = m.config
    B, T, _ = x.shape
    q = a.q_proj(x).view(B, T, cfg.num_attention_heads, cfg.head_dim)
    k = a.k_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim)
    v = a.v_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim)
    cos, sin = m.rotary(torch.arange(T))
    def rot(t):  # (B, T, H, D)
        d = t.shape[-1] // 2
        return t * cos[None, :, None] + torch.cat((-t[..., d:], t[..., :d]), -1) * sin[None, :, None]
    q, k = rot(q), rot(k)
    out = torch.zeros(B, T, cfg.num_attention_heads, cfg.head_dim)
    for h in range(cfg.num_attention_heads):
        kv = h // (cfg.num_attention_heads // cfg.num_key_value_heads)
        s = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kv]) / math.sqrt(cfg.head_dim)
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        out[:, :, h] = torch.softmax(s, -1) @ v[:, :, kv]
    return a.o_proj(out.reshape(B, T, -1))


def test_gqa_attention_formula():
    m = tiny()
    assert m.config.num_key_value_heads < m.config.num_attention_heads
    x = torch.randn(2, 9, 64)
    a = m.model.layers[0].self_attn
    cos, sin = m.rotary(torch.arange(9))
    torch.testing.assert_close(a(x, cos, sin), _attention_by_hand(m, x), atol=1e-5, rtol=1e-5)


def test_sliding_window_hides_old_keys():
    m = Transformer(preset("tiny", sliding_window=3)).eval()
    ids = torch.randint(0, 256, (1, 10))
    ids2 = ids.clone()
    ids2[0, 0] = (ids[0, 0] + 1) % 256
    # With one layer-stack of depth 2, position t sees at most 2*(3-1) positions back.
    l1, l2 = m(ids), m(ids2)
    assert not torch.allclose(l1[0, 4], l2[0, 4])
    torch.testing.assert_close(l1[0, 5:], l2[0, 5:])


def test_swiglu_mlp_formula():
    m = tiny()
    mlp = m.model.layers[1].mlp
    x = torch.randn(4, 64)
    want = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    g = x @ mlp.gate_proj.weight.T
    want2 = (g / (1 + torch.exp(-g)) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), want)
    torch.testing.assert_close(mlp(x), want2, atol=1e-5, rtol=1e-5)


def test_causality():
    m = tiny()
    ids = torch.randint(0, 256, (2, 16))
    for t in (0, 7, 15):
        ids2 = ids.clone()
        ids2[:, t] = (ids[:, t] + 17) % 256
        a, b = m(ids), m(ids2)
        torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
        assert not torch.allclose(a[:, t], b[:, t])


def test_kv_cache_matches_full_forward():
    m = tiny()
    ids = torch.randint(0, 256, (2, 40))
    full = m(ids)
    cache = m.new_cache(2, 40)
    out = [m(ids[:, :8], cache=cache)]
    for t in range(8, 40):
        out.append(m(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)


def test_loss_equals_cross_entropy_of_logits_and_packing_mask():
    m = tiny()
    ids = torch.randint(0, 256, (2, 12))
    labels = torch.randint(0, 256, (2, 12))
    labels[0, :3] = -100
    want = F.cross_entropy(m(ids).reshape(-1, 256), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(m(ids, labels=labels), want)
    # Two documents packed in one row behave like two separate rows.
    a, b = ids[0, :5], ids[1, :7]
    packed = torch.cat([a, b])[None]
    doc = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    got = m(packed, doc_ids=doc, position_ids=pos)
    torch.testing.assert_close(got[0, :5], m(a[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0, 5:], m(b[None])[0], atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_init():
    m = Transformer(preset("tiny", tie_word_embeddings=True))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert "lm_head.weight" in m.state_dict()
    std = m.model.layers[0].self_attn.o_proj.weight.std().item()
    assert std < 0.02 * 0.8  # residual projections scaled down by depth
    assert m.num_parameters() == m.config.num_parameters()


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="valid presets: tiny"):
        preset("huge")
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="missing required keys: hidden_size"):
        ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 3,
                               "intermediate_size": 4, "num_hidden_layers": 1,
                               "num_attention_heads": 1})



_LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
          "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("changes, message", [
    # a string "false" tied the head silently (and the checkpoint's lm_head was skipped)
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'"),
    # these were accepted, then a TypeError inside the model or every key hidden (window 0)
    (dict(architectures=["MistralForCausalLM"], sliding_window="4096"),
     "sliding_window must be a positive integer or null, got '4096'"),
    (dict(architectures=["MistralForCausalLM"], sliding_window=0), "sliding_window must be a"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "1"}),
     "rope_scaling low_freq_factor must be a positive number, got '1'"),
    (dict(initializer_range="x"), "initializer_range must be a non-negative number"),
    (dict(rope_scaling={"rope_type": "linear", "factor": float("nan")}),  # json reads NaN
     "rope_scaling 'linear' needs a positive 'factor', got nan"),  # was NaN logits
    (dict(architectures=[["LlamaForCausalLM"]]), "unsupported architecture"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window="false"),
     "use_sliding_window must be true or false"),
    # ids of the wrong type were kept and compared with token ids later
    (dict(eos_token_id="2"), "eos_token_id must be a token id, a list of ids or null, got '2'"),
    (dict(eos_token_id=[2, "3"]), "eos_token_id must be"),
    (dict(bos_token_id=1.5), "bos_token_id must be a token id or null"),
])
def test_config_values_of_the_wrong_type_are_one_line(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**_LLAMA, **changes})
    ModelConfig.from_dict({**_LLAMA, "eos_token_id": [2, 3], "pad_token_id": None})  # fine

def test_per_token_nll_equals_cross_entropy_of_logits_with_grads():
    """reduction="none" (DPO's sequence log-probs) gives F.cross_entropy(reduction="none") of the
    logits, 0 where ignored, and the same parameter gradients."""
    m = tiny().train()
    ids, labels = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    labels[1, :4] = -100
    w = torch.linspace(-1, 1, 24).view(2, 12)  # a non-uniform upstream gradient
    got = m(ids, labels=labels, reduction="none")
    (got * w).sum().backward()
    g_got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    want = F.cross_entropy(m(ids).reshape(-1, 256).float(), labels.reshape(-1), ignore_index=-100,
                           reduction="none").view(2, 12)
    (want * w).sum().backward()
    torch.testing.assert_close(got, want)
    assert torch.all(got[1, :4] == 0)
    for a, p in zip(g_got, m.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        m(ids, labels=labels, reduction="sum")


@pytest.mark.parametrize("model_dtype, autocast_dtype", [(torch.float32, torch.bfloat16),
                                                         (torch.bfloat16, torch.float16)])
def test_kv_cache_under_autocast_matches_uncached_forward(model_dtype, autocast_dtype):
    """Under a user's autocast, k/v come out in the autocast dtype: the cache holds them in that
    dtype (not the weights', which doubled its memory for an fp32 model and rounded fp16 keys
    to bf16 for a bf16 one), and cached decoding matches the uncached forward."""
    m = tiny().to(model_dtype)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype):
        full = m(ids)
        cache = m.new_cache(2, 24)
        assert cache.k[0].dtype == cache.v[0].dtype == autocast_dtype
        out = [m(ids[:, :8], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(8, 24)]
    got = torch.cat(out, 1)
    assert got.dtype == full.dtype == autocast_dtype
    torch.testing.assert_close(got.float(), full.float(), atol=2e-2, rtol=2e-2)
    assert (got.float() - full.float()).abs().max() <= 4 * torch.finfo(autocast_dtype).eps


def test_kv_cache_of_another_dtype_never_crashes():
    """A cache made under autocast (bf16) and then used without it (fp32 q), or one of any other
    dtype, still decodes: keys and values are read back in the queries' dtype."""
    m = tiny()
    ids = torch.randint(0, 256, (1, 12))
    full = m(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = m.new_cache(1, 12)
    assert cache.k[0].dtype == torch.bfloat16
    out = [m(ids[:, :6], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(6, 12)]
    got = torch.cat(out, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full, atol=2e-2, rtol=2e-2)  # keys rounded to bf16


def _hf_twin(cls_name, **kw):
    """A random transformers model and the engine model with the same weights."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, **kw)
    hf = getattr(transformers, cls_name)(
        getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**cfg)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.1 * torch.randn(p.shape, generator=g))
    ours = Transformer(ModelConfig(**cfg, architectures=[cls_name],
                                   attention_bias=cls_name.startswith("Qwen2"))).eval()
    ours.load_state_dict(hf.state_dict())
    ours.tie_weights()
    return hf, ours


@pytest.mark.parametrize("cls_name, kw", [("MistralForCausalLM", dict(sliding_window=5)),
                                          ("Qwen2ForCausalLM", dict(tie_word_embeddings=True))])
def test_cached_decoding_left_padding_and_gradients_match_transformers(cls_name, kw):
    """Beyond the window (Mistral) with the KV cache (prefill, then one token at a time, then a
    chunk); a left-padded row (doc_ids + position_ids) as the same row alone and as transformers
    with an attention mask; the loss gradients of every weight as transformers' loss.backward."""
    hf, ours = _hf_twin(cls_name, **kw)
    ids = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        ref = hf(ids).logits
        cache = ours.new_cache(2, 30)
        got = [ours(ids[:, :7], cache=cache)]  # prefill, one token at a time, then a chunk
        got += [ours(ids[:, t:t + 1], cache=cache) for t in range(7, 20)]
        got += [ours(ids[:, 20:], cache=cache)]
        assert (torch.cat(got, 1) - ref).abs().max() < 1e-5
        pad = 9
        mask = torch.ones_like(ids)
        mask[0, :pad] = 0
        padded = ids.masked_fill(mask == 0, 0)
        batched = ours(padded, doc_ids=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        alone = ours(ids[:1, pad:])[0]
        assert (batched[0, pad:] - alone).abs().max() < 1e-5
        assert (hf(padded, attention_mask=mask).logits[0, pad:] - alone).abs().max() < 1e-5
        assert (batched[1] - ref[1]).abs().max() < 1e-5
    labels = ids.clone()
    labels[0, :4] = -100
    hf.train()(ids, labels=labels).loss.backward()  # transformers shifts the labels itself
    ours.train()(ids[:, :-1], labels=labels[:, 1:]).backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad - theirs[name].grad).abs().max() < 1e-6, name


def test_logits_to_keep_is_the_last_rows_of_the_full_logits():
    """Prefill asks for one row of logits (logits_to_keep=1): T x V fewer values (a 4k-token
    prompt at Qwen2's 152k vocabulary: 2.5 GB of fp32 logits that were thrown away)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=300)).eval()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        full = model(ids)
        for n in (1, 4):
            kept = model(ids, logits_to_keep=n)
            assert kept.shape == (2, n, 300)  # the same up to matmul blocking (a few ulp)
            torch.testing.assert_close(kept, full[:, -n:], rtol=1e-5, atol=1e-6)
