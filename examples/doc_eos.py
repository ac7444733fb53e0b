"""Documents that end with EOS teach a model to stop; the same text as one document does not.

A corpus is a list of documents (each JSONL "text" record, each file of a directory) and each
ends with the tokenizer's EOS; a single .txt file is one document, with no EOS inside it (as
every corpus was read before documents ended with EOS). The data: short "town cards"
(fictional towns from word lists, fixed seed) whose last line is a checkable closing sentence,

    Town: Ashvale
    Region: the northern hills
    Population: 4,210
    Known for: wool and cider
    Founded: 1642
    Ashvale is a small town in the northern hills, known for wool and cider.

written two ways from the SAME documents: docs.jsonl (one {"text": card} per line: EOS after
each) and docs.txt (the cards joined by a blank line: one document). Held-out cards name towns
whose first word never appears in training.

    python examples/doc_eos.py make --out out/doc_eos
    python train.py --base smollm2-135m-instruct --finetune lora --data out/doc_eos/docs.jsonl \\
        --val-data out/doc_eos/heldout.jsonl --batch-size 8 --seq-len 128 --max-steps 40 \\
        --lr 5e-4 --seed 0 --out out/doc_eos-jsonl
    python train.py --base smollm2-135m-instruct --finetune lora --data out/doc_eos/docs.txt \\
        --val-data out/doc_eos/heldout.jsonl --batch-size 8 --seq-len 128 --max-steps 40 \\
        --lr 5e-4 --seed 0 --out out/doc_eos-txt
    python examples/doc_eos.py measure --adapter out/doc_eos-txt --adapter out/doc_eos-jsonl \\
        --prompts out/doc_eos/heldout.jsonl

measure continues each held-out card from its first line ("Town: <name>\\n", plain text, no chat
template, greedy) for the base and each adapter, up to 3x the mean true remaining length in
tokens, and reports the fractions that stop at a stop id (EOS; finish reason 'stop'), close the
card (its last line, before any new card, is the closing sentence), run on into a new card (a
"Town:" line after the prompt's) and end right (stop, close, no new card), and the mean
generated length against the mean true remaining length.

Recorded on 2 CPU cores (2026-12-03): 300 training cards (16,979 tokens, 57 per card), 48 held-out
cards; each LoRA run 40 steps in 223 s (jsonl) and 232 s (txt), ~200 tokens/s; measuring all
three took 129 s. Validation loss on heldout.jsonl (EOS after each card): 1.036 (jsonl-trained)
vs 1.406 (txt-trained: its one EOS was at the end of the file). Of 48 greedy continuations
(max_new_tokens 152, true remaining length 50.6 tokens on average):

                 stop@EOS  closes  runs on  ends right  gen tokens
    base             2.1%    0.0%     0.0%        0.0%       150.6
    txt-trained      0.0%   81.2%   100.0%        0.0%       152.0
    jsonl-trained  100.0%   97.9%     0.0%       97.9%        50.4

The effect is as strong as it can be here: the txt-trained model writes the card (81% with its
closing sentence; misses seen: the town misspelled, the line skipped) and then, every time, a blank
line and a new "Town:" card until the length limit; the jsonl-trained model ends every card at
EOS, with about the true length (its one miss stops too, the town misspelled in the closing
sentence). The base writes no cards at all (chat-style prose about the town, to the limit;
one stops). The cards are deliberately uniform, so this shows the mechanism, not how fast a
model learns to stop on varied real documents.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import read_jsonl, write_jsonl  # noqa: E402  (also puts the repo root on sys.path)
from engine.config import atomic_write_text  # noqa: E402

FIRST = ["Ash", "Brook", "Clay", "Dun", "Elm", "Fern", "Glen", "Hart", "Iron", "Juniper", "Kings",
         "Lark", "Mill", "North", "Oak", "Pine", "Quarry", "Red", "Salt", "Thorn", "Upper", "Vale",
         "West", "Yew", "Amber", "Birch", "Cold", "Deer", "East", "Fox", "Gold", "Hazel", "Marsh",
         "Rook", "Stone", "Wolf"]
HELDOUT_FIRST = ["Copper", "Heron", "Linden", "Otter", "Raven", "Willow"]  # never trained on
SECOND = ["vale", "ford", "bridge", "wick", "ton", "field", "moor", "haven", "stead", "combe",
          "holm", "mere"]
REGIONS = ["the northern hills", "the river plain", "the eastern coast", "the high moors",
           "the southern valleys", "the forest country", "the lake district", "the western marshes",
           "the salt flats", "the border uplands"]
GOODS = ["wool", "cider", "cheese", "slate", "salt", "pottery", "timber", "lace", "honey",
         "horses", "barley", "copper", "herring", "glass", "rope", "candles"]
CARD_HEAD = "Town: "


def card(rng: random.Random, town: str) -> str:
    """One town card; its last line restates the card in a fixed sentence (the checkable end)."""
    region = rng.choice(REGIONS)
    pop = rng.randint(800, 60000)
    known = " and ".join(rng.sample(GOODS, 2))
    size = "small" if pop < 5000 else "market" if pop < 20000 else "large"
    return (f"{CARD_HEAD}{town}\nRegion: {region}\nPopulation: {pop:,}\nKnown for: {known}\n"
            f"Founded: {rng.randint(1100, 1899)}\n{town} is a {size} town in {region}, known for {known}.")


def cards(n_train: int, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """(training cards, held-out cards): distinct towns; held-out towns start with a word no
    training town has."""
    rng = random.Random(seed)
    train_towns = [a + b for a in FIRST for b in SECOND]
    held_towns = [a + b for a in HELDOUT_FIRST for b in SECOND]
    if n_train > len(train_towns) or n_heldout > len(held_towns):
        raise ValueError(f"at most {len(train_towns)} training and {len(held_towns)} held-out cards")
    return ([card(rng, t) for t in rng.sample(train_towns, n_train)],
            [card(rng, t) for t in rng.sample(held_towns, n_heldout)])


def split_prompt(doc: str) -> tuple[str, str]:
    """(prompt, true rest): the card's first line with its line break, and what follows."""
    head, _, rest = doc.partition("\n")
    return head + "\n", rest


def classify(text: str, stopped: bool, town: str) -> dict:
    """How a continuation of "Town: <town>\\n" ended. stopped: it ended at a stop id (EOS), not
    at the length limit. closes: its card (the lines before any new card) ends with this card's
    closing sentence. runs_on: it goes on into a new card (a line starting "Town:").
    ends_right: stopped, closes and does not run on."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    new = next((i for i, ln in enumerate(lines) if ln.startswith(CARD_HEAD.strip())), None)
    own = lines[:new]  # this card's lines
    closing = rf"{re.escape(town)} is an? \w+ town in .+, known for .+\."
    closes = bool(own and re.fullmatch(closing, own[-1]))
    return {"stopped": stopped, "closes": closes, "runs_on": new is not None,
            "ends_right": stopped and closes and new is None}


def make(args) -> None:
    train, held = cards(args.train, args.heldout, args.seed)
    write_jsonl(os.path.join(args.out, "docs.jsonl"), [{"text": d} for d in train])
    # one .txt file is one document: the blank line is all that separates the cards (no EOS)
    atomic_write_text(os.path.join(args.out, "docs.txt"), "\n\n".join(train) + "\n")
    write_jsonl(os.path.join(args.out, "heldout.jsonl"), [{"text": d} for d in held])
    print(f"{len(train)} training cards (docs.jsonl, docs.txt), {len(held)} held-out cards "
          f"(heldout.jsonl) -> {args.out}")


def summarize(rows: list[dict]) -> dict:
    """Rates and mean lengths over classify() rows that also carry gen_tokens and true_tokens."""
    n = len(rows)
    rates = ("stopped", "closes", "runs_on", "ends_right")
    return {"n": n, **{k: sum(r[k] for r in rows) / n for k in rates},
            "mean_gen_tokens": sum(r["gen_tokens"] for r in rows) / n,
            "mean_true_tokens": sum(r["true_tokens"] for r in rows) / n}


def measure(args) -> None:
    from engine.generation import generate_many
    from engine.hub import load_model
    docs = [r["text"] for r in read_jsonl(args.prompts)]
    report = {}
    runs = [("base", None)] + [(os.path.basename(os.path.normpath(a)), a) for a in args.adapter]
    for name, adapter in runs:
        model, tok = load_model(args.model, adapter=adapter)
        parts = [split_prompt(d) for d in docs]
        true_tokens = [len(tok.encode(rest, add_bos=False)) for _, rest in parts]
        max_new = args.max_new_tokens or round(3 * sum(true_tokens) / len(true_tokens))
        t0 = time.time()
        # plain text, no BOS (documents are trained without one), greedy
        res = generate_many(model, [tok.encode(p, add_bos=False) for p, _ in parts], max_new, 0.0,
                            stop_ids=tok.stop_ids, batch_size=args.batch, vocab_size=tok.vocab_size)
        rows = []
        for d, (ids, stopped), n_true in zip(docs, res, true_tokens):
            text = tok.decode(ids, skip_special=True)
            town = d.partition("\n")[0][len(CARD_HEAD):]
            rows.append({**classify(text, stopped, town), "gen_tokens": len(ids), "true_tokens": n_true,
                         "text": text})
        report[name] = {**summarize(rows), "max_new_tokens": max_new, "seconds": round(time.time() - t0, 1),
                        "examples": [{"prompt": p, "continuation": r["text"]}
                                     for (p, _), r in list(zip(parts, rows))[:4]],
                        "not_ending_right": [{"prompt": p, "continuation": r["text"], "stopped": r["stopped"]}
                                             for (p, _), r in zip(parts, rows) if not r["ends_right"]][:4]}
        print(f"{name}: {len(rows)} continuations in {time.time() - t0:.0f}s", flush=True)
        del model
    print(f"\n{len(docs)} held-out cards continued from their first line (greedy, plain text, "
          f"max_new_tokens {max_new})")
    print(f"{'':16}{'stop@EOS':>10}{'closes':>8}{'runs on':>9}{'ends right':>12}{'gen tok':>9}"
          f"{'true tok':>10}")
    for name, r in report.items():
        print(f"{name:16}{r['stopped']:>10.1%}{r['closes']:>8.1%}{r['runs_on']:>9.1%}"
              f"{r['ends_right']:>12.1%}"
              f"{r['mean_gen_tokens']:>9.1f}{r['mean_true_tokens']:>10.1f}")
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(args.prompts)), "doc_eos_report.json")
    atomic_write_text(out, json.dumps({"settings": vars(args), **report}, indent=2))
    print(f"report: {out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write docs.jsonl, docs.txt (the same cards) and heldout.jsonl")
    m.add_argument("--out", required=True)
    m.add_argument("--train", type=int, default=300, help="training cards")
    m.add_argument("--heldout", type=int, default=48, help="held-out cards")
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("measure", help="how continuations of held-out cards end, base vs adapters")
    s.add_argument("--adapter", action="append", required=True, help="a LoRA run directory (repeatable)")
    s.add_argument("--prompts", required=True, help="heldout.jsonl from make")
    s.add_argument("--model", default="smollm2-135m-instruct")
    s.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: 3x the mean true remaining length in tokens")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--json", default=None, help="report path (default: beside --prompts)")
    args = p.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        make(args) if args.cmd == "make" else measure(args)
    except (ValueError, FileNotFoundError) as e:  # bad counts, a missing file: one line
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
