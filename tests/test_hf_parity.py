"""Parity with Hugging Face transformers (test-only reference) on tiny random checkpoints.

transformers builds and saves random Llama / Mistral / Qwen2 models; the engine loads them and
must give the same logits (fp32, 1e-4). The other way round, checkpoints saved by the engine load
in transformers with the same logits.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.checkpoint import load_model_dir, save_model  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.model import Transformer  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _prompts(vocab):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, n), generator=g) for n in (1, 7, 40)] + \
           [torch.randint(0, vocab, (2, 23), generator=g)]


def _randomize(model):
    """Away from the default init (norms = 1, zero biases) so every tensor matters."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _hf_model(cls_name, **kw):
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(**{**BASE, **kw})
    model = getattr(transformers, cls_name)(cfg).eval()
    _randomize(model)
    model.tie_weights()
    return model


def _assert_close(ours, ref, label=""):
    worst = (ours - ref).abs().max().item()
    assert worst < TOL, f"{label}: max |diff| {worst:.2e} >= {TOL}"


def _compare(ours_model, hf, vocab=BASE["vocab_size"]):
    with torch.no_grad():
        for ids in _prompts(vocab):
            ref = hf(ids).logits
            ours = ours_model(ids)
            assert ours.shape == ref.shape
            _assert_close(ours, ref, f"prompt of shape {tuple(ids.shape)}")


CASES = {
    "llama_gqa": ("LlamaForCausalLM", {}),
    "llama_tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3_rope": ("LlamaForCausalLM", dict(rope_parameters=LLAMA3)),
    "llama_head_dim": ("LlamaForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "mistral_window": ("MistralForCausalLM", dict(sliding_window=5)),
    "qwen2_bias": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_checkpoint_loads_with_same_logits(case, tmp_path):
    cls_name, kw = CASES[case]
    hf = _hf_model(cls_name, **kw)
    hf.save_pretrained(tmp_path)
    ours = load_model_dir(str(tmp_path))
    assert ours.config.architectures == [cls_name]
    if case == "qwen2_bias":
        assert ours.config.attention_bias and ours.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    if case == "mistral_window":
        assert ours.config.sliding_window == 5
    if "tied" in case or case == "qwen2_bias":
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    _compare(ours, hf)


def test_sharded_checkpoint(tmp_path):
    hf = _hf_model("LlamaForCausalLM")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _compare(load_model_dir(str(tmp_path)), hf)


def test_single_file_wins_over_an_index_as_in_transformers(tmp_path):
    """A directory with both model.safetensors and a sharded index (of another model): the
    engine loads the file transformers loads (was: the shards, max |diff| 0.8)."""
    sharded, single = _hf_model("LlamaForCausalLM"), _hf_model("LlamaForCausalLM")
    with torch.no_grad():
        single.model.norm.weight.mul_(-1)
    sharded.save_pretrained(tmp_path, max_shard_size="40KB")
    single.save_pretrained(tmp_path / "one")
    os.replace(tmp_path / "one" / "model.safetensors", tmp_path / "model.safetensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert torch.equal(hf.model.norm.weight, single.model.norm.weight)
    _compare(load_model_dir(str(tmp_path)), hf)


def test_transformers4_rope_keys(tmp_path):
    """The same llama3-scaled checkpoint with transformers-4 keys (rope_theta + rope_scaling)."""
    hf = _hf_model("LlamaForCausalLM", rope_parameters=LLAMA3)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in cfg  # transformers 5 writes the new layout
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_model_dir(str(tmp_path))
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    assert ours.config.rope_theta == 10000.0
    _compare(ours, hf)


def test_load_in_bf16_and_fp16(tmp_path):
    hf = _hf_model("LlamaForCausalLM", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    ref = load_model_dir(str(tmp_path))
    ids = _prompts(BASE["vocab_size"])[2]
    for dtype in (torch.bfloat16, torch.float16):
        m = load_model_dir(str(tmp_path), dtype=dtype)
        assert all(p.dtype == dtype for p in m.parameters())
        assert torch.equal(m.model.embed_tokens.weight, ref.model.embed_tokens.weight.to(dtype))
        with torch.no_grad():
            rel = (m(ids).float() - ref(ids)).norm() / ref(ids).norm()
        assert rel < 0.05, f"{dtype}: relative error {rel:.3f}"



@pytest.mark.parametrize("case", list(CASES))
def test_bf16_and_fp16_logits_equal_transformers_bit_for_bit(case, tmp_path):
    """Loaded in bf16 / fp16, the engine rounds where transformers' modeling code does (RMSNorm
    in fp32 cast back before the weight, cos/sin cast to the activations' dtype and the rotation
    done in it, SwiGLU, residuals, lm_head in the weights' dtype), and its attention is the same
    SDPA call as transformers' default ("sdpa"): the same logits bit for bit, prefill and cached
    decoding (Mistral beyond its window: the keys that left it are dropped as transformers'
    sliding-window cache drops them). Was: max |diff| 0.039-0.043 in bf16 (about one bf16 ulp
    of the logits), 0.0044-0.0066 in fp16 (RoPE computed in fp32 against cos/sin in fp32).
    transformers' "eager" attention (scores rounded to bf16) differs from its own "sdpa" by as
    much: not compared here."""
    cls_name, kw = CASES[case]
    _hf_model(cls_name, **kw).save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, BASE["vocab_size"], (2, 20), generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        ours = load_model_dir(str(tmp_path), dtype=dtype)
        hf = getattr(transformers, cls_name).from_pretrained(
            str(tmp_path), dtype=dtype, attn_implementation="sdpa").eval()
        with torch.no_grad():
            for p in _prompts(BASE["vocab_size"]):
                got, want = ours(p), hf(p).logits
                assert got.dtype == want.dtype == dtype
                worst = (got.float() - want.float()).abs().max().item()
                assert torch.equal(got, want), f"{dtype}, prompt {tuple(p.shape)}: max |diff| {worst}"
            out = hf(ids[:, :12], use_cache=True)  # prefill 12 (window 5), then 8 decode steps
            hf_cache, want = out.cache, [out.logits]
            cache = ours.new_cache(2, 20)
            got = [ours(ids[:, :12], cache=cache)]
            for t in range(12, 20):
                out = hf(ids[:, t:t + 1], cache=hf_cache, use_cache=True)
                hf_cache = out.cache
                want.append(out.logits)
                got.append(ours(ids[:, t:t + 1], cache=cache))
            got, want = torch.cat(got, 1), torch.cat(want, 1)
            worst = (got.float() - want.float()).abs().max().item()
            assert torch.equal(got, want), f"{dtype}, cached decoding: max |diff| {worst}"


# --- engine -> transformers ------------------------------------------------------------------
SAVE_CASES = {
    "llama": dict(),
    "llama_tied_head_dim": dict(tie_word_embeddings=True, head_dim=32),
    "llama3": dict(rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"},
                   rope_theta=10000.0),
    "bias_as_qwen2": dict(attention_bias=True),
    "window_as_mistral": dict(sliding_window=6),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_engine_checkpoint_loads_in_transformers(case, tmp_path):
    cfg = ModelConfig(**BASE, **SAVE_CASES[case])
    ours = Transformer(cfg).eval()
    _randomize(ours)
    save_model(ours, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    expected = {"bias_as_qwen2": "Qwen2ForCausalLM", "window_as_mistral": "MistralForCausalLM"}
    assert type(hf).__name__ == expected.get(case, "LlamaForCausalLM")
    _compare(ours, hf)
    again = load_model_dir(str(tmp_path))  # and back into the engine, bit for bit
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_engine_sharded_save_loads_in_transformers(tmp_path):
    ours = Transformer(ModelConfig(**BASE, tie_word_embeddings=True)).eval()
    _randomize(ours)
    save_model(ours, str(tmp_path), max_shard_size=30_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert not (tmp_path / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    _compare(ours, hf)
    save_model(ours, str(tmp_path))  # re-save as one file: the shards and index go away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _compare(load_model_dir(str(tmp_path)), hf)


def test_mistral_config_without_sliding_window_gets_transformers_default():
    """transformers' MistralConfig.sliding_window defaults to 4096; an explicit null stays None."""
    d = {**BASE, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    want = transformers.MistralConfig(**BASE).sliding_window
    assert want == 4096 and ModelConfig.from_dict(d).sliding_window == want
    assert ModelConfig.from_dict({**d, "sliding_window": None}).sliding_window is None
    assert ModelConfig.from_dict({**d, "sliding_window": 16}).sliding_window == 16
    llama = {**BASE, "architectures": ["LlamaForCausalLM"]}
    assert ModelConfig.from_dict(llama).sliding_window is None


# --- partial configs: keys left out get transformers' defaults -------------------------------
PARTIAL_CASES = {  # (class, config kwargs, keys removed from config.json)
    "llama_no_eps": ("LlamaForCausalLM", dict(rms_norm_eps=1e-6), ["rms_norm_eps"]),
    "mistral_no_eps_kv": ("MistralForCausalLM", dict(rms_norm_eps=1e-6, num_attention_heads=16,
                                                     num_key_value_heads=8, head_dim=16),
                          ["rms_norm_eps", "num_key_value_heads"]),
    "qwen2_no_eps_ids": ("Qwen2ForCausalLM", dict(rms_norm_eps=1e-6),
                         ["rms_norm_eps", "bos_token_id", "eos_token_id"]),
    "llama3_no_original_ctx": ("LlamaForCausalLM",
                               dict(rope_parameters={**LLAMA3,
                                                     "original_max_position_embeddings": 256}),
                               ["rope_parameters.original_max_position_embeddings"]),
}


@pytest.mark.parametrize("case", list(PARTIAL_CASES))
def test_partial_config_gets_transformers_defaults(case, tmp_path):
    """Was: rms_norm_eps 1e-5 (transformers: 1e-6), Qwen2's bos/eos 1/2 (None), Mistral's
    num_key_value_heads = heads (8), llama3's original context 8192 (max_position_embeddings):
    logits off by up to 1.0."""
    cls_name, kw, drop = PARTIAL_CASES[case]
    hf = _hf_model(cls_name, **kw)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in drop:
        outer, _, inner = key.partition(".")
        (cfg[outer] if inner else cfg).pop(inner or outer)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ours = load_model_dir(str(tmp_path))
    for key in ("rms_norm_eps", "num_key_value_heads", "bos_token_id", "eos_token_id"):
        assert getattr(ours.config, key) == getattr(hf.config, key), key
    _compare(ours, hf)
    save_model(ours, str(tmp_path / "again"))  # what we write says the same to transformers
    _compare(ours, transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "again")))


def test_qwen2_always_has_biases(tmp_path):
    """HF Qwen2 has q/k/v biases whatever `attention_bias` says (was: 'unexpected tensor
    ...k_proj.bias'); a Qwen2-architecture model without biases is saved as Llama (was a Qwen2
    config.json the engine could not load back: 'missing tensor ...q_proj.bias')."""
    hf = _hf_model("Qwen2ForCausalLM", attention_bias=False)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attention_bias"] is False
    _compare(load_model_dir(str(tmp_path)), hf)
    plain = Transformer(ModelConfig(**BASE, architectures=["Qwen2ForCausalLM"])).eval()
    _randomize(plain)
    save_model(plain, str(tmp_path / "plain"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    _compare(plain, hf)
    _compare(load_model_dir(str(tmp_path / "plain")), hf)


# --- Qwen2's use_sliding_window / max_window_layers / layer_types ----------------------------
QWEN2_WINDOWS = {  # (Qwen2Config kwargs, keys left out of config.json, window on every layer)
    "every_layer": (dict(max_window_layers=0), [], 4),
    "no_layer": (dict(max_window_layers=2), [], None),  # layers >= 2 only: none of the 2
    "default_max_window_layers": ({}, ["max_window_layers", "layer_types"], None),  # 28
    "layer_types_win": (dict(layer_types=["sliding_attention"] * 2), [], 4),
}


@pytest.mark.parametrize("case", list(QWEN2_WINDOWS))
def test_qwen2_sliding_window_layers_as_transformers(case, tmp_path):
    """use_sliding_window=true puts the window on the layers `layer_types` names (by default
    those >= max_window_layers): on all of them the engine's window, on none no window, as
    transformers (was refused whatever the layers: 'use_sliding_window=true is not
    supported'); the config we write says the same to transformers and back to the engine."""
    kw, drop, window = QWEN2_WINDOWS[case]
    _hf_model("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4,
              **kw).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                      if k not in drop}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert hf.config.layer_types == ["sliding_attention" if window else "full_attention"] * 2
    ours = load_model_dir(str(tmp_path))
    assert ours.config.sliding_window == window
    _compare(ours, hf)  # prompts of up to 40 tokens: 10 windows of 4
    written = ours.config.to_dict()
    assert transformers.Qwen2Config.from_dict(written).layer_types == hf.config.layer_types
    assert ModelConfig.from_dict(written).sliding_window == window


def test_windowed_qwen2_saves_as_qwen2_with_the_window_on_every_layer(tmp_path):
    """A Qwen2 with a window on every layer loads, so it saves too: as Qwen2ForCausalLM with
    use_sliding_window on every layer (was refused: 'no HF architecture has both q/k/v bias and
    a sliding window'); transformers and the engine read the saved model back alike."""
    _hf_model("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4,
              max_window_layers=0).save_pretrained(tmp_path / "hf")
    ours = load_model_dir(str(tmp_path / "hf"))
    save_model(ours, str(tmp_path / "ours"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    assert hf.config.layer_types == ["sliding_attention"] * 2
    again = load_model_dir(str(tmp_path / "ours"))
    assert again.config.sliding_window == 4 and again.config.attention_bias
    _compare(again, hf)


def test_tied_config_with_a_stored_head_of_its_own_loads_untied_as_transformers(tmp_path):
    """config.json says tie_word_embeddings but the checkpoint stores an lm_head that differs
    from the embedding: transformers keeps the stored head (with a warning); the engine tied
    the head to the embedding and dropped it (logits off). A stored copy equal to the
    embedding still ties."""
    hf = _hf_model("LlamaForCausalLM", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.warns(UserWarning, match="the stored lm_head differs from the embedding"):
        ours = load_model_dir(str(tmp_path))
    assert not ours.config.tie_word_embeddings
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    _compare(ours, transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval())
    with torch.no_grad():  # the same tensor twice: a tied model
        hf.lm_head.weight.copy_(hf.model.embed_tokens.weight)
    hf.save_pretrained(tmp_path / "same")
    (tmp_path / "same" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    ours = load_model_dir(str(tmp_path / "same"))
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight


def test_qwen2_window_on_some_layers_refused(tmp_path):
    _hf_model("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4,
              max_window_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.json: Qwen2 use_sliding_window=true is not "
                                         "supported with a window on 1 of 2 layers"):
        load_model_dir(str(tmp_path))


def test_mistral_attention_bias_key_means_no_bias(tmp_path):
    """HF's MistralAttention has no q/k/v bias whatever `attention_bias` says (was: 'missing
    tensor ...q_proj.bias' for a checkpoint transformers loads)."""
    hf = _hf_model("MistralForCausalLM", sliding_window=5, attention_bias=True)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attention_bias"] is True
    ours = load_model_dir(str(tmp_path))
    assert not ours.config.attention_bias
    _compare(ours, hf)


def test_rope_parameters_theta_wins_over_top_level_rope_theta(tmp_path):
    """A config.json with both rope_parameters.rope_theta and a top-level rope_theta:
    transformers 5 uses rope_parameters' (was: the top-level one, other logits)."""
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    _hf_model("LlamaForCausalLM", rope_parameters=rope).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_theta": 10000.0}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert hf.config.rope_parameters["rope_theta"] == 500000.0
    ours = load_model_dir(str(tmp_path))
    assert ours.config.rope_theta == 500000.0
    _compare(ours, hf)


def test_swish_is_silu(tmp_path):
    """hidden_act "swish" is SiLU in transformers' ACT2FN (was: 'unsupported hidden_act')."""
    hf = _hf_model("LlamaForCausalLM", hidden_act="swish")
    hf.save_pretrained(tmp_path)
    _compare(load_model_dir(str(tmp_path)), hf)


ROPE_LAYOUTS = {  # config.json RoPE keys as transformers 5's LlamaConfig reads them
    "theta_in_parameters_wins": dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                                     rope_theta=3e4),
    "top_level_theta": dict(rope_parameters={"rope_type": "linear", "factor": 2.0},
                            rope_theta=3e4),
    "rope_scaling_replaces_parameters": dict(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
        rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "theta_in_rope_scaling": dict(rope_scaling={"type": "linear", "factor": 4.0,
                                                "rope_theta": 2e4}, rope_theta=3e4),
    "default_type_in_rope_scaling": dict(rope_scaling={"type": "default"}, rope_theta=3e4),
}


@pytest.mark.parametrize("case", list(ROPE_LAYOUTS))
def test_rope_keys_read_as_transformers(case):
    """Was: rope_parameters won over rope_scaling and a top-level rope_theta over the one in
    the dict (transformers 5 does the opposite): a different RoPE base or factor."""
    d = {**BASE, "architectures": ["LlamaForCausalLM"], **ROPE_LAYOUTS[case]}
    want = transformers.LlamaConfig.from_dict(json.loads(json.dumps(d))).rope_parameters
    ours = ModelConfig.from_dict(d)
    assert ours.rope_theta == want["rope_theta"]
    assert (ours.rope_scaling or {}).get("factor") == want.get("factor")
    with pytest.raises(ValueError, match="rope_parameters per layer type are not supported"):
        ModelConfig.from_dict({**d, "rope_parameters": {"full_attention": {"rope_theta": 1e4}},
                               "rope_scaling": None})
