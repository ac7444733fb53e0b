"""Shared by the example experiments (dpo_marker.py, sft_pattern.py): a prompt set of templates
x topics with held-out topics, the base model's cached greedy answers to it, and batched chat
answering (engine.generation.generate_many: prompts of equal length decode together, which is
what makes a few hundred answers practical on a CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.config import atomic_write_text  # noqa: E402
from engine.generation import generate_many  # noqa: E402
from engine.hub import load_model  # noqa: E402
from tokenizer.chat import render_chat  # noqa: E402

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


def prompt_set(heldout_topics: int, seed: int) -> list[dict]:
    """[{"prompt", "topic", "heldout"}] for every template x topic; `heldout_topics` topics
    (seeded choice) are held out: none of their prompts is trained on."""
    tops = list(TOPICS)
    random.Random(seed).shuffle(tops)
    held = set(tops[:heldout_topics])
    return [{"prompt": t.format(top), "topic": top, "heldout": top in held}
            for top in tops for t in TEMPLATES]


def chat_ids(tok, prompt: str) -> list[int]:
    """A one-turn chat with the assistant's turn opened (the model's chat template)."""
    return tok.encode(render_chat(tok, [{"role": "user", "content": prompt}],
                                  add_generation_prompt=True), add_bos=False)


def answer(model, tok, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, seed: int = 0, batch: int = 32) -> list[tuple[str, bool]]:
    """(answer text, ended by a stop token rather than the length limit) per chat prompt."""
    t0 = time.time()
    res = generate_many(model, [chat_ids(tok, p) for p in prompts], max_new_tokens, temperature,
                        top_k, stop_ids=tok.stop_ids, batch_size=batch, vocab_size=tok.vocab_size,
                        generator=torch.Generator().manual_seed(seed),
                        progress=lambda d, n: print(f"  {d}/{n} answers, {time.time() - t0:.0f}s",
                                                    flush=True))
    return [(tok.decode(ids, skip_special=True).strip(), finished) for ids, finished in res]


def base_answers(out_dir: str, prompts: list[dict], model_name: str, max_new_tokens: int,
                 batch: int = 32) -> list[tuple[str, bool]]:
    """The base model's greedy answers to `prompts`, cached in out_dir/answers.jsonl."""
    cache = os.path.join(out_dir, "answers.jsonl")
    if os.path.isfile(cache):
        with open(cache) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if [r["prompt"] for r in rows] != [p["prompt"] for p in prompts]:
            raise SystemExit(f"{cache} holds other prompts; remove it to regenerate")
        print(f"reusing {len(rows)} base answers from {cache}")
        return [(r["answer"], r["finished"]) for r in rows]
    model, tok = load_model(model_name)
    print(f"generating {len(prompts)} greedy answers with {model_name} ...", flush=True)
    answers = answer(model, tok, [p["prompt"] for p in prompts], max_new_tokens, batch=batch)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(cache, "".join(json.dumps({"prompt": p["prompt"], "answer": a, "finished": f}) + "\n"
                                     for p, (a, f) in zip(prompts, answers)))
    return answers


def write_jsonl(path: str, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def answers_base_and_tuned(args, prompts: list[str], which=("base", "tuned")
                           ) -> dict[str, list[tuple[str, bool]]]:
    """Sampled answers to prompts from the base (adapter disabled) and the tuned model."""
    from engine.lora import disable_adapters
    model, tok = load_model(args.model, adapter=args.adapter)
    out = {}
    for name in which:
        print(f"sampling {len(prompts)} answers ({name}) ...", flush=True)
        with disable_adapters(model) if name == "base" else contextlib.nullcontext():
            out[name] = answer(model, tok, prompts, args.max_new_tokens, args.temperature,
                               args.top_k, args.seed, args.batch)
    return out


def cli(doc: str, make, measure, what: str, extra=None, argv=None) -> None:
    """`make --out DIR` (the data) and `measure --adapter A --prompts P` (what: the measured
    rate, base vs tuned); extra(make_parser, measure_parser) adds an example's own flags."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write train.jsonl, heldout.jsonl, heldout_prompts.jsonl")
    m.add_argument("--out", required=True)
    m.add_argument("--heldout-topics", type=int, default=15)
    m.add_argument("--max-new-tokens", type=int, default=64)
    s = sub.add_parser("measure", help=f"{what} of sampled answers, base vs tuned")
    s.add_argument("--adapter", required=True)
    s.add_argument("--prompts", required=True)
    s.add_argument("--samples", type=int, default=1, help="answers per prompt")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--json", default=None, help="report path (default: in the adapter directory)")
    for q in (m, s):
        q.add_argument("--model", default="smollm2-135m-instruct")
        q.add_argument("--batch", type=int, default=32)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, default=None)
    if extra is not None:
        extra(m, s)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    make(args) if args.cmd == "make" else measure(args)
