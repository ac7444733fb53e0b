"""OpenAI-compatible HTTP server: continuous batching over a slot KV cache, per-request LoRA
adapters, server-sent-event streaming, Prometheus /metrics. Standard library only (asyncio).

Follows the OpenAI API shapes as llama.cpp's tools/server and vLLM's entrypoints serve them
(shared/FORMATS.md section 7): POST /v1/completions, POST /v1/chat/completions (streamed as
`data: {json}` events ending in `data: [DONE]`), GET /v1/models, /health, /metrics; errors are
`{"error": {"message", "type", "param", "code"}}` with a 4xx status for bad input.

Three threads, one owner each:
- the asyncio event loop owns the sockets: a small HTTP/1.1 parser (Content-Length or chunked
  bodies, keep-alive, 100-continue, size limits, per-phase timeouts so that a slow client only
  ever holds its own connection), validation and responses;
- one scheduler thread (`Engine`) owns the model. Requests wait in a bounded FIFO (429 when
  full); each admitted sequence gets a row of a preallocated KV "slot" pool; every iteration
  prefills newly admitted requests, samples one token for every active sequence and runs ONE
  batched decode forward for all of them (continuous batching as in Orca / vLLM, without
  paging). Rows have their own lengths: keys past a row's length are masked, RoPE positions are
  per row. Finished or cancelled sequences free their row at once (the last row moves into it,
  so active rows stay contiguous and the batch reads a view of the pool, not a gathered copy);
- one tokenizer thread renders chat templates and encodes prompts off the event loop.

Adapters (`--adapter NAME=DIR`): one base model in memory. Each adapter is loaded with
engine.lora.load_adapter into its own LoRALinear layers that share the base weights, and each
covered linear becomes an `AdapterSwitch` that sends the rows of every adapter through that
adapter's LoRALinear (the base linear for base rows). So one decode forward serves a batch that
mixes adapters, the math is exactly engine.lora's (LoRA, rsLoRA, DoRA, NF4 bases), and an adapter
costs only its LoRA tensors. Adapters that replace whole modules (PEFT modules_to_save) are refused.

Sampling is engine.generation's (repetition penalty, temperature, top-k, top-p; the same stop
handling via StopStringStream), per sequence with its own torch.Generator, so a greedy request
returns what engine.generation.generate / generate.py return for the same prompt, and a seeded one
does not depend on what else is in the batch. Choice i of a request with `seed` s uses seed s + i.
(A request decoded alone runs exactly generate()'s forward; batched with others its row math is
the same but the floating-point summation order of a larger matmul may differ in the last bits,
so an exact near-tie could in principle resolve differently. Tests compare batched greedy output
with generate() on random and real models.)

Usage counts: prompt_tokens once per prompt (not per choice); completion_tokens are the output
tokens, without the stop id that ended a choice (as engine.generation counts them).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import http
import itertools
import json
import math
import secrets
import signal
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from engine.generation import StopStringStream, apply_repetition_penalty, sample
from engine.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from engine.metrics import Registry

# =============================================================================================
# Errors
# =============================================================================================
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "invalid_request_error",
               411: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 431: "invalid_request_error", 500: "server_error",
               503: "server_error", 505: "invalid_request_error"}


class APIError(Exception):
    """An error answered as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.close = close  # the connection cannot be reused (body not read, bad framing)

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


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
        return model(ids, cache=cache)[:, -1]  # exactly engine.generation's prefill / decode
    positions = cache.start[:, None]  # (B, 1)
    cos, sin = model.rotary(positions)  # (B, 1, 1, D)
    kpos = torch.arange(cache.span, device=ids.device)
    mask = (kpos[None, :] <= cache.start[:, None])[:, None, None, :]  # (B, 1, 1, span)
    x = model.model.embed_tokens(ids)  # (B, 1, H)
    for layer in model.model.layers:
        x = layer(x, cos, sin, cache, mask)
    return model.lm_head(model.model.norm(x))[:, -1]


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


class GenRequest:
    """One API request: `n` choices for each prompt; events go to on_event from the scheduler
    thread: ("token", index, text) per generated token (text may be "" while held back),
    ("finish", index, reason, completion_tokens), then ("done",); or ("error", status, message)."""

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
        self.stream = StopStringStream(engine.tok, p.stop, prompt[-4:])
        seed = (p.seed + index if p.seed is not None else secrets.randbits(63)) % (1 << 63)
        self.generator = torch.Generator(device=engine.device)
        self.generator.manual_seed(seed)
        self.slot = -1
        self.logits: torch.Tensor | None = None  # (1, V) for the next sample
        self.next_token = 0


# =============================================================================================
# The scheduler: one thread owns the model
# =============================================================================================
class Engine:
    """Continuous batching over a SlotPool. `submit` (any thread) enqueues a GenRequest or raises
    QueueFull / ShuttingDown; `cancel` frees its rows at the next iteration."""

    def __init__(self, model: nn.Module, tokenizer, name: str = "model",
                 adapters: dict[str, str] | None = None, max_batch: int = 8,
                 max_queue: int = 64, max_model_len: int | None = None,
                 registry: Registry | None = None, step_hook: Callable[[], None] | None = None):
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
        # Embedding rows past the tokenizer's vocabulary (padding) are never sampled: no text.
        self.n_vocab = min(model.config.vocab_size, tokenizer.vocab_size)
        self.adapters = dict(adapters or {})
        for a in self.adapters:
            if a == name or not a:
                raise ValueError(f"adapter name {a!r} must be non-empty and differ from the "
                                 f"base model's name {name!r}")
        self.selector = install_adapters(model, self.adapters) if self.adapters else None
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

    # -- requests -----------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if not self._accepting:
                raise ShuttingDown(f"the scheduler failed: {self.dead}" if self.dead
                                   else "the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are queued")
            self._waiting.append(req)
            self.m_waiting.set(len(self._waiting))
            self._cv.notify()

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
        self._select([(req.adapter, None)])
        self.pool.ensure(max(len(p) for p in req.prompts))
        for p_idx, prompt in enumerate(req.prompts):
            seqs = [Sequence(req, p_idx * req.n + j, prompt, self) for j in range(req.n)]
            for seq in seqs:
                seq.slot = len(self.active)
                self.active.append(seq)
            first = seqs[0]
            ids = torch.tensor([prompt], dtype=torch.long, device=self.device)  # (1, T)
            cache = RowsCache(self.pool, slice(first.slot, first.slot + 1),
                              torch.zeros(1, dtype=torch.long, device=self.device), len(prompt))
            logits = self._unpad(forward_rows(self.model, ids, cache))  # (1, V)
            self.m_prompt.inc(len(prompt), model=self._model_label(req))
            for seq in seqs:
                if seq is not first:
                    self.pool.copy_row(first.slot, seq.slot, len(prompt))
                seq.logits, seq.length = logits, len(prompt)

    def _sample(self, seq: Sequence) -> None:
        p, req = seq.params, seq.req
        logits = apply_repetition_penalty(seq.logits, seq.ids[:, :seq.n_ids], p.repetition_penalty)
        tid = int(sample(logits, p.temperature, p.top_k, p.top_p, seq.generator))
        seq.ids[0, seq.n_ids] = tid
        seq.n_ids += 1
        seq.sampled += 1
        reason = None
        if tid in self.stop_ids:
            reason, text = "stop", seq.stream.finish()
        else:
            seq.completion_tokens += 1
            self.m_gen.inc(model=self._model_label(req))
            text = seq.stream.push(tid)
            if seq.stream.stopped:
                reason = "stop"  # a stop string
            elif seq.sampled >= p.max_tokens:
                reason, text = "length", text + seq.stream.finish()
        self._emit(req, ("token", seq.index, text))
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
        window = getattr(self.model.config, "sliding_window", None)
        if window and span > window and B > 1 and not bool((start == start[0]).all()):
            # ops.attention places the window by the batch's last position: go row by row
            blocks = [slice(i, i + 1) for i in range(B)]
        else:
            blocks = [slice(0, B)]
        self.m_batch.observe(B)
        for rows in blocks:
            seqs = self.active[rows]
            groups = collections.defaultdict(list)
            for i, s in enumerate(seqs):
                groups[s.req.adapter].append(i)
            self._select([(a, torch.tensor(r, device=self.device)) for a, r in groups.items()]
                         if len(groups) > 1 else [(seqs[0].req.adapter, None)])
            s_span = span if len(blocks) == 1 else seqs[0].length + 1
            cache = RowsCache(self.pool, rows, start[rows], s_span)
            logits = self._unpad(forward_rows(self.model, tokens[rows], cache))  # (b, V)
            for i, s in enumerate(seqs):
                s.logits, s.length = logits[i:i + 1], s.length + 1

    def _unpad(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] > self.n_vocab:
            logits[:, self.n_vocab:] = float("-inf")
        return logits

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


# =============================================================================================
# OpenAI request validation -> (prompts, params)
# =============================================================================================
@dataclass
class Job:
    kind: str  # "completion" | "chat"
    model: str
    adapter: str | None
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _typed(body: dict, name: str, kind: str, default=None):
    """body[name] checked against kind ('int', 'number', 'bool', 'str'); absent/null -> default."""
    v = body.get(name)
    if v is None:
        return default
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, int) and not isinstance(v, bool)
          or isinstance(v, float) and math.isfinite(v),
          "bool": isinstance(v, bool),
          "str": isinstance(v, str)}[kind]
    if not ok:
        what = {"int": "an integer", "number": "a number", "bool": "a boolean",
                "str": "a string"}[kind]
        raise _bad(f"'{name}' must be {what}, got {json.dumps(v)[:40]}", name)
    return v


# Fields we accept only at their "off" value (the API has them; this server does not).
_UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
                "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
                "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                "response_format": (None, {"type": "text"})}


class API:
    """Turns a parsed JSON body into a Job (runs on the tokenizer thread)."""

    def __init__(self, engine: Engine, max_stop: int = 16):
        self.engine, self.tok, self.max_stop = engine, engine.tok, max_stop

    def prepare(self, kind: str, body) -> Job:
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        for name, off in _UNSUPPORTED.items():
            if body.get(name) not in off:
                raise _bad(f"'{name}' is not supported by this server", name)
        model = _typed(body, "model", "str", self.engine.name)
        if model not in self.engine.model_names:
            raise APIError(404, f"the model '{model}' does not exist; available: "
                           f"{', '.join(self.engine.model_names)}", "model", "model_not_found")
        if kind == "chat":
            prompts = [self._chat_ids(body.get("messages"))]
        else:
            prompts = self._prompt_ids(body.get("prompt"))
        n = _typed(body, "n", "int", 1)
        if not 1 <= n <= self.engine.max_batch:
            raise _bad(f"'n' must be between 1 and {self.engine.max_batch}, got {n}", "n")
        if n * len(prompts) > self.engine.max_batch:
            raise _bad(f"{len(prompts)} prompts x n={n} exceeds this server's batch of "
                       f"{self.engine.max_batch} sequences", "n")
        params = self._params(body, kind, max(len(p) for p in prompts))
        stream = _typed(body, "stream", "bool", False)
        opts = body.get("stream_options")
        if opts is not None and not (isinstance(opts, dict) and isinstance(
                opts.get("include_usage", False), bool)):
            raise _bad("'stream_options' must be an object like {\"include_usage\": true}",
                       "stream_options")
        if opts is not None and not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        adapter = model if model != self.engine.name else None
        return Job(kind, model, adapter, prompts, params, n, stream,
                   bool(opts and opts.get("include_usage")))

    def _params(self, body: dict, kind: str, prompt_len: int) -> SamplingParams:
        ctx = self.engine.max_len
        room = ctx - prompt_len
        max_tokens = _typed(body, "max_tokens", "int")
        if kind == "chat" and max_tokens is None:
            max_tokens = _typed(body, "max_completion_tokens", "int")
        if prompt_len >= ctx:
            raise _bad(f"this model's maximum context length is {ctx} tokens, but the prompt has "
                       f"{prompt_len} tokens", "messages" if kind == "chat" else "prompt",
                       "context_length_exceeded")
        if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest for chat
            max_tokens = min(16, room) if kind == "completion" else room
        if max_tokens < 1:
            raise _bad(f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
        if max_tokens > room:
            raise _bad(f"this model's maximum context length is {ctx} tokens; the prompt has "
                       f"{prompt_len} tokens and max_tokens asks for {max_tokens} more (at most "
                       f"{room} fit)", "max_tokens", "context_length_exceeded")
        temperature = _typed(body, "temperature", "number", 1.0)
        if temperature < 0:
            raise _bad(f"'temperature' must be >= 0 (0 = greedy), got {temperature}", "temperature")
        top_p = _typed(body, "top_p", "number", 1.0)
        if not 0 < top_p <= 1:
            raise _bad(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
        top_k = _typed(body, "top_k", "int", 0)
        if top_k < -1:
            raise _bad(f"'top_k' must be >= 1 (0 or -1 = off), got {top_k}", "top_k")
        penalty = _typed(body, "repetition_penalty", "number", 1.0)
        if penalty <= 0:
            raise _bad(f"'repetition_penalty' must be > 0 (1 = off), got {penalty}",
                       "repetition_penalty")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise _bad("'stop' must be a string or a list of strings", "stop")
        if len(stop) > self.max_stop:
            raise _bad(f"'stop' has {len(stop)} strings; at most {self.max_stop}", "stop")
        seed = _typed(body, "seed", "int")
        return SamplingParams(max_tokens, float(temperature), top_p if top_p < 1 else None,
                              top_k if top_k > 0 else None, float(penalty),
                              [s for s in stop if s], seed)

    def _prompt_ids(self, prompt) -> list[list[int]]:
        """prompt: a string, a list of strings, a list of token ids or a list of such lists."""
        if isinstance(prompt, str):
            return [self._encode(prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                prompts = [self._encode(p) for p in prompt]
            elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                prompts = [self._check_ids(prompt)]
            elif all(isinstance(p, list) and p for p in prompt):
                prompts = [self._check_ids(p) for p in prompt]
            else:
                prompts = None
            if prompts is not None:
                if len(prompts) > self.engine.max_batch:
                    raise _bad(f"{len(prompts)} prompts in one request; at most "
                               f"{self.engine.max_batch}", "prompt")
                return prompts
        raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a list "
                   "of token-id lists (non-empty)", "prompt")

    def _encode(self, text: str) -> list[int]:
        """generate.py's rule: the tokenizer's BOS default; an empty prompt starts a document."""
        ids = self.tok.encode(text)
        if not ids:
            start = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
            ids = [start] if start is not None else self.tok.encode("\n")
        return ids

    def _check_ids(self, ids: list) -> list[int]:
        V = self.engine.n_vocab
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids):
            raise _bad(f"token ids in 'prompt' must be integers in [0, {V})", "prompt")
        return list(ids)

    def _chat_ids(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list of {role, content} objects",
                       "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a string 'role'", "messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text"
                           and isinstance(p.get("text"), str) for p in content):
                    raise _bad(f"messages[{i}].content: only text parts are supported",
                               "messages")
                content = "".join(p["text"] for p in content)
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise _bad(f"messages[{i}].content must be a string or a list of text parts",
                           "messages")
            role = "system" if m["role"] == "developer" else m["role"]
            clean.append({"role": role, "content": content})
        try:
            return self.tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
        except ValueError as e:  # ChatTemplateError included
            raise _bad(f"cannot apply the chat template: {e}", "messages") from None


# =============================================================================================
# HTTP/1.1 over asyncio
# =============================================================================================
@dataclass
class Limits:
    max_body: int = 1 << 20  # bytes
    max_header: int = 16 << 10  # bytes of request line + headers
    header_timeout: float = 10.0  # s to receive a request's head once it has begun
    body_timeout: float = 30.0  # s to receive the body
    keepalive_timeout: float = 15.0  # s an idle connection is kept
    write_timeout: float = 30.0  # s a client may stall reading before it is dropped
    max_connections: int = 256


@dataclass
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    t0: float


class ClientGone(Exception):
    pass


ROUTES = {"/v1/completions": ("POST",), "/v1/chat/completions": ("POST",),
          "/v1/models": ("GET",), "/health": ("GET",), "/metrics": ("GET",)}


def route_of(path: str) -> str:
    if path in ROUTES:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


class _Conn:
    def __init__(self, task: asyncio.Task):
        self.task, self.idle = task, True


class Server:
    """The HTTP front of an Engine. `await start()` binds (port 0 = any free port; `.port`),
    `await serve()` runs until request_shutdown(), then finishes or cancels in-flight requests."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, limits: Limits | None = None,
                 log: Callable[[str], None] | None = None, shutdown_grace: float = 30.0):
        self.engine, self.host, self.port = engine, host, port
        self.shutdown_grace = shutdown_grace
        self.api_key = api_key or None
        self.limits = limits or Limits()
        self.log = log
        self.api = API(engine)
        self.created = int(time.time())
        self._tok_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._conns: set[_Conn] = set()
        self._server: asyncio.base_events.Server | None = None
        self._closing = False
        self._shutdown_grace: float | None = None
        self._shutdown_requested: asyncio.Event | None = None
        reg = engine.registry
        self.m_requests = reg.counter("http_requests_total", "HTTP requests answered",
                                      ["route", "status"])
        self.m_latency = reg.histogram("http_request_duration_seconds",
                                       "Time from a request's arrival to its last byte", ["route"])
        self.m_ttft = reg.histogram("time_to_first_token_seconds",
                                    "Time from a request's arrival to its first generated token",
                                    ["route"])
        self.m_errors = reg.counter("errors_total", "Error responses by OpenAI error type",
                                    ["type"])
        self.m_inprogress = reg.gauge("http_requests_in_progress", "HTTP requests being handled")
        self.m_conns = reg.gauge("http_connections", "Open client connections")

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._shutdown_requested = asyncio.Event()
        try:
            self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                      limit=self.limits.max_header)
        except OSError as e:
            raise OSError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        self.engine.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request_shutdown(self, grace: float | None = None) -> None:
        """Begin a graceful shutdown (call on the loop; signal handlers do): in-flight requests
        get `grace` seconds (default self.shutdown_grace). A second call cancels them at once."""
        first = self._shutdown_grace is None
        self._shutdown_grace = (self.shutdown_grace if grace is None else grace) if first else 0.0
        if self.log:
            self.log("shutting down: finishing in-flight requests (again to cancel them)" if first
                     else "shutting down: cancelling in-flight requests")
        if self._shutdown_grace == 0.0:
            self.engine.abort_all()
        self._shutdown_requested.set()

    async def serve(self, ready: Callable[["Server"], None] | None = None,
                    handle_signals: bool = False) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_shutdown)
        if ready is not None:
            ready(self)
        await self._shutdown_requested.wait()
        await self.shutdown(self._shutdown_grace)

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop accepting; give in-flight generations `grace` seconds, then cancel them (503);
        close idle keep-alive connections; stop the scheduler thread."""
        self._closing = True
        self.engine.stop_accepting()
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            if c.idle:
                c.task.cancel()
        deadline = time.monotonic() + (grace or 0.0)
        while not self.engine.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self.engine.idle():
            self.engine.abort_all()
        tasks = [c.task for c in self._conns]
        if tasks:  # handlers now have their last event; give them a moment to write it
            _, pending = await asyncio.wait(tasks, timeout=5.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
        self._tok_pool.shutdown(wait=False)

    # -- connections --------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(asyncio.current_task())
        self._conns.add(conn)
        self.m_conns.inc()
        try:
            if len(self._conns) > self.limits.max_connections or self._closing:
                err = APIError(503, "too many open connections" if not self._closing else
                               "the server is shutting down", close=True)
                await self._send_error(writer, err, "other", time.monotonic(), False)
                return
            await self._connection(reader, writer, conn)
        except (ConnectionError, asyncio.TimeoutError, ClientGone, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(conn)
            self.m_conns.dec()
            writer.close()

    async def _connection(self, reader, writer, conn: _Conn) -> None:
        while not self._closing:
            conn.idle = True
            try:
                first = await asyncio.wait_for(reader.readexactly(1),
                                               self.limits.keepalive_timeout)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return  # idle too long, or the client closed: nothing to answer
            conn.idle = False
            t0 = time.monotonic()
            try:
                req = await self._read_request(first, reader, writer, t0)
            except APIError as e:
                await self._send_error(writer, e, getattr(e, "route", "other"), t0, False)
                if e.status == 413:
                    await self._linger(reader, writer)
                return
            self.m_inprogress.inc()
            try:
                keep = await self._dispatch(req, reader, writer)
            finally:
                self.m_inprogress.dec()
            if not keep:
                return

    async def _linger(self, reader, writer, seconds: float = 2.0) -> None:
        """Half-close and discard what the client still sends for a moment, so that closing
        with its unread body does not reset the connection before it reads our answer."""
        try:
            writer.write_eof()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and await asyncio.wait_for(
                    reader.read(1 << 16), max(0.01, deadline - time.monotonic())):
                pass
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass

    async def _read_request(self, first: bytes, reader, writer, t0: float) -> Request:
        lim = self.limits
        try:
            head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), lim.header_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, "timed out reading the request head", close=True) from None
        except asyncio.LimitOverrunError:
            raise APIError(431, f"request head larger than {lim.max_header} bytes",
                           close=True) from None
        lines = head[:-4].lstrip(b"\r\n").decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
            raise APIError(400, "malformed request line", close=True)
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise APIError(505, f"unsupported protocol {version[:16]!r}", close=True)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise APIError(400, "malformed header line", close=True)
            name, value = name.lower(), value.strip()
            if name in headers and name in ("content-length", "transfer-encoding", "host"):
                raise APIError(400, f"duplicate {name} header", close=True)
            headers[name] = value
        path = target.split("?", 1)[0]
        conn_hdr = headers.get("connection", "").lower()
        keep = (version == "HTTP/1.1" and "close" not in conn_hdr) or "keep-alive" in conn_hdr
        try:
            body = await self._read_body(headers, reader, writer)
        except APIError as e:
            e.route = route_of(path)
            raise
        return Request(method.upper(), path, version, headers, body, keep, t0)

    async def _read_body(self, headers: dict, reader, writer) -> bytes:
        lim = self.limits
        te, cl = headers.get("transfer-encoding"), headers.get("content-length")
        if te is not None and cl is not None:
            raise APIError(400, "both Transfer-Encoding and Content-Length", close=True)
        if te is not None and te.lower() != "chunked":
            raise APIError(400, f"unsupported Transfer-Encoding {te[:20]!r}", close=True)
        if cl is not None and (not cl.isdigit() or len(cl) > 18):
            raise APIError(400, "invalid Content-Length", close=True)
        size = int(cl) if cl is not None else 0
        if size > lim.max_body:
            raise APIError(413, f"request body of {size} bytes exceeds the limit of "
                           f"{lim.max_body} bytes", code="request_too_large", close=True)
        if headers.get("expect", "").lower() == "100-continue" and (size or te):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            if te is None:
                return await asyncio.wait_for(reader.readexactly(size), lim.body_timeout)
            return await asyncio.wait_for(self._read_chunked(reader), lim.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, "timed out reading the request body", close=True) from None
        except asyncio.LimitOverrunError:
            raise APIError(400, "malformed chunked body", close=True) from None

    async def _read_chunked(self, reader) -> bytes:
        body = bytearray()
        while True:
            line = (await reader.readuntil(b"\r\n"))[:-2].split(b";", 1)[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                raise APIError(400, "malformed chunk size", close=True) from None
            if size < 0 or len(body) + size > self.limits.max_body:
                raise APIError(413, f"request body exceeds the limit of {self.limits.max_body} "
                               "bytes", code="request_too_large", close=True)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return bytes(body)
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise APIError(400, "malformed chunk", close=True)

    # -- responses ----------------------------------------------------------------------------
    async def _write(self, writer, data: bytes) -> None:
        writer.write(data)
        try:
            await asyncio.wait_for(writer.drain(), self.limits.write_timeout)
        except asyncio.TimeoutError:
            raise ClientGone("client stopped reading") from None

    def _head(self, status: int, headers: list[tuple[str, str]], keep: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append("Connection: keep-alive" if keep else "Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send(self, writer, status: int, body: bytes, ctype: str, keep: bool,
                    extra: list[tuple[str, str]] = ()) -> None:
        head = self._head(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                   *extra], keep)
        await self._write(writer, head + body)

    async def _send_json(self, writer, status: int, obj, keep: bool, extra=()) -> None:
        await self._send(writer, status, _dumps(obj), "application/json", keep, extra)

    async def _respond(self, writer, req: Request, route: str, status: int, body: bytes,
                       ctype: str = "application/json") -> bool:
        """Send a whole response and count it (499 if the client is gone before the end)."""
        keep = req.keep_alive and not self._closing
        try:
            await self._send(writer, status, body, ctype, keep)
        except (ClientGone, ConnectionError):
            status = 499
            raise
        finally:
            self._record(route, status, req.t0)
        return keep

    async def _send_error(self, writer, err: APIError, route: str, t0: float, keep: bool) -> bool:
        keep = keep and not err.close and not self._closing
        extra = [("Retry-After", "1")] if err.status in (429, 503) else []
        if err.status == 401:
            extra.append(("WWW-Authenticate", "Bearer"))
        try:
            await self._send_json(writer, err.status, err.body(), keep, extra)
        finally:
            self._record(route, err.status, t0)
        return keep

    def _record(self, route: str, status: int, t0: float) -> None:
        self.m_requests.inc(route=route, status=str(status))
        self.m_latency.observe(time.monotonic() - t0, route=route)
        if status in ERROR_TYPES:  # not 499 (the client left): requests_cancelled_total has it
            self.m_errors.inc(type=ERROR_TYPES[status])

    # -- routing ------------------------------------------------------------------------------
    async def _dispatch(self, req: Request, reader, writer) -> bool:
        """Answer one request; False when the connection must close."""
        route = route_of(req.path)
        try:
            if route == "other":
                raise APIError(404, f"no route {req.path[:100]}", code="not_found")
            allowed = ROUTES.get(route, ("GET",))
            if req.method not in allowed:
                raise APIError(405, f"method {req.method} not allowed on {route}; use "
                               f"{', '.join(allowed)}")
            if route != "/health":
                self._check_auth(req)
            if route == "/health":
                ok = not self._closing and self.engine.dead is None
                status = "ok" if ok else "failed" if self.engine.dead else "shutting_down"
                return await self._respond(writer, req, route, 200 if ok else 503,
                                           _dumps({"status": status}))
            if route == "/metrics":  # rendered before it is counted: a scrape excludes itself
                return await self._respond(writer, req, route, 200,
                                           self.engine.registry.render().encode(),
                                           METRICS_CONTENT_TYPE)
            if route.startswith("/v1/models"):
                return await self._models(req, route, writer)
            return await self._generate(req, route, reader, writer)
        except APIError as e:
            return await self._send_error(writer, e, route, req.t0, req.keep_alive)
        except (ClientGone, ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:  # a bug: answer 500, keep serving
            traceback.print_exc(file=sys.stderr)
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", close=True)
            return await self._send_error(writer, err, route, req.t0, False)

    def _check_auth(self, req: Request) -> None:
        if self.api_key is None:
            return
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def _models(self, req: Request, route: str, writer) -> bool:
        def card(name):
            return {"id": name, "object": "model", "created": self.created,
                    "owned_by": "whetstone", "root": self.engine.name,
                    "parent": None if name == self.engine.name else self.engine.name,
                    "max_model_len": self.engine.max_len}
        if route == "/v1/models":
            obj = {"object": "list", "data": [card(m) for m in self.engine.model_names]}
        else:
            name = req.path[len("/v1/models/"):]
            if name not in self.engine.model_names:
                raise APIError(404, f"the model '{name[:100]}' does not exist", "model",
                               "model_not_found")
            obj = card(name)
        return await self._respond(writer, req, route, 200, _dumps(obj))

    # -- generation ---------------------------------------------------------------------------
    async def _generate(self, req: Request, route: str, reader, writer) -> bool:
        try:
            body = json.loads(req.body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise _bad(f"could not parse the JSON body: {str(e)[:120]}") from None
        kind = "chat" if route == "/v1/chat/completions" else "completion"
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(self._tok_pool, self.api.prepare, kind, body)
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev, put=events.put_nowait):  # scheduler thread -> event loop
            loop.call_soon_threadsafe(put, ev)

        gen = GenRequest(job.prompts, job.params, job.n, job.adapter, on_event)
        try:
            self.engine.submit(gen)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), code="shutting_down") from None
        state = _Answer(job, gen, route, req.t0, self)
        try:
            if job.stream:
                return await self._stream(req, state, events, reader, writer)
            return await self._complete(req, state, events, reader, writer)
        finally:
            if gen.remaining > 0:  # the client left (or a write failed): free its rows
                self.engine.cancel(gen)

    async def _next(self, events: asyncio.Queue, reader, writer):
        """The next engine event; ClientGone as soon as the client has disconnected."""
        while True:
            if writer.is_closing() or reader.at_eof() or reader.exception() is not None:
                raise ClientGone("client disconnected")
            try:
                return await asyncio.wait_for(events.get(), 0.25)
            except asyncio.TimeoutError:
                continue

    async def _complete(self, req, state: "_Answer", events, reader, writer) -> bool:
        try:
            while not state.finished:
                ev = await self._next(events, reader, writer)
                if ev[0] == "error":
                    raise APIError(ev[1], ev[2])
                state.apply(ev)
        except ClientGone:
            self._record(state.route, 499, req.t0)
            raise
        return await self._respond(writer, req, state.route, 200, _dumps(state.response()))

    async def _stream(self, req, state: "_Answer", events, reader, writer) -> bool:
        chunked = req.version == "HTTP/1.1"
        keep = req.keep_alive and chunked
        headers = [("Content-Type", "text/event-stream; charset=utf-8"),
                   ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))

        def frame(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data

        status = 200
        await self._write(writer, self._head(200, headers, keep))
        try:
            for chunk in state.start_chunks():
                await self._write(writer, frame(_sse(chunk)))
            while not state.finished:
                ev = await self._next(events, reader, writer)
                if ev[0] == "error":  # headers are sent: the error travels as an event
                    status = ev[1]
                    await self._write(writer, frame(_sse(APIError(ev[1], ev[2]).body())))
                    break
                for chunk in state.apply(ev):
                    await self._write(writer, frame(_sse(chunk)))
            if status == 200 and state.job.include_usage:
                await self._write(writer, frame(_sse(state.usage_chunk())))
            end = b"0\r\n\r\n" if chunked else b""  # the last chunk of a chunked body
            await self._write(writer, frame(b"data: [DONE]\n\n") + end)
        except (ClientGone, ConnectionError):
            status = 499  # nginx's "client closed request", for the metrics only
            raise
        finally:
            self._record(state.route, status, req.t0)
        return keep and status == 200


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _sse(obj) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


class _Answer:
    """Builds the OpenAI response (or stream chunks) of one Job from engine events."""

    def __init__(self, job: Job, gen: GenRequest, route: str, t0: float, server: Server):
        self.job, self.gen, self.route, self.t0, self.server = job, gen, route, t0, server
        chat = job.kind == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        k = gen.num_seqs
        self.texts, self.reasons, self.tokens = [""] * k, [None] * k, [0] * k
        self.finished = False
        self.first_token = False

    def _base(self, obj: str) -> dict:
        d = {"id": self.id, "object": obj, "created": self.created, "model": self.job.model}
        if self.job.stream and self.job.include_usage:
            d["usage"] = None
        return d

    def _choice(self, i: int, text: str | None, reason: str | None, first: bool = False) -> dict:
        if self.job.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else \
                ({} if text is None else {"content": text})
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}

    def _chunk(self, choices: list[dict]) -> dict:
        obj = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        return {**self._base(obj), "choices": choices}

    def start_chunks(self) -> list[dict]:
        if self.job.kind != "chat":
            return []
        return [self._chunk([self._choice(i, None, None, first=True)])
                for i in range(self.gen.num_seqs)]

    def apply(self, ev: tuple) -> list[dict]:
        """Record an engine event; the stream chunks it produces."""
        if ev[0] == "token":
            _, i, text = ev
            if not self.first_token:
                self.first_token = True
                self.server.m_ttft.observe(time.monotonic() - self.t0, route=self.route)
            self.texts[i] += text
            return [self._chunk([self._choice(i, text, None)])] if text else []
        if ev[0] == "finish":
            _, i, reason, n = ev
            self.reasons[i], self.tokens[i] = reason, n
            return [self._chunk([self._choice(i, None if self.job.kind == "chat" else "",
                                              reason)])]
        if ev[0] == "done":
            self.finished = True
        return []

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.job.prompts)
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict:
        return {**self._chunk([]), "usage": self.usage()}

    def response(self) -> dict:
        if self.job.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.job.model, "choices": choices, "usage": self.usage()}


# =============================================================================================
# Running
# =============================================================================================
class ServerThread:
    """Run a Server on its own event loop in a daemon thread (tests, notebooks):

        srv = ServerThread(engine, port=0).start();  ...  srv.url ...;  srv.stop()
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, **kwargs):
        self.server = Server(engine, host, port, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="whetstone-http", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.serve(ready=lambda s: self._ready.set()))
        except BaseException as e:  # noqa: BLE001 (reported by start())
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    def start(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, grace: float = 5.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.request_shutdown, grace)
            self._thread.join(timeout=grace + 30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """['NAME=DIR', ...] -> {NAME: DIR}; a one-line ValueError for a malformed or repeated one."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name.strip() or not directory.strip():
            raise ValueError(f"--adapter expects NAME=DIR, got {spec!r}")
        if name in out:
            raise ValueError(f"adapter name {name!r} is given twice")
        out[name.strip()] = directory.strip()
    return out


def run(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        limits: Limits | None = None, shutdown_grace: float = 30.0, quiet: bool = False) -> None:
    """Serve until SIGINT / SIGTERM (a second one cancels in-flight requests at once)."""
    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    server = Server(engine, host, port, api_key, limits, log, shutdown_grace)

    def ready(s: Server) -> None:
        log(f"serving {', '.join(engine.model_names)} on {s.url} (max batch {engine.max_batch}, "
            f"queue {engine.max_queue}, context {engine.max_len}"
            f"{', API key required' if api_key else ''}); Ctrl-C to stop")

    asyncio.run(server.serve(ready, handle_signals=True))
    log("stopped")
