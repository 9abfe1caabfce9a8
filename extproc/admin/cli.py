"""``budget-router status`` and ``budget-router admin``: the admin API from a shell.

Talks to the admin plane of every worker (``[admin] port + i``) of the router
the config describes, so a B_short change reaches all of them and the status
shows each. Sends the admin token ($BUDGET_ROUTER_ADMIN_TOKEN or ``[admin]
token_file``) with every call, over TLS when ``[admin] tls_cert_file`` is set.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from .. import config as C
from . import auth
from .plane import channel_credentials, join_host_port, max_message_bytes
from .v1 import admin_pb2 as pb
from .v1 import admin_pb2_grpc as pbg

#: Deadline of one admin call: the calls are in-memory reads and writes, so
#: a worker that does not answer in 5 s is stuck or not there.
CALL_TIMEOUT_S = 5.0


def _targets(cfg: C.Config, host: str | None) -> list[str]:
    h = host or (cfg.admin.listen if cfg.admin.listen not in ("0.0.0.0", "::") else "127.0.0.1")
    return [join_host_port(h, p) for p in C.admin_ports(cfg)]


def call_all(cfg: C.Config, method: str, request, host: str | None = None) -> list[tuple[str, object]]:
    metadata = auth.call_metadata(auth.load_token(cfg))
    creds = channel_credentials(cfg.admin)
    options = [("grpc.max_receive_message_length", max_message_bytes(cfg))]
    out = []
    for target in _targets(cfg, host):
        with (grpc.secure_channel(target, creds, options) if creds else grpc.insecure_channel(target, options)) as ch:
            stub = pbg.AdminStub(ch)
            try:
                out.append((target, getattr(stub, method)(request, timeout=CALL_TIMEOUT_S, metadata=metadata)))
            except grpc.RpcError as e:
                out.append((target, e))
    return out


def format_status(target: str, cal: pb.Calibration) -> str:
    lines = [f"worker {cal.worker + 1}/{cal.workers} at {target}: B_short={cal.b_short} "
             f"(short max_model_len {cal.short_max_model_len}, long {cal.long_max_model_len}), "
             f"sample_rate={cal.sample_rate:g}, streams={cal.streams}"]
    lines += format_tiers(cal)
    if not cal.fits:
        lines.append("  nothing learned yet (estimates use the prior: 4 bytes/token)")
        return "\n".join(lines)
    hdr = f"  {'model':<24} {'category':<8} {'samples':>8} {'bytes/tok':>9} {'tok/msg':>8} {'overhead':>8} {'|err|':>7} {'margin':>7} {'output':>7}"
    lines.append(hdr)
    for f in cal.fits:
        lines.append(f"  {f.model[:24]:<24} {f.category:<8} {f.samples:>8} {f.bytes_per_token:>9.2f} "
                     f"{f.tokens_per_message:>8.2f} {f.overhead_tokens:>8.1f} {100 * f.rel_error:>6.1f}% "
                     f"{100 * f.margin:>6.1f}% {f.output_budget:>6}{'*' if f.output_source == 'default' else ' '}")
    lines.append("  (* = default output budget, nothing learned yet)")
    return "\n".join(lines)


def format_tiers(cal: pb.Calibration) -> list[str]:
    """One line per tier: its limit now (and configured), its load as seen."""
    if not cal.tiers:
        return []
    lines = [f"  tiers (spillover {'on' if cal.spillover else 'off'}, adaptive threshold "
             f"{'on' if cal.adaptive else 'off'}):",
             f"  {'tier':<10} {'limit':>8} {'config':>8} {'max_len':>8} {'inst':>5} {'running':>8} "
             f"{'waiting':>8} {'kv':>6} {'preempt/s':>9} {'age':>6} {'state':<10} {'spilled':>7}"]
    for t in cal.tiers:
        limit = f"{t.budget_limit}{'!' if t.pinned else ''}" if t.budget_limit else "rest"
        state = ("saturated" if t.saturated else "ok") if t.known else "unknown"
        age = f"{t.age_s:.1f}s" if t.age_s >= 0 else "-"
        lines.append(f"  {t.name:<10} {limit:>8} {t.configured_limit or '-':>8} {t.max_model_len:>8} "
                     f"{t.instances:>5} {t.running:>8.0f} {t.waiting:>8.0f} {100 * t.kv_usage:>5.1f}% "
                     f"{t.preemption_rate:>9.2f} {age:>6} {state:<10} {t.spilled_out:>7}")
    if any(t.pinned for t in cal.tiers):
        lines.append("  (! = pinned through the admin API)")
    return lines


def _report(results, fmt, as_json: bool) -> int:
    rc = 0
    docs = []
    for target, res in results:
        if isinstance(res, grpc.RpcError):
            rc = 1
            msg = f"{res.code().name}: {res.details()}"
            docs.append({"target": target, "error": msg})
            if not as_json:
                print(f"worker at {target}: {msg}", file=sys.stderr)
            continue
        docs.append({"target": target, **MessageToDict(res, preserving_proto_field_name=True)})
        if not as_json:
            print(fmt(target, res))
    if as_json:
        json.dump(docs, sys.stdout, indent=2)
        print()
    return rc


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = C.load(args.config)
    return _report(call_all(cfg, "GetCalibration", pb.GetCalibrationRequest(), args.host), format_status, args.json)


def _cmd_admin(args: argparse.Namespace) -> int:
    cfg = C.load(args.config)
    if args.action == "set-b-short":
        if args.value is None:
            print("budget-router admin set-b-short N", file=sys.stderr)
            return 2
        res = call_all(cfg, "SetBShort", pb.SetBShortRequest(b_short=args.value), args.host)
    elif args.action in ("set-limit", "unpin"):
        if args.boundary is None or (args.action == "set-limit" and args.value is None):
            print("budget-router admin set-limit --boundary I N | unpin --boundary I", file=sys.stderr)
            return 2
        res = call_all(cfg, "SetLimit", pb.SetLimitRequest(boundary=args.boundary, budget_limit=args.value or 0,
                                                           unpin=args.action == "unpin"), args.host)
    elif args.action == "reload":
        res = call_all(cfg, "ReloadConfig", pb.ReloadConfigRequest(), args.host)
    else:  # snapshot
        res = call_all(cfg, "TakeSnapshot", pb.TakeSnapshotRequest(write=True), args.host)
    return _report(res, lambda t, r: f"{t}: " + (f"B_short={r.b_short} limits={list(r.limits)}" + (
        f"; restart needed for {', '.join(r.restart_required)}" if r.restart_required else "")
        if isinstance(r, pb.ConfigResult) else f"snapshot written ({r.samples} samples)"), args.json)


def add_parsers(sub) -> None:
    p = sub.add_parser("status", help="show the running router's learned calibration per worker")
    p.add_argument("--config", metavar="FILE", help="the router's TOML config (ports, workers)")
    p.add_argument("--host", help="router host (default: [admin] listen)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("admin", help="change the running router: set-b-short N | set-limit --boundary I N | "
                                     "unpin --boundary I | reload | snapshot "
                                     "(reload re-reads the config file the router started with)")
    p.add_argument("action", choices=["set-b-short", "set-limit", "unpin", "reload", "snapshot"])
    p.add_argument("value", nargs="?", type=int, help="the new B_short (set-b-short) or budget limit (set-limit)")
    p.add_argument("--boundary", type=int, help="which tier boundary (0 = B_short) for set-limit / unpin")
    p.add_argument("--config", metavar="FILE", help="the router's TOML config (ports, workers)")
    p.add_argument("--host", help="router host (default: [admin] listen)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_admin)
