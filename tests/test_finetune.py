"""train.py --base ... --finetune MODE on a tiny base model: what trains, what is saved, resume."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from engine import finetune  # noqa: E402
from engine.config import preset  # noqa: E402
from engine.model import Transformer  # noqa: E402

ANY_DATA = ["--batch-size", "4", "--seq-len", "32", "--no-progress", "--threads", "1",
            "--warmup-steps", "2", "--log-every", "2"]
FLAGS = [*ANY_DATA, "--eval-batches", "2"]  # (--eval-batches: plain-text data only)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained base: 30 steps of train.py from scratch on a generated corpus."""
    tmp = tmp_path_factory.mktemp("ft")
    os.environ["WHETSTONE_CACHE"] = str(tmp / "cache")
    rng = random.Random(1)
    words = ["thou art", "my liege", "fair lady", "the crown", "good sir", "anon"]
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(5)) for _ in range(800)))
    run = str(tmp / "base")
    assert train.main(["--data", str(corpus), "--out", run, "--preset", "tiny", "--vocab-size", "300",
                       "--max-steps", "30", "--eval-every", "30", "--lr", "3e-3", *FLAGS]) == 0
    domain = tmp / "domain.txt"
    domain.write_text("\n".join(" ".join(rng.choice(["to be", "or not", "that is", "the question"])
                                         for _ in range(5)) for _ in range(600)))
    return run, str(domain), tmp


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def full_and_resumed(common, tmp, name, pause):
    """(step, train_loss, val_loss) of each logged event, final report left out, of a run done
    at once and of the same run paused at step `pause`, then resumed."""
    full, part = str(tmp / f"{name}-full"), str(tmp / f"{name}-part")
    assert train.main([*common, "--out", full]) == 0
    assert train.main([*common, "--out", part, "--pause-at-step", str(pause)]) == 0
    assert train.main(["--resume", part, "--no-progress", "--threads", "1"]) == 0
    return [[(e["step"], e.get("train_loss"), e.get("val_loss")) for e in metrics(run)
             if not e.get("final")] for run in (full, part)]


def test_adapter_of_a_relative_base_loads_from_another_directory(base, monkeypatch):
    """--base given relative to the current directory is saved absolute in adapter_config.json:
    the run loads as base + adapter from anywhere (it named './base' and failed elsewhere)."""
    run_base, domain, tmp = base
    monkeypatch.chdir(os.path.dirname(run_base))
    out = str(tmp / "ft-relative")
    assert train.main(["--base", os.path.join(".", os.path.basename(run_base)), "--finetune",
                       "lora", "--data", domain, "--out", out, "--max-steps", "1",
                       "--lora-r", "2", *FLAGS]) == 0
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["base_model_name_or_path"] == os.path.abspath(run_base)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from engine.hub import load_model
    from engine.lora import lora_layers
    model, _ = load_model(out)
    assert lora_layers(model)  # the base, with the adapter on it


@pytest.mark.parametrize("mode", ["lora", "qlora", "dora"])
def test_adapter_modes_save_peft_adapters_and_learn(base, mode):
    run_base, domain, tmp = base
    out = str(tmp / f"ft-{mode}")
    assert train.main(["--base", run_base, "--finetune", mode, "--data", domain, "--out", out,
                       "--max-steps", "24", "--eval-every", "12", "--lr", "1e-2",
                       "--lora-r", "4", *FLAGS]) == 0
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_dora"] == (mode == "dora")
    assert cfg["base_model_name_or_path"] == run_base
    keys = load_file(os.path.join(out, "adapter_model.safetensors")).keys()
    assert all(k.startswith("base_model.model.") and "lora_" in k for k in keys)
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # only the adapter
    vals = [e["val_loss"] for e in metrics(out) if "val_loss" in e]
    assert vals[-1] < vals[0]
    # the adapter loads back onto the base through the public API
    from engine.hub import load_model
    model, tok = load_model(run_base, adapter=out)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_lora_resume_identical(base):
    run_base, domain, tmp = base
    common = ["--base", run_base, "--finetune", "qlora", "--data", domain, "--max-steps", "12",
              "--eval-every", "4", "--lr", "1e-2", "--lora-r", "4", *FLAGS]
    a, b = full_and_resumed(common, tmp, "q", 4)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[0] == y[0]
        for u, v in zip(x[1:], y[1:]):
            assert (u is None and v is None) or u == pytest.approx(v, abs=1e-5)


def test_freeze_trains_only_chosen_blocks(base):
    run_base, domain, tmp = base
    out = str(tmp / "ft-freeze")
    assert train.main(["--base", run_base, "--finetune", "freeze", "--trainable-layers", "1",
                       "--data", domain, "--out", out, "--max-steps", "6", "--eval-every", "6",
                       "--lr", "1e-3", *FLAGS]) == 0
    before = load_file(os.path.join(run_base, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    for k, v in before.items():
        changed = not torch.equal(v, after[k])
        assert changed == k.startswith("model.layers.1."), k


def test_model_cards_list_only_the_flags_that_took_part(base):
    run_base, domain, tmp = base
    card = open(os.path.join(run_base, "README.md")).read()  # the base: trained from scratch
    assert "base_model:" not in card and "None: trained from scratch." in card
    assert "Mode: `pretrain` — pretraining from scratch." in card
    assert "| preset | tiny |" in card and "| lora_r |" not in card and "| beta |" not in card
    out = str(tmp / "ft-full-card")
    assert train.main(["--base", run_base, "--finetune", "full", "--data", domain, "--out", out,
                       "--max-steps", "2", "--eval-every", "2", "--lr", "1e-3", *FLAGS]) == 0
    card = open(os.path.join(out, "README.md")).read()
    assert f'base_model: "{run_base}"' in card and "| finetune | full |" in card
    for unused in ("preset", "lora_r", "lora_alpha", "lora_targets", "half_round_steps", "beta"):
        assert f"| {unused} |" not in card, unused


def test_prepare_reports_and_gradients_only_on_trainable():
    m = Transformer(preset("tiny"))
    rep = finetune.prepare(m, "freeze", trainable_layers="0-0")
    assert rep["trainable_layers"] == [0]
    m(torch.randint(0, 256, (1, 8)), labels=torch.randint(0, 256, (1, 8))).backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == n.startswith("model.layers.0."), n
    with pytest.raises(ValueError, match="block 9 does not exist"):
        finetune.parse_layers("0,9", 2, None)
    for spec in ("1-0", "0,3-2"):  # an empty range: nothing trained, then torch's "element 0 of
        with pytest.raises(ValueError, match="runs backwards"):  # tensors does not require grad"
            finetune.parse_layers(spec, 4, None)
    with pytest.raises(ValueError, match="unknown --finetune mode"):
        finetune.prepare(m, "adapterz")


def test_half_finetuning_alternates_halves():
    m = Transformer(preset("tiny"))
    hft = finetune.HalfFineTuning(m, [0, 1], seed=0)
    seen = {}
    for r in range(6):
        hft.select(r)
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        total = [n for n, _ in m.named_parameters() if n.startswith("model.layers.")]
        assert 0.3 < len(trainable) / len(total) < 0.7  # about half of each block
        assert all(n.startswith("model.layers.") for n in trainable)  # embeddings etc. frozen
        for n in total:
            seen[n] = seen.get(n, 0) + (n in trainable)
    assert all(c > 0 for c in seen.values())  # over rounds every matrix gets trained


def test_half_finetune_startup_line_counts_what_trains_this_round(base, capsys):
    """The 'fine-tuning:' line gave prepare()'s count (full mode: every parameter, embeddings and
    lm_head included), while a Half Fine-Tuning round trains half of the blocks' matrices and norms."""
    import re
    run_base, domain, tmp = base
    assert train.main(["--base", run_base, "--finetune", "full", "--half-finetune", "--data", domain,
                       "--out", str(tmp / "hft-line"), "--max-steps", "1", "--eval-every", "1",
                       *FLAGS]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("fine-tuning:")][0]
    m = Transformer(preset("tiny"))
    hft = finetune.HalfFineTuning(m, [0, 1], seed=1337)
    hft.select(0)
    now = sum(p.numel() for p in m.parameters() if p.requires_grad)
    blocks = sum(p.numel() for p in m.model.layers.parameters())
    assert hft.counts() == (blocks, now) and 0.3 < now / blocks < 0.7
    assert re.search(rf"trainable {now:,} of .*half_finetune round 0 trains {now:,} of the "
                     rf"{blocks:,} candidate params", line), line


def test_finetune_flag_errors(tmp_path):
    import subprocess
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--finetune", "lora"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--finetune needs --base" in r.stderr


def test_seq_len_beyond_the_bases_context_warns(base, capsys):
    """A fine-tune's --seq-len past the base's max_position_embeddings (the tiny preset's 256)
    trains positions the base never saw: one warning line, and the run goes on."""
    run_base, domain, tmp = base
    args = ["--base", run_base, "--finetune", "lora", "--data", domain, "--max-steps", "1",
            *FLAGS, "--batch-size", "1"]
    assert train.main([*args, "--seq-len", "300", "--out", str(tmp / "ft-long")]) == 0
    err = capsys.readouterr().err
    assert ("warning: --seq-len 300 is longer than --base's context (256 tokens, "
            "max_position_embeddings): positions past 256 were never trained") in err
    assert train.main([*args, "--seq-len", "256", "--out", str(tmp / "ft-fits")]) == 0
    assert "longer than --base's context" not in capsys.readouterr().err


def test_sft_chat_jsonl_trains_on_responses_and_resumes(base):
    run_base, _, tmp = base
    rng = random.Random(3)
    data = tmp / "chat.jsonl"
    with open(data, "w") as f:
        for _ in range(120):
            w = rng.choice(["crown", "lady", "sir", "liege"])
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                             {"role": "assistant", "content": f"{w} {w} {w}"}]}) + "\n")
        f.write("{not json\n")
    common = ["--base", run_base, "--finetune", "lora", "--data", str(data), "--max-steps", "16",
              "--eval-every", "8", "--lr", "1e-2", "--bad-lines", "skip", *ANY_DATA, "--seq-len", "128"]
    full, part = str(tmp / "sft-full"), str(tmp / "sft-part")
    assert train.main([*common, "--out", full]) == 0
    vals = [e["val_loss"] for e in metrics(full) if "val_loss" in e]
    assert vals[-1] < vals[0]
    assert os.path.isfile(os.path.join(full, "README.md"))  # model card
    assert train.main([*common, "--out", part, "--pause-at-step", "8"]) == 0
    assert train.main(["--resume", part, "--no-progress", "--threads", "1"]) == 0
    a = [e.get("train_loss") for e in metrics(full) if not e.get("final")]
    b = [e.get("train_loss") for e in metrics(part) if not e.get("final")]
    assert a == pytest.approx(b, abs=1e-5)
    r = __import__("subprocess").run([sys.executable, os.path.join(ROOT, "train.py"), *common,
                                      "--bad-lines", "stop", "--out", str(tmp / "sft-bad")],
                                     capture_output=True, text=True)
    assert r.returncode == 2 and "chat.jsonl:121" in r.stderr


def test_merge_command_writes_plain_model_with_same_logits(base):
    run_base, domain, tmp = base
    out = str(tmp / "ft-merge-src")
    assert train.main(["--base", run_base, "--finetune", "lora", "--data", domain, "--out", out,
                       "--max-steps", "4", "--eval-every", "4", "--lr", "1e-2", "--lora-r", "4", *FLAGS]) == 0
    from engine import merge
    from engine.hub import load_model
    merged_dir = str(tmp / "merged")
    assert merge.main(["--base", run_base, "--adapter", out, "--out", merged_dir]) == 0
    adapted, _ = load_model(run_base, adapter=out)
    merged, _ = load_model(merged_dir)
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already holds a model"):
        merge.main(["--base", run_base, "--adapter", out, "--out", merged_dir])
    # --weights scales a single adapter too (it was ignored: weight 0 merged the whole adapter)
    zero_dir, half_dir = str(tmp / "merged-w0"), str(tmp / "merged-w05")
    assert merge.main(["--base", run_base, "--adapter", out, "--weights", "0", "--out", zero_dir]) == 0
    assert merge.main(["--base", run_base, "--adapter", out, "--weights", "0.5", "--out", half_dir]) == 0
    plain, _ = load_model(run_base)
    with torch.no_grad():
        torch.testing.assert_close(load_model(zero_dir)[0](ids), plain(ids), atol=1e-6, rtol=0)
        half = load_model(half_dir)[0]
        w = "model.layers.0.self_attn.q_proj.weight"
        torch.testing.assert_close(half.state_dict()[w] - plain.state_dict()[w],
                                   0.5 * (merged.state_dict()[w] - plain.state_dict()[w]),
                                   atol=1e-6, rtol=1e-4)
    # bad flags: one line, exit code 2, before loading anything
    afile = tmp / "afile"
    afile.write_text("x")
    for flags, message in ((["--out", str(afile)], "is a file, not a directory"),
                           (["--out", str(tmp / "m-r"), "--rank", "0", "--method", "svd"], "rank >= 1"),
                           (["--out", str(tmp / "m-r"), "--rank", "2"], "needs --method svd"),
                           (["--out", str(tmp / "m-w"), "--weights", "1", "2"], "1 adapter(s) but 2")):
        r = subprocess.run([sys.executable, "-m", "engine.merge", "--base", run_base, "--adapter",
                            out, *flags], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and message in r.stderr, (flags, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert afile.read_text() == "x"


def test_half_finetune_resumes_in_the_middle_of_a_round(base):
    """Paused at step 5 with rounds of 3 steps: the resumed run selects round 1 (steps 3-5) at
    once, and continues exactly."""
    run_base, domain, tmp = base
    common = ["--base", run_base, "--finetune", "full", "--half-finetune", "--half-round-steps", "3",
              "--data", domain, "--max-steps", "8", "--eval-every", "4", "--lr", "1e-3", *FLAGS,
              "--log-every", "1"]
    a, b = full_and_resumed(common, tmp, "hft", 5)
    assert [x[0] for x in a] == [y[0] for y in b] and len(a) == 11  # 8 steps, 3 evaluations (0, 4, 8)
    for x, y in zip(a, b):
        for u, v in zip(x[1:], y[1:]):
            assert (u is None and v is None) or u == pytest.approx(v, abs=1e-5), x[0]


def test_chat_template_flag_is_the_runs_template(base, capsys):
    """--chat-template renders the SFT data and travels with the run's tokenizer, so generate.py
    and the server use the template the model was trained on; a bad one is one line up front."""
    from engine import load_model
    from engine.sft import encode_example
    run_base, _, tmp = base
    template = ("{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}")
    (tmp / "t.jinja").write_text(template)
    data = tmp / "chat-t.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ["crown", "lady", "sir", "liege"] * 10))
    run = str(tmp / "sft-template")
    common = ["--base", run_base, "--data", str(data), "--max-steps", "2", *ANY_DATA]
    assert train.main([*common, "--out", run, "--chat-template", str(tmp / "t.jinja")]) == 0
    _, tok = load_model(run_base, adapter=run)  # the adapter's template replaces the base's
    assert tok.chat_template == template
    ids, mask = encode_example({"messages": [{"role": "user", "content": "say sir"},
                                             {"role": "assistant", "content": "sir"}]}, tok)
    assert tok.decode(ids).startswith("### user: say sir\n### assistant: ")
    with pytest.raises(SystemExit) as e:  # the parser's error: one line, exit code 2
        train.main([*common, "--out", str(tmp / "bad"), "--chat-template", "{{ x"])
    assert e.value.code == 2
    assert "--chat-template '{{ x': chat template does not compile" in capsys.readouterr().err
    assert not os.path.exists(tmp / "bad")


def test_adapter_run_directory_loads_as_its_base_with_the_adapter(base, tmp_path, monkeypatch):
    """A LoRA run directory stands for base + adapter wherever a model is named (generate.py,
    serve.py, eval.py, gguf_export), and generate.py's default picks it when it is newest."""
    from engine import load_model
    from generate import latest_checkpoint
    run_base, domain, _ = base
    root = tmp_path / "out"
    run = str(root / "lora-run")
    assert train.main(["--base", run_base, "--data", domain, "--out", run, "--max-steps", "2",
                       "--lr", "1e-2", *FLAGS]) == 0
    ids = torch.tensor([[1, 5, 9, 13]])
    m1, t1 = load_model(run)
    m2, t2 = load_model(run_base, adapter=run)
    with torch.no_grad():
        assert torch.equal(m1(ids), m2(ids))
        assert not torch.equal(m1(ids), load_model(run_base)[0](ids))  # the adapter is applied
    assert t1.vocab_size == t2.vocab_size
    os.utime(os.path.join(run_base, "model.safetensors"), (1, 1))  # older than the adapter
    monkeypatch.chdir(tmp_path)
    os.symlink(run_base, root / "base-run")
    assert latest_checkpoint(str(root)) == run
    cfg = os.path.join(run, "adapter_config.json")
    with open(cfg) as f:
        c = json.load(f)
    c["base_model_name_or_path"] = None
    with open(cfg, "w") as f:
        json.dump(c, f)
    with pytest.raises(ValueError, match="adapter without base_model_name_or_path"):
        load_model(run)


@pytest.mark.parametrize("mode", ["full", "freeze"])
def test_full_finetune_keeps_the_bases_generation_config(base, tmp_path, mode):
    """A full / freeze run wrote config.json and the weights but not the base's
    generation_config.json: its extra stop ids (Llama 3's <|eot_id|>) were lost, so generate.py
    on the run did not stop where the base does. engine.merge keeps it; so does the run now."""
    import shutil
    from engine.hub import load_model
    run_base, domain, _ = base
    gbase = shutil.copytree(run_base, str(tmp_path / "gbase"))
    gen = json.dumps({"eos_token_id": [2, 7]})
    (tmp_path / "gbase" / "generation_config.json").write_text(gen)
    out = str(tmp_path / "run")
    assert train.main(["--base", gbase, "--finetune", mode, "--data", domain, "--out", out,
                       "--max-steps", "1", "--eval-every", "1", *FLAGS]) == 0
    assert open(os.path.join(out, "generation_config.json")).read() == gen
    assert 7 in load_model(out)[1].stop_ids
