"""The server's metrics in the Prometheus text format (version 0.0.4), written by hand: three
kinds (counter, gauge, histogram) do not justify a dependency. Thread-safe: the engine thread
records, the API thread renders."""

from __future__ import annotations

import math
import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._counters: dict[tuple, float] = {}
        self._hists: dict[tuple, list] = {}  # (name, labels) -> [bucket counts..., sum, count]
        self._buckets: dict[str, tuple] = {}
        self._gauges: dict[str, Callable[[], dict]] = {}  # name -> () -> {labels tuple: value}

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)

    def histogram(self, name: str, help: str, buckets) -> None:
        self._help[name] = ("histogram", help)
        self._buckets[name] = tuple(buckets)

    def gauge(self, name: str, help: str, read: Callable[[], dict]) -> None:
        """`read` returns {tuple of (label, value) pairs: value}, called at render time."""
        self._help[name] = ("gauge", help)
        self._gauges[name] = read

    def inc(self, name: str, value: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def observe(self, name: str, value: float, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        buckets = self._buckets[name]
        with self._lock:
            h = self._hists.setdefault(key, [0] * (len(buckets) + 2))
            for i, b in enumerate(buckets):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def value(self, name: str, **labels) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0)

    def render(self) -> str:
        lines = []
        with self._lock:
            counters, hists = dict(self._counters), {k: list(v) for k, v in self._hists.items()}
        for name, (kind, help) in self._help.items():
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
            if kind == "counter":
                for (n, labels), v in sorted(counters.items()):
                    if n == name:
                        lines.append(f"{name}{_labels(dict(labels))} {_num(v)}")
            elif kind == "gauge":
                for labels, v in self._gauges[name]().items():
                    lines.append(f"{name}{_labels(dict(labels))} {_num(v)}")
            else:
                for (n, labels), h in sorted(hists.items()):
                    if n != name:
                        continue
                    lab = dict(labels)
                    for b, c in zip(self._buckets[name], h):
                        lines.append(f"{name}_bucket{_labels({**lab, 'le': _num(b)})} {c}")
                    lines.append(f"{name}_bucket{_labels({**lab, 'le': '+Inf'})} {h[-1]}")
                    lines.append(f"{name}_sum{_labels(lab)} {_num(h[-2])}")
                    lines.append(f"{name}_count{_labels(lab)} {h[-1]}")
        return "\n".join(lines) + "\n"
