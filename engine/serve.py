"""OpenAI-compatible HTTP server: continuous batching over a slot KV cache, per-request LoRA
adapters, server-sent-event streaming, Prometheus /metrics. Standard library only (asyncio).

Three threads, one owner each:
- the asyncio event loop owns the sockets: a small HTTP/1.1 parser (Content-Length or chunked
  bodies, keep-alive, 100-continue, size limits, per-phase timeouts so that a slow client only
  ever holds its own connection), validation and responses;
- one scheduler thread (`Engine`, engine/serve_engine.py) owns the model: continuous batching
  over a slot KV cache, per-request LoRA adapters, sampling;
- one tokenizer thread renders chat templates and encodes prompts off the event loop.

engine/serve_api.py turns request bodies into jobs and engine events into OpenAI responses (with
tool calls: `tools` in, Hermes-style <tool_call> blocks parsed by engine/tool_calls.py into
`tool_calls` out); this module is the HTTP transport and the entry points (Server, ServerThread,
run).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import http
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from engine.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from engine.serve_api import API, ERROR_TYPES, APIError, Job, _Answer, _bad
from engine.serve_engine import (AdapterSelector, AdapterSwitch, Engine, GenRequest, QueueFull,
                                 RowsCache, SamplingParams, Sequence, ShuttingDown, SlotPool,
                                 forward_rows, install_adapters)

# The names engine.serve has always had (the engine and API parts moved to serve_engine.py and
# serve_api.py): `from engine.serve import Engine, SamplingParams, API, ...` keeps working.
__all__ = [
    # engine/serve_engine.py
    "QueueFull", "ShuttingDown", "AdapterSelector", "AdapterSwitch", "install_adapters",
    "SlotPool", "RowsCache", "forward_rows", "SamplingParams", "GenRequest", "Sequence", "Engine",
    # engine/serve_api.py
    "ERROR_TYPES", "APIError", "Job", "API",
    # this module
    "Limits", "Request", "ClientGone", "ROUTES", "route_of", "Server", "ServerThread",
    "parse_adapter_specs", "run",
]

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
        # made here, not in start(): request_shutdown() may come before the server runs
        self._shutdown_requested = asyncio.Event()

    def _register_metrics(self) -> None:
        """Once bound (a Server that failed to bind registers nothing: another may retry on the
        same engine and registry)."""
        reg = self.engine.registry
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
        try:
            self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                      limit=self.limits.max_header,
                                                      start_serving=False)
        except OSError as e:  # asyncio's bind error repeats the address: keep the reason only
            why = (os.strerror(e.errno) if e.errno and not isinstance(e, socket.gaierror)
                   else e.strerror or str(e))
            raise OSError(f"cannot listen on {self.host}:{self.port}: {why}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        self._register_metrics()  # before the first connection is accepted
        self.engine.start()
        await self._server.start_serving()

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
        except Exception:  # a bug: keep serving the other connections, close this one
            traceback.print_exc(file=sys.stderr)
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
        if cl is not None and not (cl.isascii() and cl.isdigit() and len(cl) <= 18):
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
            # hex digits only: int(, 16) would also take a sign, "_" and a "0x" prefix
            size = int(line, 16) if line and line.strip(b"0123456789abcdefABCDEF") == b"" else -1
            if size < 0:
                raise APIError(400, "malformed chunk size", close=True)
            if len(body) + size > self.limits.max_body:
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
        if err.status == 405:  # RFC 9110: a 405 names the allowed methods
            extra.append(("Allow", ", ".join(ROUTES.get(route, ("GET",)))))
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
            name = urllib.parse.unquote(req.path[len("/v1/models/"):])  # models.retrieve quotes
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
        state = _Answer(job, gen, route, req.t0,
                        lambda seconds: self.m_ttft.observe(seconds, route=route))
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
    # backslashreplace: a lone surrogate (valid in JSON input) is written back as its \uXXXX
    # escape instead of failing the UTF-8 encode
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "backslashreplace")


def _sse(obj) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


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
        name, sep, directory = (part.strip() for part in spec.partition("="))
        if not sep or not name or not directory:
            raise ValueError(f"--adapter expects NAME=DIR, got {spec!r}")
        if name in out:
            raise ValueError(f"adapter name {name!r} is given twice")
        out[name] = directory
    return out


def run(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        limits: Limits | None = None, shutdown_grace: float = 30.0, quiet: bool = False) -> None:
    """Serve until SIGINT / SIGTERM (a second one cancels in-flight requests at once). A process's
    last act (serve.py): once stopped, further SIGINT / SIGTERM are ignored."""
    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    server = Server(engine, host, port, api_key, limits, log, shutdown_grace)

    def ready(s: Server) -> None:
        log(f"serving {', '.join(engine.model_names)} on {s.url} (max batch {engine.max_batch}, "
            f"queue {engine.max_queue}, context {engine.max_len}"
            f"{', API key required' if api_key else ''}); Ctrl-C to stop")

    asyncio.run(server.serve(ready, handle_signals=True))
    # The interpreter's exit (torch's teardown) still takes a moment: a second Ctrl-C there
    # would print a KeyboardInterrupt traceback or kill the process (exit -2) instead of exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    log("stopped")
