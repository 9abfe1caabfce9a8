"""Traffic for ``budget-router demo``: a built-in mix, real prompt files, traces.

Everything here is pure request *building* (no network): a list of
``DemoRequest`` objects that ``extproc.tools.demo`` sends through Envoy.

* ``builtin_mix``: real-looking prompts generated on the fly from what every
  Python installation has -- docstrings of stdlib modules (prose), their
  source (code), a handful of original Chinese and Japanese paragraphs
  recombined into longer texts (CJK), tool definitions built from stdlib
  function signatures (JSON), multi-turn chats with system prompts, long
  prompts (10K-60K tokens of concatenated sources) and prompts whose budget is
  near B_short. Deterministic for a seed (on one Python version).
* ``from_prompt_files``: the formats of ../shared/data/prompts (JSONL with
  ``turns`` or ``prompt``; JSON lists with ``instruction``/``input``,
  ``conversations`` (+ ``tools``) or ``messages``).
* ``from_trace``: Azure LLM inference CSV or Mooncake JSONL, read by the
  planner's loader (``extproc.planner.sim.traces.load_trace``): arrival times and
  sizes; prompts are filler text from the built-in mix cut to the trace's
  input length (cl100k as the guide), max_tokens = the output length.

Sizes are measured with the same offline cl100k encoding the simulated pools
count with, so "a 20K-token prompt" here is ~20K prompt_tokens there (plus
the chat template's few tokens).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

from ..planner.sim.traces import load_trace

# --- Traffic mix ----------------------------------------------------------------

#: Shares of the built-in mix (sum 1). Chat-sized prose and code dominate real
#: traffic (Azure's 2023 traces: >90% of requests under 4K tokens), so they
#: take half; CJK, tool calls and multi-turn chats are the categories whose
#: bytes-per-token differ most from prose and are what the estimator must
#: learn separately; ~10% long prompts (10K-60K tokens) make the long pool
#: visible, and ~8% near-threshold prompts show the margin at work.
MIX_SHARES: dict[str, float] = {
    "prose": 0.22,
    "code": 0.18,
    "cjk": 0.14,
    "tools": 0.14,
    "chat": 0.14,
    "long": 0.10,
    "near": 0.08,
}

#: Share of requests sent with stream=True (+ stream_options.include_usage):
#: about a third of chat traffic streams, and the router must learn from SSE
#: usage chunks as well as from JSON bodies.
STREAM_SHARE = 0.35

#: Share of requests without max_tokens: the router then uses its learned
#: output budget (p90 of completion_tokens) -- "a few", as in real clients
#: that leave it to the server default.
NO_MAX_TOKENS_SHARE = 0.08

#: max_tokens values clients commonly send (OpenAI / LangChain defaults and
#: round numbers); the simulated pool generates exactly max_tokens tokens.
MAX_TOKENS_CHOICES = (64, 128, 256, 256, 512, 512, 1024)

#: Chat-sized prompt lengths (tokens): log-normal with this median and sigma,
#: clipped to [MIN, MAX]; the median of the Azure conversation trace's
#: ContextTokens is ~1K.
CHAT_MEDIAN_TOKENS = 900
CHAT_LOG_SIGMA = 0.9
CHAT_MIN_TOKENS = 40
CHAT_MAX_TOKENS = 6000

#: CJK prompts are shorter (the Japanese/Chinese benchmark prompts are
#: 50-2K tokens); recombined paragraphs reach up to this.
CJK_MAX_TOKENS = 4000

#: Long prompts: log-uniform between these (tokens): whole-file code reviews
#: and document Q&A, well above B_short = 8K.
LONG_MIN_TOKENS = 10_000
LONG_MAX_TOKENS = 60_000

#: Near-threshold requests: prompt + max_tokens within this relative band of
#: B_short, where the estimate's error (and the margin) decides the pool.
NEAR_BAND = 0.15

#: Deliberate errors in the built-in mix: one prompt far above the long pool's
#: 128K context (answered 400 context_length_exceeded, by the router when it
#: is sure, else by the pool) and one with max_tokens above any pool's
#: context. They show the error paths and are reported apart.
DELIBERATE_TOO_LONG_TOKENS = 240_000
DELIBERATE_HUGE_MAX_TOKENS = 200_000

#: Model name sent in requests (the simulated pools echo any name).
MODEL = "llama-3-8b-sim"

#: Long prompts built from prompt files: real prompts joined as a batch
#: ("answer each question"); this share of --prompts traffic, so both pools
#: appear even though benchmark prompts alone are all short.
PROMPTS_LONG_SHARE = 0.12

#: Chat template tokens the simulated pool adds per request and per message
#: (Llama-3 template, extproc.backend.tokens); subtracted when sizing trace
#: prompts so prompt_tokens lands on the trace's input length.
TEMPLATE_REQUEST_TOKENS = 5
TEMPLATE_MESSAGE_TOKENS = 5

#: Trace prompts are cut at this size: the long pool's context is 128K and
#: prompt + max_tokens must fit (the largest Mooncake prompts would only be
#: rejected); the number cut is reported.
TRACE_MAX_TOTAL_TOKENS = 131_072 - 1_024


@dataclass
class DemoRequest:
    index: int
    kind: str                        # traffic kind (prose, code, cjk, tools, chat, long, near, ...)
    messages: list[dict[str, Any]]
    max_tokens: int | None
    stream: bool
    tools: list[dict[str, Any]] | None = None
    at: float | None = None          # arrival time (s from start), trace replay only
    target_tokens: int | None = None  # intended prompt size (trace replay)
    deliberate_error: bool = False
    clipped: bool = False            # trace prompt cut to fit the long pool
    model: str = MODEL               # model name sent (real vLLM pools serve their own)

    def body(self) -> dict[str, Any]:
        b: dict[str, Any] = {"model": self.model, "messages": self.messages}
        if self.tools:
            b["tools"] = self.tools
        if self.max_tokens is not None:
            b["max_tokens"] = self.max_tokens
        if self.stream:
            b["stream"] = True
            b["stream_options"] = {"include_usage": True}
        return b

    def content_bytes(self) -> int:
        n = 0
        for m in self.messages:
            c = m.get("content")
            if isinstance(c, str):
                n += len(c.encode())
        if self.tools:
            n += len(json.dumps(self.tools, ensure_ascii=False, separators=(",", ":")).encode())
        return n


# --- Tokens ---------------------------------------------------------------------

@lru_cache(maxsize=1)
def _encoding():
    try:
        from ..backend.tokens import get_encoding
        return get_encoding()
    except Exception:  # no tiktoken: fall back to ~4 bytes per token
        return None


def count_tokens(text: str) -> int:
    enc = _encoding()
    if enc is None:
        return max(1, len(text.encode()) // 4)
    return len(enc.encode_ordinary(text))


def cut_to_tokens(text: str, n: int) -> str:
    """The first ~n tokens of text."""
    enc = _encoding()
    if enc is None:
        b = text.encode()[: 4 * n]
        return b.decode(errors="ignore")
    ids = enc.encode_ordinary(text)
    if len(ids) <= n:
        return text
    return enc.decode(ids[:n]).rstrip("\ufffd")


# --- Corpora from the standard library -------------------------------------------

#: Modules whose docstrings read like documentation prose.
PROSE_MODULES = (
    "argparse", "asyncio.events", "asyncio.tasks", "collections", "configparser", "contextlib",
    "csv", "dataclasses", "email.message", "functools", "http.client", "http.cookiejar",
    "inspect", "json", "logging", "logging.handlers", "pathlib", "pickle", "shutil",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest.case",
    "urllib.parse", "zipfile", "difflib", "statistics", "decimal", "fractions", "heapq",
    "string", "socket", "ssl", "calendar", "locale", "gettext", "imaplib", "smtplib",
)

#: Modules whose source is the code corpus (pure-Python, readable).
CODE_MODULES = (
    "argparse", "json.decoder", "json.encoder", "collections", "functools", "heapq",
    "textwrap", "shlex", "pathlib", "statistics", "fractions", "difflib", "tokenize",
    "ast", "dataclasses", "enum", "inspect", "typing", "logging", "subprocess",
    "configparser", "calendar", "string", "random", "bisect", "csv", "gettext",
    "tarfile", "zipfile", "tempfile", "shutil", "threading", "queue", "sched",
    "http.client", "urllib.parse", "email.message", "asyncio.tasks", "asyncio.base_events",
    "pprint", "pydoc", "ipaddress", "decimal", "smtplib", "imaplib", "ftplib",
)

#: Modules whose functions become tool definitions.
TOOL_MODULES = ("shutil", "os.path", "json", "textwrap", "statistics", "math", "glob",
                "fnmatch", "urllib.parse", "base64", "zlib", "difflib", "calendar",
                "ipaddress", "shlex", "html", "colorsys", "heapq", "bisect", "random")


def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:
        return None


@lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """Docstring paragraphs of stdlib modules, classes and functions."""
    out: list[str] = []
    seen: set[str] = set()
    for name in PROSE_MODULES:
        mod = _module(name)
        if mod is None:
            continue
        objs = [mod] + [getattr(mod, a) for a in sorted(vars(mod)) if not a.startswith("_")]
        for obj in objs:
            if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if obj is not mod and getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            for para in doc.split("\n\n"):
                para = para.strip()
                # keep sentences, not signature lists or doctest blocks
                if len(para) < 120 or para.startswith(">>>") or para in seen:
                    continue
                letters = sum(c.isalpha() or c == " " for c in para)
                if letters < 0.8 * len(para):
                    continue
                seen.add(para)
                out.append(para)
    if not out:  # stripped-down Python (-OO): docstrings gone
        out = list(CJK_FALLBACK_EN)
    return tuple(out)


@lru_cache(maxsize=1)
def code_chunks() -> tuple[str, ...]:
    """Top-level definitions (functions, classes) of stdlib modules' source."""
    out: list[str] = []
    for name in CODE_MODULES:
        mod = _module(name)
        if mod is None:
            continue
        try:
            src = inspect.getsource(mod)
        except (OSError, TypeError):
            continue
        chunk: list[str] = []
        for line in src.splitlines(keepends=True):
            if (line.startswith("def ") or line.startswith("class ") or line.startswith("async def ")) and chunk:
                text = "".join(chunk).strip("\n")
                if len(text) > 200:
                    out.append(text)
                chunk = []
            chunk.append(line)
        text = "".join(chunk).strip("\n")
        if len(text) > 200:
            out.append(text)
    if not out:
        out = ["def f(x):\n    return x + 1\n" * 20]
    return tuple(out)


# Original paragraphs written for this demo (not taken from any dataset).
CJK_ZH = (
    "我们的团队在上个季度完成了数据平台的迁移工作。旧系统运行了将近八年，积累了大量的历史数据和各种临时脚本，"
    "很多逻辑只存在于少数几位同事的记忆里。迁移过程中，我们先梳理了所有的数据流向，再逐个模块进行重写和验证。",
    "请帮我分析一下这份用户反馈的主要问题。用户普遍反映应用在晚上高峰时段加载缓慢，尤其是在打开图片较多的页面时，"
    "等待时间经常超过五秒。另外，也有不少人提到登录之后偶尔会被强制退出，需要重新输入密码。",
    "在城市的老街区里，清晨总是最安静的时候。卖豆浆油条的小摊已经支起了炉子，骑自行车上班的人们从巷口穿过，"
    "偶尔有几声鸟叫从屋檐下传来。等到太阳升高，街道才慢慢热闹起来，茶馆里也坐满了下棋聊天的老人。",
    "机器学习模型上线之后，最容易被忽视的是数据分布的变化。训练时的数据可能来自去年的用户行为，而今天的用户习惯"
    "已经发生了改变。因此，我们需要持续监控输入特征的统计量，并在偏差超过阈值时及时触发重新训练。",
    "这篇文章介绍了如何用简单的方法估算一段文本会被切分成多少个词元。对于英文，平均每个词元大约对应四个字节；"
    "而对于中文，每个汉字通常对应一到两个词元，具体取决于分词器的词表大小和训练语料。",
    "下周三下午两点，我们将在三楼会议室召开项目评审会。请各位负责人提前准备好进度报告，重点说明目前遇到的风险、"
    "需要其他团队配合的事项，以及下一阶段的时间安排。如果无法参加，请提前告知并安排同事代为汇报。",
    "为了降低推理服务的成本，我们计划把短请求和长请求分开部署到不同的服务器池。短请求的池子可以使用较小的上下文长度，"
    "从而在同样的显存里容纳更多并发序列；长请求则交给专门配置的大上下文实例处理。",
    "小时候，外婆家门前有一棵很大的桂花树。每年秋天，满院子都是淡淡的香气，我们几个孩子会在树下铺一块旧床单，"
    "轻轻摇动树枝，把落下的桂花收集起来，交给外婆做桂花糖和桂花糕。",
)

CJK_JA = (
    "先週の金曜日、私たちのチームは新しい検索機能を本番環境にリリースしました。リリース直後はアクセスが集中し、"
    "一部のユーザーで応答が遅くなる現象が見られましたが、キャッシュの設定を見直したことで翌朝には解消しました。",
    "このドキュメントでは、設定ファイルの書き方と、環境変数による上書きの優先順位について説明します。"
    "まず既定値が読み込まれ、次に設定ファイル、最後に環境変数の値が適用されます。",
    "駅から歩いて十分ほどのところに、小さな古本屋があります。店主のおじいさんはいつも奥の机で本を読んでいて、"
    "声をかけるまで客に気づかないこともあります。棚には昭和の文庫本や古い地図がぎっしりと並んでいます。",
    "大規模言語モデルを運用する際には、リクエストごとの入力トークン数と出力トークン数を把握することが重要です。"
    "長い入力は多くのメモリを消費するため、短いリクエストと同じサーバーで処理すると全体の効率が下がります。",
    "お問い合わせいただいた件について、担当部署で確認いたしました。ご注文の商品は現在在庫が不足しており、"
    "発送までに二週間ほどお時間をいただく見込みです。ご不便をおかけしますが、何卒よろしくお願いいたします。",
    "春になると、川沿いの桜並木には多くの人が集まります。昼間は家族連れがお弁当を広げ、夜になると提灯の明かりに"
    "照らされた花びらが水面に落ちて、ゆっくりと流れていきます。毎年見ても飽きることのない景色です。",
    "テストが失敗した原因を調べたところ、タイムゾーンの扱いに問題があることが分かりました。サーバーは協定世界時で"
    "動いていますが、一部の処理が日本時間を前提にしていたため、日付の境界で結果がずれていました。",
    "新しいメンバーが入ったときは、最初の一週間で開発環境の準備とコードベースの概要説明を行います。"
    "その後、小さな不具合の修正から始めてもらい、レビューを通じてチームの書き方に慣れてもらいます。",
)

CJK_FALLBACK_EN = (
    "The service estimates how many tokens a request will use before it is sent to a model server, "
    "and picks the pool whose context length fits the request with the least waste of memory.",
)

ZH_ASKS = ("请总结下面的内容，并列出三个要点：", "请把下面这段文字翻译成英文：", "请根据以下材料写一封回复邮件：",
           "下面的描述中有哪些值得注意的问题？")
JA_ASKS = ("次の文章を要約してください。", "以下の内容を英語に翻訳してください。", "次の文章について、改善点を三つ挙げてください。",
           "以下の説明を読んで、質問に答えてください。")

PROSE_ASKS = (
    "Summarize the following documentation for a new team member:",
    "Explain in plain words what the following text says, with an example:",
    "Rewrite the following paragraph so it is clearer and shorter:",
    "What are the main caveats described below?",
    "Write three quiz questions based on this text:",
)
CODE_ASKS = (
    "Review this Python code and point out bugs or risky edge cases:",
    "Explain what this code does, step by step:",
    "Write unit tests for the following code:",
    "Refactor this function for readability without changing behaviour:",
    "Port the following Python code to TypeScript:",
)
LONG_ASKS = (
    "Here are several modules of a code base. Give an architecture overview and list the public APIs:",
    "Read the following documentation and source, then answer: which functions can raise exceptions?",
    "Summarize the following files, one paragraph per file:",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer concisely and cite the relevant part of the input.",
    "You are a senior Python engineer doing code review. Be precise and kind.",
    "You are a technical writer. Prefer short sentences and concrete examples.",
    "你是一名专业的中文助理，回答要准确、简洁。",
    "あなたは丁寧な日本語で回答するアシスタントです。",
)


@lru_cache(maxsize=16384)
def _piece_tokens(text: str) -> int:
    """Token count of a corpus piece (pieces recur across requests)."""
    return count_tokens(text)


def _join_until(pieces: Iterator[str], target: int, sep: str = "\n\n") -> str:
    """Join pieces until ~target tokens, cutting the last one."""
    parts: list[str] = []
    total = 0
    for p in pieces:
        n = _piece_tokens(p) + 1
        if total + n >= target:
            parts.append(cut_to_tokens(p, max(1, target - total)))
            break
        parts.append(p)
        total += n
    return sep.join(parts)


def _cycle(rng: random.Random, items: tuple[str, ...]) -> Iterator[str]:
    """Endless shuffled passes over items (deterministic for the rng)."""
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


def prose_text(rng: random.Random, tokens: int) -> str:
    paras = prose_paragraphs()
    start = rng.randrange(len(paras))
    # consecutive paragraphs read like one document
    it = (paras[(start + i) % len(paras)] for i in range(10 ** 9))
    return _join_until(it, tokens)


def code_text(rng: random.Random, tokens: int) -> str:
    chunks = code_chunks()
    start = rng.randrange(len(chunks))
    it = (chunks[(start + i) % len(chunks)] for i in range(10 ** 9))
    return _join_until(it, tokens)


def cjk_text(rng: random.Random, tokens: int, lang: str) -> str:
    paras = CJK_ZH if lang == "zh" else CJK_JA
    return _join_until(_cycle(rng, paras), tokens, sep="\n")


def filler_text(rng: random.Random, tokens: int, kind: str) -> str:
    if kind == "code":
        return code_text(rng, tokens)
    if kind in ("zh", "ja"):
        return cjk_text(rng, tokens, kind)
    return prose_text(rng, tokens)


def _chat_tokens(rng: random.Random, hi: int = CHAT_MAX_TOKENS) -> int:
    n = int(rng.lognormvariate(math.log(CHAT_MEDIAN_TOKENS), CHAT_LOG_SIGMA))
    return max(CHAT_MIN_TOKENS, min(hi, n))


# --- Tools from stdlib signatures ---------------------------------------------------

def _json_type(p: inspect.Parameter) -> str:
    d = p.default
    ann = p.annotation
    for t, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if ann is t or (d is not inspect.Parameter.empty and d is not None and type(d) is t):
            return name
    if isinstance(ann, str):
        return {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}.get(ann, "string")
    return "string"


@lru_cache(maxsize=1)
def tool_definitions() -> tuple[dict[str, Any], ...]:
    """OpenAI tool definitions for public stdlib functions with a signature."""
    tools: list[dict[str, Any]] = []
    for modname in TOOL_MODULES:
        mod = _module(modname)
        if mod is None:
            continue
        for name in sorted(vars(mod)):
            fn = getattr(mod, name)
            if name.startswith("_") or not callable(fn) or inspect.isclass(fn):
                continue
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):
                continue
            doc = (inspect.getdoc(fn) or "").strip()
            props: dict[str, Any] = {}
            required: list[str] = []
            for pname, p in sig.parameters.items():
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                prop: dict[str, Any] = {"type": _json_type(p), "description": f"The '{pname}' argument of {modname}.{name}."}
                if p.default is not p.empty and isinstance(p.default, (bool, int, float, str)):
                    prop["default"] = p.default
                props[pname] = prop
                if p.default is p.empty:
                    required.append(pname)
            tools.append({"type": "function", "function": {
                "name": f"{modname.replace('.', '_')}_{name}",
                "description": (doc.split("\n\n")[0].replace("\n", " ")[:300] or f"Call {modname}.{name}."),
                "parameters": {"type": "object", "properties": props, "required": required},
            }})
    return tuple(tools)


TOOL_ASKS = (
    "Can you copy the report folder to the backup drive and tell me how much space is left?",
    "What's the median and standard deviation of these numbers: 3, 9, 4, 12, 7, 7, 10?",
    "Please wrap this paragraph at 60 columns and then dedent it.",
    "Is 10.0.3.17 inside the 10.0.0.0/22 network?",
    "Encode the string 'hello, world' as base64 and compress it.",
    "帮我计算一下这组数据的平均值和方差：12, 15, 9, 20, 18。",
    "この URL のクエリ文字列を分解して、パラメータを一覧にしてください: https://example.com/s?q=kyoto&lang=ja&page=2",
    "Find every file matching *.log under /var/tmp and show the differences between the two newest ones.",
)


def _tool_request(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    defs = tool_definitions()
    k = rng.randint(2, min(16, len(defs)))
    tools = [defs[i] for i in sorted(rng.sample(range(len(defs)), k))]
    ask = rng.choice(TOOL_ASKS)
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You can call tools. Call them when needed."},
                                      {"role": "user", "content": ask}]
    if rng.random() < 0.5:  # a completed tool round trip before the final answer
        t = rng.choice(tools)["function"]
        args = {p: (s.get("default") if "default" in s else f"value_{i}")
                for i, (p, s) in enumerate(t["parameters"]["properties"].items())}
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": t["name"], "arguments": json.dumps(args)}}]})
        result = {"ok": True, "result": [rng.randint(0, 10 ** 6) for _ in range(rng.randint(3, 40))],
                  "elapsed_ms": round(rng.uniform(0.2, 80.0), 3)}
        messages.append({"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result)})
    return messages, tools


# --- The built-in mix --------------------------------------------------------------------

def _kinds(rng: random.Random, n: int, shares: dict[str, float]) -> list[str]:
    """n kinds with the shares' proportions (largest remainder), shuffled."""
    raw = {k: n * s for k, s in shares.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    return kinds


def _max_tokens(rng: random.Random, scale: float = 1.0, capped_only: bool = False) -> int | None:
    if rng.random() < NO_MAX_TOKENS_SHARE and not capped_only:
        return None
    return _scaled(rng.choice(MAX_TOKENS_CHOICES), scale)


#: Smallest size a scaled prompt or output cap gets (``scale`` < 1).
MIN_SCALED_TOKENS = 8


def _scaled(tokens: int, scale: float) -> int:
    return tokens if scale == 1.0 else max(MIN_SCALED_TOKENS, int(tokens * scale))


def make_request(rng: random.Random, index: int, kind: str, b_short: int, scale: float = 1.0,
                 capped_only: bool = False) -> DemoRequest:
    """One request of ``kind``. ``scale`` multiplies every prompt size and
    output cap (not the near-threshold budgets, which follow ``b_short``):
    real vLLM pools on a CPU have 16x smaller contexts than the GPU fleet the
    mix is written for. ``capped_only``: every request sets max_tokens (a
    model with random weights has no natural answer length: it never emits
    EOS and an uncapped answer runs to max_model_len)."""
    max_tokens = _max_tokens(rng, scale, capped_only)
    stream = rng.random() < STREAM_SHARE
    tools = None
    if kind == "prose":
        messages = [{"role": "user", "content": rng.choice(PROSE_ASKS) + "\n\n" + prose_text(rng, _scaled(_chat_tokens(rng), scale))}]
    elif kind == "code":
        messages = [{"role": "user", "content": rng.choice(CODE_ASKS) + "\n\n```python\n"
                     + code_text(rng, _scaled(_chat_tokens(rng), scale)) + "\n```"}]
    elif kind == "cjk":
        lang = rng.choice(("zh", "ja"))
        ask = rng.choice(ZH_ASKS if lang == "zh" else JA_ASKS)
        messages = [{"role": "user", "content": ask + "\n" + cjk_text(rng, _scaled(_chat_tokens(rng, CJK_MAX_TOKENS), scale), lang)}]
    elif kind == "tools":
        messages, tools = _tool_request(rng)
    elif kind == "chat":
        system = rng.choice(SYSTEM_PROMPTS)
        lang = "zh" if "中文" in system else "ja" if "日本語" in system else rng.choice(("prose", "prose", "code"))
        messages = [{"role": "system", "content": system}]
        for t in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": filler_text(
                rng, _scaled(_chat_tokens(rng, 1500), scale), lang)})
            messages.append({"role": "assistant", "content": filler_text(
                rng, _scaled(rng.randint(40, 400), scale), lang)})
        messages.append({"role": "user", "content": filler_text(rng, _scaled(rng.randint(20, 300), scale), lang)})
    elif kind == "long":
        tokens = _scaled(int(math.exp(rng.uniform(math.log(LONG_MIN_TOKENS), math.log(LONG_MAX_TOKENS)))), scale)
        body = code_text(rng, tokens) if rng.random() < 0.6 else prose_text(rng, tokens)
        messages = [{"role": "user", "content": rng.choice(LONG_ASKS) + "\n\n" + body}]
    elif kind == "near":
        # prompt + output within NEAR_BAND of B_short: a modest output and a
        # prompt that makes up the rest
        max_tokens = _scaled(rng.choice((128, 256, 512, 1024)), scale)
        total = int(b_short * rng.uniform(1 - NEAR_BAND, 1 + NEAR_BAND))
        prompt = max(_scaled(500, scale), total - max_tokens - TEMPLATE_REQUEST_TOKENS - TEMPLATE_MESSAGE_TOKENS)
        body = code_text(rng, prompt) if rng.random() < 0.5 else prose_text(rng, prompt)
        messages = [{"role": "user", "content": body}]
    else:
        raise ValueError(f"unknown traffic kind {kind!r}")
    return DemoRequest(index, kind, messages, max_tokens, stream, tools)


def deliberate_errors(rng: random.Random) -> list[DemoRequest]:
    """Requests that must fail with 400 (reported apart from real errors)."""
    huge = [{"role": "user", "content": "Summarize:\n\n" + code_text(rng, DELIBERATE_TOO_LONG_TOKENS)}]
    small = [{"role": "user", "content": "Write a very long story.\n\n" + prose_text(rng, 300)}]
    return [DemoRequest(-1, "error:too_long", huge, 256, False, deliberate_error=True),
            DemoRequest(-1, "error:max_tokens", small, DELIBERATE_HUGE_MAX_TOKENS, False, deliberate_error=True)]


def _place(rng: random.Random, reqs: list[DemoRequest], extra: list[DemoRequest]) -> list[DemoRequest]:
    """Insert extra requests at random positions of the second half and renumber."""
    out = list(reqs)
    for r in extra:
        out.insert(rng.randint(len(out) // 2, len(out)), r)
    for i, r in enumerate(out):
        r.index = i
    return out


def builtin_mix(n: int, seed: int, b_short: int = 8192, with_errors: bool = True,
                scale: float = 1.0, capped_only: bool = False) -> list[DemoRequest]:
    """n requests of the built-in mix (+2 deliberate errors when n >= 20);
    ``scale``, ``capped_only``: see ``make_request``."""
    rng = random.Random(seed)
    errors = deliberate_errors(rng) if with_errors and n >= 20 else []
    kinds = _kinds(rng, n - len(errors), MIX_SHARES)
    reqs = [make_request(rng, i, k, b_short, scale, capped_only) for i, k in enumerate(kinds)]
    return _place(rng, reqs, errors)


# --- Prompt files ------------------------------------------------------------------------

def _turn_text(t: Any) -> str | None:
    if isinstance(t, str):
        return t
    if isinstance(t, dict):
        for k in ("content", "value", "text"):
            if isinstance(t.get(k), str):
                return t[k]
    return None


def _conversation(rec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None] | None:
    """Messages (up to the last user turn) and tools of one prompt record."""
    tools = None
    raw_tools = rec.get("tools")
    if isinstance(raw_tools, str) and raw_tools.strip():
        try:
            raw_tools = json.loads(raw_tools)
        except ValueError:
            raw_tools = None
    if isinstance(raw_tools, list) and raw_tools:
        tools = [t if isinstance(t, dict) and t.get("type") == "function" else {"type": "function", "function": t}
                 for t in raw_tools if isinstance(t, dict)]
    messages: list[dict[str, Any]] = []
    if isinstance(rec.get("system"), str) and rec["system"]:
        messages.append({"role": "system", "content": rec["system"]})
    if isinstance(rec.get("turns"), list):
        turns = [_turn_text(t) for t in rec["turns"]]
        turns = [t for t in turns if t]
        for i, t in enumerate(turns):
            if i:
                # a stand-in assistant answer between benchmark turns
                messages.append({"role": "assistant", "content": "Here is my answer to your question. " * 6})
            messages.append({"role": "user", "content": t})
    elif isinstance(rec.get("instruction"), str):
        text = rec["instruction"]
        if isinstance(rec.get("input"), str) and rec["input"].strip():
            text += "\n\n" + rec["input"]
        messages.append({"role": "user", "content": text})
    elif isinstance(rec.get("prompt"), str) or isinstance(rec.get("question"), str):
        messages.append({"role": "user", "content": rec.get("prompt") or rec.get("question")})
    elif isinstance(rec.get("conversations"), list) or isinstance(rec.get("messages"), list):
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system", "function_call": "tool_call", "observation": "tool", "tool": "tool"}
        calls = 0
        for m in rec.get("conversations") or rec.get("messages"):
            if not isinstance(m, dict):
                continue
            role = roles.get(m.get("from") or m.get("role"))
            text = _turn_text(m)
            if role is None or text is None:
                continue
            if role == "tool_call":
                calls += 1
                try:
                    call = json.loads(text)
                    name, args = call.get("name", "tool"), call.get("arguments", {})
                except (ValueError, AttributeError):
                    name, args = "tool", text
                messages.append({"role": "assistant", "content": None, "tool_calls": [{
                    "id": f"call_{calls}", "type": "function", "function": {
                        "name": str(name), "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}]})
            elif role == "tool":
                messages.append({"role": "tool", "tool_call_id": f"call_{max(calls, 1)}", "content": text})
            else:
                messages.append({"role": role, "content": text})
        # the request a client sends: everything up to the last user turn
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        messages = messages[: last + 1]
    if not any(m["role"] == "user" for m in messages):
        return None
    return messages, tools


def load_prompt_records(path: str) -> list[dict[str, Any]]:
    """Records of one .json/.jsonl file, or of every such file in a directory."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".json", ".jsonl")))
        if not files:
            raise ValueError(f"{path}: no .json or .jsonl files")
    else:
        files = [path]
    recs: list[dict[str, Any]] = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            if f.endswith(".jsonl"):
                for line in fh:
                    line = line.strip()
                    if line:
                        try:
                            r = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(r, dict):
                            recs.append(r)
            else:
                doc = json.load(fh)
                items = doc if isinstance(doc, list) else doc.get("data", []) if isinstance(doc, dict) else []
                recs.extend(r for r in items if isinstance(r, dict))
    return recs


def from_prompt_files(path: str, n: int, seed: int, b_short: int = 8192) -> list[DemoRequest]:
    """n requests from real prompt files; PROMPTS_LONG_SHARE of them join
    many real prompts into one long request (10K-60K tokens), and the two
    deliberate errors are added as in the built-in mix."""
    rng = random.Random(seed)
    convs = [c for c in (_conversation(r) for r in load_prompt_records(path)) if c]
    if not convs:
        raise ValueError(f"{path}: no usable prompts (expected turns/prompt/instruction/conversations/messages)")
    errors = deliberate_errors(rng) if n >= 20 else []
    m = n - len(errors)
    n_long = round(m * PROMPTS_LONG_SHARE) if m >= 10 else 0
    reqs: list[DemoRequest] = []
    order = list(range(len(convs)))
    rng.shuffle(order)
    for i in range(m - n_long):
        messages, tools = convs[order[i % len(order)]]
        reqs.append(DemoRequest(i, "prompts", [dict(x) for x in messages], _max_tokens(rng),
                                rng.random() < STREAM_SHARE, tools))
    texts = [m["content"] for c in convs for m in c[0] if m["role"] == "user" and isinstance(m["content"], str)]
    for _ in range(n_long):
        target = int(math.exp(rng.uniform(math.log(LONG_MIN_TOKENS), math.log(LONG_MAX_TOKENS))))
        body = _join_until(_cycle(rng, tuple(texts)), target)
        reqs.append(DemoRequest(0, "prompts:long", [{"role": "user", "content":
                                "Answer each of the following questions in turn.\n\n" + body}],
                                rng.choice(MAX_TOKENS_CHOICES), rng.random() < STREAM_SHARE))
    rng.shuffle(reqs)
    return _place(rng, reqs, errors)


# --- Traces ---------------------------------------------------------------------------------

#: Filler kinds for trace prompts, in rotation: the built-in mix's categories,
#: weighted like the mix (prose and code most).
TRACE_FILLER = ("prose", "code", "prose", "code", "zh", "ja")


def from_trace(path: str, n: int, seed: int, rate: float = 1.0, duration: float | None = None) -> list[DemoRequest]:
    """Requests following a trace's arrival times (divided by ``rate``) and
    sizes, at most n of them and within ``duration`` seconds of scaled time."""
    rng = random.Random(seed)
    tr = load_trace(path)
    reqs: list[DemoRequest] = []
    for i in range(min(n, len(tr))):
        at = float(tr.arrival[i]) / rate
        if duration is not None and at > duration:
            break
        out = int(tr.output[i])
        prompt = int(tr.prompt[i])
        clipped = False
        if prompt + out > TRACE_MAX_TOTAL_TOKENS:
            clipped = True
            out = min(out, TRACE_MAX_TOTAL_TOKENS // 8)
            prompt = min(prompt, TRACE_MAX_TOTAL_TOKENS - out)
        kind = TRACE_FILLER[i % len(TRACE_FILLER)]
        text = filler_text(rng, max(1, prompt - TEMPLATE_REQUEST_TOKENS - TEMPLATE_MESSAGE_TOKENS), kind)
        reqs.append(DemoRequest(i, f"trace:{'cjk' if kind in ('zh', 'ja') else kind}",
                                [{"role": "user", "content": text}], out, rng.random() < STREAM_SHARE,
                                at=at, target_tokens=int(tr.prompt[i]), clipped=clipped))
    return reqs
