"""``budget-router``: one command, one subcommand per job.

    budget-router serve          run the ext_proc router (Envoy talks to it)
    budget-router envoy-config   render the Envoy bootstrap from the config
    budget-router backend        a simulated vLLM pool (OpenAI-compatible)
    budget-router up             Envoy + router + two simulated pools, until Ctrl-C
    budget-router demo           the same stack, replay traffic, print a report
    budget-router replay         run your own request log through the core
    budget-router plan/simulate  size a split fleet on a trace
    budget-router config         print the effective configuration
    budget-router status/admin   the running router's calibration; change B_short live
"""

from __future__ import annotations

import argparse
import os
import sys

from . import config as C


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="TOML config file (default: $BUDGET_ROUTER_CONFIG, else built-in defaults)")


#: gRPC core's log level for the router unless GRPC_VERBOSITY says otherwise:
#: at its INFO default (through absl) grpcio logs a line per failed TLS
#: handshake, so plain-text or certificate-less clients on a TLS port (ext_proc
#: with the grpcio transport, or the admin plane) could fill the log at their
#: connection rate; ERROR is grpc's documented default. Read once, when grpc is
#: first imported, hence set here, before any command's modules import it.
GRPC_VERBOSITY = "ERROR"
os.environ.setdefault("GRPC_VERBOSITY", GRPC_VERBOSITY)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve.server import serve
    cfg = C.load_config(args, router__workers=args.workers, router__port=args.port,
                      router__transport=args.transport, router__state_file=args.state_file,
                      router__drain_delay_s=args.drain_delay)
    return serve(cfg, args.config or os.environ.get(C.ENV_PREFIX + "CONFIG"))


def _cmd_replay(args: argparse.Namespace) -> int:
    from .tools.replay import run
    cfg = C.load_config(args, policy__b_short=args.b_short)
    if args.b_short is not None and args.b_short > cfg.short.max_model_len:
        # Replaying at a larger B_short is a what-if: let the short pool follow.
        cfg = cfg.replace(short={"max_model_len": args.b_short}, policy={"b_short": args.b_short})
    s = run(cfg, args.requests, args.out)
    return 0 if s["requests"] or not s["bad_lines"] else 1


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = C.load_config(args)
    sys.stdout.write(C.to_toml(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="budget-router", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the ext_proc router service")
    add_config_arg(p)
    p.add_argument("--workers", type=int, help="worker processes (each on its own port: port, port+1, ...)")
    p.add_argument("--port", type=int, help="gRPC port of the first worker")
    p.add_argument("--transport", choices=["fast", "grpcio"], help="gRPC server implementation")
    p.add_argument("--state-file", help="calibration snapshot file")
    p.add_argument("--drain-delay", type=float, metavar="SECONDS",
                   help="after SIGTERM, answer health NOT_SERVING and keep serving this long before closing "
                        "([router] drain_delay_s, default 5)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("replay", help="run a request log (JSONL) through estimator and policy")
    add_config_arg(p)
    p.add_argument("--requests", required=True, metavar="FILE.jsonl",
                   help='one {"body": <OpenAI request>, "usage": {"prompt_tokens": N, "completion_tokens": M}} per line')
    p.add_argument("--b-short", type=int, help="threshold to replay at (default: the config's)")
    p.add_argument("--out", metavar="FILE", help="per-request JSONL output (default: stdout)")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("config", help="print the effective configuration (file + environment) as TOML")
    add_config_arg(p)
    p.set_defaults(func=_cmd_config)

    from .envoy import bootstrap
    bootstrap.add_parser(sub)
    from .backend import cli as backend_cli
    backend_cli.add_parser(sub)
    from .tools import stack
    stack.add_parsers(sub)
    from .tools import demo
    demo.add_parser(sub)
    from .planner import cli as planner_cli
    planner_cli.add_parsers(sub)
    from .admin import cli as admin_cli
    admin_cli.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except C.ConfigError as e:
        print(f"budget-router: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
