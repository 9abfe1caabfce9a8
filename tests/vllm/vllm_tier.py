"""Helpers of the real-vLLM tier (a module of its own: conftest.py files are
not imported by name)."""

from __future__ import annotations

import re
import urllib.request


def vllm_metrics(url: str) -> dict[str, float]:
    """``name{labels}`` -> value of a Prometheus text endpoint."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a metric's series whose labels include ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items()
               if (k == name or k.startswith(name + "{")) and all(w in k for w in want))
