"""Model cards (engine/card.py): front matter parsed by huggingface_hub's own card reader, every
section issue 4 asks for with its exact values, hashes against hashlib, atomic writes."""
import hashlib
import os

import pytest

from engine.card import (command_line, describe_hardware, file_sha256, format_duration,
                         render_model_card, write_model_card)

CARD = dict(base_model="smollm2-135m-instruct", data_path="data/chat.jsonl",
            data_hash="ab" * 32, data_sizes={"train examples": 900, "validation examples": 100,
                                             "train tokens": 123456},
            mode="qlora",
            hyperparameters={"lora_r": 8, "lora_alpha": 16.0, "lora_targets": ["q_proj", "v_proj"],
                             "lr": 0.0002, "rslora": False, "seq_len": 256, "weight_decay": 3e-05},
            metrics={"train_loss": 1.234567, "val_loss": 1.5, "val_ppl": 4.4817, "tokens": 1234567.0,
                     "a|b": "x"},
            wall_time_s=903.2, hardware="CPU: Test CPU, 2 cores usable",
            command="python train.py --base smollm2-135m-instruct --finetune qlora --data 'my data.jsonl'",
            adapter=True)


def test_file_sha256(tmp_path):
    data = os.urandom(3 << 20) + b"tail"  # several read chunks
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(str(tmp_path / "f.bin")) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(tmp_path / "f.bin"), chunk=7) == hashlib.sha256(data).hexdigest()
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("one")
    (d / "sub" / "b.txt").write_text("two")
    expected = hashlib.sha256()
    for rel, content in (("a.txt", b"one"), ("sub/b.txt", b"two")):
        expected.update(rel.encode() + b"\0" + hashlib.sha256(content).digest())
    h = file_sha256(str(d))
    assert h == expected.hexdigest()
    os.rename(d / "a.txt", d / "c.txt")
    assert file_sha256(str(d)) != h
    with pytest.raises(FileNotFoundError, match="cannot hash"):
        file_sha256(str(tmp_path / "missing"))


def test_adapter_card_contents(tmp_path):
    out = tmp_path / "run" / "adapter"
    path = write_model_card(str(out), **CARD)
    assert path == str(out / "README.md")
    text = open(path).read()
    repocard = pytest.importorskip("huggingface_hub.repocard")
    meta = repocard.metadata_load(path)
    assert meta == {"library_name": "whetstone", "base_model": "smollm2-135m-instruct",
                    "pipeline_tag": "text-generation",
                    "tags": ["whetstone", "qlora", "peft", "adapter", "text-generation"]}
    sections = [l for l in text.splitlines() if l.startswith("## ")]
    assert sections == ["## Base model", "## Data", "## Method and hyperparameters", "## Results",
                        "## Training time and hardware", "## Command", "## How to use"]
    for line in ["# adapter", "An adapter for `smollm2-135m-instruct`, trained with Whetstone by QLoRA "
                 "(LoRA over an NF4 4-bit quantized, frozen base) on `data/chat.jsonl`.", "- path: `data/chat.jsonl`", f"- sha256: `{'ab' * 32}`",
                 "- train examples: 900", "- train tokens: 123,456",
                 "Mode: `qlora` — QLoRA (LoRA over an NF4 4-bit quantized, frozen base).",
                 "| lora_r | 8 |", "| lora_alpha | 16 |", "| lora_targets | q_proj, v_proj |",
                 "| lr | 0.0002 |", "| rslora | false |", "| weight_decay | 3e-05 |",
                 "| train_loss | 1.2346 |", "| val_ppl | 4.4817 |", "| tokens | 1,234,567 |",
                 "| a\\|b | x |", "- wall time: 15 min 3 s (903 s)",
                 "- hardware: CPU: Test CPU, 2 cores usable",
                 CARD["command"],
                 f"model, tokenizer = load_model('smollm2-135m-instruct', adapter={str(out)!r})",
                 f"python generate.py --model smollm2-135m-instruct --adapter {out} --chat \"Hello\""]:
        assert line in text.splitlines(), line
    assert not [f for f in os.listdir(out) if f != "README.md"]  # no temp file left behind


def test_model_card_defaults_and_overwrite(tmp_path, monkeypatch):
    data = tmp_path / "corpus.txt"
    data.write_bytes(b"To be, or not to be")
    monkeypatch.setattr("sys.argv", ["train.py", "--data", str(data), "--max-steps", "5"])
    args = dict(CARD, base_model=None, data_path=str(data), data_hash=None, mode="pretrain",
                adapter=False, hardware=None, command=None)
    write_model_card(str(tmp_path / "ckpt"), **dict(args, metrics={"val_loss": 9.0}))
    path = write_model_card(str(tmp_path / "ckpt"), **args)  # overwrites in place
    text = open(path).read()
    meta = pytest.importorskip("huggingface_hub.repocard").metadata_load(path)
    assert "base_model" not in meta and meta["tags"][:2] == ["whetstone", "pretrain"]
    assert "None: trained from scratch." in text and "| val_loss | 1.5 |" in text
    assert f"- sha256: `{hashlib.sha256(b'To be, or not to be').hexdigest()}`" in text
    assert f"python train.py --data {data} --max-steps 5" in text
    assert f"- hardware: {describe_hardware()}" in text
    assert f"python generate.py --checkpoint {tmp_path / 'ckpt'} --prompt \"Hello\"" in text


def test_helpers():
    assert command_line(["train.py", "--data", "my file.jsonl"]) == "python train.py --data 'my file.jsonl'"
    assert format_duration(42.25) == "42.2 s"
    assert format_duration(3723) == "1 h 2 min 3 s (3,723 s)"
    hw = describe_hardware()
    cores = len(os.sched_getaffinity(0))
    assert hw.startswith(("GPU: ", "CPU: ")) and f"{cores} cores usable" in hw and "torch " in hw
    text = render_model_card("x", **dict(CARD, metrics={}, notes="Trained on a laptop."))
    assert "(no metrics recorded)" in text and text.rstrip().endswith("Trained on a laptop.")


def test_combined_mode_names_method_and_objective():
    """A DPO run through LoRA says both (before, the card only said LoRA)."""
    text = render_model_card("x", **dict(CARD, mode="lora+dpo", metrics={}))
    assert ("trained with Whetstone by LoRA (low-rank adapters; base weights frozen) with DPO "
            "preference optimization") in text
    assert '- "lora"' in text and '- "dpo"' in text


def test_command_line_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert command_line(["train.py", "--data", "d.txt"]) == \
        "torchrun --nnodes 2 --nproc_per_node 2 train.py --data d.txt"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert command_line(["train.py"]) == "python train.py"


def test_resumed_run_shows_the_command_that_started_it():
    """A resumed run's card showed only the --resume command, which does not say how the run was
    made: the starting command stays the block's command, the resume a comment under it."""
    text = render_model_card("x", **dict(CARD, resumed_with="python train.py --resume out/x"))
    block = text.split("## Command\n\n```bash\n", 1)[1].split("```", 1)[0]
    assert block.splitlines() == [CARD["command"], "# resumed with: python train.py --resume out/x"]
    plain = render_model_card("x", **CARD)
    assert plain.split("## Command\n\n```bash\n", 1)[1].split("```", 1)[0] == CARD["command"] + "\n"


def test_table_numbers_drop_trailing_zeros():
    from engine.card import _fmt
    assert [_fmt(v) for v in (554.7, 0.003, 4.50821, 0.0, 16.0, 12345.67, 2e-5, 1337)] == \
        ["554.7", "0.003", "4.5082", "0", "16", "12,345.7", "2e-05", "1,337"]
