"""Simulated OpenAI/vLLM-compatible HTTP server: a thin aiohttp shell over
``pool.Pool`` (the planner's vLLM scheduler model, ``Instance``, driven by this
server's clock) and ``tokens.TokenCounter`` (prompt tokens).

Request parsing and response shaping are plain functions; the only stateful
part is ``Backend``, which owns the pool, maps simulated time to wall time
(``time_scale`` wall seconds per simulated second; 0: as fast as possible)
and wakes the handlers whose sequences produced tokens.

Simulator-specific behaviour (not in vLLM):

* every response carries ``x-pool-name: <name>``;
* any model name is accepted and echoed unless ``served_names`` is given
  (then an unknown one gets vLLM's 404, like a real server);
* latencies in the histograms are *simulated* seconds (what the modelled GPU
  would take), independent of ``time_scale``.

Where the router and the planner depend on it, it answers like the vLLM
release ``tests/vllm`` pins (0.32, checked by its contract test against a
real server): error bodies ``{"error": {message, type, param, code}}`` with
vLLM's wordings, a prompt + ``max_tokens`` over ``max_model_len`` *clipped*
(200, ``finish_reason: "length"``) instead of refused, ``max_tokens`` over
``max_model_len`` a 400 (param ``max_tokens``), the streamed usage chunk
after the finish chunk (``choices: []``), a bounded queue answered with
vLLM's 503 and counted in ``vllm:admission_rejections_total``, and only
metric names real vLLM exports. ``compat="0.6"`` (``--vllm-compat 0.6``)
answers like vLLM 0.5-0.10 instead: the flat error body and a 400 for prompt
+ max_tokens over max_model_len.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson
from aiohttp import web

from .pool import Pool, PoolConfig, QueueFull, Sequence
from .tokens import ChatTemplate, PromptError, TokenCounter, output_text, DEFAULT_TOKENIZER

# --- Defaults ---------------------------------------------------------------

#: Served model name; the ext_proc demo models a Llama-3-8B deployment.
DEFAULT_MODEL = "llama-3-8b-sim"

#: Response header naming the pool that answered (so tests and the demo can
#: tell which backend served a request through Envoy).
POOL_HEADER = "x-pool-name"

#: Output length when the request gives no max_tokens: log-normal fitted on
#: the Azure LLM inference 2023 conversation trace (GeneratedTokens: median
#: 129, sigma of log 0.86; ../shared/data/traces), capped by the context left.
OUTPUT_MEDIAN_TOKENS = 129
OUTPUT_LOG_SIGMA = 0.86

#: With time-scale 0 a stream is sent at once; it is still cut into chunks of
#: this many tokens so clients see a realistic multi-chunk stream.
STREAM_TOKENS_PER_CHUNK = 16

#: Shortest wall-clock sleep of the pool's driver: bounds its CPU use and the
#: streaming chunk rate (~500 wake-ups/s at most).
MIN_DRIVER_SLEEP = 0.002

#: Largest n (choices per prompt) accepted; vLLM has no fixed cap, but each
#: choice is a sequence here and a huge n is a mistake, not a load.
MAX_N = 128


#: vLLM generations the simulator answers like (``--vllm-compat``): the
#: release the contract test pins (default) and vLLM 0.5-0.10.
COMPAT_032 = "0.32"
COMPAT_06 = "0.6"
COMPATS = (COMPAT_032, COMPAT_06)

#: vLLM 0.32's answer when its queue is full (vllm/exceptions.py QueueOverflowError).
QUEUE_FULL_MESSAGE = ("The engine is currently busy and cannot accept new requests. "
                      "Please try again later or on a different instance.")


# --- Errors -----------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self, compat: str = COMPAT_032) -> dict[str, Any]:
        if compat == COMPAT_06:
            # vLLM 0.5-0.10's ErrorResponse (flat).
            return {"object": "error", "message": self.message, "type": self.err_type,
                    "param": self.param, "code": self.status}
        # vLLM 0.32's ErrorResponse(error=ErrorInfo(...)).
        return {"error": {"message": self.message, "type": self.err_type,
                          "param": self.param, "code": self.status}}


def validation_error(message: str, param: str, value: object) -> ApiError:
    """vLLM 0.32's VLLMValidationError: the message ends with
    "(parameter=P, value=V)" and ``param`` is set."""
    return ApiError(400, f"{message} (parameter={param}, value={value})", param=param)


def prompt_too_long_error(max_model_len: int, prompt: int, exact: bool) -> ApiError:
    """vLLM 0.32 (renderers/params.py) for a prompt over max_model_len. Text
    is tokenized only up to max_model_len + 1 tokens, so it says "at least"
    that; token-id prompts are counted exactly."""
    if exact:
        n, qualifier = prompt, ""
    else:
        n, qualifier = max_model_len + 1, "at least "
    return validation_error(
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
        f"contains {qualifier}{n} input tokens, which exceeds this limit even without any output "
        f"tokens. Please reduce the length of the input prompt.", "input_tokens", n)


def max_tokens_error(max_model_len: int, max_tokens: int) -> ApiError:
    """vLLM 0.32 for max_tokens over max_model_len (whatever the prompt)."""
    return validation_error(
        f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. "
        f"Please request fewer output tokens.", "max_tokens", max_tokens)


def model_not_found_error(model: str, served: tuple[str, ...]) -> ApiError:
    """vLLM 0.32's 404 for a model name it does not serve."""
    return ApiError(404, f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.",
                    err_type="NotFoundError", param="model")


def context_length_error(max_model_len: int, prompt: int, max_tokens: int | None) -> ApiError:
    """vLLM's wording (serving_engine.py, v0.5-v0.10) for too-long requests."""
    if max_tokens is None:
        msg = (f"This model's maximum context length is {max_model_len} tokens. "
               f"However, you requested {prompt} tokens in the messages, "
               f"Please reduce the length of the messages.")
    else:
        msg = (f"This model's maximum context length is {max_model_len} tokens. "
               f"However, you requested {prompt + max_tokens} tokens "
               f"({prompt} in the messages, {max_tokens} in the completion). "
               f"Please reduce the length of the messages or completion.")
    return ApiError(400, msg)


# --- Parsing (pure) -----------------------------------------------------------

@dataclass
class Choice:
    """One sequence to generate: a (prompt, choice) pair."""

    index: int
    prompt_tokens: int
    output_tokens: int
    finish_reason: str


@dataclass
class ParsedRequest:
    kind: str                    # "chat" | "completion"
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int           # usage.prompt_tokens (sum over prompts)
    choices: list[Choice] = field(default_factory=list)


def _opt_int(body: dict, key: str, minimum: int) -> int | None:
    val = body.get(key)
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, int):
        raise ApiError(400, f"'{key}' must be an integer", param=key)
    if val < minimum:
        raise ApiError(400, f"'{key}' must be at least {minimum}, got {val}.", param=key)
    return val


def _seed(body: dict, raw: bytes) -> int:
    seed = body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


def draw_output_tokens(seed: int, index: int, room: int) -> tuple[int, str]:
    """Deterministic natural output length (and finish reason) for a choice."""
    rng = random.Random(f"{seed}:{index}")
    n = max(1, round(rng.lognormvariate(math.log(OUTPUT_MEDIAN_TOKENS), OUTPUT_LOG_SIGMA)))
    if n >= room:
        return room, "length"
    return n, "stop"


def parse_request(kind: str, raw: bytes, counter: TokenCounter, max_model_len: int,
                  served_model: str, compat: str = COMPAT_032,
                  served_names: tuple[str, ...] = ()) -> ParsedRequest:
    """Validate a /v1/chat/completions or /v1/completions body; raise ApiError.
    ``served_names``: the model names served (empty: accept any name)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    model = body.get("model")
    if model is None:
        model = served_model
    elif not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    elif served_names and model not in served_names:
        raise model_not_found_error(model, served_names)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        if not stream:
            msg = "Stream options can only be defined when `stream=True`."
            if compat != COMPAT_06:
                msg += " (parameter=stream_options)"
            raise ApiError(400, msg, param="stream_options")
        include_usage = bool(opts.get("include_usage"))
    n = _opt_int(body, "n", 1) or 1
    if n > MAX_N:
        raise ApiError(400, f"'n' must be at most {MAX_N}", param="n")
    max_tokens = _opt_int(body, "max_completion_tokens", 1) if kind == "chat" else None
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1)
    if max_tokens is not None and max_tokens > max_model_len and compat != COMPAT_06:
        raise max_tokens_error(max_model_len, max_tokens)

    try:
        if kind == "chat":
            if "messages" not in body:
                raise ApiError(400, "Field required: 'messages'", param="messages")
            prompts = [counter.chat_prompt_tokens(
                body["messages"], body.get("tools"), body.get("functions"))]
        else:
            if "prompt" not in body:
                raise ApiError(400, "Field required: 'prompt'", param="prompt")
            prompts = counter.completion_prompt_tokens(body["prompt"])
    except PromptError as exc:
        raise ApiError(400, str(exc)) from None

    token_ids = kind != "chat" and _is_token_ids(body["prompt"])
    seed = _seed(body, raw)
    parsed = ParsedRequest(kind, model, stream, include_usage, sum(prompts))
    for p_idx, p in enumerate(prompts):
        if p < 1:
            raise ApiError(400, "The prompt cannot be empty.", param="prompt")
        if compat == COMPAT_06:
            if max_tokens is None:
                if p >= max_model_len:
                    raise context_length_error(max_model_len, p, None)
            elif p + max_tokens > max_model_len:
                raise context_length_error(max_model_len, p, max_tokens)
        elif p >= max_model_len:
            # vLLM 0.32 refuses p > max_model_len; p == max_model_len leaves
            # no room for output and is refused here too.
            raise prompt_too_long_error(max_model_len, p, token_ids)
        for c in range(n):
            index = p_idx * n + c
            if max_tokens is not None:
                # vLLM 0.32 clips max_tokens to the context left: the answer
                # is cut short ("length") instead of the request refused.
                out, reason = min(max_tokens, max_model_len - p), "length"
            else:
                out, reason = draw_output_tokens(seed, index, max_model_len - p)
            parsed.choices.append(Choice(index, p, out, reason))
    return parsed


def _is_token_ids(prompt: Any) -> bool:
    """A /v1/completions prompt given as token ids (a list of ints or of lists)."""
    return (isinstance(prompt, list) and bool(prompt)
            and all(isinstance(x, int) or isinstance(x, list) for x in prompt))


# --- Response shaping (pure) -------------------------------------------------

def usage(parsed: ParsedRequest, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": parsed.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": parsed.prompt_tokens + completion_tokens}


def full_response(parsed: ParsedRequest, rid: str, created: int,
                  generated: list[int]) -> dict[str, Any]:
    choices = []
    for ch, g in zip(parsed.choices, generated):
        text = output_text(0, g)
        if parsed.kind == "chat":
            choices.append({"index": ch.index,
                            "message": {"role": "assistant", "content": text,
                                        "tool_calls": []},
                            "logprobs": None, "finish_reason": ch.finish_reason,
                            "stop_reason": None})
        else:
            choices.append({"index": ch.index, "text": text, "logprobs": None,
                            "finish_reason": ch.finish_reason, "stop_reason": None})
    return {"id": rid,
            "object": "chat.completion" if parsed.kind == "chat" else "text_completion",
            "created": created, "model": parsed.model, "choices": choices,
            "usage": usage(parsed, sum(generated))}


class StreamShaper:
    """Builds SSE chunks for one streamed request."""

    def __init__(self, parsed: ParsedRequest, rid: str, created: int) -> None:
        self.parsed = parsed
        self.head = {"id": rid,
                     "object": ("chat.completion.chunk" if parsed.kind == "chat"
                                else "text_completion"),
                     "created": created, "model": parsed.model}
        self.sent = [0] * len(parsed.choices)
        self.closed = [False] * len(parsed.choices)

    def _event(self, choice: dict) -> bytes:
        return b"data: " + orjson.dumps({**self.head, "choices": [choice]}) + b"\n\n"

    def chunks(self, i: int, upto: int, done: bool, max_tokens_per_chunk: int = 0) -> list[bytes]:
        """Chunks for choice i having generated ``upto`` tokens."""
        out: list[bytes] = []
        if self.closed[i]:
            return out
        ch = self.parsed.choices[i]
        chat = self.parsed.kind == "chat"
        start = self.sent[i]
        if chat and start == 0 and upto > 0:
            out.append(self._event({"index": ch.index,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}))
        step = max_tokens_per_chunk or max(upto - start, 1)
        pos = start
        while pos < upto or (done and not self.closed[i]):
            nxt = min(upto, pos + step)
            last = done and nxt >= upto
            text = output_text(pos, nxt)
            reason = ch.finish_reason if last else None
            if chat:
                c = {"index": ch.index, "delta": {"content": text},
                     "logprobs": None, "finish_reason": reason}
            else:
                c = {"index": ch.index, "text": text, "logprobs": None,
                     "finish_reason": reason, "stop_reason": None}
            out.append(self._event(c))
            pos = nxt
            if last:
                self.closed[i] = True
        self.sent[i] = upto
        return out

    def final(self, completion_tokens: int) -> bytes:
        out = b""
        if self.parsed.include_usage:
            out += b"data: " + orjson.dumps(
                {**self.head, "choices": [],
                 "usage": usage(self.parsed, completion_tokens)}) + b"\n\n"
        return out + b"data: [DONE]\n\n"


# --- Metrics (pure rendering) ------------------------------------------------

def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


#: Metric names real vLLM 0.32 exports that the simulator also serves (the
#: contract test checks each against a real server's /metrics); the
#: simulator serves no other ``vllm:`` name.
EXPORTED_METRICS = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:request_success_total", "vllm:admission_rejections_total",
    "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
)

#: vLLM 0.32's finished_reason label values of vllm:request_success_total.
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")

#: Reasons of vllm:admission_rejections_total (vLLM 0.32 ADMISSION_REASONS);
#: the simulator's bounded queue is vLLM's --max-num-queued-reqs.
ADMISSION_QUEUE_REASON = "max_num_queued_reqs"
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")


def render_metrics(pool: Pool, model_name: str) -> str:
    """Prometheus text exposition with vLLM 0.32's metric names and labels
    (``engine="0"``, ``model_name``)."""
    model = f'model_name="{_esc(model_name)}"'
    lbl = f'engine="0",{model}'
    st = pool.stats
    lines: list[str] = []

    def metric(name: str, typ: str, help_: str, samples: list[tuple[str, str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {typ}")
        for suffix, labels, value in samples:
            lines.append(f"{name}{suffix}{{{labels}}} {float(value)!r}")

    metric("vllm:num_requests_running", "gauge",
           "Number of requests in model execution batches.",
           [("", lbl, pool.num_running)])
    metric("vllm:num_requests_waiting", "gauge",
           "Number of requests waiting to be processed.",
           [("", lbl, pool.num_waiting)])
    metric("vllm:kv_cache_usage_perc", "gauge",
           "KV-cache usage. 1 means 100 percent usage.", [("", lbl, pool.kv_usage)])
    metric("vllm:num_preemptions", "counter",
           "Cumulative number of preemption from the engine.",
           [("_total", lbl, pool.num_preemptions)])
    metric("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.",
           [("_total", lbl, st.prompt_tokens)])
    metric("vllm:generation_tokens", "counter", "Number of generation tokens processed.",
           [("_total", lbl, st.generation_tokens)])
    reasons = list(FINISHED_REASONS) + sorted(set(st.success) - set(FINISHED_REASONS))
    metric("vllm:request_success", "counter", "Count of successfully processed requests.",
           [("_total", f'{lbl},finished_reason="{r}"', st.success.get(r, 0))
            for r in reasons])
    metric("vllm:admission_rejections", "counter",
           "Number of admission attempts rejected by a queue limit, by reason.",
           [("_total", f'{model},reason="{r}"', st.rejected if r == ADMISSION_QUEUE_REASON else 0)
            for r in ADMISSION_REASONS])
    for name, hist, help_ in (
            ("vllm:time_to_first_token_seconds", st.ttft,
             "Histogram of time to first token in seconds (simulated)."),
            ("vllm:e2e_request_latency_seconds", st.e2e,
             "Histogram of end to end request latency in seconds (simulated).")):
        samples = [("_bucket", f'{lbl},le="{le}"', c) for le, c in hist.cumulative()]
        samples.append(("_count", lbl, hist.count))
        samples.append(("_sum", lbl, hist.sum))
        metric(name, "histogram", help_, samples)
    return "\n".join(lines) + "\n"


# --- The stateful shell ------------------------------------------------------

@dataclass(frozen=True)
class BackendSettings:
    name: str = "backend"
    model: str = DEFAULT_MODEL
    time_scale: float = 0.0
    tokenizer: str = DEFAULT_TOKENIZER
    template: ChatTemplate = ChatTemplate()
    pool: PoolConfig = PoolConfig()
    compat: str = COMPAT_032                 # vLLM generation answered like (COMPATS)
    served_names: tuple[str, ...] = ()       # model names served; empty: any name


class Backend:
    """Owns the pool and maps simulated time onto the event loop."""

    def __init__(self, settings: BackendSettings) -> None:
        if settings.time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        self.settings = settings
        self.counter = TokenCounter(settings.tokenizer, settings.template)
        self.pool = Pool(settings.pool)
        self.max_model_len = settings.pool.max_model_len
        self._ids = itertools.count()
        self._prefix = os.urandom(4).hex()
        self._events: dict[str, asyncio.Event] = {}
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None
        self._t0 = 0.0

    # -- clock / driver --------------------------------------------------------

    @property
    def realtime(self) -> bool:
        return self.settings.time_scale > 0

    def sim_now(self) -> float:
        if not self.realtime:
            return self.pool.now
        return (asyncio.get_running_loop().time() - self._t0) / self.settings.time_scale

    async def start(self, app: web.Application | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        self._wake = asyncio.Event()
        if self.realtime:
            self._driver = loop.create_task(self._drive())

    async def stop(self, app: web.Application | None = None) -> None:
        if self._driver:
            self._driver.cancel()
            try:
                await self._driver
            except asyncio.CancelledError:
                pass

    def _notify(self, changed: list[Sequence]) -> None:
        for seq in changed:
            ev = self._events.get(seq.req_id.split("#", 1)[0])
            if ev is not None:
                ev.set()

    async def _drive(self) -> None:
        assert self._wake is not None
        scale = self.settings.time_scale
        while True:
            now = self.sim_now()
            self._notify(self.pool.advance(now))
            nxt = self.pool.next_event_time()
            self._wake.clear()
            if nxt is None:
                await self._wake.wait()
                continue
            delay = max((nxt - now) * scale, MIN_DRIVER_SLEEP)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    # -- request lifecycle -------------------------------------------------------

    def _submit(self, rid: str, parsed: ParsedRequest) -> list[Sequence]:
        seqs: list[Sequence] = []
        now = self.sim_now()
        try:
            for ch in parsed.choices:
                seqs.append(self.pool.submit(f"{rid}#{ch.index}", ch.prompt_tokens,
                                               ch.output_tokens, now, ch.finish_reason))
        except QueueFull:
            for s in seqs:
                self.pool.abort(s.req_id, now)
                self.pool.release(s.req_id)
            raise ApiError(503, QUEUE_FULL_MESSAGE, err_type="Service Unavailable") from None
        if self.realtime:
            assert self._wake is not None
            self._wake.set()
        else:
            for s in seqs:
                self.pool.run_until_done(s.req_id)
        return seqs

    def sync(self) -> None:
        """Bring the pool up to now and wake handlers (realtime mode)."""
        if self.realtime:
            self._notify(self.pool.advance(self.sim_now()))

    def _finish(self, seqs: list[Sequence]) -> None:
        now = self.sim_now()
        aborted = False
        for s in seqs:
            if not s.done:
                self.pool.abort(s.req_id, now)
                aborted = True
            self.pool.release(s.req_id)
        if aborted and self._wake is not None:
            self._wake.set()  # the freed slot may admit a waiting request

    async def handle(self, request: web.Request, kind: str) -> web.StreamResponse:
        raw = await request.read()
        parsed = parse_request(kind, raw, self.counter, self.max_model_len,
                               self.settings.model, self.settings.compat,
                               self.settings.served_names)
        rid = (("chatcmpl-" if kind == "chat" else "cmpl-")
               + f"{self._prefix}{next(self._ids):08x}")
        created = int(time.time())
        event = asyncio.Event()
        self._events[rid] = event
        seqs: list[Sequence] = []
        try:
            seqs = self._submit(rid, parsed)
            if parsed.stream:
                return await self._stream(request, parsed, rid, created, seqs, event)
            while not all(s.done for s in seqs):
                await event.wait()
                event.clear()
            body = full_response(parsed, rid, created, [s.generated for s in seqs])
            return web.Response(body=orjson.dumps(body), content_type="application/json")
        finally:
            self._events.pop(rid, None)
            self._finish(seqs)

    async def _stream(self, request: web.Request, parsed: ParsedRequest, rid: str,
                      created: int, seqs: list[Sequence],
                      event: asyncio.Event) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        shaper = StreamShaper(parsed, rid, created)
        per_chunk = 0 if self.realtime else STREAM_TOKENS_PER_CHUNK
        while True:
            out: list[bytes] = []
            for i, s in enumerate(seqs):
                out.extend(shaper.chunks(i, s.generated, s.done, per_chunk))
            if out:
                await resp.write(b"".join(out))
            if all(s.done for s in seqs):
                break
            await event.wait()
            event.clear()
        await resp.write(shaper.final(sum(s.generated for s in seqs)))
        await resp.write_eof()
        return resp


# --- aiohttp app ---------------------------------------------------------------

def _error_response(err: ApiError, compat: str) -> web.Response:
    return web.Response(status=err.status, body=orjson.dumps(err.body(compat)),
                        content_type="application/json")


#: Where the app keeps its Backend (for embedding code and tests).
BACKEND_KEY: "web.AppKey[Backend]" = web.AppKey("backend", Backend)


def create_app(settings: BackendSettings) -> web.Application:
    backend = Backend(settings)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[BACKEND_KEY] = backend

    async def add_pool_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[POOL_HEADER] = settings.name

    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except ApiError as err:
            return _error_response(err, settings.compat)

    app.middlewares.append(errors)
    app.on_response_prepare.append(add_pool_header)
    app.on_startup.append(backend.start)
    app.on_cleanup.append(backend.stop)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await backend.handle(request, "chat")

    async def completions(request: web.Request) -> web.StreamResponse:
        return await backend.handle(request, "completion")

    async def models(request: web.Request) -> web.Response:
        names = settings.served_names or (settings.model,)
        body = {"object": "list", "data": [{
            "id": m, "object": "model", "created": int(time.time()),
            "owned_by": "vllm", "root": settings.model, "parent": None,
            "max_model_len": backend.max_model_len, "permission": []} for m in names]}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics(request: web.Request) -> web.Response:
        backend.sync()
        return web.Response(text=render_metrics(backend.pool, settings.model),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(settings: BackendSettings, host: str, port: int,
                ready: "asyncio.Event | None" = None,
                on_bound: "Callable[[int], None] | None" = None) -> None:
    """Run until cancelled. ``on_bound`` receives the bound port (useful with
    port 0); ``ready`` is set once the socket listens."""
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        if on_bound is not None:
            on_bound(bound)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


class BackgroundServer:
    """Run a backend on its own event loop in a daemon thread (tests, demos).

    >>> with BackgroundServer(BackendSettings(name="short")) as srv:
    ...     srv.base_url   # "http://127.0.0.1:<port>/v1"
    """

    def __init__(self, settings: BackendSettings, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def _run(self) -> None:
        def bound(port: int) -> None:
            self.port = port
            self._ready.set()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            await serve(self.settings, self.host, self.port, on_bound=bound)

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # reported by start()
            self._error = exc
        finally:
            self._ready.set()

    def start(self, timeout: float = 10.0) -> "BackgroundServer":
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"backend-{self.settings.name}")
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("backend did not start in time")
        if self._error is not None:
            raise RuntimeError(f"backend failed to start: {self._error}") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
