"""An SFT set with a checkable pattern, and the measurement of it (issue: SFT on a small chat JSONL
makes the tuned model follow a pattern the base does not).

Pattern: the assistant replies with one JSON object and nothing else,
    {"topic": "<the subject of the question>", "answer": "<the answer>"}
checked by json.loads, exact keys, and "topic" equal to the prompt's subject. The answers are the
base model's own greedy answers (cached in answers.jsonl, shared with dpo_marker.py), so what SFT
teaches is the format, not new content.

    python examples/sft_pattern.py make --out out/sft_data       # train/held-out chat JSONL
    python train.py --base smollm2-135m-instruct --finetune lora --data out/sft_data/train.jsonl \\
        --val-data out/sft_data/heldout.jsonl --batch-size 8 --seq-len 256 --max-steps 60 \\
        --lr 5e-4 --out out/sft-json
    python examples/sft_pattern.py measure --adapter out/sft-json \\
        --prompts out/sft_data/heldout_prompts.jsonl --samples 2  # pattern rate, base vs tuned

Held-out topics never appear in train.jsonl. Recorded on 2 CPU cores (2026-12-02, re-run after
the cosine schedule change): 244 training samples, 60 steps in 314 s (the cores shared with other
jobs); of 120 sampled answers on held-out prompts, 0.0% (base) vs 84.2% (tuned) follow the
pattern, 100% of tuned answers start with "{" and 99.2% finish. (Before the schedule change:
87.5%.)
"""
from __future__ import annotations

import json
import os

from common import answers_base_and_tuned, base_answers, cli, prompt_set, read_jsonl, write_jsonl
from engine.config import atomic_write_text


def reply(topic: str, text: str) -> str:
    return json.dumps({"topic": topic, "answer": text}, ensure_ascii=False)


def follows(text: str, finished: bool, topic: str) -> bool:
    """A finished reply that is exactly one JSON object {"topic": topic, "answer": str}."""
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return (finished and isinstance(obj, dict) and set(obj) == {"topic", "answer"}
            and obj["topic"] == topic and isinstance(obj["answer"], str) and bool(obj["answer"]))


def make(args) -> None:
    prompts = prompt_set(args.heldout_topics, args.seed)
    answers = base_answers(args.out, prompts, args.model, args.max_new_tokens, args.batch)
    train, val, skipped = [], [], 0
    for p, (ans, finished) in zip(prompts, answers):
        if not finished or not ans:
            skipped += 1  # an answer cut by max_new_tokens is not an example of a whole answer
            continue
        sample = {"messages": [{"role": "user", "content": p["prompt"]},
                               {"role": "assistant", "content": reply(p["topic"], ans)}]}
        (val if p["heldout"] else train).append(sample)
    held = [{"prompt": p["prompt"], "topic": p["topic"]} for p in prompts if p["heldout"]]
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", val), ("heldout_prompts.jsonl", held)):
        write_jsonl(os.path.join(args.out, name), rows)
    print(f"{len(train)} training samples, {len(val)} held-out samples, {len(held)} held-out "
          f"prompts ({skipped} unfinished answers skipped) -> {args.out}")


def measure(args) -> None:
    """Pattern rate of sampled answers on held-out prompts, base (adapter disabled) vs tuned."""
    rows = [r for r in read_jsonl(args.prompts) for _ in range(args.samples)]
    report = {}
    for name, answers in answers_base_and_tuned(args, [r["prompt"] for r in rows]).items():
        hits = [follows(a, f, r["topic"]) for r, (a, f) in zip(rows, answers)]
        report[name] = {"pattern_rate": sum(hits) / len(hits), "n": len(hits),
                        "starts_with_brace": sum(a.startswith("{") for a, _ in answers) / len(answers),
                        "finished_rate": sum(f for _, f in answers) / len(answers),
                        "examples": [{"prompt": r["prompt"], "answer": a}
                                     for r, (a, _) in list(zip(rows, answers))[:6]]}
    print(f"\npattern: one JSON object {{\"topic\": <the prompt's subject>, \"answer\": ...}}; "
          f"{len(rows)} sampled answers on held-out prompts (temperature {args.temperature}, "
          f"top-k {args.top_k})")
    print(f"{'':8}{'pattern':>10}{'starts {':>10}{'finished':>10}")
    for name, r in report.items():
        print(f"{name:8}{r['pattern_rate']:>10.1%}{r['starts_with_brace']:>10.1%}{r['finished_rate']:>10.1%}")
    out = args.json or os.path.join(args.adapter, "pattern_rate.json")
    atomic_write_text(out, json.dumps({"settings": vars(args), **report}, indent=2))
    print(f"report: {out}")


if __name__ == "__main__":
    cli(__doc__, make, measure, "pattern rate")
