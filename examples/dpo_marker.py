"""A DPO preference set with an objective, checkable property, and the measurement of it.

Property (--style prefix, the default): the assistant's answer starts with "Answer:"; with
--style suffix it ends with a last line "[DONE]". Pairs are on-policy: the base model's own
greedy answer to each prompt with the marker added (chosen) and as it is (rejected), so the
only thing DPO can learn from a pair is the preference itself.

    python examples/dpo_marker.py make --out out/dpo_data        # pairs + held-out prompts
    python train.py --objective dpo --base smollm2-135m-instruct --finetune lora \\
        --data out/dpo_data/train.jsonl --val-data out/dpo_data/heldout.jsonl ...
    python examples/dpo_marker.py measure --adapter out/dpo-answer \\
        --prompts out/dpo_data/heldout_prompts.jsonl              # property rate, base vs tuned

Prompts come from templates x topics; the held-out topics never appear in train.jsonl. The
base's answers are cached in answers.jsonl (re-running `make` with another --style reuses them).
Generation is batched over prompts of equal token length (engine.generation's prefill /
decode_one_token / sample with one KV cache per group), which is what makes this practical on
a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.config import atomic_write_text  # noqa: E402
from engine.generation import decode_one_token, prefill, sample  # noqa: E402
from engine.hub import load_model  # noqa: E402
from tokenizer.chat import render_chat  # noqa: E402

MARKERS = {"prefix": "Answer:", "suffix": "[DONE]"}
TEMPLATES = ["Tell me about {} in one sentence.", "Give me one short fact about {}.",
             "Describe {} briefly.", "Why do people care about {}? Keep it short."]
TOPICS = ["volcanoes", "owls", "bicycles", "rainbows", "honey bees", "the moon", "glaciers",
          "pianos", "tomatoes", "deserts", "lighthouses", "penguins", "thunderstorms",
          "coffee", "maps", "bridges", "dolphins", "libraries", "candles", "mountains",
          "rivers", "oak trees", "sunflowers", "telescopes", "clocks", "umbrellas",
          "elephants", "batteries", "snowflakes", "islands", "gardens", "compasses", "whales",
          "forests", "kites", "lanterns", "windmills", "coral reefs", "trains", "airplanes",
          "submarines", "rockets", "magnets", "mirrors", "lemons", "mushrooms", "spiders",
          "butterflies", "tigers", "camels", "pyramids", "castles", "tea", "bread", "cheese",
          "rice", "apples", "bananas", "carrots", "potatoes", "violins", "drums", "guitars",
          "paintings", "sculptures", "poems", "novels", "newspapers", "calendars", "keyboards",
          "computers", "phones", "cameras", "radios", "televisions", "satellites", "comets",
          "stars", "planets", "oceans", "lakes", "waterfalls", "caves", "canyons",
          "earthquakes", "hurricanes", "tornadoes", "clouds", "fog", "wind", "solar panels",
          "wheels", "ladders", "hammers", "scissors", "needles", "buttons", "zippers", "shoes",
          "hats", "gloves", "blankets"]


def chat_ids(tok, prompt: str) -> list[int]:
    return tok.encode(render_chat(tok, [{"role": "user", "content": prompt}],
                                  add_generation_prompt=True), add_bos=False)


@torch.no_grad()
def generate_batched(model, tok, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                     top_k: int | None = None, seed: int = 0, batch: int = 32,
                     log=print) -> list[tuple[str, bool]]:
    """(answer text, ended by a stop token) per prompt."""
    stop = torch.tensor(sorted(tok.stop_ids))
    ids = [chat_ids(tok, p) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        groups.setdefault(len(x), []).append(i)
    work = [g[k:k + batch] for g in groups.values() for k in range(0, len(g), batch)]
    gen = torch.Generator().manual_seed(seed)
    out: list[tuple[str, bool]] = [("", False)] * len(prompts)
    t0 = time.time()
    for n, rows in enumerate(work):
        x = torch.tensor([ids[i] for i in rows])                            # (B, T)
        cache = model.new_cache(len(rows), x.shape[1] + max_new_tokens)
        logits = prefill(model, x, cache)                                   # (B, V)
        new = torch.zeros(len(rows), 0, dtype=torch.long)
        done = torch.zeros(len(rows), dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, None, gen)             # (B,)
            nxt = torch.where(done, torch.full_like(nxt, int(stop[0])), nxt)
            new = torch.cat([new, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, stop)
            if done.all():
                break
            logits = decode_one_token(model, nxt[:, None], cache)
        for r, i in enumerate(rows):
            toks = new[r].tolist()
            cut = next((k for k, t in enumerate(toks) if t in tok.stop_ids), None)
            out[i] = (tok.decode(toks[:cut], skip_special=True).strip(), cut is not None)
        log(f"  group {n + 1}/{len(work)}: {len(rows)} prompts, {time.time() - t0:.0f}s")
    return out


def with_marker(answer: str, style: str) -> str:
    return f"{MARKERS[style]} {answer}" if style == "prefix" else f"{answer}\n\n{MARKERS[style]}"


def has_property(text: str, finished: bool, style: str) -> bool:
    """The answer ended (stop token, not the length limit) and carries the marker exactly once,
    at its start (prefix) or end (suffix): a degenerate "[DONE] [DONE] ..." loop does not count."""
    m = MARKERS[style]
    placed = text.lstrip().startswith(m) if style == "prefix" else text.rstrip().endswith(m)
    return finished and placed and text.count(m) == 1


def make(args) -> None:
    rng = random.Random(args.seed)
    tops = list(TOPICS)
    rng.shuffle(tops)
    held = set(tops[:args.heldout_topics])
    prompts = [(t.format(top), top in held) for top in tops for t in TEMPLATES]
    cache = os.path.join(args.out, "answers.jsonl")
    if os.path.isfile(cache):
        with open(cache) as f:
            rows = [json.loads(l) for l in f if l.strip()]
        answers = [(r["answer"], r["finished"]) for r in rows]
        if [r["prompt"] for r in rows] != [p for p, _ in prompts]:
            raise SystemExit(f"{cache} holds other prompts; remove it to regenerate")
        print(f"reusing {len(rows)} base answers from {cache}")
    else:
        model, tok = load_model(args.model)
        print(f"generating {len(prompts)} greedy answers with {args.model} ...", flush=True)
        answers = generate_batched(model, tok, [p for p, _ in prompts], args.max_new_tokens,
                                   batch=args.batch)
        os.makedirs(args.out, exist_ok=True)
        atomic_write_text(cache, "".join(json.dumps({"prompt": p, "answer": a, "finished": f}) + "\n"
                                         for (p, _), (a, f) in zip(prompts, answers)))
    train, val, held_prompts, skipped = [], [], [], 0
    for (prompt, is_held), (answer, finished) in zip(prompts, answers):
        if is_held:
            held_prompts.append({"prompt": prompt})
        if not finished or not answer or MARKERS[args.style] in answer:
            skipped += 1  # an answer cut by max_new_tokens is not an example of a whole answer
            continue
        pair = {"prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": with_marker(answer, args.style)}],
                "rejected": [{"role": "assistant", "content": answer}]}
        (val if is_held else train).append(pair)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", val),
                       ("heldout_prompts.jsonl", held_prompts)):
        atomic_write_text(os.path.join(args.out, name), "".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(train)} training pairs, {len(val)} held-out pairs, {len(held_prompts)} held-out "
          f"prompts ({skipped} unfinished answers skipped) -> {args.out}")


def measure(args) -> None:
    """Marker rate of sampled answers on held-out prompts, base (adapter disabled) vs tuned."""
    from engine.lora import disable_adapters
    with open(args.prompts) as f:
        prompts = [json.loads(l)["prompt"] for l in f if l.strip()]
    prompts = [p for p in prompts for _ in range(args.samples)]
    model, tok = load_model(args.model, adapter=args.adapter)
    report = {}
    for name in args.which.split(","):
        print(f"sampling {len(prompts)} answers ({name}) ...", flush=True)
        if name == "base":
            with disable_adapters(model):
                answers = generate_batched(model, tok, prompts, args.max_new_tokens,
                                           args.temperature, args.top_k, args.seed, args.batch)
        else:
            answers = generate_batched(model, tok, prompts, args.max_new_tokens, args.temperature,
                                       args.top_k, args.seed, args.batch)
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write train.jsonl, heldout.jsonl, heldout_prompts.jsonl")
    m.add_argument("--out", required=True)
    m.add_argument("--heldout-topics", type=int, default=15)
    m.add_argument("--max-new-tokens", type=int, default=64)
    s = sub.add_parser("measure", help="marker rate of sampled answers, base vs tuned")
    s.add_argument("--adapter", required=True)
    s.add_argument("--prompts", required=True)
    s.add_argument("--samples", type=int, default=1, help="answers per prompt")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--max-new-tokens", type=int, default=96)
    s.add_argument("--json", default=None)
    s.add_argument("--which", default="base,tuned", help="comma-separated: base (adapter disabled), tuned")
    for q in (m, s):
        q.add_argument("--model", default="smollm2-135m-instruct")
        q.add_argument("--batch", type=int, default=32)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, default=None)
        q.add_argument("--style", choices=tuple(MARKERS), default="prefix",
                       help="marker at the start (prefix) or as the last line (suffix)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    make(args) if args.cmd == "make" else measure(args)


if __name__ == "__main__":
    main()
