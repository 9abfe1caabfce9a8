"""``budget-router backend``: run one simulated vLLM pool.

The project CLI calls ``add_parser(subparsers)``; ``python -m
extproc.backend.cli ...`` runs the same command standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from . import pool, tokens
from .server import COMPAT_032, COMPATS, DEFAULT_MODEL, BackendSettings, serve

#: vLLM's default bind is 0.0.0.0; the simulator binds loopback by default
#: because it is only ever a local stand-in for a GPU pool.
DEFAULT_HOST = "127.0.0.1"

#: vLLM's default port.
DEFAULT_PORT = 8000


def _positive_float(text: str) -> float:
    val = float(text)
    if not val > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return val


def _nonneg_float(text: str) -> float:
    val = float(text)
    if val < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return val


def _positive_int(text: str) -> int:
    val = int(text)
    if val < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return val


def _nonneg_int(text: str) -> int:
    val = int(text)
    if val < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return val


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--host", default=DEFAULT_HOST, help="bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="bind port (default %(default)s; 0 picks a free port)")
    p.add_argument("--name", default="backend",
                   help="pool name, sent as the x-pool-name response header")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="served model name (any requested name is accepted and echoed)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model names served, like vLLM's flag: any other gets vLLM's 404 "
                        "(default: accept and echo any name)")
    p.add_argument("--vllm-compat", choices=COMPATS, default=COMPAT_032,
                   help="vLLM generation to answer like: 0.32 (default) clips prompt + max_tokens "
                        "over --max-model-len (finish_reason length); 0.6 (vLLM 0.5-0.10) refuses it "
                        "with a 400 and uses the flat error body")
    p.add_argument("--max-model-len", type=_positive_int, default=pool.DEFAULT_MAX_MODEL_LEN,
                   help="context length, prompt + output (default %(default)s)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=pool.hw.MAX_NUM_SEQS,
                   help="running sequences per step (default %(default)s, vLLM's)")
    p.add_argument("--kv-tokens", type=_positive_int, default=None,
                   help="KV-cache capacity in tokens, like vLLM's --kv-cache-memory-bytes "
                        "(default: what the GPU's memory leaves after the weights); "
                        "must be >= --max-model-len")
    p.add_argument("--block-size", type=_positive_int, default=pool.hw.BLOCK_SIZE,
                   help="KV block size in tokens (default %(default)s, vLLM's)")
    p.add_argument("--max-num-batched-tokens", type=_positive_int,
                   default=pool.hw.MAX_NUM_BATCHED_TOKENS,
                   help="token budget per step (default %(default)s)")
    p.add_argument("--max-waiting", type=_positive_int, default=None,
                   help="waiting-queue bound before HTTP 503 "
                        f"(default {pool.WAITING_PER_SEQ_SLOT} x --max-num-seqs)")
    p.add_argument("--gpu", choices=sorted(pool.hw.GPUS), default=pool.DEFAULT_GPU,
                   help="GPU whose step times the pool models, from the planner's "
                        "profiles (default %(default)s)")
    p.add_argument("--model-profile", choices=sorted(pool.hw.MODELS),
                   default=pool.DEFAULT_MODEL_PROFILE,
                   help="model whose step times the pool models (default %(default)s)")
    p.add_argument("--tp", type=_positive_int, default=None,
                   help="tensor-parallel degree (default: the model's for the GPU)")
    p.add_argument("--time-scale", type=_nonneg_float, default=1.0,
                   help="wall seconds per simulated second; 0 answers at once "
                        "(default %(default)s)")
    p.add_argument("--tokenizer", default=tokens.DEFAULT_TOKENIZER,
                   help="tiktoken encoding name (default %(default)s)")
    p.add_argument("--template-overhead", type=_nonneg_int, default=tokens.REQUEST_OVERHEAD,
                   help="chat template tokens per request (default %(default)s: "
                        "Llama-3 BOS + assistant header)")
    p.add_argument("--per-message-overhead", type=_nonneg_int,
                   default=tokens.PER_MESSAGE_OVERHEAD,
                   help="chat template tokens per message (default %(default)s, Llama-3)")
    p.add_argument("--completion-bos", type=_nonneg_int, default=tokens.COMPLETION_BOS_TOKENS,
                   help="tokens added to a /v1/completions text prompt (default %(default)s)")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "backend", help="run a simulated OpenAI/vLLM-compatible pool",
        description="Simulated vLLM pool: real token counts, modelled timing.")
    configure_parser(p)
    p.set_defaults(func=main)
    return p


def settings_from_args(args: argparse.Namespace) -> BackendSettings:
    pool_config = pool.PoolConfig(
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        kv_cache_tokens=args.kv_tokens,
        block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting=args.max_waiting,
        gpu=args.gpu,
        model=args.model_profile,
        tp=args.tp,
    ).validate()
    template = tokens.ChatTemplate(request_overhead=args.template_overhead,
                                   per_message_overhead=args.per_message_overhead,
                                   completion_bos=args.completion_bos)
    return BackendSettings(name=args.name, model=args.model, time_scale=args.time_scale,
                           tokenizer=args.tokenizer, template=template,
                           pool=pool_config, compat=args.vllm_compat,
                           served_names=tuple(args.served_model_name or ()))


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        tokens.get_encoding(settings.tokenizer)
    except (pool.ConfigError, ValueError) as exc:
        print(f"budget-router backend: error: {exc}", file=sys.stderr)
        return 2
    def bound(port: int) -> None:
        print(f"backend {settings.name!r}: serving {settings.model} on "
              f"http://{args.host}:{port} (max_model_len={args.max_model_len}, "
              f"max_num_seqs={args.max_num_seqs}, "
              f"kv_tokens={settings.pool.instance_config().kv_tokens}, "
              f"{settings.pool.instance_config().label()}, "
              f"time_scale={args.time_scale})", file=sys.stderr, flush=True)

    async def run() -> None:
        # SIGTERM (docker stop, Stack.stop) ends the server like Ctrl-C:
        # aiohttp's cleanup closes connections, then exit 0.
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(settings, args.host, args.port, on_bound=bound)
        except asyncio.CancelledError:
            pass

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="budget-router")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
