"""examples/: the checks that decide the recorded SFT and DPO results, and their data split
(held-out topics never trained on). No model: the base answers are given."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
import common  # noqa: E402
import dpo_marker  # noqa: E402
import sft_pattern  # noqa: E402


def test_sft_pattern_check():
    ok = json.dumps({"topic": "owls", "answer": "Owls hunt at night."})
    assert sft_pattern.follows(ok, True, "owls")
    assert not sft_pattern.follows(ok, False, "owls")                 # cut by the length limit
    assert not sft_pattern.follows(ok, True, "bees")                  # wrong subject
    assert not sft_pattern.follows(ok + " Sure!", True, "owls")       # more than one object
    assert not sft_pattern.follows('{"topic": "owls"}', True, "owls")  # missing key
    assert not sft_pattern.follows('{"topic": "owls", "answer": ""}', True, "owls")
    assert not sft_pattern.follows("Owls hunt at night.", True, "owls")


@pytest.mark.parametrize("style", ["prefix", "suffix"])
def test_dpo_marker_property(style):
    marked = dpo_marker.with_marker("Owls hunt at night.", style)
    assert dpo_marker.has_property(marked, True, style)
    assert not dpo_marker.has_property(marked, False, style)
    assert not dpo_marker.has_property("Owls hunt at night.", True, style)
    twice = dpo_marker.with_marker(marked, style)
    assert not dpo_marker.has_property(twice, True, style)  # a marker loop does not count


def test_data_split_keeps_heldout_topics_out_of_training(tmp_path, monkeypatch):
    prompts = common.prompt_set(heldout_topics=15, seed=0)
    answers = [(f"An answer about {p['topic']}.", i % 7 != 0) for i, p in enumerate(prompts)]
    monkeypatch.setattr(sft_pattern, "base_answers", lambda *a, **k: answers)
    monkeypatch.setattr(dpo_marker, "base_answers", lambda *a, **k: answers)
    args = lambda out: type("A", (), dict(heldout_topics=15, seed=0, out=str(out), model="m",  # noqa: E731
                                          max_new_tokens=8, batch=4, style="prefix"))()
    sft_pattern.make(args(tmp_path / "sft"))
    dpo_marker.make(args(tmp_path / "dpo"))
    held = {p["prompt"] for p in prompts if p["heldout"]}
    assert len({p["topic"] for p in prompts if p["heldout"]}) == 15
    sft_train = common.read_jsonl(tmp_path / "sft" / "train.jsonl")
    dpo_train = common.read_jsonl(tmp_path / "dpo" / "train.jsonl")
    assert sft_train and dpo_train
    assert not {s["messages"][0]["content"] for s in sft_train} & held
    assert not {p["prompt"][0]["content"] for p in dpo_train} & held
    finished = sum(f for _, f in answers)  # unfinished answers make no examples
    n_sft = len(sft_train) + len(common.read_jsonl(tmp_path / "sft" / "heldout.jsonl"))
    assert n_sft == finished
    pair = dpo_train[0]
    assert pair["chosen"][0]["content"] == "Answer: " + pair["rejected"][0]["content"]
