"""HF-format directories (engine/checkpoint.py): round trips, dtypes, memory, and bad input
(each problem is one ValueError / FileNotFoundError line naming it)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import (empty_model, load_model_dir, load_state, parse_dtype,
                               read_safetensors_dir, save_model)
from engine.config import ModelConfig
from engine.model import Transformer

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture
def saved(tmp_path):
    model = Transformer(ModelConfig(**TINY)).eval()
    save_model(model, str(tmp_path))
    return model, tmp_path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_round_trip_is_exact_and_files_are_hf(saved):
    model, path = saved
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    names = set(read_safetensors_dir(str(path)))
    assert "model.layers.1.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    again = load_model_dir(str(path))
    assert not again.training
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_tied_head_is_not_stored_and_is_shared(tmp_path):
    model = Transformer(ModelConfig(**TINY, tie_word_embeddings=True))
    save_model(model, str(tmp_path))
    assert "lm_head.weight" not in read_safetensors_dir(str(tmp_path))
    again = load_model_dir(str(tmp_path))
    assert again.lm_head.weight is again.model.embed_tokens.weight


def test_dtypes_and_no_meta_left(saved):
    _, path = saved
    for name, dtype in [("bf16", torch.bfloat16), ("float16", torch.float16),
                        (torch.float32, torch.float32)]:
        m = load_model_dir(str(path), dtype=name)
        assert {p.dtype for p in m.parameters()} == {dtype}
        assert not any(p.is_meta for p in m.parameters())
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        parse_dtype("int8")


def test_load_state_into_a_built_model(saved):
    model, path = saved
    fresh = Transformer(ModelConfig(**TINY))
    load_state(fresh, read_safetensors_dir(str(path)))
    assert torch.equal(fresh.model.norm.weight, model.model.norm.weight)
    with pytest.raises(ValueError, match="missing tensor 'model.embed_tokens.weight'"):
        load_state(empty_model(ModelConfig(**TINY)), {})


def test_rotary_inv_freq_and_tied_head_copies_are_ignored(saved, tmp_path):
    model, path = saved
    sd = read_safetensors_dir(str(path))
    sd["model.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, str(path / "model.safetensors"))
    load_model_dir(str(path))


# --- bad input ----------------------------------------------------------------------------------
def test_truncated_and_corrupt_safetensors(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors: .*incomplete"):
        load_model_dir(str(path))
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors"):
        load_model_dir(str(path))


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=None), "config is missing required keys: hidden_size"),
    (dict(architectures=["GPT2LMHeadModel"]),
     "unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM, "
     "MistralForCausalLM, Qwen2ForCausalLM"),
    (dict(architectures=None, model_type="gpt2"), "unsupported model_type 'gpt2'"),
    (dict(vocab_size=100), "config vocab_size 100 does not match the 128 rows of "
                           "'(model.embed_tokens|lm_head).weight'"),
    (dict(intermediate_size=80), "tensor 'model.layers.0.mlp.down_proj.weight' has shape "
                                 r"\(64, 96\), expected \(64, 80\)"),
    (dict(num_hidden_layers=3), "missing tensor 'model.layers.2"),
    (dict(num_hidden_layers=1), "unexpected tensor 'model.layers.1"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "unsupported rope_scaling type 'yarn'"),
    (dict(attention_bias=True), "attention_bias/mlp_bias is not supported"),
    (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    # zero sizes were a ZeroDivisionError, a factor-less scaling a KeyError
    (dict(num_key_value_heads=0), "config.json: num_key_value_heads must be a positive integer"),
    (dict(num_hidden_layers=0), "config.json: num_hidden_layers must be a positive integer"),
    (dict(num_attention_heads=0), "config.json: num_attention_heads must be a positive integer"),
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling 'linear' needs a positive 'factor'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "config.json: unsupported "
                                                            "rope_scaling type 'dynamic'"),
    # these built a model that failed later with a TypeError / AttributeError
    (dict(rms_norm_eps="1e-5"), "config.json: rms_norm_eps must be a positive number, got '1e-5'"),
    (dict(rope_theta="x"), "config.json: rope_theta must be a positive number"),
    (dict(max_position_embeddings="4k"), "max_position_embeddings must be a positive integer"),
    (dict(rope_scaling="linear"), "config.json: rope_scaling must be an object or null"),
    # loaded silently before (fp8 codes read as weights, no scales)
    (dict(quantization_config={"quant_method": "fp8"}), "config.json: quantized checkpoints are "
                                                         "not supported .*quant_method 'fp8'"),
])
def test_bad_config(saved, changes, message):
    _, path = saved
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=message):
        load_model_dir(str(path))


def test_bad_directory(saved, tmp_path):
    _, path = saved
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_dir(str(tmp_path / "nowhere"))
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_model_dir(str(path))
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json must hold a JSON object, got list"):
        load_model_dir(str(path))
    os.remove(path / "model.safetensors")
    save_model(Transformer(ModelConfig(**TINY)), str(path))
    os.remove(path / "model.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard 'model-00002-of-00002.safetensors' "
                                                "listed in .* is missing"):
        load_model_dir(str(path))
    (path / "model.safetensors.index.json").write_text('{"weight_map": ["x"]}')
    with pytest.raises(ValueError, match="not a valid safetensors index"):  # was AttributeError
        load_model_dir(str(path))


def test_qwen2_per_layer_window_rejected(tmp_path):
    model = Transformer(ModelConfig(**TINY, attention_bias=True, architectures=["Qwen2ForCausalLM"]))
    save_model(model, str(tmp_path))
    # a window from layer 1 of 2 (with the default max_window_layers, 28, no layer has one)
    _edit_config(tmp_path, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(ValueError, match="Qwen2 use_sliding_window=true is not supported"):
        load_model_dir(str(tmp_path))


def test_save_refuses_non_hf_tensors(tmp_path):
    lora = pytest.importorskip("engine.lora")
    model = Transformer(ModelConfig(**TINY))
    lora.apply_lora(model)
    with pytest.raises(ValueError, match="non-HF tensor .*lora.*merge LoRA"):
        save_model(model, str(tmp_path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_second_copy_of_the_weights(tmp_path, dtype):
    """Peak memory of a fresh process loading a ~40 MB fp32 checkpoint: the weights once in the
    target dtype plus about one tensor in flight (not a state dict and then a model)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    cfg = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=2, num_attention_heads=8)
    save_model(Transformer(cfg), str(tmp_path))
    size = os.path.getsize(tmp_path / "model.safetensors")
    code = ("import re, torch, engine.checkpoint as c\n"
            "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
            "base = hwm()\n"
            f"m = c.load_model_dir({str(tmp_path)!r}, dtype={dtype!r})\n"
            "print((hwm() - base) * 1024)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=root, check=True).stdout
    grown = int(re.findall(r"\d+", out)[-1])
    largest = 8192 * 512 * 4  # one fp32 embedding matrix in flight
    weights = size if dtype == "float32" else size // 2
    assert grown < weights + 1.5 * largest, \
        f"peak grew {grown / 2**20:.1f} MiB for {weights / 2**20:.1f} MiB of weights"


def test_config_tied_but_weights_untied_saves_the_head(tmp_path):
    """A tied model whose lm_head got its own weight (a merged lm_head LoRA): the head is
    stored and config.json says untied, so the reload gives the same logits."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, tie_word_embeddings=True)).eval()
    head = torch.nn.Linear(TINY["hidden_size"], TINY["vocab_size"], bias=False)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight + 0.1)
    model.lm_head = head
    save_model(model, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in read_safetensors_dir(str(tmp_path))
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    again = load_model_dir(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert model.config.tie_word_embeddings  # the live config is left alone


def test_failed_save_keeps_the_old_file_and_leaves_no_temp_file(saved, monkeypatch):
    """A write that fails (disk full) keeps the previous model.safetensors intact and removes
    its hidden temp file (it used to stay behind, as large as the weights written so far)."""
    model, path = saved
    before = (path / "model.safetensors").read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_model(Transformer(ModelConfig(**TINY)), str(path))
    monkeypatch.undo()
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]


KILLED_MID_SAVE = """import os, signal, sys
from engine.checkpoint import save_model
from engine.config import ModelConfig
from engine.model import Transformer
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed as the first file is written
save_model(Transformer(ModelConfig(**{tiny!r})), sys.argv[1])
"""


def test_a_save_killed_outright_leaves_nothing_after_the_next_save(saved):
    """SIGKILL (the OOM killer) mid-save skips the cleanup: the old model stays whole, and its
    hidden staging folder (the new weights written so far) used to stay for good."""
    model, path = saved
    before = (path / "model.safetensors").read_bytes()
    r = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE.format(tiny=TINY), str(path)],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == -9
    assert (path / "model.safetensors").read_bytes() == before
    assert any(n.startswith(".save-") for n in os.listdir(path))  # what the kill left
    save_model(model, str(path))
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]


def test_architectures_as_a_bare_string(saved):
    _, path = saved  # was "unsupported architecture 'L'" (its first letter)
    _edit_config(path, architectures="LlamaForCausalLM")
    assert load_model_dir(str(path)).config.architectures == ["LlamaForCausalLM"]


def test_pickle_only_directory_is_refused_unread(saved, monkeypatch):
    """pytorch_model.bin alone: one line that names it; torch.load is never called (was 'no
    model.safetensors', as if the directory held no weights)."""
    model, path = saved
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    os.remove(path / "model.safetensors")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(ValueError, match=r"holds only pytorch_model.bin \(pickle\), which is not "
                                         "loaded: convert it to safetensors"):
        load_model_dir(str(path))


def _fsync_failing_at(monkeypatch, n):
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == n:
            raise OSError(28, "No space left on device")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("fail_at, max_shard_size", [(2, 30_000), (2, None), (5, 30_000)])
def test_failed_save_leaves_the_old_model_whole(tmp_path, monkeypatch, fail_at, max_shard_size):
    """The disk fills while a new model is saved over an old one: the directory still loads as
    the old model. Was: new first shard beside old others (a silent mix of two models), or new
    weights with the old config.json (vocab 128 vs 256 rows)."""
    torch.manual_seed(0)
    old = Transformer(ModelConfig(**TINY)).eval()
    save_model(old, str(tmp_path), max_shard_size=max_shard_size)
    before = sorted(os.listdir(tmp_path))
    new = Transformer(ModelConfig(**{**TINY, "vocab_size": 256})).eval()
    _fsync_failing_at(monkeypatch, fail_at)
    with pytest.raises(OSError, match="No space left"):
        save_model(new, str(tmp_path), max_shard_size=max_shard_size)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before  # and no staging folder left behind
    again = load_model_dir(str(tmp_path))
    for (k, a), b in zip(old.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    save_model(new, str(tmp_path), max_shard_size=max_shard_size)  # a later save still works
    assert load_model_dir(str(tmp_path)).config.vocab_size == 256


def test_failed_tokenizer_save_keeps_the_old_model(saved):
    model, path = saved

    class BrokenTokenizer:
        def save(self, directory):
            (open(os.path.join(directory, "tokenizer.json"), "w")).write("{")
            raise OSError("tokenizer cannot be written")
    with pytest.raises(OSError, match="tokenizer cannot be written"):
        save_model(Transformer(ModelConfig(**{**TINY, "vocab_size": 256})), str(path),
                   BrokenTokenizer())
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    assert load_model_dir(str(path)).config.vocab_size == 128


@pytest.mark.parametrize("dtype, name", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.int8, "I8")])
def test_non_float_weights_are_refused(saved, dtype, name):
    """Quantized codes without a quantization_config: one line (were cast to float, silently)."""
    _, path = saved
    sd = read_safetensors_dir(str(path))
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(dtype)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"tensor 'model.layers.0.mlp.up_proj.weight' is {name}, "
                                         "not a float type"):
        load_model_dir(str(path))
