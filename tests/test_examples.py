"""examples/: the checks that decide the recorded SFT, DPO and document-EOS results, and their
data (held-out topics and towns never trained on). No model: the base answers are given."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
import common  # noqa: E402
import doc_eos  # noqa: E402
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


def test_doc_eos_writes_the_same_documents_both_ways(tmp_path):
    from engine.data import read_documents
    args = type("A", (), dict(out=str(tmp_path), train=40, heldout=12, seed=3))()
    doc_eos.make(args)
    train = read_documents(str(tmp_path / "docs.jsonl"))
    held = read_documents(str(tmp_path / "heldout.jsonl"))
    assert len(train) == 40 and len(held) == 12 and len(set(train)) == 40
    # the .txt file is ONE document: the same cards joined by a blank line, no EOS between them
    assert read_documents(str(tmp_path / "docs.txt")) == ["\n\n".join(train) + "\n"]
    town = lambda d: d.partition("\n")[0].removeprefix("Town: ")  # noqa: E731
    assert not {town(d) for d in held} & {town(d) for d in train}
    assert all(any(town(d).startswith(w) for w in doc_eos.HELDOUT_FIRST) for d in held)
    assert not any(any(town(d).startswith(w) for w in doc_eos.HELDOUT_FIRST) for d in train)
    prompt, rest = doc_eos.split_prompt(held[0])
    assert prompt == f"Town: {town(held[0])}\n" and prompt + rest == held[0]
    assert doc_eos.classify(rest, True, town(held[0]))["ends_right"]  # a card's rest ends right
    doc_eos.make(args)  # same seed, same cards
    assert read_documents(str(tmp_path / "docs.jsonl")) == train


def test_doc_eos_classify():
    rest = ("Region: the river plain\nPopulation: 4,210\nKnown for: wool and cider\nFounded: 1642\n"
            "Ashvale is a small town in the river plain, known for wool and cider.")
    assert doc_eos.classify(rest, True, "Ashvale") == {"stopped": True, "closes": True, "runs_on": False,
                                                       "ends_right": True}
    assert doc_eos.classify(rest + "\n", True, "Ashvale")["ends_right"]
    cut = doc_eos.classify(rest, False, "Ashvale")  # the length limit, not EOS, ended it
    assert cut == {"stopped": False, "closes": True, "runs_on": False, "ends_right": False}
    # the card closes, then a new one starts (what a model trained without EOS between documents does)
    on = doc_eos.classify(rest + "\n\nTown: Brookford\nRegion: the salt", False, "Ashvale")
    assert on == {"stopped": False, "closes": True, "runs_on": True, "ends_right": False}
    assert doc_eos.classify(rest + "\n\nTown: Brookford", True, "Ashvale")["runs_on"]
    assert not doc_eos.classify("Region: x\nTown: Brookford", False, "Ashvale")["closes"]
    # stopped, but the last line is not this card's closing sentence
    assert doc_eos.classify(rest.rsplit("\n", 1)[0], True, "Ashvale") == {
        "stopped": True, "closes": False, "runs_on": False, "ends_right": False}
    assert not doc_eos.classify(rest.replace("Ashvale is", "Elmton is"), True, "Ashvale")["ends_right"]
    assert not doc_eos.classify("", True, "Ashvale")["ends_right"]
    rows = [{**doc_eos.classify(rest, True, "Ashvale"), "gen_tokens": 40, "true_tokens": 45},
            {**on, "gen_tokens": 120, "true_tokens": 45}]
    assert doc_eos.summarize(rows) == {"n": 2, "stopped": 0.5, "closes": 1.0, "runs_on": 0.5,
                                       "ends_right": 0.5, "mean_gen_tokens": 80.0,
                                       "mean_true_tokens": 45.0}
