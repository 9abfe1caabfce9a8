"""Every default and limit of the router, each with its reason and precedent.

Modules import these names; the config file and environment variables
override the ones that belong to an operator (see ``extproc.config``).
"""

# --- Routing -----------------------------------------------------------------

#: Token budget (prompt + output) at or below which a request goes to the short
#: pool. 8K is the low end of the 8K-16K range production splits use and the
#: context most chat traffic fits: 99.99% of the Azure 2023 conversation trace
#: and 54% of Mooncake's conversation trace are under it (../shared/data/README.md).
B_SHORT = 8192

#: max_model_len of the short pool. Equal to B_SHORT by default: a request the
#: policy calls short must fit, and vLLM rejects prompt + max_tokens above it.
SHORT_MAX_MODEL_LEN = 8192

#: max_model_len of the long pool: Llama-3.1's 128K context, the usual
#: worst-case setting that the whole fleet is provisioned for today.
LONG_MAX_MODEL_LEN = 131072

#: Pool names; they are the values of the routing header and Envoy cluster names.
SHORT_POOL = "short"
LONG_POOL = "long"

#: Request header Envoy routes on. The ``x-`` prefix marks it as private to
#: this deployment, like Envoy's own ``x-envoy-*`` headers.
ROUTING_HEADER = "x-budget-pool"

#: Response header that tells the client (and access logs) what was decided:
#: ``pool=short; est=1234; budget=2258; cat=prose``.
DECISION_HEADER = "x-budget-decision"

#: Envoy dynamic-metadata namespace for the decision (read by access logs as
#: %DYNAMIC_METADATA(token_budget_router:pool)%). Envoy's own filters use their
#: reverse-DNS filter name; ours is the project name.
METADATA_NAMESPACE = "token_budget_router"

# --- Margins -----------------------------------------------------------------

#: How many root-mean-square relative errors (learned per (model, category)
#: on prompts of at least half B_short, shrinking with the number of texts in
#: the prompt) the policy adds to the prompt estimate before comparing with
#: B_short. On chats built from ../shared/data/calib with tokenizers and chat
#: templates the router is not told (bench/replay_accuracy.py, 10K requests
#: each), 1.0 / 1.25 / 1.5 sigmas gave 0.11-0.23% / 0.10-0.16% / 0.09-0.16%
#: harmful misroutes and 2.3-2.5% / 2.5-2.8% / 3.0-3.2% in all: 1.25 keeps
#: harmful ones (a request that fails or thrashes the short pool) near the
#: floor while a third fewer requests than at 1.5 go long for nothing.
MARGIN_SIGMAS = 1.25

#: Floor of the relative margin, so a lucky streak of small errors never makes
#: the policy trust the estimate blindly. 2% is below the typical error of a
#: well-calibrated (model, category) and above tokenizer-version drift.
MIN_MARGIN = 0.02

#: A prompt is "surely" over the long pool's max_model_len when even its
#: estimate minus this relative margin is over it; only then do we answer 400
#: ourselves. 25% is above the p99 relative error of the 4 bytes/token prior
#: on the calib data, so no request vLLM would accept is refused here.
REJECT_MARGIN = 0.25

# --- Output budget -----------------------------------------------------------

#: Output tokens assumed when the request gives no max_tokens and nothing has
#: been learned yet. 1024 is a common serving default for chat (vLLM's
#: generation_config and many gateways cap at 1K-4K).
DEFAULT_OUTPUT_TOKENS = 1024

#: Quantile of usage.completion_tokens learned per category as the output
#: budget when the request does not give one. Only requests whose prompt is
#: within one output length of B_short are affected: on the same replay sets
#: p85 instead of p90 moved ~0.3% of requests from benign misroutes to
#: correct ones for +0.02-0.06% harmful; p95 costs ~0.5% more benign ones.
OUTPUT_QUANTILE = 0.85

#: Completions observed per category before the learned quantile replaces
#: DEFAULT_OUTPUT_TOKENS: a p95 needs ~20 points for its first meaningful value.
OUTPUT_MIN_SAMPLES = 20

# --- Estimator ---------------------------------------------------------------

#: Prior bytes per token until a (model, category) has samples: the classic
#: "~4 characters per token" rule for English with GPT/Llama BPE tokenizers,
#: measured 4.5-4.9 bytes/token for prose and 3.2-4.3 for code and JSON.
PRIOR_BYTES_PER_TOKEN = 4.0

#: Relative error assumed before any sample: the prior is off by 24-41% at p90
#: per category on the calib data, so start wide and let samples narrow it.
PRIOR_REL_ERROR = 0.20

#: Weight of a new sample in the relative-error EMA: ~50 samples of memory,
#: enough to follow a tokenizer change within a minute of traffic while
#: smoothing single outliers (like TCP's RTT estimator using 1/8 for srtt).
ERROR_EMA_WEIGHT = 0.02

#: Forgetting factor of the per-(model, category) recursive least squares fit.
#: 0.998 gives an effective memory of ~500 samples, long enough to average
#: over text lengths, short enough to track a model swap behind the same name.
RLS_FORGETTING = 0.998

#: Samples before a (model, category) is "confident": the adaptive sampler
#: learns from every response until then (the RLS has ~6 parameters; 5x that
#: gives a stable fit).
MIN_SAMPLES_CONFIDENT = 32

#: Distinct model names tracked. Past this, new names share the "*" bucket, so
#: a flood of made-up model names cannot grow memory without limit (like a
#: bounded LRU in a cache; real deployments serve a handful of models).
MAX_MODELS = 64

# --- Learning from responses -------------------------------------------------

#: Share of routed requests whose response phase we watch once every category
#: is confident. 5% of 1K req/s is 50 samples/s: plenty to track drift while
#: most requests cost only the request phase (one ext_proc stream closed early).
SAMPLE_RATE = 0.05

#: Add stream_options.include_usage to streamed requests that lack it (and hide
#: the extra usage-only chunk from the client). Off by default: it rewrites the
#: request body, which operators should opt into.
INJECT_INCLUDE_USAGE = False

#: Largest response body we keep looking into for usage. vLLM puts usage at the
#: end of a JSON body; 4 MiB matches gRPC's default message limit.
MAX_RESPONSE_SCAN_BYTES = 4 * 1024 * 1024

# --- Limits and timeouts -----------------------------------------------------

#: Largest request body accepted (413 above it). 8 MiB holds ~2M bytes of
#: prompt text, more than any 128K-token prompt (at most ~4-5 bytes/token)
#: even with JSON escaping; OpenAI's API caps request bodies in the same range.
MAX_BODY_BYTES = 8 * 1024 * 1024

#: Room above the body limit ([router] max_body_bytes) for what travels with
#: a body: headers, gRPC framing, the ProcessingRequest around it. 1 MiB is
#: Envoy's own default buffer, so headers alone never fill it. Every limit
#: that must hold a whole body is the body limit plus this: Envoy's buffer
#: (envoy.bootstrap.buffer_limit_bytes), the gRPC message limit on both ends
#: of the ext_proc channel (envoy.bootstrap.grpc_max_message_bytes,
#: serve.server.max_message_bytes).
BODY_HEADROOM_BYTES = 1024 * 1024

#: Envoy's per-connection buffer must hold a whole buffered body; Envoy's 1 MiB
#: default answers 413 for long prompts (the default body limit's value).
ENVOY_BUFFER_BYTES = MAX_BODY_BYTES + BODY_HEADROOM_BYTES

#: gRPC message limit on the ext_proc channel: the body travels in one
#: ProcessingRequest, so it must exceed MAX_BODY_BYTES (gRPC's 4 MiB default
#: gives a 500); the default body limit's value.
GRPC_MAX_MESSAGE_BYTES = MAX_BODY_BYTES + BODY_HEADROOM_BYTES

#: What the router reads of a request besides its body, as Envoy's
#: ext_proc ``request_attributes`` (CEL attribute expressions) -> the header
#: name the state machine files it under. Envoy skips the request-header
#: phase (``request_header_mode: SKIP``: one exchange per request instead of
#: two, issue 19) and sends these with the body message, in
#: ``ProcessingRequest.attributes[<filter name>]``; a header the client did
#: not send is left out. Path and method pick the endpoint; content-type and
#: content-encoding gate parsing and decoding (what the header phase checked);
#: the request id and W3C trace context go into logs and spans. Envoy >= 1.40
#: sends request attributes with the first request message, headers or body.
EXT_PROC_REQUEST_ATTRIBUTES = (
    ("request.path", ":path"),
    ("request.method", ":method"),
    ("request.headers['content-type']", "content-type"),
    ("request.headers['content-encoding']", "content-encoding"),
    ("request.id", "x-request-id"),
    ("request.headers['traceparent']", "traceparent"),
    ("request.headers['tracestate']", "tracestate"),
)

#: Envoy's per-message deadline for the processor. Envoy's 200 ms default gives
#: 504s under a CPU burst on small hosts; 1 s is still far below a first token.
MESSAGE_TIMEOUT_MS = 1000

#: Circuit-breaker limits on the ext_proc cluster: one stream per in-flight
#: request, and Envoy's default of 1024 overflows at fleet load.
EXTPROC_MAX_REQUESTS = 100_000

#: Route timeout for pools. Envoy's 15 s default cuts long SSE streams; a 128K
#: generation at 20 tok/s takes ~2 h. 0 disables it; the idle timeout below
#: still reaps dead streams.
ROUTE_TIMEOUT_S = 0

#: Idle timeout of a stream to a pool: longer than the slowest prefill of a
#: 128K prompt queued behind others (minutes), like Envoy's 5 min default.
STREAM_IDLE_TIMEOUT_S = 300

#: Graceful shutdown: how long in-flight ext_proc streams may finish.
#: Kubernetes' default terminationGracePeriodSeconds is 30 s; stay below it.
DRAIN_SECONDS = 20.0

#: Drain delay: after SIGTERM a worker answers health NOT_SERVING and keeps
#: serving this long before it closes its port, so Envoy stops opening
#: streams to it before they would be refused (refused streams fail open, to
#: the long pool, unclassified). Envoy's gRPC health check here marks it down
#: within 2 x 1 s (bootstrap.HEALTH_CHECK_*), and Kubernetes takes a few
#: seconds to drop an endpoint; 5 s covers both, as the usual preStop sleep
#: does. With drain_seconds (20 s) it stays under Kubernetes' default 30 s
#: termination grace period. [router] drain_delay_s, `serve --drain-delay`.
DRAIN_DELAY_S = 5.0

#: Calibration snapshot period. Losing 30 s of learning on a crash is cheap
#: (the sampler refills it in seconds) and writing a few KB every 30 s is free.
SNAPSHOT_INTERVAL_S = 30.0

# --- Ports (loopback demo defaults) ------------------------------------------

ENVOY_PORT = 10000          # Envoy's own docs use 10000 for the listener
ENVOY_ADMIN_PORT = 9901     # Envoy's documented admin port
ROUTER_PORT = 50051         # gRPC's conventional example port; worker i: +i
SHORT_POOL_PORT = 8101
LONG_POOL_PORT = 8102

# --- Tiers, pool signals and closed-loop routing (issue 10) ---------------------

#: Most tiers a config may have. Operators ask for 3-4 (8K / 32K / 128K, AIBrix
#: and SGLang length buckets); 8 bounds the per-tier metric series and routes
#: with room to spare.
MAX_TIERS = 8

#: A tier name is the routing header's value, part of an Envoy cluster name
#: (``pool_<name>``), a metric label and part of an environment variable name:
#: lower-case letters, digits and '_', starting with a letter, at most 32
#: characters (Kubernetes label values allow 63; 32 keeps cluster names short).
TIER_NAME_PATTERN = r"[a-z][a-z0-9_]{0,31}"

#: How often the monitor scrapes each pool endpoint's vLLM /metrics: 1 s, the
#: granularity vLLM's own scheduler gauges change at under load and what
#: Prometheus setups for autoscaling (KEDA, llm-d's inference scheduler) use.
MONITOR_INTERVAL_S = 1.0

#: A sample older than this many scrape intervals counts as unknown: one lost
#: scrape is tolerated, three in a row mean the endpoint (or the monitor) is gone
#: (Prometheus marks series stale after a missed scrape plus lookback, same idea).
MONITOR_STALE_INTERVALS = 3

#: Deadline of one /metrics scrape: half the interval, so scrapes never pile up.
MONITOR_TIMEOUT_FRACTION = 0.5

#: Spillover: a tier is saturated when its waiting requests per instance reach
#: this (vLLM semantic-router's fleet simulator spills at 0.85 active+queued per
#: GPU slot; with requests already queueing, one waiting per instance means the
#: scheduler is full and a new request would wait) ...
SPILL_WAITING_PER_INSTANCE = 1.0
#: ... or its mean KV-cache usage reaches this (vLLM starts preempting near 1.0;
#: Dynamo's KV router treats > 0.9 as busy).
SPILL_KV_USAGE = 0.92
#: Hysteresis (a Schmitt trigger): a saturated tier is clear again only when
#: its waiting per instance falls to this (a quarter of the trigger: the queue
#: has mostly drained, so one scrape's noise cannot flap decisions) ...
SPILL_WAITING_CLEAR = 0.25
#: ... and its KV usage to this (a 12-point band below the trigger, about what
#: a few long sequences finishing free on one instance).
SPILL_KV_CLEAR = 0.80

#: Adaptive threshold (opt-in): each boundary moves by this share of its value
#: per step (small steps: 5%, so a wrong move costs little) ...
ADAPT_STEP_FRACTION = 0.05
#: ... at most once per this many seconds (dwell: a move needs time to show in
#: the signals; 10 scrape intervals) ...
ADAPT_DWELL_S = 10.0
#: ... when the smaller tier's pressure differs from the larger tier's by more
#: than this dead band (waiting per instance + preemptions per second; below it
#: the boundary stays put).
ADAPT_DEAD_BAND = 0.5
#: Bounds of a moving boundary as shares of its configured value, unless set.
ADAPT_MIN_FRACTION = 0.5

# --- Request kinds: media parts, max_tokens, content types -------------------

#: Vision token rule (see extproc.core.images.ImageRule): one prompt token per
#: 28 x 28 px, as Qwen2-VL / Qwen2.5-VL (14 px ViT patches merged 2x2), the
#: most served open VLM family on vLLM. ViT-style models with 14 px patches and
#: no merge (e.g. Pixtral, 16 px) spend ~4x more per pixel: configure them per
#: model in [media] models.
IMAGE_PATCH_PX = 28

#: Fewest tokens per image: Qwen2-VL's min_pixels (56 x 56 = 4 tokens).
IMAGE_MIN_TOKENS = 4

#: Most tokens per image: Qwen2-VL's default max_pixels (28 x 28 x 16384);
#: larger images are scaled down to it by the model's processor.
IMAGE_MAX_TOKENS = 16384

#: Marker tokens around each image (<|vision_start|>, <|vision_end|>).
IMAGE_OVERHEAD_TOKENS = 2

#: An image the router cannot size (an http(s) URL it must not fetch, or a
#: data URL whose header it cannot read): 4096 tokens, a 1792 x 1792 image at
#: 28 px, more than a phone photo after the usual 1-2 Mpx resize (1280-2560
#: tokens): conservative, so such requests lean towards the long pool.
REMOTE_IMAGE_TOKENS = 4096

#: Audio parts: Whisper-style encoders (Qwen2-Audio, Ultravox) spend ~25 tokens
#: per second and read at most 30 s per clip, 750 tokens; a clip given as a
#: URL or of unknown length counts this much, a data clip its size at
#: AUDIO_BYTES_PER_TOKEN when that is more.
AUDIO_TOKENS = 750

#: 8 KB/s (64 kbit/s compressed speech) / 25 tokens per second: a data clip's
#: bytes per token, conservative for WAV (32 KB/s at 16 kHz, 4x fewer tokens).
AUDIO_BYTES_PER_TOKEN = 320

#: Video and file parts (PDFs, documents): no header tells their token count;
#: 8192 tokens (a short video at 2 fps or a ~10-page PDF) unless a data file's
#: size at PRIOR_BYTES_PER_TOKEN says more. Flagged in the decision's metadata.
FILE_TOKENS = 8192

# --- Admin plane -----------------------------------------------------------------

#: First admin gRPC port (worker i: +i). 100 above ROUTER_PORT so the two
#: blocks never overlap for up to 100 workers (config.validate checks it),
#: in the way Envoy keeps its admin (9901) apart from its listeners.
ADMIN_PORT = 50151

#: Smallest B_short the config or the admin API accepts. Below a few hundred
#: tokens every chat request (template + a question + any output budget) is
#: "long", so such a value only ever sends all traffic to the long pool, which
#: is what the SetBShort(1) attack did. 512 is under the smallest context any
#: served chat model has had since GPT-2's 1024.
MIN_B_SHORT = 512

#: How long a replica without a snapshot of its own waits for a peer's
#: calibration ([admin] warm_start_peers) before it starts from the prior.
#: 10 s is a third of Kubernetes' default 30 s failureThreshold x periodSeconds
#: window for startup and far above a loopback/pod-network gRPC call (ms).
WARM_START_TIMEOUT_S = 10.0

#: Upper bound on warm_start_timeout_s: a readiness delay longer than a
#: minute costs more (a replica that is not serving) than a cold start does
#: (the sampler relearns the prior in a few hundred responses).
MAX_WARM_START_TIMEOUT_S = 60.0

#: Learned samples after which a snapshot is written before the periodic one
#: is due, so a kill -9 loses at most ~this many samples of learning instead
#: of SNAPSHOT_INTERVAL_S worth (at a cold start every response is learned:
#: hundreds per second). Bounded by SNAPSHOT_MIN_GAP_S below.
SNAPSHOT_SAMPLES = 500

#: Shortest time between two snapshots triggered by SNAPSHOT_SAMPLES: a write
#: + fsync of a full 64-model state costs ~10 ms of the event loop, so at most
#: one per 5 s keeps that under 0.2% of a core whatever the learning rate
#: (like Redis' "save 60 10000": a count trigger with a time floor).
SNAPSHOT_MIN_GAP_S = 5.0

# --- Identity bounds ---------------------------------------------------------------

#: Longest model name kept as-is (characters). Hugging Face repo ids are at
#: most 96 characters for the name plus the owner, OpenAI's names are far
#: shorter; longer names are cut and suffixed with a hash of the full name
#: (estimator.bounded_model_name), so distinct names stay distinct while a
#: 1 MiB "model" costs 128 characters in the table, the state file, the
#: /metrics page and GetCalibration.
MAX_MODEL_NAME_CHARS = 128

#: A model name that has learned nothing for this many learned samples (of any
#: model) may give its slot to a new name once all MAX_MODELS slots are taken
#: (least recently learned first). Real deployments learn every model they
#: serve continuously; a name a flood made up is never learned again, so after
#: this many samples of real traffic its slot is free. 1,000 samples is ~20 s
#: at 1K req/s with the 5% sample rate, and a model is only ever dropped when
#: the table is full, so a small horizon costs a real model nothing.
MODEL_IDLE_SAMPLES = 1000
