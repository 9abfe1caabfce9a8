"""One vLLM server, simulated iteration by iteration (continuous batching).

Faithful to the vLLM V1 scheduler where it matters for sizing:

* PagedAttention KV blocks (``block_size`` tokens) allocated as sequences grow;
  a request's prefill allocates the blocks for the chunk it computes.
* Each step first serves the *running* requests in admission order (every
  decoding request 1 token, partially prefilled requests a chunk from the
  ``max_num_batched_tokens`` budget), then admits *waiting* requests FCFS
  while ``len(running) < max_num_seqs`` and blocks and budget remain
  (chunked prefill). No admission in a step that preempted.
* When blocks run out, the most recently admitted running request is
  preempted by recompute: its blocks are freed, it goes back to the front of
  the waiting queue and must prefill prompt + tokens generated so far again
  (the lost work costs real step time).
* Requests with prompt + max_tokens > ``max_model_len`` are rejected on arrival
  (the OpenAI server's 400 "maximum context length" error).

Speed: decoding requests are not touched per step. Their KV length is
``base + (dc - join)`` where ``dc`` counts steps, block growth is tracked by
phase class (length mod block_size), and runs of pure-decode steps with no
admission possible are jumped over analytically up to the next event (first
completion, the step whose block need exceeds free blocks, or the caller's
time limit). Step time is ``hardware.StepCoeffs.step_time`` (GEMMs, then attention).
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque

from .hardware import InstanceConfig
from .prefix_cache import PrefixCache
from .traces import HASH_BLOCK_TOKENS

INF = float("inf")

#: Inter-token-latency histogram bins per e-fold of step time (metrics.itl_p99):
#: 50 bins per e-fold is 2% wide, finer than the cost model's own accuracy.
ITL_BINS_PER_E = 50.0


class Records:
    """Per-request outcomes shared by all instances of a simulation (plain lists: fast)."""

    __slots__ = ("first_token", "finish", "first_sched", "preempts", "rejected", "inst", "pool")

    def __init__(self, n: int):
        nan = float("nan")
        self.first_token = [nan] * n
        self.finish = [nan] * n
        self.first_sched = [nan] * n
        self.preempts = [0] * n
        self.rejected = bytearray(n)
        self.inst = [-1] * n
        self.pool = [-1] * n


class Seq:
    __slots__ = ("rid", "P", "O", "g", "target", "computed", "blocks", "dec", "base", "join",
                 "gjoin", "ver", "work", "h")

    def __init__(self, rid: int, P: int, O: int, work: float, h: tuple | None = None):
        self.h = h  # prompt block hashes (prefix caching), or None
        self.rid = rid
        self.P = P
        self.O = O
        self.g = 0  # tokens generated before the current (re)admission
        self.target = P  # tokens to prefill: prompt + g (recompute after preemption)
        self.computed = 0
        self.blocks = 0  # blocks held while prefilling
        self.dec = False
        self.base = 0
        self.join = 0
        self.gjoin = 0
        self.ver = 0
        self.work = work  # balancer's estimate of this request's tokens


def _sum_max(a1: float, b1: float, a2: float, b2: float, n: int) -> float:
    """sum_{k=0}^{n-1} max(a1 + b1 k, a2 + b2 k): the lower line's arithmetic
    series below the crossing plus the upper one's above it, written out
    inline (this runs for every run of decode steps and every probe of
    `Instance.run_until`'s search)."""
    d, e = a1 - a2, b1 - b2
    if e == 0.0:
        if n <= 0:
            return 0.0
        return n * a1 + b1 * n * (n - 1) * 0.5 if d >= 0 else n * a2 + b2 * n * (n - 1) * 0.5
    kx = -d / e  # f1 >= f2  iff  d + e k >= 0
    if e > 0:  # f1 dominates for k >= kx
        c = min(max(int(-(-kx // 1)), 0), n)
        lo_a, lo_b, hi_a, hi_b = a2, b2, a1, b1
    else:
        c = min(max(int(kx // 1) + 1, 0), n)  # f1 dominates for k <= kx
        lo_a, lo_b, hi_a, hi_b = a1, b1, a2, b2
    # sum_{k<c} (lo_a + lo_b k) + sum_{c<=k<n} (hi_a + hi_b k)
    x = c * lo_a + lo_b * c * (c - 1) * 0.5 if c > 0 else 0.0
    m = n - c
    y = m * hi_a + hi_b * m * (c + n - 1) * 0.5 if m > 0 else 0.0
    return x + y


class Instance:
    def __init__(self, cfg: InstanceConfig, iid: int, rec: Records, work: list, widx: int,
                 check: bool = False, fixed: dict | None = None):
        cfg.validate()
        self.cfg = cfg
        self.iid = iid
        self.rec = rec
        self.work = work
        self.widx = widx
        self.check = check
        c = self.coeffs = cfg.step_coeffs()
        self.invFa, self.invBa = c.inv_attn_flops, c.inv_attn_bw
        self.attn, self.kvb = c.attn_flops_per_ctx, c.kv_bytes_per_token
        self.model = cfg.model
        # tokens -> overhead + all-reduces + GEMM time (hardware.StepCoeffs.fixed);
        # a pure function of the config: the instances of one pool share it (``fixed``)
        self._fixed = {} if fixed is None else fixed
        # Engines that build a kernel per batch row count (vLLM's CPU build:
        # oneDNN primitives, cpu_profile.SHAPE_CACHE) pay ``_shape_s`` on a step
        # whose token count is not among the last ``_shape_n`` distinct ones.
        sc = getattr(cfg, "shape_cache", None)
        self._shape_n, self._shape_s = sc if sc else (0, 0.0)
        self._shapes: OrderedDict[int, None] | None = OrderedDict() if sc else None
        # A neighbour on the same host (cpu_profile.HostShare, CPU configs only):
        # every step is timed on its own (no decode-run jumps) and logged.
        self._host = getattr(cfg, "host_share", None)
        # Step time per request scheduled in the step (CPU profiles; 0 on GPU configs).
        self._per_seq = getattr(cfg, "per_seq_s", 0.0)
        # An engine idle over ``_sleep_after`` s sleeps; its next step pays ``_wake_s``
        # (vLLM's CPU build: cpu_profile.IDLE_SPIN_S; GPU configs: none).
        iw = getattr(cfg, "idle_wake", None)
        self._sleep_after, self._wake_s = iw if iw else (INF, 0.0)
        self._wake = 0.0  # what the next step pays for waking the engine
        self.bs = cfg.block_size
        self.total_blocks = cfg.num_blocks
        self.free = self.total_blocks
        self.max_len = cfg.max_model_len
        self.max_seqs = cfg.max_num_seqs
        self.mbt = cfg.max_num_batched_tokens
        # --long-prefill-token-threshold caps one request's chunk per step (0: off)
        self.lpt = cfg.long_prefill_token_threshold or (1 << 62)
        # --max-num-partial-prefills caps requests in partial prefill (0: no cap)
        self.mpp = cfg.max_num_partial_prefills or (1 << 62)
        # automatic prefix caching (vLLM V1 default on): LRU of 512-token blocks
        self.pc = (PrefixCache(self.total_blocks * self.bs // HASH_BLOCK_TOKENS)
                   if cfg.enable_prefix_caching else None)
        self.prefix_skipped = 0  # prefill tokens served from the cache
        self.t = 0.0
        self.waiting: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}
        self.prefilling: list[Seq] = []
        self.nD = 0
        self.cnt = [0] * self.bs
        self.sum_off = 0
        self.dc = 0
        self.heap: list = []
        self._pc, self._pc_ok = None, False  # `_plan`'s cached answer, valid while the state is unchanged
        # statistics
        self.kv_int = 0.0  # integral of used blocks over busy time
        self.busy = 0.0
        self.peak_used = 0
        self.steps = 0
        self.jumps = 0
        self.preemptions = 0
        self.recomputed_tokens = 0
        self.completed = 0
        self.rejected = 0
        self.admitted = 0
        # inter-token latency: {log-bin of a decode step's time: token gaps in steps of that time}
        self.itl_hist: dict[int, int] = {}

    # -- the live pool's view (extproc.backend.pool drives the model by a wall clock) --
    def generated(self, s: Seq) -> int:
        """Output tokens ``s`` has produced by ``self.t`` (never decreases; tokens
        survive a preemption). The caller knows from ``rec.finish`` when it is done."""
        if s.dec:
            return s.gjoin + self.dc - s.join
        return s.g

    def abort(self, s: Seq) -> bool:
        """Drop ``s`` (its client went away; vLLM aborts the request): its slot and
        KV blocks are free for the next step. False if it was not here."""
        self._pc_ok = False
        if s.rid in self.running:
            self._unlink(s)
        elif s in self.waiting:
            self.waiting.remove(s)
        else:
            return False
        self.work[self.widx] -= s.work
        return True

    def used_blocks(self) -> int:
        return self.total_blocks - self.free

    # -- helpers -----------------------------------------------------------------
    def _f(self, tokens: int) -> float:
        f = self._fixed.get(tokens)
        if f is None:
            f = self._fixed[tokens] = self.coeffs.fixed(tokens)
        return f

    def _lpt(self) -> int:
        """The long-prefill threshold of the next step: vLLM 0.32's scheduler
        drops it when one request is running or waiting (nobody to starve)."""
        return self.lpt if len(self.running) + len(self.waiting) > 1 else self.mbt

    def idle(self) -> bool:
        return not self.running and not self.waiting

    def outstanding(self) -> int:
        return len(self.running) + len(self.waiting)

    def add(self, s: Seq, t: float) -> None:
        """A request arrives at time t (the caller has run the instance up to t)."""
        rec = self.rec
        rec.inst[s.rid] = self.iid
        self._pc_ok = False
        if s.P + s.O > self.max_len:
            rec.rejected[s.rid] = 1
            rec.finish[s.rid] = t
            self.work[self.widx] -= s.work
            self.rejected += 1
            return
        if self.t < t:
            # Idle (or caught up): the next step starts when the request arrives.
            if not self.running and not self.waiting and t - self.t > self._sleep_after:
                self._wake = self._wake_s
            self.t = t
        self.waiting.append(s)

    def _finish(self, s: Seq, blocks: int) -> None:
        del self.running[s.rid]
        self.free += blocks
        self.rec.finish[s.rid] = self.t
        self.work[self.widx] -= s.work
        self.completed += 1

    def _unlink(self, v: Seq) -> None:
        """Take running ``v`` out of the batch and free its KV blocks; ``v.g``
        keeps the tokens it generated."""
        del self.running[v.rid]
        if v.dec:
            L = v.base + self.dc - v.join
            blocks = -(-L // self.bs)
            v.g = v.gjoin + self.dc - v.join
            self.cnt[(v.base - v.join) % self.bs] -= 1
            self.nD -= 1
            self.sum_off -= v.base - v.join
            v.dec = False
            v.ver += 1
        else:
            blocks = v.blocks
            self.prefilling.remove(v)
        self.free += blocks
        v.blocks = 0

    def _preempt_last(self) -> Seq:
        v = self.running[next(reversed(self.running))]
        self._unlink(v)
        v.computed = 0
        v.target = v.P + v.g
        self.recomputed_tokens += v.target
        self.waiting.appendleft(v)
        self.rec.preempts[v.rid] += 1
        self.preemptions += 1
        return v

    def _admissible(self) -> bool:
        """Could the head of the waiting queue be admitted at the next step?"""
        if not self.waiting or len(self.running) >= self.max_seqs:
            return False
        room = self.mbt - self.nD
        if room <= 0:
            return False
        if len(self.prefilling) >= self.mpp:
            return False
        s = self.waiting[0]
        x = min(s.target, room, self._lpt())
        need_dec = self.cnt[(-self.dc) % self.bs] if self.nD else 0
        return -(-x // self.bs) <= self.free - need_dec

    def _pop_done(self) -> None:
        h, dc = self.heap, self.dc
        while h and h[0][0] <= dc:
            _, _, ver, s = heapq.heappop(h)
            if ver != s.ver or not s.dec:
                continue
            L = s.base + dc - s.join
            self.cnt[(s.base - s.join) % self.bs] -= 1
            self.nD -= 1
            self.sum_off -= s.base - s.join
            s.dec = False
            self._finish(s, -(-L // self.bs))

    def _head_finish(self) -> int:
        h = self.heap
        while h and (h[0][2] != h[0][3].ver or not h[0][3].dec):
            heapq.heappop(h)
        return h[0][0] if h else self.dc + (1 << 40)

    # -- decode-run planning -------------------------------------------------------
    def _shape_cost(self, tokens: int) -> float:
        """The new-shape cost of a step of ``tokens`` (0 when compiled), and
        the shape marked most recently used."""
        sh = self._shapes
        if sh is None:
            return 0.0
        if tokens in sh:
            sh.move_to_end(tokens)
            return 0.0
        sh[tokens] = None
        if len(sh) > self._shape_n:
            sh.popitem(last=False)
        return self._shape_s

    def _plan(self):
        """(n, a1, b1, a2, b2, its duration) for the pure-decode run possible now, or None.
        Cached until the state changes (`add`, `abort`, a step or a run): the
        fleet asks for it in `next_event` and again when it runs the instance."""
        if self._pc_ok:
            return self._pc
        p = self._pc = self._plan_now()
        self._pc_ok = True
        return p

    def _plan_now(self):
        if self.prefilling or not self.nD or self._admissible() or self._host is not None:
            return None
        if self._shapes is not None and self.nD not in self._shapes:
            return None  # its first step builds the shape: a detailed step
        nD, bs, dc, cnt = self.nD, self.bs, self.dc, self.cnt
        n_fin = self._head_finish() - dc
        full = self.free // nD
        if full * bs >= n_fin:  # the KV cache outlasts the run to the next completion
            n = n_fin
        else:
            rem = self.free - full * nD
            acc = 0
            j = 0
            while j < bs:
                need = cnt[(-(dc + j)) % bs]
                if acc + need > rem:
                    break
                acc += need
                j += 1
            n_kv = full * bs + j
            n = n_fin if n_fin < n_kv else n_kv
        if n <= 0:
            return None
        S0 = self.sum_off + nD * dc
        # step k of the run: fixed(nD) + max(attention FLOPs, KV reads), both linear in k
        f = self._f(nD) + self._per_seq * nD
        a1 = f + self.attn * S0 * self.invFa
        b1 = self.attn * nD * self.invFa
        a2 = f + self.kvb * S0 * self.invBa
        b2 = self.kvb * nD * self.invBa
        return n, a1, b1, a2, b2, _sum_max(a1, b1, a2, b2, n)

    def _blocks_needed(self, n: int) -> int:
        bs, dc, cnt = self.bs, self.dc, self.cnt
        need = (n // bs) * self.nD
        for j in range(n % bs):
            need += cnt[(-(dc + j)) % bs]
        return need

    def next_event(self) -> float:
        """When the balancer next needs this instance processed (a completion), or
        self.t if a detailed step is pending; inf when idle."""
        if not self.running and not self.waiting:
            return INF
        p = self._pc if self._pc_ok else self._plan()
        if p is None:
            return self.t
        return self.t + p[5]

    # -- simulation ----------------------------------------------------------------
    def run_until(self, T: float) -> None:
        """Execute every step that starts before T (the state ends at a step boundary)."""
        while self.t < T and (self.running or self.waiting):
            p = self._pc if self._pc_ok else self._plan()
            self._pc_ok = False  # whatever runs now changes the state
            if p is None:
                self._step()
                continue
            n, a1, b1, a2, b2, dt = p
            if T != INF and self.t + dt >= T:
                D = T - self.t
                lo, hi = 1, n  # smallest m with S(m) >= D (S increases with m: one answer)
                # first probes where it must be: every step takes at least the
                # first one's time, so S(ceil(D / step0)) >= D, and the steps of
                # a run differ little, so the answer is almost always that or one less
                g = D / (a1 if a1 > a2 else a2)
                m = int(g)
                m = m + 1 if m < g else m
                m = 1 if m < 1 else n if m > n else m
                if _sum_max(a1, b1, a2, b2, m) >= D:
                    hi = m
                    if m - 1 >= lo:
                        if _sum_max(a1, b1, a2, b2, m - 1) >= D:
                            hi = m - 1
                        else:
                            lo = m
                elif m < n:
                    lo = m + 1
                else:  # S(n) < D only by rounding (t + S(n) >= T): the search's answer is n
                    lo = n
                while lo < hi:
                    mid = (lo + hi) // 2
                    if _sum_max(a1, b1, a2, b2, mid) >= D:
                        hi = mid
                    else:
                        lo = mid + 1
                n = lo
                dt = _sum_max(a1, b1, a2, b2, n)
            if self._shapes is not None:
                self._shape_cost(self.nD)  # compiled (``_plan``): marks it recently used
            need = self._blocks_needed(n)
            used0 = self.total_blocks - self.free
            self.free -= need
            self.kv_int += (used0 + need * 0.5) * dt
            self.busy += dt
            self.t += dt
            if self.nD:  # n pure-decode steps: n * nD token gaps at (about) the mean step time
                b = int(math.floor(math.log(dt / n) * ITL_BINS_PER_E))
                self.itl_hist[b] = self.itl_hist.get(b, 0) + n * self.nD
            self.dc += n
            self.steps += n
            self.jumps += 1
            if self.total_blocks - self.free > self.peak_used:
                self.peak_used = self.total_blocks - self.free
            h = self.heap
            if h and h[0][0] <= self.dc:
                self._pop_done()
            if self.check:
                self._check()

    def _step(self) -> None:
        bs, rec = self.bs, self.rec
        budget = self.mbt
        lpt = self._lpt()
        preempted = False
        # 1) running decodes: one token each; preempt from the tail if blocks run out
        need = self.cnt[(-self.dc) % bs] if self.nD else 0
        while need > self.free:
            v = self._preempt_last()
            preempted = True
            need = self.cnt[(-self.dc) % bs] if self.nD else 0
        self.free -= need
        nD = self.nD
        budget -= nD
        S_dec = self.sum_off + nD * self.dc
        chunks = []
        # 2) running prefills (chunked), in admission order
        for s in list(self.prefilling):
            if budget <= 0:
                break
            if s.rid not in self.running or s.dec:
                continue
            x = min(s.target - s.computed, budget, lpt)
            nb = -(-(s.computed + x) // bs) - s.blocks
            gone = False
            while nb > self.free:
                # Victims come from the tail of the running list. Decodes already
                # got their token this step (we batch them first), so a tail decode
                # means this chunk waits for the next step instead.
                if self.running[next(reversed(self.running))].dec:
                    gone = True
                    break
                v = self._preempt_last()
                preempted = True
                if v is s:
                    gone = True
                    break
            if gone:
                continue
            self.free -= nb
            s.blocks += nb
            chunks.append((s, x))
            budget -= x
        # 3) admissions (FCFS, chunked prefill), only if nothing was preempted
        if not preempted:
            while (self.waiting and len(self.running) < self.max_seqs and budget > 0
                   and len(self.prefilling) < self.mpp):
                s = self.waiting[0]
                cached = 0
                if s.h and self.pc is not None:
                    k = self.pc.peek(s.h)
                    if k:
                        cached = min(k * HASH_BLOCK_TOKENS, (s.target - 1) // bs * bs)
                x = min(s.target - cached, budget, lpt)
                nb = -(-(cached + x) // bs)
                if nb > self.free:
                    break
                if s.h and self.pc is not None:
                    self.pc.lookup(s.h)
                    self.prefix_skipped += cached
                self.waiting.popleft()
                self.running[s.rid] = s
                self.prefilling.append(s)
                s.computed = cached
                s.blocks = nb
                self.free -= nb
                self.admitted += 1
                if rec.first_sched[s.rid] != rec.first_sched[s.rid]:  # NaN: first time
                    rec.first_sched[s.rid] = self.t
                chunks.append((s, x))
                budget -= x
        if not nD and not chunks:
            if preempted or not self.running:
                return  # state changed; the caller loops
            # Only partial prefills hold blocks and none can grow: recompute the
            # newest one (vLLM would preempt it when allocation fails).
            self._preempt_last()
            return
        # 4) step time (hardware.StepCoeffs.step_time, inlined)
        tokens = nD
        attn_ctx = S_dec
        kv_read = S_dec
        for s, x in chunks:
            tokens += x
            attn_ctx += x * s.computed + x * x * 0.5
            kv_read += s.computed
        a = self.attn * attn_ctx * self.invFa
        k = self.kvb * kv_read * self.invBa
        dt = self._f(tokens) + (a if a > k else k) + self._per_seq * (nD + len(chunks)) + self._wake
        self._wake = 0.0
        if self._shapes is not None:  # CPU profiles only: a GPU config compiles no shapes
            dt += self._shape_cost(tokens)
        if self._host is not None:  # a neighbour computing on the same host slows the step
            dt *= self._host.factor(self.t, dt)
            self._host.log.append((self.t, self.t + dt))
        used = self.total_blocks - self.free
        self.kv_int += used * dt
        self.busy += dt
        if used > self.peak_used:
            self.peak_used = used
        self.t += dt
        if nD:  # every decoding request waited dt for this token
            b = int(math.floor(math.log(dt) * ITL_BINS_PER_E))
            self.itl_hist[b] = self.itl_hist.get(b, 0) + nD
        self.dc += 1
        self.steps += 1
        # 5) prefill progress: the step that finishes a prefill samples a token
        for s, x in chunks:
            s.computed += x
            if s.computed < s.target:
                continue
            self.prefilling.remove(s)
            if s.h and self.pc is not None:
                self.pc.insert(s.h)
            gen = s.g + 1
            if rec.first_token[s.rid] != rec.first_token[s.rid]:
                rec.first_token[s.rid] = self.t
            if gen >= s.O:
                self._finish(s, s.blocks)
                continue
            s.dec = True
            s.base = s.target
            s.join = self.dc
            s.gjoin = gen
            s.blocks = 0
            self.cnt[(s.base - s.join) % bs] += 1
            self.nD += 1
            self.sum_off += s.base - s.join
            heapq.heappush(self.heap, (s.join + s.O - gen, s.rid, s.ver, s))
        self._pop_done()
        if self.check:
            self._check()

    def _check(self) -> None:
        """Invariants (tests): block accounting is exact and within capacity."""
        assert 0 <= self.free <= self.total_blocks, (self.free, self.total_blocks)
        held = 0
        for s in self.running.values():
            if s.dec:
                held += -(-(s.base + self.dc - s.join) // self.bs)
            else:
                held += s.blocks
        assert held == self.total_blocks - self.free, (held, self.total_blocks - self.free)
        assert len(self.running) <= self.max_seqs
        assert self.nD == sum(1 for s in self.running.values() if s.dec)
