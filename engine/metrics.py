"""A tiny Prometheus metrics registry (counters, gauges, histograms with labels) rendered in the
Prometheus text exposition format 0.0.4, and a /metrics endpoint for running training jobs.

Follows the format as prometheus_client writes it (github.com/prometheus/client_python,
exposition.py): `# HELP` / `# TYPE` lines, counters named `*_total`, histograms as cumulative
`*_bucket{le="..."}` series ending in `le="+Inf"` plus `*_sum` and `*_count`, label values
escaped (backslash, double quote, newline). No dependency: the serving code (engine/serve.py)
and train.py use the same registry.

    reg = Registry()
    reqs = reg.counter("http_requests_total", "HTTP requests", ["route", "status"])
    reqs.inc(route="/v1/completions", status="200")
    text = reg.render()

    srv = TrainingMetricsServer(9100)                # /metrics from a daemon thread
    srv.update(step=10, loss=2.31, lr=3e-4, tokens_per_s=5e3, eta_s=120)
    srv.close()
"""
from __future__ import annotations

import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; suits request latency and time to first token from milliseconds to minutes.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)


def _fmt(v: float) -> str:
    """Sample value as Prometheus writes it (+Inf, -Inf, NaN; integers without '.0')."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        if not name.replace("_", "").replace(":", "").isalnum() or name[0].isdigit():
            raise ValueError(f"invalid metric name {name!r}")
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], object] = {}
        if not self.labelnames:  # an unlabelled metric is shown (as zero) from the start
            self._values[()] = self._zero()

    def _zero(self):
        return 0.0

    def _key(self, labels: dict) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"metric {self.name} takes labels {list(self.labelnames)}, "
                             f"got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]


class _Scalar(_Metric):
    def _add(self, amount: float, labels: dict) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def get(self, **labels) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}" for k, v in items]


class Counter(_Scalar):
    """A value that only goes up. `inc(amount=1, **labels)`."""
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels) -> None:
        if not amount >= 0:
            raise ValueError(f"counter {self.name} can only increase, got {amount}")
        self._add(amount, labels)


class Gauge(_Scalar):
    """A value that goes up and down. `set(v, **labels)`, `inc`, `dec`."""
    kind = "gauge"

    def set(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, **labels) -> None:
        self.inc(-amount, **labels)


class Histogram(_Metric):
    """Observations counted into cumulative buckets (upper bounds `le`), plus sum and count."""
    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS):
        b = sorted(float(x) for x in buckets if not math.isinf(x))
        if not b or len(set(b)) != len(b):
            raise ValueError(f"histogram {name} needs distinct finite buckets, got {buckets}")
        self.buckets = tuple(b) + (math.inf,)
        super().__init__(name, help, labelnames)

    def _zero(self):
        return [0] * len(self.buckets), 0.0

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._values.get(key) or self._zero()
            i = next((i for i, upper in enumerate(self.buckets) if value <= upper), -1)
            counts[i] += 1  # NaN lands in +Inf
            self._values[key] = (counts, total + value)

    def count(self, **labels) -> int:
        with self._lock:
            counts, _ = self._values.get(self._key(labels), ([0], 0.0))
            return sum(counts)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s)) for k, (c, s) in self._values.items())
        out = []
        for key, (counts, total) in items:
            running = 0
            for upper, c in zip(self.buckets, counts):
                running += c
                le = 'le="' + _fmt(upper) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_fmt(total)}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {running}")
        return out


class Registry:
    """Named metrics, rendered together. Names get the registry's prefix (e.g. 'whetstone_')."""

    def __init__(self, prefix: str = "whetstone_"):
        self.prefix = prefix
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def _add(self, metric: _Metric) -> _Metric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        return self._add(Counter(self.prefix + name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self._add(Gauge(self.prefix + name, help, labelnames))

    def histogram(self, name: str, help: str, labelnames: Iterable[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        return self._add(Histogram(self.prefix + name, help, labelnames, buckets))

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for m in metrics:
            lines += m.header() + m.samples()
        return "\n".join(lines) + "\n"


def parse_text(text: str) -> dict[str, float]:
    """Samples of a text exposition as {'name{labels}': value} (for tests and quick checks)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# ---------------------------------------------------------------------------------------------
# /metrics over HTTP from a daemon thread (training jobs; the server has its own HTTP stack)
# ---------------------------------------------------------------------------------------------
class MetricsHTTPServer:
    """Serves `registry.render()` at GET /metrics (and 'ok' at /health) from a daemon thread.
    port 0 picks a free port (see `.port`). Binds 127.0.0.1 unless told otherwise."""

    def __init__(self, registry: Registry, port: int, host: str = "127.0.0.1"):
        reg = registry

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a stalled scraper cannot hold its thread forever

            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = reg.render().encode(), CONTENT_TYPE, 200
                elif path == "/health":
                    body, ctype, code = b"ok\n", "text/plain; charset=utf-8", 200
                else:
                    body, ctype, code = b"not found\n", "text/plain; charset=utf-8", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not worth a stderr line each
                pass

        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be an integer in [0, 65535], got {port!r}")
        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
        self._httpd.daemon_threads = True
        self.host, self.port = host, self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name=f"metrics:{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TrainingMetricsServer(MetricsHTTPServer):
    """/metrics for a running training job (`train.py --metrics-port PORT`).

        srv = TrainingMetricsServer(port)           # starts serving at once (daemon thread)
        srv.update(step=..., loss=..., val_loss=..., lr=..., tokens_per_s=..., eta_s=...)
        srv.close()

    Every field of update() is optional (None = leave unchanged; NaN until first given).
    Gauges: whetstone_train_step, _loss, _val_loss, _lr, _tokens_per_second, _eta_seconds,
    _last_update_timestamp_seconds, _start_timestamp_seconds; counter
    whetstone_train_updates_total."""

    FIELDS = {"step": ("step", "Optimizer steps done"),
              "loss": ("loss", "Training loss of the latest step"),
              "val_loss": ("val_loss", "Latest validation loss"),
              "lr": ("lr", "Current learning rate"),
              "tokens_per_s": ("tokens_per_second", "Training throughput, tokens per second"),
              "eta_s": ("eta_seconds", "Estimated seconds until the run ends")}

    def __init__(self, port: int, host: str = "127.0.0.1", registry: Registry | None = None):
        self.registry = registry or Registry()
        g = self.registry.gauge
        self._gauges = {k: g("train_" + name, help) for k, (name, help) in self.FIELDS.items()}
        for gauge in self._gauges.values():
            gauge.set(math.nan)  # "not reported yet" rather than a misleading 0
        self._updates = self.registry.counter("train_updates_total", "Calls to update()")
        self._last = g("train_last_update_timestamp_seconds", "Unix time of the latest update")
        g("train_start_timestamp_seconds", "Unix time the job started").set(time.time())
        super().__init__(self.registry, port, host)

    def update(self, **fields: float | None) -> None:
        unknown = sorted(set(fields) - set(self.FIELDS))
        if unknown:
            raise ValueError(f"unknown training metric(s) {unknown}; known: {list(self.FIELDS)}")
        for key, value in fields.items():
            if value is not None:
                self._gauges[key].set(float(value))
        self._updates.inc()
        self._last.set(time.time())
