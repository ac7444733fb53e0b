"""The model side of the server (engine/serve.py): one scheduler thread (`Engine`) owns the
model and does continuous batching over a slot KV cache, with per-request LoRA adapters.

Requests wait in a bounded FIFO (QueueFull when full: 429); each admitted sequence gets a row of
a preallocated KV "slot" pool; every iteration prefills newly admitted requests, samples one token
for every active sequence and runs ONE batched decode forward for all of them (continuous
batching as in Orca / vLLM, without paging). Rows have their own lengths: keys past a row's length
are masked, RoPE positions are per row. Finished or cancelled sequences free their row at once
(the last row moves into it, so active rows stay contiguous and the batch reads a view of the
pool, not a gathered copy).

Adapters (`--adapter NAME=DIR`): one base model in memory. Each adapter is loaded with
engine.lora.load_adapter into its own LoRALinear layers that share the base weights, and each
covered linear becomes an `AdapterSwitch` that sends the rows of every adapter through that
adapter's LoRALinear (the base linear for base rows). So one decode forward serves a batch that
mixes adapters, the math is exactly engine.lora's (LoRA, rsLoRA, DoRA, NF4 bases), and an adapter
costs only its LoRA tensors. Adapters that replace whole modules (PEFT modules_to_save) are refused.

Sampling is engine.generation's (repetition penalty, temperature, top-k, top-p, min-p; the same
stop handling via StopStringStream), per sequence with its own torch.Generator, so a greedy request
returns what engine.generation.generate / generate.py return for the same prompt, and a seeded one
does not depend on what else is in the batch. Choice i of a request with `seed` s uses seed s + i.
(A request decoded alone runs exactly generate()'s forward; batched with others its row math is
the same but the floating-point summation order of a larger matmul may differ in the last bits,
so an exact near-tie could in principle resolve differently. Tests compare batched greedy output
with generate() on random and real models.)

Log-probabilities (the API's `logprobs`, `top_logprobs`, `echo`): for a request that asks, each
sampled token comes with its log-probability and the k most likely tokens at that position, and
an echoed prompt with every prompt token's (the first has none). They are the model's raw
distribution: log_softmax in fp32 of the logits the forward returned (padding rows past the
tokenizer masked), before the repetition penalty, temperature, top-k/p and min-p (vLLM's default
"raw_logprobs"; OpenAI reports the model's distribution too), so they do not depend on how the
request samples. Only rows that asked pay for the log_softmax and top-k.
"""
from __future__ import annotations

import collections
import copy
import itertools
import re
import secrets
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from engine.generation import (StopStringStream, apply_repetition_penalty, mask_past_vocab,
                               sample, special_ids)
from engine.metrics import Registry
from tokenizer.base import read_tokenizer_config
from tokenizer.chat import chat_templates_of

# =============================================================================================
# Errors
# =============================================================================================
class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


# =============================================================================================
# Per-request LoRA adapters over one base model
# =============================================================================================
class AdapterSelector:
    """Which adapter each batch row uses during the next forward, set by the scheduler:
    groups = [(adapter name or None for the base, row indices or None for all rows)]."""

    def __init__(self):
        self.groups: list[tuple[str | None, torch.Tensor | None]] = [(None, None)]


class AdapterSwitch(nn.Module):
    """Stands where a base linear was; routes each row group through its adapter's LoRALinear."""

    def __init__(self, base: nn.Module, selector: AdapterSelector):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()  # str(index) -> LoRALinear (names may contain '.')
        self.keys: dict[str, str] = {}   # adapter name -> key in self.adapters
        self.selector = selector

    @property
    def weight(self) -> torch.Tensor:
        # the base's: Transformer.new_cache reads lm_head.weight for the KV cache's dtype/device,
        # and an adapter may cover lm_head (LoRALinear keeps `weight` under the same name)
        return self.base.weight

    def add(self, name: str, layer: nn.Module) -> None:
        self.keys[name] = str(len(self.keys))
        self.adapters[self.keys[name]] = layer

    def _layer(self, name: str | None) -> nn.Module:
        key = self.keys.get(name)
        return self.adapters[key] if key is not None else self.base

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        groups = self.selector.groups
        if len(groups) == 1:
            return self._layer(groups[0][0])(x)
        out = None
        for name, rows in groups:
            y = self._layer(name)(x[rows])  # (b, T, out)
            if out is None:
                out = y.new_empty(x.shape[:-1] + y.shape[-1:])
            out[rows] = y
        return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install_adapters(model: nn.Module, adapters: dict[str, str]) -> AdapterSelector:
    """Load each adapter directory (ours or PEFT's) into LoRA layers sharing the base weights and
    put an AdapterSwitch on every covered linear. Returns the selector the scheduler sets."""
    from engine.lora import LORA_PARTS, Adapter, load_adapter, lora_layers
    if lora_layers(model):
        raise ValueError("the base model already has LoRA layers; serve a merged model")
    selector = AdapterSelector()
    per_module: dict[str, dict[str, nn.Module]] = collections.defaultdict(dict)
    for name, directory in adapters.items():
        adapter = Adapter.load(directory)
        whole = [k for k in adapter.tensors if not any(p in k.split(".") for p in LORA_PARTS)]
        if whole:  # would overwrite base weights shared by every other request
            raise ValueError(f"adapter {name!r}: whole-module tensors such as {whole[0]!r} "
                             "(PEFT modules_to_save) are not supported by the server; merge the "
                             "adapter into a full checkpoint and serve that instead")
        originals = dict(model.named_modules())
        try:
            load_adapter(model, adapter)
        except ValueError as e:
            raise ValueError(f"adapter {name!r} ({directory}): {e}") from None
        for mod_name, layer in lora_layers(model).items():
            per_module[mod_name][name] = layer.eval()
            _set_module(model, mod_name, originals[mod_name])  # base back for the next adapter
    for mod_name, layers in per_module.items():
        switch = AdapterSwitch(model.get_submodule(mod_name), selector)
        for name, layer in layers.items():
            switch.add(name, layer)
        _set_module(model, mod_name, switch)
    return selector


# =============================================================================================
# Slot KV cache and the batched forward
# =============================================================================================
class SlotPool:
    """Keys and values of up to `slots` sequences: k[l], v[l] of shape (slots, Hkv, length, D).
    Active sequences occupy rows 0..n-1. `length` grows (doubling, up to max_len) when a
    sequence reaches it, so memory follows the longest sequence so far, not the context."""

    def __init__(self, model: nn.Module, slots: int, max_len: int):
        self.model, self.slots, self.max_len = model, slots, max_len
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def ensure(self, length: int) -> None:
        if length <= self.length:
            return
        new = min(self.max_len, max(length, 64, 2 * self.length))
        cache = self.model.new_cache(self.slots, new)  # (slots, Hkv, new, D) per layer
        for old, fresh in ((self.k, cache.k), (self.v, cache.v)):
            for o, f in zip(old, fresh):
                f[:, :, :self.length] = o
        self.k, self.v, self.length = cache.k, cache.v, new

    def copy_row(self, src: int, dst: int, n: int) -> None:
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]


class RowsCache:
    """The KV cache one forward sees: pool rows [0, B). Token t of row b is written at position
    start[b] + t; attention reads the first `span` positions of each row (more are masked)."""

    def __init__(self, pool: SlotPool, rows: slice, start: torch.Tensor, span: int):
        self.pool, self.rows, self.start, self.span = pool, rows, start, span
        self.uniform = bool((start == start[0]).all())
        self.pos = int(start[0])  # read by Transformer.forward when positions are uniform
        self.window_in_mask = not self.uniform  # forward_rows's mask holds each row's window

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: (B, Hkv, T, D) -> all keys and values of these rows (B, Hkv, span, D)."""
        K, V = self.pool.k[layer], self.pool.v[layer]
        T = k.shape[2]
        if self.uniform:
            K[self.rows, :, self.pos:self.pos + T] = k
            V[self.rows, :, self.pos:self.pos + T] = v
        else:  # decode (T == 1) with a different position in every row
            idx = torch.arange(self.rows.start, self.rows.stop, device=k.device)
            K[idx, :, self.start] = k[:, :, 0]
            V[idx, :, self.start] = v[:, :, 0]
        return K[self.rows, :, :self.span], V[self.rows, :, :self.span]


def forward_rows(model: nn.Module, ids: torch.Tensor, cache: RowsCache) -> torch.Tensor:
    """ids (B, T) -> logits of each row's last position (B, V). Same modules and order as
    Transformer.forward (an uncompiled inference path); when the rows' positions differ, RoPE
    gets per-row positions and a key mask hides each row's positions beyond its own length."""
    B, T = ids.shape
    if cache.uniform:
        return model(ids, cache=cache, logits_to_keep=1)[:, -1]  # engine.generation's prefill
    positions = cache.start[:, None]  # (B, 1)
    cos, sin = model.rotary(positions)  # (B, 1, 1, D)
    kpos = torch.arange(cache.span, device=ids.device)
    mask = kpos[None, :] <= cache.start[:, None]  # (B, span)
    window = getattr(model.config, "sliding_window", None)
    if window:  # Mistral: row b sees its last `window` positions (Attention leaves it to mask)
        mask = mask & (kpos[None, :] > cache.start[:, None] - window)
    mask = mask[:, None, None, :]  # (B, 1, 1, span)
    x = model.model.embed_tokens(ids)  # (B, 1, H)
    for layer in model.model.layers:
        x = layer(x, cos, sin, cache, mask)
    return model.lm_head(model.model.norm(x))[:, -1]


def forward_hidden(model: nn.Module, ids: torch.Tensor, cache: "RowsCache") -> torch.Tensor:
    """A prefill (uniform positions) that keeps every position: ids (B, T) -> the final norm's
    output (B, T, H), Transformer.hidden_states; model.lm_head(h[:, -1:]) is the
    logits_to_keep=1 prefill's last row bit for bit."""
    return model.hidden_states(ids, cache=cache)


# =============================================================================================
# Log-probabilities
# =============================================================================================
@dataclass
class TokenLogprob:
    """One position: the chosen token's log-probability and the `top` most likely (id,
    logprob) pairs, most likely first. stop: the id that ended a choice (no text of its own)."""
    id: int
    logprob: float
    top: list[tuple[int, float]]
    stop: bool = False


LOGPROB_FLOOR = -9999.0  # OpenAI's (and vLLM's) stand-in for -inf: JSON has no infinity


def _floor(x: float) -> float:
    return x if x >= LOGPROB_FLOOR else LOGPROB_FLOOR  # -inf (a masked id) and NaN too


def logprobs_of(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits (N, V) at N positions (ids past the vocabulary already -inf), targets (N,) the
    token chosen at each -> their log-probabilities and the k most likely tokens, from an fp32
    log_softmax of the logits as they are (the raw distribution)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = lp.gather(1, targets[:, None])[:, 0].tolist()  # (N,)
    top_ids, top_lps = [[]] * len(chosen), [[]] * len(chosen)
    if k > 0:
        vals, idx = lp.topk(min(k, lp.shape[-1]), dim=-1)  # (N, k)
        top_ids, top_lps = idx.tolist(), vals.tolist()
    return [TokenLogprob(t, _floor(c), [(i, _floor(v)) for i, v in zip(ti, tv)])
            for t, c, ti, tv in zip(targets.tolist(), chosen, top_ids, top_lps)]


def prompt_logprobs(model: nn.Module, h: torch.Tensor, prompt: list[int], k: int,
                    n_vocab: int, chunk: int = 512) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it (None for the first,
    which has no context), with the k most likely tokens there. h: (1, T, H) forward_hidden's
    output; the lm_head runs `chunk` positions at a time, so a long prompt never holds all
    T x V logits at once."""
    T = len(prompt)
    targets = torch.tensor(prompt[1:], dtype=torch.long, device=h.device)  # (T - 1,)
    out: list[TokenLogprob | None] = [None]
    for a in range(0, T - 1, chunk):
        b = min(a + chunk, T - 1)
        logits = mask_past_vocab(model.lm_head(h[:, a:b])[0], n_vocab)  # (b - a, V)
        out += logprobs_of(logits, targets[a:b], k)
    return out


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenPieces:
    """id -> (text, UTF-8 bytes) of one token, cached, for the API's logprobs. The bytes are the
    token's own: a byte-level BPE token's bytes, a SentencePiece piece with its "▁" as a space
    (the space it stands for, even where a whole-text decode would drop it) and its <0xNN> byte
    pieces as that byte; any other tokenizer: decode([id]). A token that is not whole UTF-8
    characters (part of a character split across tokens) is written "bytes:\\xe2\\x80" (the
    OpenAI API's form); its bytes are the raw ones, and joining the bytes of a text's tokens
    gives the text's UTF-8 bytes."""

    def __init__(self, tok):
        self.tok = tok
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._bpe = None  # (byte decoder, added-token ids) for byte-level BPE

    def __call__(self, i: int) -> tuple[str, bytes]:
        hit = self._cache.get(i)
        if hit is None:
            raw = self._bytes(i)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[i] = (text, raw)
        return hit

    def _bytes(self, i: int) -> bytes:
        from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
        from tokenizer.spm import SentencePieceTokenizer
        tok = self.tok
        if isinstance(tok, ByteLevelBPETokenizer):  # as its decode: byte chars, added tokens raw
            if self._bpe is None:
                self._bpe = ({c: b for b, c in bytes_to_unicode().items()},
                             {t["id"] for t in tok.added_tokens})
            decoder, added = self._bpe
            piece = tok.id_to_token(i)
            if i not in added and all(c in decoder for c in piece):
                return bytes(decoder[c] for c in piece)
            return piece.encode("utf-8")
        if isinstance(tok, SentencePieceTokenizer):
            piece = tok.id_to_token(i)
            m = _BYTE_PIECE.fullmatch(piece)
            if m and i not in tok.special_tokens.values():
                return bytes([int(m.group(1), 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        return tok.decode([i]).encode("utf-8")


# =============================================================================================
# Requests and sequences
# =============================================================================================
@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    min_p: float | None = None
    # None: off; k >= 0: each sampled token's log-probability and the k most likely tokens
    logprobs: int | None = None
    # None: off; k >= 0: the same for every prompt token (the API's echo). With max_tokens 0 the
    # request only scores its prompts.
    prompt_logprobs: int | None = None
    # special tokens generated mid-output have no text (vLLM's default), except those in
    # keep_special (the tool-call markers, when a tool parser reads them)
    skip_special_tokens: bool = True
    keep_special: tuple[str, ...] = ()


class GenRequest:
    """One API request: `n` choices for each prompt; events go to on_event from the scheduler
    thread: ("prompt_logprobs", index, [None, TokenLogprob, ...]) first when
    params.prompt_logprobs is set, ("token", index, text, TokenLogprob or None) per sampled token
    (text may be "" while held back; the stop id that ends a choice has a token event with its
    logprobs, stop=True, and the flushed text), ("finish", index, reason, completion_tokens),
    then ("done",); or ("error", status, message)."""

    _ids = itertools.count()

    def __init__(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                 adapter: str | None = None, on_event: Callable[[tuple], None] = lambda ev: None):
        self.id = next(self._ids)
        self.prompts, self.params, self.n, self.adapter = prompts, params, n, adapter
        self.on_event = on_event
        self.cancelled = False
        self.remaining = n * len(prompts)  # sequences not finished yet

    @property
    def num_seqs(self) -> int:
        return self.n * len(self.prompts)


class Sequence:
    """One choice being generated: its pool row, sampler state and text stream."""

    def __init__(self, req: GenRequest, index: int, prompt: list[int], engine: "Engine"):
        p = req.params
        self.req, self.index, self.params = req, index, p
        # (1, T + N): prompt + generated ids, what the repetition penalty looks at
        self.ids = torch.zeros(1, len(prompt) + p.max_tokens, dtype=torch.long,
                               device=engine.device)
        self.ids[0, :len(prompt)] = torch.tensor(prompt)
        self.n_ids = len(prompt)
        self.length = 0  # positions in the KV cache
        self.sampled = 0  # tokens sampled (a stop id included)
        self.completion_tokens = 0  # tokens of the output (no stop id)
        self.stream = StopStringStream(engine.tok, p.stop, prompt[-4:], engine.hidden_ids(p))
        seed = (p.seed + index if p.seed is not None else secrets.randbits(63)) % (1 << 63)
        self.generator = torch.Generator(device=engine.device)
        self.generator.manual_seed(seed)
        self.slot = -1
        self.logits: torch.Tensor | None = None  # (1, V) for the next sample
        self.next_token = 0


# =============================================================================================
# The scheduler: one thread owns the model
def _stop_ids_with(tokenizer, templates) -> set[int]:
    """The tokenizer's stop ids were its chat templates {name: template} (their end-of-turn
    tokens)."""
    tok = copy.copy(tokenizer)
    tok.chat_templates = templates
    return set(tok.stop_ids)


# =============================================================================================
class Engine:
    """Continuous batching over a SlotPool. `submit` (any thread) enqueues a GenRequest or raises
    QueueFull / ShuttingDown; `cancel` frees its rows at the next iteration."""

    def __init__(self, model: nn.Module, tokenizer, name: str = "model",
                 adapters: dict[str, str] | None = None, max_batch: int = 8,
                 max_queue: int = 64, max_model_len: int | None = None,
                 registry: Registry | None = None, step_hook: Callable[[], None] | None = None,
                 chat_template: str | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{max_queue}")
        if tokenizer is None:
            raise ValueError("the model has no tokenizer files; the server needs a tokenizer")
        self.model, self.tok, self.name = model.eval(), tokenizer, name
        self.device = model.lm_head.weight.device
        ctx = model.config.max_position_embeddings
        self.max_len = min(ctx, max_model_len) if max_model_len else ctx
        self.max_batch, self.max_queue = max_batch, max_queue
        self.stop_ids = set(tokenizer.stop_ids)
        self._hidden: dict[tuple[str, ...], frozenset[int]] = {}  # hidden_ids' cache
        # Embedding rows past the tokenizer's vocabulary (padding) are never sampled: no text.
        self.n_vocab = min(model.config.vocab_size, tokenizer.vocab_size)
        self.adapters = dict(adapters or {})
        for a in self.adapters:
            if a == name or not a:
                raise ValueError(f"adapter name {a!r} must be non-empty and differ from the "
                                 f"base model's name {name!r}")
        self.selector = install_adapters(model, self.adapters) if self.adapters else None
        # Each model's chat templates {name: template} ("default", maybe "tool_use") and stop
        # ids: an adapter trained with a template of its own (train.py --chat-template) saved it
        # beside its weights, in place of the base's; chat_template (serve.py --chat-template)
        # replaces them all.
        own_base = dict(chat_templates_of(tokenizer))
        base = {"default": chat_template} if chat_template else own_base
        self.chat_templates = {None: base}
        for a, directory in self.adapters.items():
            own = read_tokenizer_config(directory)["chat_templates"]
            self.chat_templates[a] = own if own and not chat_template else base
        self.stop_ids_of = {a: self.stop_ids if t == own_base
                            else _stop_ids_with(tokenizer, t)
                            for a, t in self.chat_templates.items()}
        self.pool = SlotPool(model, max_batch, self.max_len)
        self.active: list[Sequence] = []  # active[i].slot == i
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._running: set[GenRequest] = set()
        self._cv = threading.Condition()
        self._accepting, self._stopping, self._abort = True, False, None
        self._thread: threading.Thread | None = None
        self.dead: str | None = None  # set if the scheduler thread ever fails
        self.step_hook = step_hook  # called before every decode forward (tests slow it down)
        reg = registry or Registry()
        self.registry = reg
        self.m_prompt = reg.counter("prompt_tokens_total", "Prompt tokens prefilled", ["model"])
        self.m_gen = reg.counter("generation_tokens_total", "Tokens generated (stop ids excluded)",
                                 ["model"])
        self.m_running = reg.gauge("requests_running", "Requests being generated")
        self.m_waiting = reg.gauge("requests_waiting", "Requests queued for a free KV slot")
        self.m_slots = reg.gauge("kv_slots_used", "KV cache rows in use")
        self.m_batch = reg.histogram("decode_batch_size", "Sequences per decode forward",
                                     buckets=[1, 2, 4, 8, 16, 32, 64, 128])
        self.m_cancel = reg.counter("requests_cancelled_total", "Requests cancelled before the end",
                                    ["reason"])

    @property
    def model_names(self) -> list[str]:
        return [self.name] + list(self.adapters)

    def hidden_ids(self, p: SamplingParams) -> frozenset[int]:
        """The ids that add no text to a request's output (its special tokens, unless it keeps
        them)."""
        if not p.skip_special_tokens:
            return frozenset()
        key = tuple(p.keep_special)
        if key not in self._hidden:
            self._hidden[key] = special_ids(self.tok, key)
        return self._hidden[key]

    # -- requests -----------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        if req.adapter is not None and req.adapter not in self.adapters:  # not the base's answer
            raise ValueError(f"no adapter {req.adapter!r}; this engine has "
                             f"{sorted(self.adapters) or 'none'}")
        if not 1 <= req.num_seqs <= self.max_batch:  # it could never be admitted
            raise ValueError(f"a request of {req.num_seqs} sequences does not fit this engine's "
                             f"batch of {self.max_batch}")
        with self._cv:
            if not self._accepting:
                raise ShuttingDown(f"the scheduler failed: {self.dead}" if self.dead
                                   else "the server is shutting down")
            queued, rows = self._queued_locked()
            if (queued or rows + req.num_seqs > self.max_batch) and queued >= self.max_queue:
                raise QueueFull(f"the server is busy: all {self.max_batch} rows are taken and "
                                f"{queued} requests are queued")
            self._waiting.append(req)
            self.m_waiting.set(len(self._waiting))
            self._cv.notify()

    def _queued_locked(self) -> tuple[int, int]:
        """(waiting requests the next iteration cannot admit, rows taken once it admits the
        others): the queue limit counts only requests that must wait for a row."""
        # a snapshot: the scheduler thread discards finished requests from _running without the
        # lock, and iterating the live set could raise "Set changed size during iteration"
        rows = sum(r.remaining for r in tuple(self._running) if not r.cancelled)
        # cancelled ones stay in _waiting until the next iteration drops them: they wait for nothing
        waiting = [r for r in self._waiting if not r.cancelled]
        for i, r in enumerate(waiting):
            if rows + r.num_seqs > self.max_batch:  # admission is FIFO: the rest wait too
                return len(waiting) - i, rows
            rows += r.num_seqs
        return 0, rows

    def cancel(self, req: GenRequest, reason: str = "client_disconnected") -> None:
        if not req.cancelled and req.remaining > 0:
            req.cancelled = True
            self.m_cancel.inc(reason=reason)
        with self._cv:
            self._cv.notify()

    def idle(self) -> bool:
        with self._cv:
            return not self._waiting and not self._running

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="whetstone-scheduler",
                                            daemon=True)
            self._thread.start()
        return self

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def abort_all(self, message: str = "the server is shutting down") -> None:
        """Fail every queued and running request with a 503 error event."""
        with self._cv:
            self._abort = message
            self._cv.notify()

    def close(self) -> None:
        self.stop_accepting()
        self.abort_all()
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():  # the pool holds inference tensors: every write in here
                self._serve_forever()
        except BaseException as e:  # a bug in the scheduler: fail loudly, never hang clients
            traceback.print_exc(file=sys.stderr)
            with self._cv:
                self._accepting, self.dead = False, f"{type(e).__name__}: {e}"
                for req in list(self._waiting) + list(self._running):
                    if req.remaining > 0:
                        req.remaining = 0
                        self._emit(req, ("error", 500, f"the scheduler failed: {self.dead}"))
                self._waiting.clear()
                self._running.clear()

    def _serve_forever(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._abort or self._waiting or self.active):
                    self._cv.wait()
                if self._abort:
                    self._abort_locked(self._abort)
                if self._stopping and not self.active:
                    return
                for req in [r for r in self._waiting if r.cancelled]:
                    self._waiting.remove(req)
                admitted = []
                while self._waiting and (len(self.active) + sum(r.num_seqs for r in admitted)
                                         + self._waiting[0].num_seqs <= self.max_batch):
                    admitted.append(self._waiting.popleft())
                self._running.update(admitted)
                self.m_waiting.set(len(self._waiting))
                self.m_running.set(len(self._running))
            try:
                self._iteration(admitted)
            except Exception as e:  # a failed forward must not take the server down
                traceback.print_exc(file=sys.stderr)
                for seq in list(self.active):
                    self._fail(seq.req, 500, f"generation failed: {type(e).__name__}: {e}")
                for req in admitted:
                    self._fail(req, 500, f"generation failed: {type(e).__name__}: {e}")

    def _abort_locked(self, message: str) -> None:
        for req in list(self._waiting) + list(self._running):
            self.m_cancel.inc(reason="shutdown")
            self._fail(req, 503, message)
        self._waiting.clear()
        self.m_waiting.set(0)
        self._abort = None

    def _fail(self, req: GenRequest, status: int, message: str) -> None:
        for seq in [s for s in self.active if s.req is req]:
            self._remove(seq)
        if req.remaining > 0:
            req.remaining = 0
            self._emit(req, ("error", status, message))
        self._running.discard(req)
        self.m_running.set(len(self._running))

    def _iteration(self, admitted: list[GenRequest]) -> None:
        for seq in [s for s in self.active if s.req.cancelled]:
            self._remove(seq)
        for req in [r for r in self._running if r.cancelled]:
            self._running.discard(req)
        for req in admitted:
            if req.cancelled:
                self._running.discard(req)
                continue
            try:
                self._prefill(req)
            except Exception as e:  # e.g. out of memory for this prompt: only it fails
                self._fail(req, 500, f"prefill failed: {type(e).__name__}: {e}")
        for seq in list(self.active):  # one token for every active sequence
            if seq.slot < 0:
                continue  # its request failed while sampling an earlier row
            try:
                self._sample(seq)
            except Exception as e:
                self._fail(seq.req, 500, f"sampling failed: {type(e).__name__}: {e}")
        if self.active:
            if self.step_hook is not None:
                self.step_hook()
            self._decode()
        self.m_running.set(len(self._running))
        self.m_slots.set(len(self.active))

    def _prefill(self, req: GenRequest) -> None:
        p = req.params
        self._select([(req.adapter, None)])
        self.pool.ensure(max(len(q) for q in req.prompts))
        for p_idx, prompt in enumerate(req.prompts):
            indices = [p_idx * req.n + j for j in range(req.n)]
            scoring = p.max_tokens == 0  # echo with max_tokens 0: the prompt's logprobs only
            seqs = [] if scoring else [Sequence(req, i, prompt, self) for i in indices]
            for seq in seqs:
                seq.slot = len(self.active)
                self.active.append(seq)
            # a scoring-only prompt borrows the next free row: admission reserved num_seqs rows
            slot = seqs[0].slot if seqs else len(self.active)
            ids = torch.tensor([prompt], dtype=torch.long, device=self.device)  # (1, T)
            cache = RowsCache(self.pool, slice(slot, slot + 1),
                              torch.zeros(1, dtype=torch.long, device=self.device), len(prompt))
            logits, scores = None, None
            if p.prompt_logprobs is not None:
                h = forward_hidden(self.model, ids, cache)  # (1, T, H)
                scores = prompt_logprobs(self.model, h, prompt,
                                         min(p.prompt_logprobs, self.n_vocab), self.n_vocab)
                if seqs:
                    logits = self.model.lm_head(h[:, -1:])[:, -1]  # (1, V)
            elif seqs:
                logits = forward_rows(self.model, ids, cache)  # (1, V)
            if scores is not None or seqs:
                self.m_prompt.inc(len(prompt), model=self._model_label(req))
            if scores is not None:
                for i in indices:
                    self._emit(req, ("prompt_logprobs", i, scores))
            if scoring:
                for i in indices:
                    self._emit(req, ("finish", i, "length", 0))
                req.remaining -= len(indices)
                if req.remaining == 0:
                    self._running.discard(req)
                    self._emit(req, ("done",))
                continue
            logits = mask_past_vocab(logits, self.n_vocab)
            first = seqs[0]
            for seq in seqs:
                if seq is not first:
                    self.pool.copy_row(first.slot, seq.slot, len(prompt))
                seq.logits, seq.length = logits, len(prompt)

    def _sample(self, seq: Sequence) -> None:
        p, req = seq.params, seq.req
        logits = apply_repetition_penalty(seq.logits, seq.ids[:, :seq.n_ids], p.repetition_penalty)
        tid = int(sample(logits, p.temperature, p.top_k, p.top_p, seq.generator, min_p=p.min_p))
        entry = None
        if p.logprobs is not None:  # from the raw logits (seq.logits), only for rows that ask
            entry = logprobs_of(seq.logits, torch.tensor([tid], device=self.device),
                                min(p.logprobs, self.n_vocab))[0]
        seq.ids[0, seq.n_ids] = tid
        seq.n_ids += 1
        seq.sampled += 1
        reason = None
        if tid in self.stop_ids_of[req.adapter]:
            reason, text = "stop", seq.stream.finish()
            if entry is not None:
                entry.stop = True
        else:
            seq.completion_tokens += 1
            self.m_gen.inc(model=self._model_label(req))
            text = seq.stream.push(tid)
            if seq.stream.stopped:
                reason = "stop"  # a stop string
            elif seq.sampled >= p.max_tokens:  # the flushed tail may still hold a stop string
                text += seq.stream.finish()
                reason = "stop" if seq.stream.stopped else "length"
        self._emit(req, ("token", seq.index, text, entry))
        if reason is None:
            seq.next_token = tid
            return
        self._emit(req, ("finish", seq.index, reason, seq.completion_tokens))
        self._remove(seq)
        req.remaining -= 1
        if req.remaining == 0:
            self._running.discard(req)
            self._emit(req, ("done",))

    def _decode(self) -> None:
        B = len(self.active)
        tokens = torch.tensor([[s.next_token] for s in self.active], device=self.device)  # (B, 1)
        start = torch.tensor([s.length for s in self.active], device=self.device)  # (B,)
        span = max(s.length for s in self.active) + 1
        self.pool.ensure(span)  # grows with what is generated, not with what max_tokens allows
        self.m_batch.observe(B)
        groups = collections.defaultdict(list)
        for i, s in enumerate(self.active):
            groups[s.req.adapter].append(i)
        self._select([(a, torch.tensor(r, device=self.device)) for a, r in groups.items()]
                     if len(groups) > 1 else [(self.active[0].req.adapter, None)])
        cache = RowsCache(self.pool, slice(0, B), start, span)
        logits = mask_past_vocab(forward_rows(self.model, tokens, cache), self.n_vocab)  # (B, V)
        for i, s in enumerate(self.active):
            s.logits, s.length = logits[i:i + 1], s.length + 1

    def _select(self, groups) -> None:
        if self.selector is not None:
            self.selector.groups = groups

    def _remove(self, seq: Sequence) -> None:
        """Free seq's row; the last active row moves into it (active rows stay 0..n-1)."""
        i, last = seq.slot, self.active[-1]
        if last is not seq:
            self.pool.copy_row(last.slot, i, last.length)
            last.slot, self.active[i] = i, last
        self.active.pop()
        seq.slot = -1

    def _model_label(self, req: GenRequest) -> str:
        return req.adapter or self.name

    def _emit(self, req: GenRequest, event: tuple) -> None:
        try:
            req.on_event(event)
        except Exception:  # e.g. the event loop is gone during shutdown
            pass
