"""GGUF import (engine/gguf.py) against source weights, independent block decoders and the
llama.cpp RoPE convention; the real SmolLM2 GGUF against transformers (slow).

Small GGUF files are written here with gguf.GGUFWriter the way convert_hf_to_gguf.py does it
(llama arch: q/k rows permuted; norms F32; `output` left out when embeddings are tied).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from engine.config import ModelConfig  # noqa: E402
import engine.gguf as engine_gguf  # noqa: E402
from engine.gguf import (SUPPORTED_TYPES, hf_name, load_gguf, permute_qk,  # noqa: E402
                         read_gguf, tokenizer_from_gguf, unpermute_qk)
from engine.model import Transformer  # noqa: E402

Q = gguf.GGMLQuantizationType
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
K_TINY = dict(TINY, hidden_size=256, intermediate_size=512)  # K-quants: rows of 256
_GGUF_NAMES = {}  # HF name -> GGUF name, filled lazily from engine.gguf.hf_name


def gguf_name(hf: str) -> str:
    if not _GGUF_NAMES:
        for i in range(8):
            for part in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                         "ffn_gate", "ffn_up", "ffn_down"):
                for kind in ("weight", "bias"):
                    n = f"blk.{i}.{part}.{kind}"
                    _GGUF_NAMES[hf_name(n)] = n
        for n in ("token_embd.weight", "output_norm.weight", "output.weight"):
            _GGUF_NAMES[hf_name(n)] = n
    return _GGUF_NAMES[hf]


def random_model(**kw) -> Transformer:
    model = Transformer(ModelConfig(**{**TINY, **kw})).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.3 * torch.randn(p.shape, generator=g)) if name.endswith("norm.weight")
                    else 0.1 * torch.randn(p.shape, generator=g))
    return model


def write_gguf(path, model, qtype=Q.F32, arch="llama", tokens=None, skip=(), meta=None,
               raw=None, extra=None, omit=(), kv=None):
    """Write `model` as a GGUF file. raw: {gguf name: (uint8 array, qtype)} replaces tensors;
    extra: {gguf name: float32 array} adds tensors; omit: metadata keys (without arch) left out;
    kv: {full metadata key: uint32 or list} added as is."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    ints = dict(block_count=c.num_hidden_layers, context_length=c.max_position_embeddings,
                embedding_length=c.hidden_size, feed_forward_length=c.intermediate_size,
                **{"attention.head_count": c.num_attention_heads,
                   "attention.head_count_kv": c.num_key_value_heads,
                   "rope.dimension_count": c.head_dim})
    floats = {"attention.layer_norm_rms_epsilon": c.rms_norm_eps, "rope.freq_base": c.rope_theta}
    for k, v in ints.items():
        if k not in omit:
            w.add_uint32(f"{arch}.{k}", v)
    for k, v in floats.items():
        if k not in omit:
            w.add_float32(f"{arch}.{k}", v)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    if tokens is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens[0])
        w.add_token_merges(tokens[1])
        w.add_chat_template("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}")
    for k, v in (meta or {}).items():
        (w.add_uint32 if isinstance(v, int) else w.add_string)(f"{arch}.{k}", v)
    for k, v in (kv or {}).items():
        w.add_array(k, v) if isinstance(v, list) else w.add_uint32(k, v)
    for name, t in model_state(model).items():
        gname = gguf_name(name)
        if gname in skip:
            continue
        if raw and gname in raw:
            data, qt = raw[gname]
            w.add_tensor(gname, data, raw_dtype=qt)
            continue
        t = t.detach().float()
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            t = permute_qk(t, c.num_attention_heads if ".attn_q." in gname else c.num_key_value_heads)
        arr = t.numpy()
        qt = Q.F32 if t.dim() == 1 else qtype
        w.add_tensor(gname, gguf.quants.quantize(arr, qt) if qt != Q.F32 else arr, raw_dtype=qt)
    for gname, arr in (extra or {}).items():
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def model_state(model):
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


# --- independent block decoders (ggml-quants.c, FORMATS.md section 4) -------------------------
def ref_dequant(raw: np.ndarray, qtype) -> np.ndarray:
    rows = raw.shape[0]
    if qtype == Q.Q8_0:
        b = raw.reshape(rows, -1, 34)
        d = b[..., :2].copy().view(np.float16).astype(np.float32)
        return (d * b[..., 2:].view(np.int8)).reshape(rows, -1)
    if qtype in (Q.Q4_0, Q.Q4_1):
        size = 18 if qtype == Q.Q4_0 else 20
        b = raw.reshape(rows, -1, size)
        d = b[..., :2].copy().view(np.float16).astype(np.float32)
        qs = b[..., size - 16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32)  # y[j], y[j + 16]
        if qtype == Q.Q4_0:
            return ((q - 8) * d).reshape(rows, -1)
        m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
        return (q * d + m).reshape(rows, -1)
    raise AssertionError(qtype)


QTYPES = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 0.05, Q.Q4_0: 0.12,
          Q.Q4_1: 0.12}


@pytest.mark.parametrize("qtype", list(QTYPES), ids=lambda q: q.name)
def test_round_trip_against_source_weights(qtype, tmp_path):
    src = random_model(tie_word_embeddings=True)
    path = write_gguf(tmp_path / "m.gguf", src, qtype)
    ours, _ = load_gguf(path)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    fields, infos = read_gguf(path)
    for name, ref in model_state(src).items():
        got = ours.state_dict()[name]
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel <= QTYPES[qtype] + 1e-7, f"{name}: relative error {rel:.2e}"
        if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1) and ref.dim() == 2:  # bit-exact vs our decoder
            info = infos[gguf_name(name)]
            with open(path, "rb") as f:
                f.seek(info.offset)
                raw = np.frombuffer(f.read(info.n_bytes), np.uint8).reshape(info.shape[0], -1)
            want = torch.from_numpy(ref_dequant(raw, qtype))
            if ".q_proj." in name or ".k_proj." in name:
                n = 4 if ".q_proj." in name else 2
                want = unpermute_qk(want, n)
            assert torch.equal(got, want), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_gguf_gives_the_source_logits(arch, tmp_path):
    kw = dict(attention_bias=True, architectures=["Qwen2ForCausalLM"]) if arch == "qwen2" else {}
    src = random_model(**kw)  # untied: `output` is written
    path = write_gguf(tmp_path / "m.gguf", src, Q.F32, arch=arch)
    ours, _ = load_gguf(path)
    assert ours.config.architectures == src.config.architectures
    assert not ours.config.tie_word_embeddings and ours.config.attention_bias == (arch == "qwen2")
    ids = torch.randint(0, TINY["vocab_size"], (2, 19))
    with torch.no_grad():
        assert (ours(ids) - src(ids)).abs().max() < 1e-5


def _rope_interleaved(x, theta):
    """llama.cpp's LLAMA rope (GGML "normal" mode): rotate pairs (2i, 2i+1). x: (T, H, D)."""
    T, _, D = x.shape
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    ang = torch.arange(T).float()[:, None] * inv  # (T, D/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def _rope_half(x, theta):
    """HF rotate_half: dim i pairs with i + D/2."""
    T, _, D = x.shape
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    ang = torch.arange(T).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin


def test_unpermuted_qk_give_llamacpp_attention_scores(tmp_path):
    """Scores from the file's permuted q/k with llama.cpp's interleaved RoPE equal scores from the
    loaded (unpermuted) q/k with HF's rotate_half RoPE: the permutation is undone correctly."""
    src = random_model()
    path = write_gguf(tmp_path / "m.gguf", src, Q.F32)
    ours, _ = load_gguf(path)
    c = ours.config
    x = torch.randn(9, c.hidden_size)
    wq_file = permute_qk(src.model.layers[1].self_attn.q_proj.weight.detach(), c.num_attention_heads)
    wk_file = permute_qk(src.model.layers[1].self_attn.k_proj.weight.detach(), c.num_key_value_heads)
    attn = ours.model.layers[1].self_attn
    heads = lambda t, n: t.view(9, n, c.head_dim)  # noqa: E731
    ref_q = _rope_interleaved(heads(x @ wq_file.T, 4), c.rope_theta)
    ref_k = _rope_interleaved(heads(x @ wk_file.T, 2), c.rope_theta)
    q = _rope_half(heads(attn.q_proj(x).detach(), 4), c.rope_theta)
    k = _rope_half(heads(attn.k_proj(x).detach(), 2), c.rope_theta)
    rep = lambda t: t.repeat_interleave(2, dim=1)  # noqa: E731  GQA: head h uses kv h // 2
    ref = torch.einsum("thd,shd->hts", ref_q, rep(ref_k))
    got = torch.einsum("thd,shd->hts", q, rep(k))
    assert (got - ref).abs().max() < 1e-4
    assert not torch.allclose(wq_file, attn.q_proj.weight)  # the file really was permuted


def _llama3_rope_factors(head_dim, theta, factor=8.0, low=1.0, high=4.0, old_ctx=8192):
    """convert_hf_to_gguf.py's `rope_freqs` for llama3 scaling: divisor per frequency."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_freqs_tensor(tmp_path):
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    src = random_model(rope_scaling=rs, max_position_embeddings=20000)
    factors = _llama3_rope_factors(16, TINY["rope_theta"])
    assert len(set(factors.tolist())) == 3  # high, blended and low frequencies all present
    path = write_gguf(tmp_path / "r.gguf", src, extra={"rope_freqs.weight": factors})
    ours, _ = load_gguf(path)
    assert ours.config.rope_scaling == rs
    ids = torch.randint(0, TINY["vocab_size"], (1, 40))
    far = dict(input_ids=ids[:, :4], position_ids=torch.tensor([0, 5000, 9000, 15000]))
    with torch.no_grad():
        assert (ours(ids) - src(ids)).abs().max() < 1e-5
        assert (ours(**far) - src(**far)).abs().max() < 1e-5  # where the scaling matters
    bad = write_gguf(tmp_path / "b.gguf", src, extra={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(ValueError, match="rope_freqs tensor does not match llama3 scaling"):
        load_gguf(bad)


def _random_k_blocks(qtype, rows, cols, seed=0):
    """Random K-quant blocks with sane fp16 scales (gguf cannot quantize K types)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.array([0.01], np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        raw[..., -2:] = scale  # d is last
    else:
        raw[..., 0:2] = scale  # d
        raw[..., 2:4] = scale  # dmin
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_load_into_the_right_places(qtype, tmp_path):
    src = random_model(**K_TINY)
    raw = {}
    for name, t in model_state(src).items():
        if t.dim() == 2:
            raw[gguf_name(name)] = (_random_k_blocks(qtype, t.shape[0], t.shape[1], len(raw)), qtype)
    path = write_gguf(tmp_path / "k.gguf", src, raw=raw)
    ours, _ = load_gguf(path, dtype=torch.bfloat16)
    for gname, (data, qt) in raw.items():
        want = torch.from_numpy(gguf.quants.dequantize(data, qt))
        if ".attn_q." in gname or ".attn_k." in gname:
            want = unpermute_qk(want, 4 if ".attn_q." in gname else 2)
        got = ours.state_dict()[hf_name(gname)]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want.to(torch.bfloat16)), gname


# byte offsets of each block type's fp16 scale fields (ggml-common.h), kept finite and small
_F16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
               Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def _random_blocks(qtype, rows, cols, seed):
    rng = np.random.default_rng(seed)
    if qtype in (Q.F32, Q.F16):
        dt = np.float32 if qtype == Q.F32 else np.float16
        return rng.standard_normal((rows, cols)).astype(dt).view(np.uint8)
    if qtype == Q.BF16:  # the high halves of float32s
        return (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16
                ).astype(np.uint16).view(np.uint8)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for o in _F16_FIELDS[qtype]:
        raw[..., o:o + 2] = rng.uniform(-0.05, 0.05, raw.shape[:2] + (1,)).astype(np.float16
                                                                                   ).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_every_supported_type_matches_gguf_dequantize(qtype, tmp_path, monkeypatch):
    """Random blocks of each claimed type, read in chunks that split rows unevenly, equal
    gguf.quants.dequantize of the same bytes (q/k unpermuted), bit for bit."""
    monkeypatch.setattr(engine_gguf, "_CHUNK_ELEMS", 700)
    src = random_model(**K_TINY)
    raw = {}
    for name, t in model_state(src).items():
        if t.dim() == 2:
            raw[gguf_name(name)] = (_random_blocks(qtype, *t.shape, seed=len(raw)), qtype)
    ours, _ = load_gguf(write_gguf(tmp_path / "r.gguf", src, raw=raw))
    for gname, (data, qt) in raw.items():
        want = torch.from_numpy(gguf.quants.dequantize(data, qt).astype(np.float32))
        if ".attn_q." in gname or ".attn_k." in gname:
            want = unpermute_qk(want, 4 if ".attn_q." in gname else 2)
        assert torch.equal(ours.state_dict()[hf_name(gname)], want), gname


def test_q4_k_block_layout_pinned():
    """One Q4_K block decoded by hand (ggml-quants.c dequantize_row_q4_K): d = 1, dmin = 0, all
    sub-block scales 1 -> each 64-value group is the low nibbles of 32 bytes, then the high."""
    block = np.zeros(144, np.uint8)
    block[0:2] = np.array([1.0], np.float16).view(np.uint8)  # d = 1; dmin (bytes 2:4) = 0
    scales = block[4:16]  # 12 bytes of packed 6-bit scales and mins
    scales[0:4] = 1  # scale of groups 0-3; scales[4:8] = 0: their mins
    scales[8:12] = 0x01  # low nibble: scale of groups 4-7, high nibble: their mins (0)
    qs = np.random.default_rng(1).integers(0, 256, 128, dtype=np.uint8)
    block[16:] = qs
    want = np.concatenate([np.concatenate([qs[32 * j:32 * j + 32] & 15, qs[32 * j:32 * j + 32] >> 4])
                           for j in range(4)]).astype(np.float32)
    got = gguf.quants.dequantize(block.reshape(1, -1), Q.Q4_K).reshape(-1)
    assert np.array_equal(got, want)


def test_tokenizer_and_chat_template_from_metadata(tmp_path):
    from tokenizer.bpe import bytes_to_unicode
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + ["Ġt", "he", "Ġthe"] + ["<pad>"] * (300 - 259)
    merges = ["Ġ t", "h e", "Ġt he"]
    src = random_model(tie_word_embeddings=True)
    path = write_gguf(tmp_path / "t.gguf", src, Q.Q8_0, tokens=(tokens, merges))
    model, fields = load_gguf(path)
    tok = tokenizer_from_gguf(fields, path)
    ids = tok.encode("the theme", add_bos=False)
    assert 258 in ids and tok.decode(ids) == "the theme"
    assert tok.bos_id == 1 and tok.eos_id == 2
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>hi"


# --- bad input: one clear line -----------------------------------------------------------------
def test_bad_files(tmp_path):
    src = random_model()
    good = write_gguf(tmp_path / "good.gguf", src, Q.Q8_0)
    data = open(good, "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        load_gguf(str(tmp_path / "cut.gguf"))
    (tmp_path / "header.gguf").write_bytes(data[:200])
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        load_gguf(str(tmp_path / "header.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad magic"):
        load_gguf(str(tmp_path / "junk.gguf"))


def test_bad_metadata(tmp_path):
    src = random_model()
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2'; supported: llama, qwen2"):
        load_gguf(write_gguf(tmp_path / "a.gguf", src, arch="gpt2"))
    with pytest.raises(ValueError, match=r"vocab size \(512\) does not match the 300 rows"):
        load_gguf(write_gguf(tmp_path / "v.gguf", src, meta={"vocab_size": 512}))
    with pytest.raises(ValueError, match="missing tensor for 'model.layers.1.mlp.up_proj.weight'"):
        load_gguf(write_gguf(tmp_path / "m.gguf", src, skip=("blk.1.ffn_up.weight",)))
    with pytest.raises(ValueError, match="GGUF metadata is missing llama.feed_forward_length"):
        load_gguf(write_gguf(tmp_path / "f.gguf", src, omit=("feed_forward_length",)))
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        load_gguf(write_gguf(tmp_path / "y.gguf", src, meta={"rope.scaling.type": "yarn"}))
    # these were ZeroDivisionErrors
    with pytest.raises(ValueError, match="h.gguf: num_attention_heads must be a positive integer"):
        load_gguf(write_gguf(tmp_path / "h.gguf", src, meta={"attention.head_count": 0},
                             omit=("attention.head_count",)))
    with pytest.raises(ValueError, match="b.gguf: llama.block_count is 0, but the file has tensors for 2 blocks"):
        load_gguf(write_gguf(tmp_path / "b.gguf", src, meta={"block_count": 0},
                             omit=("block_count",)))
    with pytest.raises(ValueError, match="l.gguf: GGUF metadata llama.attention.head_count_kv "
                                         "must be a number, got list"):  # was a TypeError
        load_gguf(write_gguf(tmp_path / "l.gguf", src, kv={"llama.attention.head_count_kv": [2, 2]},
                             omit=("attention.head_count_kv",)))
    with pytest.raises(ValueError, match="cannot read GGUF file .*: bad general.alignment 0"):
        load_gguf(write_gguf(tmp_path / "al.gguf", src, kv={"general.alignment": 0}))


def test_unsupported_quant_type(tmp_path):
    src = random_model(**K_TINY)
    w = src.model.layers[0].mlp.up_proj.weight
    raw = {"blk.0.ffn_up.weight": (_random_k_blocks(Q.Q4_K, *w.shape)[:, :w.shape[1] // 256 * 136],
                                   Q.IQ4_XS)}
    with pytest.raises(ValueError, match="'blk.0.ffn_up.weight' has unsupported quant type IQ4_XS"):
        load_gguf(write_gguf(tmp_path / "iq.gguf", src, raw=raw))


# --- the real demo model (downloaded once into the cache) --------------------------------------
@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from engine.hub import fetch
    path = fetch("smollm2-135m-instruct")
    ours, fields = load_gguf(path)
    tok = tokenizer_from_gguf(fields, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4,",
               "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"]
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok.encode(p)])
            worst = (ours(ids)[0, -1] - hf(ids).logits[0, -1]).abs().max().item()
            assert worst < 1e-4, f"{p!r}: max |diff| {worst:.2e}"
    ids = torch.tensor([tok.encode("The capital of France is")])
    assert tok.decode([ours(ids)[0, -1].argmax().item()]) == " Paris"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_smollm2_gguf_peak_memory():
    """Peak RSS of a fresh process loading the demo GGUF in fp32 (figures printed): the growth
    over the process after imports stays under 1.5x the fp32 weights."""
    from engine.hub import fetch
    path = fetch("smollm2-135m-instruct")
    # VmHWM: this process's own peak (ru_maxrss would carry over the pytest parent's peak).
    code = ("import re, time, torch, engine.gguf as g\n"
            "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
            "base = hwm()\n"
            f"t = time.time(); m, _ = g.load_gguf({path!r}); dt = time.time() - t\n"
            "n = sum(p.numel() for p in m.parameters())\n"
            "print(base * 1024, hwm() * 1024, n * 4, dt)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         check=True).stdout.split()
    base, peak, fp32, dt = int(out[0]), int(out[1]), int(out[2]), float(out[3])
    print(f"\nSmolLM2 GGUF load: {dt:.1f}s; peak RSS {peak / 2**20:.0f} MiB (after imports "
          f"{base / 2**20:.0f} MiB, +{(peak - base) / 2**20:.0f} MiB) vs fp32 weights "
          f"{fp32 / 2**20:.0f} MiB")
    assert peak - base < 1.5 * fp32


def test_rope_scaling_keys_read_as_llamacpp(tmp_path):
    """llama.cpp's load_hparams: the scaling type defaults to linear, the factor is
    rope.scaling.factor or the older rope.scale_linear, a missing factor means no scaling, and
    type "none" ignores a factor. A factor without a type was dropped (other logits), and
    `linear` without a factor was an error."""
    src = random_model()
    cases = [({"rope.scaling.factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
             ({"rope.scale_linear": 2.0}, {"rope_type": "linear", "factor": 2.0}),
             ({"rope.scaling.type": "linear"}, None),
             ({"rope.scaling.type": "none", "rope.scaling.factor": 4.0}, None)]
    fields, tensors = read_gguf(write_gguf(tmp_path / "r.gguf", src))
    for meta, want in cases:
        kv = {**fields, **{f"llama.{k}": v for k, v in meta.items()}}
        assert engine_gguf.config_from_gguf(kv, tensors).rope_scaling == want, meta
    # and through a file: the old key as a float32, as llama.cpp's old convert.py wrote it
    path = tmp_path / "s.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_float32("llama.rope.scale_linear", 4.0)
    ours, _ = load_gguf(_copy_with_writer(w, str(tmp_path / "r.gguf"), path))
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def _copy_with_writer(w, src_path, out_path):
    """Every key and tensor of `src_path` added to writer `w` (which already holds extra keys)."""
    r = gguf.GGUFReader(src_path)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(out_path)


def test_float32_metadata_reads_back_as_written(tmp_path):
    """rms eps 1e-5 is stored as float32; it reads back as 1e-5 (was 9.999999747378752e-06), so a
    config survives export -> load unchanged."""
    src = random_model(rms_norm_eps=1e-5, rope_theta=10000.0)
    ours, fields = load_gguf(write_gguf(tmp_path / "e.gguf", src))
    assert fields["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    assert ours.config.rms_norm_eps == 1e-5 and ours.config.rope_theta == 10000.0
    src = random_model(rms_norm_eps=1e-6)
    assert load_gguf(write_gguf(tmp_path / "f.gguf", src))[0].config.rms_norm_eps == 1e-6


def test_duplicate_names_refused(tmp_path):
    """llama.cpp refuses a file that repeats a tensor name or a metadata key; the second copy
    silently replaced the first here."""
    data = open(write_gguf(tmp_path / "g.gguf", random_model()), "rb").read()
    dup_t = data.replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight")
    (tmp_path / "t.gguf").write_bytes(dup_t)
    with pytest.raises(ValueError, match="duplicate tensor 'blk.0.attn_q.weight'"):
        load_gguf(str(tmp_path / "t.gguf"))
    dup_k = data.replace(b"tokenizer.ggml.eos_token_id", b"tokenizer.ggml.bos_token_id")
    (tmp_path / "k.gguf").write_bytes(dup_k)
    with pytest.raises(ValueError, match="duplicate metadata key 'tokenizer.ggml.bos_token_id'"):
        load_gguf(str(tmp_path / "k.gguf"))


def test_no_vocab_tokenizer_model_is_no_tokenizer():
    """llama.cpp's "none" / "no_vocab" tokenizer model (a file without a vocabulary)."""
    for kind in ("none", "no_vocab"):
        assert tokenizer_from_gguf({"tokenizer.ggml.model": kind}) is None


def test_block_count_checked_against_the_tensors(tmp_path):
    """A block_count that the blk.N tensors don't bear out is one clear line before any model is
    built (a corrupt count of millions of layers took minutes and gigabytes building it)."""
    src = random_model()
    data = bytearray(open(write_gguf(tmp_path / "g.gguf", src), "rb").read())
    i = data.index(b"llama.block_count") + len(b"llama.block_count") + 4  # after the type id
    for count in (3, 1, 2 + (51 << 16)):
        data[i:i + 4] = count.to_bytes(4, "little")
        (tmp_path / "b.gguf").write_bytes(bytes(data))
        with pytest.raises(ValueError, match=f"block_count is {count}, but the file has tensors "
                                             "for 2 blocks"):
            load_gguf(str(tmp_path / "b.gguf"))
