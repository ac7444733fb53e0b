"""A DPO preference set with an objective, checkable property, and the measurement of it.

Property (--style prefix, the default): the assistant's answer starts with "Answer:"; with
--style suffix it ends with a last line "[DONE]". Pairs are on-policy: the base model's own
greedy answer to each prompt with the marker added (chosen) and as it is (rejected), so the
only thing DPO can learn from a pair is the preference itself.

    python examples/dpo_marker.py make --out out/dpo_data        # pairs + held-out prompts
    python train.py --objective dpo --base smollm2-135m-instruct --finetune lora --lora-r 8 \\
        --lora-alpha 16 --data out/dpo_data/train.jsonl --val-data out/dpo_data/heldout.jsonl \\
        --seq-len 160 --batch-size 4 --max-steps 40 --lr 2e-4 --beta 0.25 --rpo-alpha 1 \\
        --warmup-steps 5 --out out/dpo-rpo
    python examples/dpo_marker.py measure --adapter out/dpo-rpo \\
        --prompts out/dpo_data/heldout_prompts.jsonl --samples 2  # property rate, base vs tuned

Recorded on 2 CPU cores (2026-12-02), 120 sampled answers on held-out prompts: held-out reward
accuracy 100% with or without --rpo-alpha; the property in 0.0% of the base's answers, 99.2%
with --rpo-alpha 1, 30.8% with pure DPO (--rpo-alpha 0: only 40.8% of its answers finish).

Prompts come from templates x topics; the held-out topics never appear in train.jsonl. The
base's answers are cached in answers.jsonl (re-running `make` with another --style reuses them).
Generation is batched over prompts of equal token length (engine.generation.generate_many),
which is what makes this practical on a CPU.
"""
from __future__ import annotations

import json
import os

from common import answers_base_and_tuned, base_answers, cli, prompt_set, read_jsonl, write_jsonl
from engine.config import atomic_write_text

MARKERS = {"prefix": "Answer:", "suffix": "[DONE]"}


def with_marker(answer: str, style: str) -> str:
    return f"{MARKERS[style]} {answer}" if style == "prefix" else f"{answer}\n\n{MARKERS[style]}"


def has_property(text: str, finished: bool, style: str) -> bool:
    """The answer ended (stop token, not the length limit) and carries the marker exactly once,
    at its start (prefix) or end (suffix): a degenerate "[DONE] [DONE] ..." loop does not count."""
    m = MARKERS[style]
    placed = text.lstrip().startswith(m) if style == "prefix" else text.rstrip().endswith(m)
    return finished and placed and text.count(m) == 1


def make(args) -> None:
    prompts = prompt_set(args.heldout_topics, args.seed)
    answers = base_answers(args.out, prompts, args.model, args.max_new_tokens, args.batch)
    train, val, skipped = [], [], 0
    for p, (ans, finished) in zip(prompts, answers):
        if not finished or not ans or MARKERS[args.style] in ans:
            skipped += 1  # an answer cut by max_new_tokens is not an example of a whole answer
            continue
        pair = {"prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": with_marker(ans, args.style)}],
                "rejected": [{"role": "assistant", "content": ans}]}
        (val if p["heldout"] else train).append(pair)
    held = [{"prompt": p["prompt"]} for p in prompts if p["heldout"]]
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", val), ("heldout_prompts.jsonl", held)):
        write_jsonl(os.path.join(args.out, name), rows)
    print(f"{len(train)} training pairs, {len(val)} held-out pairs, {len(held)} held-out "
          f"prompts ({skipped} unfinished answers skipped) -> {args.out}")


def measure(args) -> None:
    """Marker rate of sampled answers on held-out prompts, base (adapter disabled) vs tuned."""
    prompts = [r["prompt"] for r in read_jsonl(args.prompts) for _ in range(args.samples)]
    report = {}
    for name, answers in answers_base_and_tuned(args, prompts, args.which.split(",")).items():
        hits = [has_property(a, f, args.style) for a, f in answers]
        report[name] = {"marker_rate": sum(hits) / len(hits), "n": len(hits),
                        "any_marker_rate": sum(MARKERS[args.style] in a for a, _ in answers) / len(answers),
                        "finished_rate": sum(f for _, f in answers) / len(answers),
                        "mean_words": sum(len(a.split()) for a, _ in answers) / len(answers),
                        "examples": [{"prompt": p, "answer": a} for p, (a, _) in
                                     list(zip(prompts, answers))[:5]]}
    where = "starts" if args.style == "prefix" else "ends"
    print(f"\nproperty: a finished answer that {where} with {MARKERS[args.style]!r} (once); "
          f"{len(prompts)} sampled "
          f"answers on held-out prompts (temperature {args.temperature}, top-k {args.top_k})")
    print(f"{'':8}{'property':>10}{'any marker':>12}{'finished':>10}{'words':>8}")
    for name, r in report.items():
        print(f"{name:8}{r['marker_rate']:>10.1%}{r['any_marker_rate']:>12.1%}"
              f"{r['finished_rate']:>10.1%}{r['mean_words']:>8.1f}")
    out = args.json or os.path.join(args.adapter, "property_rate.json")
    atomic_write_text(out, json.dumps({"marker": MARKERS[args.style], "settings": vars(args), **report}, indent=2))
    print(f"report: {out}")


def main(argv=None) -> None:
    def extra(make_parser, measure_parser):
        measure_parser.add_argument("--which", default="base,tuned",
                                    help="comma-separated: base (adapter disabled), tuned")
        for q in (make_parser, measure_parser):
            q.add_argument("--style", choices=tuple(MARKERS), default="prefix",
                           help="marker at the start (prefix) or as the last line (suffix)")
    cli(__doc__, make, measure, "marker rate", extra, argv)


if __name__ == "__main__":
    main()
