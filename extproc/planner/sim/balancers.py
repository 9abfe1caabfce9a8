"""In-pool balancers: which instance of a pool gets a request.

What balances traffic inside a pool in production is not an oracle:

* ``least-request`` -- Envoy's default LEAST_REQUEST policy: with equal host
  weights it is power-of-two-choices, ``choice_count`` (default 2) hosts drawn
  at random, the one with fewer active requests wins (Envoy docs,
  "Load balancers: Weighted least request"). Active requests = requests sent
  to the host and not finished.
* ``round-robin`` -- Envoy ROUND_ROBIN.
* ``random`` -- Envoy RANDOM.
* ``kv-aware`` -- an endpoint picker in the style of llm-d / the Gateway API
  Inference Extension EPP: it scrapes ``vllm:num_requests_waiting`` and
  ``vllm:kv_cache_usage_perc`` every ``scrape_interval`` s and picks the
  highest score of queue-scorer + kv-cache-utilization-scorer (equal weights);
  between scrapes it adds the requests it has itself sent to the scraped
  queue, so one stale snapshot does not send a whole interval's traffic to
  one instance.
* ``prefill-aware`` -- least outstanding *estimated prompt* tokens: the
  router already estimates each request's prompt tokens to pick a pool, so a
  picker beside it can send a request to the instance with the fewest prompt
  tokens not yet finished (it knows nothing of output lengths). Unlike
  ``least-request`` it tells a 100K-token prefill from a short decode.
* ``oracle-least-work`` -- least outstanding *true* tokens (prompt + true
  output). No real balancer knows output lengths: this is an upper bound, named
  so, never the default.

Randomness comes from an injected ``numpy.random.Generator``.
"""
from __future__ import annotations

import numpy as np

BALANCERS = ("least-request", "round-robin", "random", "kv-aware", "prefill-aware", "oracle-least-work")

#: The balancers an operator can run (the planner sizes every design under each);
#: ``random`` is dominated by round-robin, the oracle is a named bound only.
REALISTIC_BALANCERS = ("least-request", "round-robin", "kv-aware", "prefill-aware")

#: Balancers whose per-instance work is the estimated prompt tokens (not the
#: router's whole budget): `fleet.simulate` sets the work estimate for them.
PROMPT_WORK_BALANCERS = ("prefill-aware",)

#: Default balancer: Envoy's default for the pool clusters this project renders.
DEFAULT_BALANCER = "least-request"

#: Envoy LEAST_REQUEST ``choice_count`` default.
CHOICE_COUNT = 2

#: Metrics scrape interval of the kv-aware picker: the Gateway API Inference
#: Extension EPP refreshes endpoint metrics every 50 ms by default
#: (``--refresh-metrics-interval``).
SCRAPE_INTERVAL_S = 0.05


class Balancer:
    """pick(i, t) -> instance index in the pool; one object per pool."""

    def __init__(self, insts: list, work: list, rng: np.random.Generator):
        self.insts = insts
        self.work = work
        self.rng = rng
        self.n = len(insts)

    def pick(self, t: float) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


class LeastRequest(Balancer):
    def __init__(self, *a, choices: int = CHOICE_COUNT):
        super().__init__(*a)
        self.choices = choices
        self._draws: list[int] = []

    def _draw(self) -> int:
        if not self._draws:
            self._draws = self.rng.integers(0, self.n, 4096).tolist()
        return self._draws.pop()

    def pick(self, t: float) -> int:
        if self.n == 1:
            return 0
        best = self._draw()
        ba = self.insts[best].outstanding()
        for _ in range(self.choices - 1):
            j = self._draw()
            a = self.insts[j].outstanding()
            if a < ba:
                best, ba = j, a
        return best


class RoundRobin(Balancer):
    def __init__(self, *a):
        super().__init__(*a)
        self.k = int(self.rng.integers(0, self.n))  # Envoy starts at a random host

    def pick(self, t: float) -> int:
        j = self.k % self.n
        self.k += 1
        return j


class Random(LeastRequest):
    def pick(self, t: float) -> int:
        return self._draw()


class OracleLeastWork(Balancer):
    def pick(self, t: float) -> int:
        w = self.work
        return w.index(min(w))


class PrefillAware(OracleLeastWork):
    """argmin over outstanding estimated prompt tokens (the work list holds
    them: `fleet.simulate` feeds prompt estimates for this balancer)."""


class KVAware(Balancer):
    def __init__(self, *a, scrape_interval: float = SCRAPE_INTERVAL_S):
        super().__init__(*a)
        self.interval = scrape_interval
        self.next_scrape = -1.0
        self.queue = np.zeros(self.n)
        self.kv_score = np.zeros(self.n)
        self.noise = np.zeros(self.n)

    def _scrape(self, t: float) -> None:
        self.queue = np.array([len(x.waiting) for x in self.insts], dtype=np.float64)
        self.kv_score = np.array([x.free / x.total_blocks for x in self.insts])
        # tie-break among equal scores at random (the EPP's max-score picker)
        self.noise = self.rng.random(self.n) * 1e-9
        self.next_scrape = t + self.interval

    def pick(self, t: float) -> int:
        if t >= self.next_scrape:
            self._scrape(t)
        q = self.queue
        lo, hi = q.min(), q.max()
        qs = (hi - q) / (hi - lo) if hi > lo else np.ones(self.n)
        j = int(np.argmax(qs + self.kv_score + self.noise))
        self.queue[j] += 1.0  # what the picker itself sent since the scrape
        return j


def make(name: str, insts: list, work: list, rng: np.random.Generator,
         scrape_interval: float = SCRAPE_INTERVAL_S) -> Balancer:
    if name == "least-request":
        return LeastRequest(insts, work, rng)
    if name == "round-robin":
        return RoundRobin(insts, work, rng)
    if name == "random":
        return Random(insts, work, rng)
    if name == "kv-aware":
        return KVAware(insts, work, rng, scrape_interval=scrape_interval)
    if name == "prefill-aware":
        return PrefillAware(insts, work, rng)
    if name == "oracle-least-work":
        return OracleLeastWork(insts, work, rng)
    raise ValueError(f"unknown balancer {name!r}; one of {', '.join(BALANCERS)}")
