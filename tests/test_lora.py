"""engine/lora.py: LoRA / rsLoRA / DoRA math, merge, NF4 base, PEFT adapter files, combination;
interoperability with peft + transformers (test-only references)."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.lora import (Adapter, LoRALinear, apply_lora, combine_adapters, disable_adapters,
                         load_adapter, lora_layers, lora_state_dict, lora_summary, merge_lora,
                         save_adapter)
from engine.model import Transformer
from engine.nf4 import NF4Linear, quantize_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **kw})).eval()


def _ids(seed=1, shape=(2, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], shape, generator=g)


def _randomize_adapter(model, seed=3):
    """Non-zero B (and a perturbed magnitude) so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lay in lora_layers(model).values():
            lay.lora_B.weight.copy_(0.1 * torch.randn(lay.lora_B.weight.shape, generator=g))
            if lay.use_dora:
                lay.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(lay.out_features, generator=g))


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _peft_logits(hf_base, path: str) -> torch.Tensor:
    """Logits of _ids() from hf_base with PEFT's load of the adapter at `path` (unloaded after)."""
    from peft import PeftModel
    pm = PeftModel.from_pretrained(hf_base, path).eval()
    try:
        with torch.no_grad():
            return pm(_ids()).logits
    finally:
        pm.unload()


@pytest.mark.parametrize("kw", [{}, {"dora": True}, {"rslora": True, "dropout": 0.1}])
def test_zero_b_leaves_outputs_unchanged(kw):
    m = _model()
    ids = _ids()
    with torch.no_grad():
        ref = m(ids)
        names = apply_lora(m, "all-linear", r=4, alpha=8, **kw)
        out = m(ids)
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert _max_diff(out, ref) <= 1e-6


def test_lora_forward_formula_and_dropout_on_branch_only():
    base = nn.Linear(32, 24, bias=True)
    lay = LoRALinear(base, r=4, alpha=8, dropout=0.5).train()
    nn.init.normal_(lay.lora_B.weight)
    x = torch.randn(5, 32)
    torch.manual_seed(7)
    y = lay(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, training=True)
    expected = base(x) + 2.0 * (xd @ lay.lora_A.weight.T @ lay.lora_B.weight.T)
    assert _max_diff(y, expected) < 1e-5
    assert lay.lora_A.weight.shape == (4, 32) and lay.lora_B.weight.shape == (24, 4)
    # PEFT init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0
    fresh = LoRALinear(nn.Linear(256, 64), r=8, alpha=16)
    bound = 1 / math.sqrt(256)
    assert 0.9 * bound < fresh.lora_A.weight.abs().max() <= bound
    assert torch.all(fresh.lora_B.weight == 0)


def test_rslora_scaling():
    lay = LoRALinear(nn.Linear(32, 32), r=16, alpha=8, rslora=True)
    assert lay.scaling == 8 / math.sqrt(16)
    assert LoRALinear(nn.Linear(32, 32), r=16, alpha=8).scaling == 0.5
    nn.init.normal_(lay.lora_B.weight)
    x = torch.randn(3, 32)
    delta = lay(x) - F.linear(x, lay.weight, lay.bias)
    assert _max_diff(delta, 2.0 * x @ (lay.lora_B.weight @ lay.lora_A.weight).T) < 1e-5


def test_dora_formula_and_detached_norm():
    base = nn.Linear(16, 12, bias=True)
    lay = LoRALinear(base, r=4, alpha=4, dora=True)
    assert torch.allclose(lay.lora_magnitude_vector, base.weight.norm(dim=1))
    with torch.no_grad():
        nn.init.normal_(lay.lora_B.weight)
        lay.lora_magnitude_vector.mul_(1.5)
    x = torch.randn(6, 16)
    y = lay(x)
    W = base.weight + 1.0 * lay.lora_B.weight @ lay.lora_A.weight
    m = lay.lora_magnitude_vector
    expected = (m / W.norm(dim=1).detach()) * (x @ W.T) + base.bias
    assert _max_diff(y, expected) < 1e-5
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [m, lay.lora_B.weight], g)
    ref = torch.autograd.grad(expected, [m, lay.lora_B.weight], g)
    assert all(_max_diff(a, b) < 1e-4 for a, b in zip(grads, ref))


def test_only_adapter_parameters_get_gradients():
    m = _model()
    apply_lora(m, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dora=True)
    _randomize_adapter(m)
    m(_ids(), labels=_ids(2)).backward()
    for name, p in m.named_parameters():
        is_lora = any(k in name for k in ("lora_A", "lora_B", "lora_magnitude_vector"))
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name
        if is_lora:
            assert p.grad.abs().sum() > 0, name
    s = lora_summary(m)
    assert s["lora_layers"] == 6 and s["ranks"] == [4]
    expected = sum(p.numel() for n, p in m.named_parameters() if "lora" in n)
    assert s["trainable_params"] == expected and s["total_params"] == m.num_parameters()


@pytest.mark.parametrize("dora", [False, True])
def test_merge_equals_unmerged(dora):
    m = _model()
    apply_lora(m, "all-linear", r=4, alpha=8, dora=dora)
    _randomize_adapter(m)
    ids = _ids()
    with torch.no_grad():
        ref = m(ids)
        w0 = m.model.layers[0].self_attn.q_proj.weight.clone()
        for lay in lora_layers(m).values():
            lay.merge()
        assert _max_diff(m(ids), ref) < 1e-5
        for lay in lora_layers(m).values():
            lay.unmerge()
        assert _max_diff(m.model.layers[0].self_attn.q_proj.weight, w0) < 1e-6
        assert _max_diff(m(ids), ref) < 1e-5
        merge_lora(m)
        assert not lora_layers(m)
        assert type(m.model.layers[1].mlp.down_proj) is nn.Linear
        assert _max_diff(m(ids), ref) < 1e-5


def test_disable_adapters_gives_the_base_model():
    base = _model()
    ids = _ids()
    with torch.no_grad():
        ref = base(ids)
        apply_lora(base, ALL, r=4, alpha=8)
        _randomize_adapter(base)
        tuned = base(ids)
        with disable_adapters(base):
            assert _max_diff(base(ids), ref) <= 1e-6
        assert _max_diff(base(ids), tuned) == 0
    assert _max_diff(tuned, ref) > 1e-3


@pytest.mark.parametrize("dora", [False, True])
def test_lora_over_nf4_base(dora):
    m = _model()
    quantize_model(m)
    dense = _model()                                            # same base, dequantized weights
    for name, mod in list(m.named_modules()):
        if isinstance(mod, NF4Linear):
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(mod.dequantized_weight())
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(m(ids), dense(ids)) < 1e-5
        apply_lora(m, ALL, r=4, alpha=8, dora=dora)
        assert _max_diff(m(ids), dense(ids)) < 1e-5          # DoRA init uses the dequantized W
        apply_lora(dense, ALL, r=4, alpha=8, dora=dora)
    _randomize_adapter(m)
    dense.load_state_dict(lora_state_dict(m), strict=False)
    out = m(ids)
    assert _max_diff(out, dense(ids)) < 1e-5
    assert {k for k in m.state_dict() if ".q_proj." in k and "layers.0." in k} >= {
        "model.layers.0.self_attn.q_proj.packed", "model.layers.0.self_attn.q_proj.lora_A.weight"}
    out.sum().backward()
    assert all((p.grad is not None) == ("lora" in n) for n, p in m.named_parameters())
    with pytest.raises(ValueError, match="4-bit base"):
        m.model.layers[0].self_attn.q_proj.merge()
    with torch.no_grad():
        merged = merge_lora(m)(ids)
    assert type(m.model.layers[0].self_attn.q_proj) is nn.Linear
    assert _max_diff(merged, out) < 1e-5


@pytest.mark.parametrize("kw", [{}, {"dora": True, "rslora": True}])
def test_save_load_round_trip(tmp_path, kw):
    from safetensors import safe_open
    m = _model()
    apply_lora(m, ["q_proj", "v_proj", "gate_proj"], r=4, alpha=8, **kw)
    _randomize_adapter(m)
    save_adapter(m, str(tmp_path), base_model_name_or_path="tiny-base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["gate_proj", "q_proj", "v_proj"]
    assert cfg["use_dora"] == bool(kw) and cfg["use_rslora"] == bool(kw)
    assert cfg["base_model_name_or_path"] == "tiny-base"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    dora_key = "base_model.model.model.layers.1.mlp.gate_proj.lora_magnitude_vector"
    assert (dora_key in keys) == bool(kw)
    assert len(keys) == 2 * 3 * (3 if kw else 2)
    fresh = _model()
    load_adapter(fresh, str(tmp_path))
    ids = _ids()
    with torch.no_grad():
        ref = m(ids)
        assert _max_diff(fresh(ids), ref) == 0
        for p in lora_state_dict(fresh).values():           # resume: same layout, new values
            p.add_(0.5)
        load_adapter(fresh, str(tmp_path))
        assert _max_diff(fresh(ids), ref) == 0


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qproj'\].*'q_proj'"):
        apply_lora(_model(), ["qproj"])
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        apply_lora(_model(), ["q_proj"], r=0)
    m = _model()
    apply_lora(m, ["q_proj"], r=4)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(m, ["v_proj"])
    save_adapter(m, str(tmp_path))
    other = _model(hidden_size=32, intermediate_size=48)       # a different base
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight has shape \(4, 64\)"):
        load_adapter(other, str(tmp_path))
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        load_adapter(_model(), str(tmp_path / "nowhere"))
    # damaged files: one line naming the file (as engine.checkpoint does for model weights)
    st = tmp_path / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"cannot read .*adapter_model\.safetensors"):
        load_adapter(_model(), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LO')
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        load_adapter(_model(), str(tmp_path))
    # an older PEFT adapter (pickle weights): say so, not "adapter_model.safetensors is missing"
    st.rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"holds adapter_model\.bin \(a pickle, older PEFT\)"):
        Adapter.load(str(tmp_path))


def test_pickle_beside_safetensors_is_ignored(tmp_path):
    """A directory with both adapter_model.safetensors and the older adapter_model.bin (a user
    who converted it as told) loads the safetensors file, as PEFT's load_peft_weights does; the
    pickle is never read."""
    m = _model()
    apply_lora(m, ["q_proj"], r=2, alpha=4)
    with torch.no_grad():
        for p in lora_state_dict(m).values():
            p.normal_(0, 0.05)
    save_adapter(m, str(tmp_path))
    (tmp_path / "adapter_model.bin").write_bytes(b"not even a pickle")
    got = Adapter.load(str(tmp_path))
    want = lora_state_dict(m)
    assert sorted(got.tensors) == sorted(want)
    assert all(torch.equal(got.tensors[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------
# Combining adapters
# ---------------------------------------------------------------------------------------------
def _adapter(r, alpha, rslora=False, seed=0, dtype=torch.float32, integer=False):
    g = torch.Generator().manual_seed(seed)
    mk = (lambda *s: torch.randint(-3, 4, s, generator=g).to(dtype)) if integer else \
         (lambda *s: torch.randn(*s, generator=g, dtype=dtype))
    tensors = {}
    for mod in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        tensors[mod + ".lora_A.weight"] = mk(r, 12)
        tensors[mod + ".lora_B.weight"] = mk(10, r)
    return Adapter({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
                    "target_modules": ["q_proj", "down_proj"]}, tensors)


def _delta(ad, mod):
    return ad.scaling() * ad.tensors[mod + ".lora_B.weight"] @ ad.tensors[mod + ".lora_A.weight"]


MODS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")


def test_cat_combination_is_exactly_the_weighted_sum():
    a1, a2 = _adapter(2, 4, integer=True, seed=1), _adapter(4, 2, rslora=True, integer=True, seed=2)
    out = combine_adapters([a1, a2], [0.5, -1.5], "cat")
    assert out.config["r"] == 6 and out.config["lora_alpha"] == 6 and out.scaling() == 1.0
    for mod in MODS:  # integer factors, power-of-two scalings: every float op is exact
        assert torch.equal(_delta(out, mod), 0.5 * _delta(a1, mod) - 1.5 * _delta(a2, mod))
    a3, a4 = _adapter(3, 5, seed=3), _adapter(5, 7, rslora=True, seed=4)
    out = combine_adapters([a3, a4], [0.7, 0.3], "cat")
    for mod in MODS:
        assert _max_diff(_delta(out, mod), 0.7 * _delta(a3, mod) + 0.3 * _delta(a4, mod)) < 1e-5


def test_linear_and_svd_combination_math():
    a1, a2 = _adapter(4, 8, seed=5), _adapter(4, 2, seed=6)
    w = [0.8, -0.4]
    lin = combine_adapters([a1, a2], w, "linear")
    s = [w[0] * 2.0, w[1] * 0.5]                                # w_i * scaling_i
    for mod in MODS:
        A = [a.tensors[mod + ".lora_A.weight"] for a in (a1, a2)]
        B = [a.tensors[mod + ".lora_B.weight"] for a in (a1, a2)]
        A_ref = math.sqrt(abs(s[0])) * A[0] - math.sqrt(abs(s[1])) * A[1]   # sign on A only
        B_ref = math.sqrt(abs(s[0])) * B[0] + math.sqrt(abs(s[1])) * B[1]
        assert _max_diff(lin.tensors[mod + ".lora_A.weight"], A_ref) < 1e-6
        assert _max_diff(lin.tensors[mod + ".lora_B.weight"], B_ref) < 1e-6
    full = combine_adapters([a1, a2], w, "svd", rank=8)         # rank 8 holds the whole sum
    low = combine_adapters([a1, a2], w, "svd")                  # rank = max r_i = 4
    assert low.config["r"] == 4 and full.config["r"] == 8
    for mod in MODS:
        dW = w[0] * _delta(a1, mod) + w[1] * _delta(a2, mod)
        assert _max_diff(_delta(full, mod), dW) < 1e-5
        U, S, Vh = torch.linalg.svd(dW)
        assert _max_diff(_delta(low, mod), (U[:, :4] * S[:4]) @ Vh[:4]) < 1e-5
    with pytest.raises(ValueError, match="equal ranks"):
        combine_adapters([a1, _adapter(2, 2)], [1, 1], "linear")
    with pytest.raises(ValueError, match="cat, linear or svd"):
        combine_adapters([a1, a2], [1, 1], "ties")
    for bad in (0, -1):  # rank 0 silently became max r_i; -1 dropped the last singular value
        with pytest.raises(ValueError, match="svd rank must be a positive integer"):
            combine_adapters([a1, a2], w, "svd", rank=bad)


def test_unknown_targets_error_names_only_a_few():
    """An adapter for a deeper model names hundreds of modules the model lacks: the one-line
    error shows three and a count, not all of them."""
    missing = [f"model.layers.{i}.self_attn.q_proj" for i in range(5, 40)]
    with pytest.raises(ValueError) as e:
        apply_lora(_model(), missing)
    msg = str(e.value)
    assert "['model.layers.5.self_attn.q_proj'" in msg and "and 32 more" in msg
    assert "layers.39" not in msg and len(msg) < 400


# ---------------------------------------------------------------------------------------------
# PEFT / transformers interoperability
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_base():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(**TINY, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1 + 0.3 * torch.randn(p.shape, generator=g)) if name.endswith("norm.weight")
                    else 0.1 * torch.randn(p.shape, generator=g))
    return hf


def _ours_from(hf):
    ours = Transformer(ModelConfig.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours


@pytest.mark.parametrize("kw", [{}, {"dora": True, "rslora": True}])
def test_our_adapter_loads_in_peft(hf_base, tmp_path, kw):
    from peft import PeftModel
    ours = _ours_from(hf_base)
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(ours(ids), hf_base(ids).logits) < 1e-4
    apply_lora(ours, ALL, r=4, alpha=8, **kw)
    _randomize_adapter(ours)
    save_adapter(ours, str(tmp_path))
    peft_model = PeftModel.from_pretrained(hf_base, str(tmp_path)).eval()
    try:
        with torch.no_grad():
            ref, out = peft_model(ids).logits, ours(ids)
            with disable_adapters(ours):
                base = ours(ids)
        assert _max_diff(out, base) > 1e-2                     # the adapter matters ...
        assert _max_diff(out, ref) < 1e-4                      # ... and PEFT agrees
    finally:
        peft_model.unload()                                    # give hf_base back untouched


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_here(hf_base, tmp_path, dora):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False,
                     use_dora=dora, task_type="CAUSAL_LM")
    ours = _ours_from(hf_base)
    torch.manual_seed(5)
    peft_model = get_peft_model(hf_base, cfg).eval()
    try:
        with torch.no_grad():  # a magnitude away from its init, so that loading it matters
            for name, p in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.rand(p.shape))
        peft_model.save_pretrained(str(tmp_path))
        ids = _ids()
        with torch.no_grad():
            ref = peft_model(ids).logits
            with peft_model.disable_adapter():
                base = peft_model(ids).logits
    finally:
        peft_model.unload()
    names = load_adapter(ours, str(tmp_path))
    assert len(names) == 2 * 7 and all(lay.use_dora == dora for lay in lora_layers(ours).values())
    with torch.no_grad():
        out = ours(ids)
    assert _max_diff(ref, base) > 1e-2
    assert _max_diff(out, ref) < 1e-4


def test_peft_key_names_are_normalised():
    from engine.lora import _our_key
    pre = "base_model.model.model.layers.0.self_attn.q_proj."
    assert _our_key(pre + "lora_A.weight") == "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert _our_key(pre + "lora_B.default.weight") == pre[17:] + "lora_B.weight"
    for suffix in ("lora_magnitude_vector", "lora_magnitude_vector.default.weight",
                   "lora_magnitude_vector.weight"):
        assert _our_key(pre + suffix) == "model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert _our_key("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"


def test_combination_matches_peft_add_weighted_adapter(hf_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(9)
    kw = dict(target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    pm = get_peft_model(hf_base, LoraConfig(r=4, lora_alpha=8, **kw), adapter_name="x1")
    try:
        pm.add_adapter("x2", LoraConfig(r=4, lora_alpha=2, use_rslora=True, **kw))
        pm.save_pretrained(str(tmp_path))
        ours_in = [Adapter.load(str(tmp_path / n)) for n in ("x1", "x2")]
        w = [0.7, -0.4]
        for method in ("cat", "linear", "svd"):
            pm.add_weighted_adapter(["x1", "x2"], w, "m_" + method, combination_type=method)
            ours = combine_adapters(ours_in, w, method)
            checked = 0
            for name, mod in pm.base_model.model.named_modules():
                if hasattr(mod, "lora_A") and "m_" + method in mod.lora_A:
                    A = mod.lora_A["m_" + method].weight
                    B = mod.lora_B["m_" + method].weight
                    assert mod.scaling["m_" + method] == ours.scaling() == 1.0
                    t = ours.tensors
                    d_ours = t[name + ".lora_B.weight"] @ t[name + ".lora_A.weight"]
                    assert _max_diff(B @ A, d_ours) < 1e-5, (method, name)
                    checked += 1
            assert checked == 4
    finally:
        pm.unload()


# ---------------------------------------------------------------------------------------------
# Review fixes: tied models, modules_to_save, lm_head, unsupported configs, eval mode
# ---------------------------------------------------------------------------------------------
def _hf_tiny(tied, seed=0):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **TINY, rms_norm_eps=1e-5, tie_word_embeddings=tied)).eval()


@pytest.mark.parametrize("tied, module", [(True, "embed_tokens"), (True, "lm_head"),
                                          (False, "lm_head")])
def test_modules_to_save_matches_peft_and_disables_to_base(tmp_path, tied, module):
    """PEFT trains a copy of the module; on a tied base the other side keeps the original."""
    import copy

    from peft import LoraConfig, get_peft_model

    from engine.checkpoint import load_model_dir, save_model
    hf = _hf_tiny(tied)
    hf.save_pretrained(str(tmp_path / "base"))
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=[module],
        init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    torch.manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5 * torch.randn(p.shape))
    pm.save_pretrained(str(tmp_path / "ad"))
    ids = _ids()
    with torch.no_grad():
        ref, true_base = pm(ids).logits, hf(ids).logits
    ours = load_model_dir(str(tmp_path / "base"))
    load_adapter(ours, str(tmp_path / "ad"))
    with torch.no_grad():
        out = ours(ids)
        with disable_adapters(ours):
            base = ours(ids)
        again = ours(ids)
    assert _max_diff(ref, true_base) > 1e-1
    assert _max_diff(out, ref) < 1e-4 and _max_diff(again, ref) < 1e-4
    assert _max_diff(base, true_base) < 1e-4
    merge_lora(ours)                      # merged + saved: the untied head must survive
    save_model(ours, str(tmp_path / "merged"))
    with torch.no_grad():
        reloaded = load_model_dir(str(tmp_path / "merged"))(ids)
    assert _max_diff(reloaded, ref) < 1e-4


def test_modules_to_save_with_weight_tying_is_refused(tmp_path):
    m = _model(tie_word_embeddings=True)
    ad = Adapter({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "ensure_weight_tying": True},
                 {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
                  "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
                  "model.embed_tokens.weight": torch.zeros(128, 64)})
    with pytest.raises(ValueError, match="ensure_weight_tying"):
        load_adapter(m, ad)


def test_tied_lm_head_lora_merge_save_reload(tmp_path):
    from engine.checkpoint import load_model_dir, save_model
    from engine.merge import main as merge_main
    m = _model(tie_word_embeddings=True)
    save_model(m, str(tmp_path / "base"))
    apply_lora(m, ["q_proj", "lm_head"], r=4, alpha=8)
    _randomize_adapter(m)
    save_adapter(m, str(tmp_path / "ad"))
    ids = _ids()
    with torch.no_grad():
        unmerged = m(ids)
        merge_lora(m)
        merged = m(ids)
    save_model(m, str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert merge_main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                       "--out", str(tmp_path / "cli")]) == 0
    with torch.no_grad():
        for d in ("out", "cli"):
            assert _max_diff(load_model_dir(str(tmp_path / d))(ids), merged) < 1e-5, d
    assert _max_diff(merged, unmerged) < 1e-5


def test_peft_lm_head_lora_loads_and_embedding_lora_is_refused(hf_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    ours = _ours_from(hf_base)
    torch.manual_seed(6)
    pm = get_peft_model(hf_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                            init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    try:
        pm.save_pretrained(str(tmp_path / "head"))
        ids = _ids()
        with torch.no_grad():
            ref = pm(ids).logits
    finally:
        pm.unload()
    ad = Adapter.load(str(tmp_path / "head"))
    assert list(ad.base_tensors) == ["lm_head"]        # PEFT's lm_head.base_layer.weight
    assert "lm_head" in load_adapter(ours, ad)
    with torch.no_grad():
        assert _max_diff(ours(ids), ref) < 1e-4
    other = _model(seed=7, rms_norm_eps=1e-5)          # a different base: its head differs
    with pytest.raises(ValueError, match="lm_head.base_layer.weight differs"):
        load_adapter(other, ad)
    pm = get_peft_model(hf_base, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"],
                                            task_type="CAUSAL_LM"))
    try:
        pm.save_pretrained(str(tmp_path / "emb"))
    finally:
        pm.unload()
    with pytest.raises(ValueError, match="LoRA on embedding layer model.embed_tokens"):
        load_adapter(_ours_from(hf_base), str(tmp_path / "emb"))


# LoraConfig fields that are harmless to ignore: target selection, training, initialization
# (the saved tensors hold its result), bookkeeping.
_IGNORED_FIELDS = {"task_type", "peft_type", "auto_mapping", "peft_version",
                   "base_model_name_or_path", "revision", "inference_mode", "r", "target_modules",
                   "exclude_modules", "lora_alpha", "lora_dropout", "use_rslora", "modules_to_save",
                   "init_lora_weights", "layers_to_transform", "layers_pattern", "megatron_core",
                   "loftq_config", "eva_config", "corda_config", "lora_ga_config", "use_dora",
                   "qalora_group_size", "runtime_config", "ensure_weight_tying",
                   "rank_pattern", "alpha_pattern",  # implemented (per-module r / alpha)
                   "bias"}  # checked on the tensors: refused only when bias vectors were saved


def test_every_peft_lora_config_field_is_handled_or_refused():
    """A new peft field must be classified: implemented/harmless, or refused when set."""
    import dataclasses
    peft = pytest.importorskip("peft")
    from engine.lora import _UNSUPPORTED
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - _IGNORED_FIELDS - set(_UNSUPPORTED) == set()
    defaults = peft.LoraConfig()
    for key, off in _UNSUPPORTED.items():
        if key in fields:  # our "off" value is peft's default
            assert getattr(defaults, key) in (off, None, False, {}, []), key


@pytest.mark.parametrize("key, value", [
    ("alora_invocation_tokens", [7, 8]), ("arrow_config", {"top_k": 2}), ("use_bdlora", True),
    ("velora_config", {"x": 1}), ("monteclora_config", {"x": 1}), ("kasa_config", {"x": 1}),
    ("megatron_config", {"x": 1}), ("init_lora_weights", "pissa_niter_4")])
def test_unsupported_config_fields_are_refused(key, value):
    ad = _adapter(4, 8)
    ad.config[key] = value
    with pytest.raises(ValueError, match=f"adapter_config: {key}="):
        load_adapter(_model(), ad)
    with pytest.raises(ValueError, match=f"adapter 2 of 2: adapter_config: {key}="):
        combine_adapters([_adapter(4, 8), ad], [1, 1])
    ad.config[key] = False if key == "use_bdlora" else None   # "off" values still load
    combine_adapters([_adapter(4, 8), ad], [1, 1])


def test_peft_alora_adapter_is_refused(hf_base, tmp_path):
    """PEFT applies aLoRA only from the invocation tokens on; we would apply it everywhere."""
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(hf_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                            alora_invocation_tokens=[7, 8], task_type="CAUSAL_LM"))
    try:
        pm.save_pretrained(str(tmp_path))
    finally:
        pm.unload()
    with pytest.raises(ValueError, match=r"alora_invocation_tokens=\[7, 8\] is not supported"):
        load_adapter(_ours_from(hf_base), str(tmp_path))


def test_combine_refuses_patterns_and_modules_to_save():
    a2 = _adapter(4, 8, seed=1)
    a2.config["alpha_pattern"] = {"q_proj": 1}
    with pytest.raises(ValueError, match="adapter 2 of 2: adapter_config: alpha_pattern"):
        combine_adapters([_adapter(4, 8), a2], [1, 1])
    a3 = _adapter(4, 8, seed=2)
    a3.tensors["lm_head.weight"] = torch.zeros(10, 12)
    with pytest.raises(ValueError, match="adapter 1 of 2 has whole-module tensors"):
        combine_adapters([a3, _adapter(4, 8)], [1, 1])


def test_new_lora_layers_follow_the_model_mode(tmp_path):
    m = _model()
    apply_lora(m, ["q_proj"], r=4, alpha=8, dropout=0.5)
    _randomize_adapter(m)
    save_adapter(m, str(tmp_path))
    fresh = _model()                                   # eval mode
    load_adapter(fresh, str(tmp_path))
    assert not any(lay.training for lay in lora_layers(fresh).values())
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids), fresh(ids))     # dropout off
    train = _model().train()
    apply_lora(train, ["q_proj"], r=4, alpha=8, dropout=0.5)
    assert all(lay.training for lay in lora_layers(train).values())


# ---------------------------------------------------------------------------------------------
# Review 8: PEFT adapters we refused or changed
# ---------------------------------------------------------------------------------------------
def _peft_adapter(hf, tmp_path, **cfg):
    """A PEFT adapter for a copy of `hf` with random A/B (and perturbed extra tensors), saved
    to tmp_path; returns PEFT's logits on _ids()."""
    import copy

    from peft import LoraConfig, get_peft_model
    torch.manual_seed(5)
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(init_lora_weights=False,
                                                      task_type="CAUSAL_LM", **cfg)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n or (n.endswith("bias") and p.requires_grad):
                p.add_(0.5 * torch.randn(p.shape))
    pm.save_pretrained(str(tmp_path))
    with torch.no_grad():
        return pm(_ids()).logits


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_with_rank_above_the_layer_width_loads(hf_base, tmp_path, dora):
    """PEFT allows r > min(in, out) (k_proj here is 64 -> 32; SmolLM2's is 576 -> 192, so an
    r=256 adapter for it is real); we refused it with 'rank 40 exceeds min(in, out)'."""
    ref = _peft_adapter(hf_base, tmp_path, r=40, lora_alpha=8, target_modules=["k_proj"],
                        use_dora=dora)
    ours = _ours_from(hf_base)
    load_adapter(ours, str(tmp_path))
    with torch.no_grad():
        assert _max_diff(ours(_ids()), ref) < 1e-4


def test_peft_bias_setting_loads_unless_bias_vectors_were_trained(tmp_path):
    """bias="all" on Llama (no biases) saves plain LoRA tensors: load it (we refused it). On
    Qwen2 it saves trained q/k/v biases: refuse that in one line naming them."""
    transformers = pytest.importorskip("transformers")
    llama = _hf_tiny(tied=False)
    ref = _peft_adapter(llama, tmp_path / "llama", r=4, lora_alpha=8, target_modules=ALL,
                        bias="all")
    ours = _ours_from(llama)
    load_adapter(ours, str(tmp_path / "llama"))
    with torch.no_grad():
        assert _max_diff(ours(_ids()), ref) < 1e-4
    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).eval()
    for bias in ("all", "lora_only"):
        _peft_adapter(qwen, tmp_path / bias, r=4, lora_alpha=8, target_modules=ALL, bias=bias)
        with pytest.raises(ValueError, match=rf"bias='{bias}' is not supported: the adapter "
                                             r"holds 6 trained bias vector\(s\), e\.g\. model\."):
            load_adapter(_ours_from(qwen), str(tmp_path / bias))


@pytest.mark.parametrize("tied, module", [(False, "lm_head"), (True, "embed_tokens")])
def test_modules_to_save_survive_save_adapter(tmp_path, tied, module):
    """load_adapter + save_adapter of a PEFT adapter with modules_to_save dropped the trained
    copy (PEFT then differed by 0.36 in the logits)."""
    from peft import PeftModel
    hf = _hf_tiny(tied)
    ref = _peft_adapter(hf, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["q_proj"],
                        modules_to_save=[module])
    ours = _ours_from(hf)
    load_adapter(ours, str(tmp_path / "peft"))
    save_adapter(ours, str(tmp_path / "ours"))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == [{"lm_head": "lm_head"}.get(module, "model." + module)]
    fresh = _ours_from(hf)
    load_adapter(fresh, str(tmp_path / "ours"))
    pm = PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert _max_diff(fresh(_ids()), ref) < 1e-4
        assert _max_diff(pm(_ids()).logits, ref) < 1e-4


def test_combined_regex_targets_stay_a_regex_for_peft(hf_base, tmp_path):
    """PEFT reads a regex only as a string: a combined adapter of regex-targeted ones wrote
    ['.*\\.(q_proj|down_proj)'], a list, which PEFT refused ('Target modules ... not found')."""
    regex = r".*\.(q_proj|down_proj)"
    for i in (1, 2):
        _peft_adapter(hf_base, tmp_path / f"a{i}", r=4, lora_alpha=8, target_modules=regex)
    ads = [Adapter.load(str(tmp_path / f"a{i}")) for i in (1, 2)]
    combined = combine_adapters(ads, [0.5, 0.5], "cat")
    assert combined.config["target_modules"] == regex
    combined.save(str(tmp_path / "c"))
    ours = _ours_from(hf_base)
    load_adapter(ours, combined)
    with torch.no_grad():
        assert _max_diff(_peft_logits(hf_base, str(tmp_path / "c")), ours(_ids())) < 1e-4
    ads[1].config["target_modules"] = ["q_proj", "down_proj"]   # a mix: the exact modules
    assert combine_adapters(ads, [1, 1]).config["target_modules"] == ads[0].modules()


def test_minimal_peft_config_uses_peft_defaults(hf_base, tmp_path):
    """FORMATS: only peft_type is required; PEFT then takes r = lora_alpha = 8. We raised
    KeyError: 'r'."""
    from peft import PeftModel
    ours = _ours_from(hf_base)
    apply_lora(ours, ["q_proj"], r=8, alpha=8)
    _randomize_adapter(ours)
    save_adapter(ours, str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    fresh = _ours_from(hf_base)
    load_adapter(fresh, str(tmp_path))
    pm = PeftModel.from_pretrained(hf_base, str(tmp_path)).eval()
    try:
        with torch.no_grad():
            ref = pm(_ids()).logits
        assert _max_diff(fresh(_ids()), ref) < 1e-4 and _max_diff(ours(_ids()), ref) < 1e-4
    finally:
        pm.unload()
    for bad, msg in (('"r": "8"', r"r='8' is not a positive integer"),
                     ('"lora_alpha": null', "lora_alpha=None is not a number")):
        (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", %s}' % bad)
        with pytest.raises(ValueError, match=msg):
            load_adapter(_ours_from(hf_base), str(tmp_path))


def test_peft_lm_head_adapter_trained_in_bf16_loads_on_an_fp32_base(tmp_path):
    """PEFT saves lm_head.base_layer.weight in the training dtype; checked against the fp32
    model it 'differed from the model's lm_head.weight', so the adapter was refused."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model
    hf = _hf_tiny(tied=False)
    torch.manual_seed(5)
    pm = get_peft_model(copy.deepcopy(hf).to(torch.bfloat16), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path))
    ours = _ours_from(hf)
    load_adapter(ours, str(tmp_path))
    ref = PeftModel.from_pretrained(hf, str(tmp_path)).eval()  # PEFT copies the rounded head in
    with torch.no_grad():
        out = ours(_ids())
        with disable_adapters(ours):
            assert _max_diff(ours(_ids()), out) > 1e-2
        assert _max_diff(out, ref(_ids()).logits) < 5e-3        # bf16 rounding of the head only
    other = _hf_tiny(tied=False, seed=1)                          # a different base: still refused
    with pytest.raises(ValueError, match="differs from the model's lm_head.weight"):
        load_adapter(_ours_from(other), str(tmp_path))


@pytest.mark.parametrize("dora", [False, True])
def test_layer_merge_keeps_a_tied_embedding(dora):
    """LoRALinear.merge() wrote W + sBA into the weight lm_head shares with embed_tokens: the
    merged tied model's logits moved by 2.6."""
    m = _model(tie_word_embeddings=True)
    apply_lora(m, ["q_proj", "lm_head"], r=4, alpha=8, dora=dora)
    _randomize_adapter(m)
    emb = m.model.embed_tokens.weight.clone()
    ids = _ids()
    with torch.no_grad():
        ref = m(ids)
        for lay in lora_layers(m).values():
            lay.merge()
        assert torch.equal(m.model.embed_tokens.weight, emb)
        assert _max_diff(m(ids), ref) < 1e-5
        for lay in lora_layers(m).values():
            lay.unmerge()
        assert _max_diff(m(ids), ref) < 1e-5


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_on_a_bf16_base_keeps_fp32_weights_as_peft(tmp_path, dora):
    """PEFT loads adapter weights in fp32 on a bf16 base (autocast_adapter_dtype); we rounded
    them to bf16, which doubled the logit error against the fp32 model in a PEFT comparison
    (DoRA: 0.033 vs PEFT's 0.017; here the model is smaller and the gap too)."""
    m = _model()
    apply_lora(m, ALL, r=8, alpha=16, dora=dora)
    _randomize_adapter(m)
    save_adapter(m, str(tmp_path))
    ids = _ids()
    with torch.no_grad():
        ref = m(ids)
        errs = []
        for adapter_dtype in (torch.bfloat16, None):
            half = _model().to(torch.bfloat16)
            if adapter_dtype is not None:    # what load_adapter built before
                apply_lora(half, ALL, r=8, alpha=16, dora=dora, dtype=adapter_dtype)
            load_adapter(half, str(tmp_path))
            # mean, not max: one max element is noise at this size (review 11 saw the
            # max flip for DoRA when the fp32 sum with the base output became one rounding)
            errs.append((half(ids).float() - ref).abs().mean().item())
    assert all(p.dtype == torch.float32 for p in lora_state_dict(half).values())
    assert half(ids).dtype == torch.bfloat16
    assert errs[1] < errs[0], errs


def test_combining_adapters_on_different_modules_matches_peft(hf_base, tmp_path):
    """PEFT's add_weighted_adapter takes adapters on different modules (each module sums the
    adapters that have it; cat pads with zeros); we refused 'adapters cover different modules'."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(9)
    pm = get_peft_model(hf_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                            init_lora_weights=False), adapter_name="x1")
    try:
        pm.add_adapter("x2", LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "down_proj"],
                                        init_lora_weights=False))
        pm.save_pretrained(str(tmp_path))
        ours_in = [Adapter.load(str(tmp_path / n)) for n in ("x1", "x2")]
        w = [0.7, -0.4]
        for method in ("cat", "linear", "svd"):
            pm.add_weighted_adapter(["x1", "x2"], w, "m_" + method, combination_type=method)
            ours = combine_adapters(ours_in, w, method)
            assert ours.modules() == ours_in[1].modules()
            checked = 0
            for name, mod in pm.base_model.model.named_modules():
                if hasattr(mod, "lora_A") and "m_" + method in mod.lora_A:
                    t = ours.tensors
                    assert t[name + ".lora_A.weight"].shape == mod.lora_A["m_" + method].weight.shape
                    d_peft = mod.lora_B["m_" + method].weight @ mod.lora_A["m_" + method].weight
                    d_ours = t[name + ".lora_B.weight"] @ t[name + ".lora_A.weight"]
                    assert _max_diff(d_peft, d_ours) < 1e-5, (method, name)
                    checked += 1
            assert checked == 4
        ours.save(str(tmp_path / "svd"))          # the saved combination loads in PEFT too
        pm.set_adapter("m_svd")
        with torch.no_grad():
            ref = pm(_ids()).logits
    finally:
        pm.unload()
    assert _max_diff(_peft_logits(hf_base, str(tmp_path / "svd")), ref) < 1e-4
    # the first adapter's layer filter must not drop the second's modules in the saved config
    a1, a2 = _adapter(4, 8), _adapter(4, 8, seed=1)
    a1.config["layers_to_transform"] = [0]
    del a1.tensors[MODS[1] + ".lora_A.weight"], a1.tensors[MODS[1] + ".lora_B.weight"]
    c = combine_adapters([a1, a2], [1, 1]).config
    assert c["target_modules"] == list(MODS[::-1]) and c["layers_to_transform"] is None


def test_svd_rank_above_a_module_width_keeps_its_whole_sum_and_loads_in_peft(hf_base, tmp_path):
    """svd at the largest rank (40) with k_proj 64 -> 32: that module keeps all 32 singular
    triplets (its weighted sum exactly) zero-padded to rank 40, so one r fits every module; we
    refused 'svd rank 40 exceeds min(out, in) = 32'. PEFT loads the result to the logits of its
    own exact (cat) combination."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(11)
    pm = get_peft_model(hf_base, LoraConfig(r=40, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                                            init_lora_weights=False), adapter_name="x1")
    try:
        pm.add_adapter("x2", LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "v_proj"],
                                        init_lora_weights=False))
        pm.save_pretrained(str(tmp_path))
        ours_in = [Adapter.load(str(tmp_path / n)) for n in ("x1", "x2")]
        w = [0.7, -0.4]
        ours = combine_adapters(ours_in, w, "svd")
        assert ours.config["r"] == 40
        for m in ours.modules():
            want = sum(wi * _delta(a, m) for wi, a in zip(w, ours_in)
                       if m + ".lora_A.weight" in a.tensors)
            assert ours.tensors[m + ".lora_A.weight"].shape[0] == 40
            assert _max_diff(_delta(ours, m), want) < 1e-5, m
        ours.save(str(tmp_path / "svd"))
        pm.add_weighted_adapter(["x1", "x2"], w, "cat", combination_type="cat")
        pm.set_adapter("cat")
        with torch.no_grad():
            ref = pm(_ids()).logits
    finally:
        pm.unload()
    assert _max_diff(_peft_logits(hf_base, str(tmp_path / "svd")), ref) < 1e-4


# ---------------------------------------------------------------------------------------------
# Review 11: bit-for-bit parity with PEFT on bf16 bases, and QLoRA against a bnb Linear4bit
# ---------------------------------------------------------------------------------------------
class _One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _peft_twin(base_dense, ours_base, dora, dropout):
    """A PEFT layer over `base_dense` (random A, B, magnitude) and our LoRALinear over
    `ours_base` with the same adapter tensors (fp32 adapter, as both load it)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    pm = get_peft_model(_One(base_dense), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"],
        init_lora_weights=False, use_dora=dora))
    pl = pm.base_model.model.proj
    lay = LoRALinear(ours_base, 4, 8, dropout=dropout, dora=dora, dtype=torch.float32)
    with torch.no_grad():
        if dora:
            pl.lora_magnitude_vector["default"].weight.mul_(1.3)
            lay.lora_magnitude_vector.copy_(pl.lora_magnitude_vector["default"].weight)
        lay.lora_A.weight.copy_(pl.lora_A["default"].weight)
        lay.lora_B.weight.copy_(pl.lora_B["default"].weight)
    return pm, pl, lay


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bf16_base_layer_bit_identical_to_peft(nf4, dora, dropout):
    """PEFT adds the fp32 adapter output to the bf16 base output in fp32 and rounds once; we
    rounded the adapter output to bf16 first (0.0156 apart on outputs ~2). DoRA in eval mode
    with lora_dropout configured recomputed x W^T in fp32 instead of reusing the base output.
    An NF4 base's DoRA norm used W dequantized straight to fp32, where PEFT (bnb) rounds it to
    the original bf16 first. The NF4 reference is PEFT over the dequantized bf16 weights."""
    pytest.importorskip("peft")
    from engine.nf4 import NF4Linear
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=True).to(torch.bfloat16)
    base = NF4Linear.from_linear(lin) if nf4 else lin
    dense = nn.Linear(128, 64, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        dense.weight.copy_(base.dequantized_weight() if nf4 else lin.weight)
        dense.bias.copy_(lin.bias)
    pm, pl, lay = _peft_twin(dense, base, dora, dropout)
    pm.eval(), lay.eval()
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    x.requires_grad_(True)
    ref, out = pm(x), lay(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    _assert_same_grads(ref, out, x, pl, lay, dora)


def _assert_same_grads(ref, out, x, pl, lay, dora):
    """The input's and every adapter weight's gradient equal PEFT's layer `pl`, bit for bit."""
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x, pl.lora_A["default"].weight, pl.lora_B["default"].weight]
                               + ([pl.lora_magnitude_vector["default"].weight] if dora else []), g)
    got = torch.autograd.grad(out, [x, lay.lora_A.weight, lay.lora_B.weight]
                              + ([lay.lora_magnitude_vector] if dora else []), g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_layer_bit_identical_to_peft_on_a_bnb_linear4bit(dora):
    """QLoRA: our LoRALinear over NF4Linear against PEFT over bitsandbytes' Linear4bit (nf4,
    double quant, bf16), forward and every gradient. bnb's CPU kernel is only exact in its
    training path with rows a multiple of the blocksize (its eval path repacks to a bf16 GEMM;
    see test_nf4 for the row-length bug), hence train mode and 128 inputs."""
    pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    from engine.nf4 import NF4Linear
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=True).to(torch.bfloat16)
    l4 = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.bfloat16,
                           compress_statistics=True, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                  compress_statistics=True, quant_type="nf4")
    l4.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    l4 = l4.to("cpu")                                          # quantizes
    pm, pl, lay = _peft_twin(l4, NF4Linear.from_linear(lin), dora, 0.0)
    pm.train(), lay.train()
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    x.requires_grad_(True)
    ref, out = pm(x), lay(x)
    assert torch.equal(out, ref)
    _assert_same_grads(ref, out, x, pl, lay, dora)


# ---------------------------------------------------------------------------------------------
# Review 15: per-module rank / alpha, and refusals that left the model half-changed
# ---------------------------------------------------------------------------------------------
_PATTERNS = dict(rank_pattern={"q_proj": 2, r"model\.layers\.1\.mlp\.down_proj": 6},
                 alpha_pattern={"v_proj": 32, "^model.layers.0.self_attn.o_proj": 3})


@pytest.mark.parametrize("kw", [{}, {"use_dora": True, "use_rslora": True}])
def test_peft_rank_and_alpha_patterns_load_and_save_back(hf_base, tmp_path, kw):
    """PEFT's per-module r / alpha (rank_pattern, alpha_pattern, regex keys matched at the end
    of the module name): we refused them. Now they load with PEFT's logits, and save_adapter
    writes them back so that PEFT loads our copy with the same logits."""
    from peft import PeftModel
    from peft.utils.other import get_pattern_key
    from engine.lora import pattern_value
    ref = _peft_adapter(hf_base, tmp_path / "peft", r=4, lora_alpha=8, target_modules=ALL,
                        **_PATTERNS, **kw)
    ours = _ours_from(hf_base)
    load_adapter(ours, str(tmp_path / "peft"))
    lays = lora_layers(ours)
    for name, lay in lays.items():  # the same module -> pattern rule as PEFT's
        for pat, val in (("rank_pattern", lay.r), ("alpha_pattern", lay.lora_alpha)):
            key = get_pattern_key(_PATTERNS[pat].keys(), name)
            assert val == _PATTERNS[pat].get(key, 4 if pat == "rank_pattern" else 8), name
            assert pattern_value(_PATTERNS[pat], name, None) == _PATTERNS[pat].get(key)
    assert lays["model.layers.1.mlp.down_proj"].r == 6
    assert lays["model.layers.0.mlp.down_proj"].r == 4
    assert lays["model.layers.0.self_attn.o_proj"].lora_alpha == 3
    with torch.no_grad():
        assert _max_diff(ours(_ids()), ref) < 1e-4
    save_adapter(ours, str(tmp_path / "ours"))
    pm = PeftModel.from_pretrained(copy.deepcopy(hf_base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert _max_diff(pm(_ids()).logits, ref) < 1e-4
    fresh = _ours_from(hf_base)                       # and back here from our own file
    load_adapter(fresh, str(tmp_path / "ours"))
    with torch.no_grad():
        assert _max_diff(fresh(_ids()), ref) < 1e-4


def test_pattern_errors_are_one_line():
    ad = _adapter(4, 8)
    ad.config["rank_pattern"] = {"q_proj": 0}
    with pytest.raises(ValueError, match=r"rank_pattern gives .*q_proj r=0 is not a positive"):
        load_adapter(_model(), ad)
    ad.config["rank_pattern"] = {"q_proj[": 2}
    with pytest.raises(ValueError, match=r"rank_pattern key 'q_proj\[' is not a regex"):
        load_adapter(_model(), ad)
    ad.config["rank_pattern"] = {"q_proj": 2}
    with pytest.raises(ValueError, match="adapter 1 of 2: adapter_config: rank_pattern=.* when "
                                         "combining"):
        combine_adapters([ad, _adapter(4, 8)], [1, 1])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_refused_adapter_leaves_the_model_as_it_was(tmp_path):
    """A shape mismatch, a missing tensor, keys of another model class ("layers.0..." without
    "model.") or a bad modules_to_save tensor were found after LoRA layers were in place (and
    some tensors copied): the refused model kept them."""
    m = _model()
    apply_lora(m, ["q_proj", "v_proj"], r=4, alpha=8, dora=True)
    _randomize_adapter(m)
    good = save_adapter(m, str(tmp_path))
    cases = {}
    ad = Adapter(dict(good.config), dict(good.tensors))        # a different base
    ad.tensors["model.layers.1.self_attn.v_proj.lora_A.weight"] = torch.zeros(4, 32)
    cases[r"v_proj\.lora_A\.weight has shape \(4, 32\)"] = ad
    ad = Adapter(dict(good.config), dict(good.tensors))
    del ad.tensors["model.layers.1.self_attn.v_proj.lora_magnitude_vector"]
    cases[r"adapter lacks 1 tensor\(s\), e\.g\. model\.layers\.1\.self_attn\.v_proj\.lora_mag"] = ad
    ad = Adapter(dict(good.config), {k.removeprefix("model."): v for k, v in good.tensors.items()})
    cases[r"adapter tensor layers\.0\.self_attn\.q_proj\.lora_A\.weight has no matching"] = ad
    ad = Adapter(dict(good.config), {**good.tensors, "lm_head.weight": torch.zeros(3, 64)})
    cases[r"lm_head\.weight has shape \(3, 64\)"] = ad
    ad = Adapter(dict(good.config), {**good.tensors, "model.layers.0.self_attn.q_proj.weight":
                                     torch.zeros(64, 64)})
    cases["both LoRA and a whole-module tensor"] = ad
    for msg, ad in cases.items():
        fresh = _model()
        before = _state(fresh)
        with pytest.raises(ValueError, match=msg):
            load_adapter(fresh, ad)
        assert not lora_layers(fresh), msg
        after = _state(fresh)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                     for k in before), msg
        load_adapter(fresh, good)                              # still a clean base
