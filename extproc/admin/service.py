"""The admin service's logic: request messages in, response messages out.

Transport-independent (the fast HTTP/2 server and grpc.aio both dispatch
here). Operates on one worker: its Router, config and snapshot file.
Errors are ``AdminError`` with a gRPC status code and a message for people.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable

import orjson

from .. import config as C
from ..core.policy import margin_for
from .v1 import admin_pb2 as pb

SERVICE = "budget_router.admin.v1.Admin"

log = logging.getLogger("budget_router.admin")

INVALID_ARGUMENT = 3
FAILED_PRECONDITION = 9

#: Config keys that a running worker cannot take over: they are bound to
#: sockets, processes or Envoy's own config, which only a restart re-reads.
RESTART_KEYS = {
    ("router", "listen"), ("router", "port"), ("router", "workers"), ("router", "transport"),
    ("router", "routing_header"), ("router", "decision_header"), ("router", "metadata_namespace"),
    ("router", "state_file"), ("envoy", "*"), ("telemetry", "*"), ("estimator", "*"),
    ("monitor", "*"),
}


class AdminError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _changed_keys(old: C.Config, new: C.Config) -> list[tuple[str, str]]:
    out = []
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if dataclasses.is_dataclass(a):
            out += [(f.name, g.name) for g in dataclasses.fields(a) if getattr(a, g.name) != getattr(b, g.name)]
    return out


class AdminService:
    """``worker`` is an ``extproc.serve.server.Worker`` (router, cfg, streams, ...)."""

    def __init__(self, worker: Any, config_path: str | None):
        self.worker = worker
        self.config_path = config_path

    # name -> (request parser, handler)
    def methods(self) -> dict[str, tuple[Callable[[bytes], Any], Callable[[Any], Any]]]:
        return {
            "GetCalibration": (pb.GetCalibrationRequest.FromString, self.get_calibration),
            "SetBShort": (pb.SetBShortRequest.FromString, self.set_b_short),
            "SetLimit": (pb.SetLimitRequest.FromString, self.set_limit),
            "ReloadConfig": (pb.ReloadConfigRequest.FromString, self.reload_config),
            "TakeSnapshot": (pb.TakeSnapshotRequest.FromString, self.take_snapshot),
            "RestoreSnapshot": (pb.Snapshot.FromString, self.restore_snapshot),
        }

    @property
    def router(self):
        return self.worker.router

    def _apply(self, cfg: C.Config) -> None:
        self.worker.cfg = cfg
        self.router.reconfigure(cfg)

    def _result(self, restart: list[tuple[str, str]] | None = None) -> pb.ConfigResult:
        cfg = self.router.cfg
        return pb.ConfigResult(b_short=self.router.limits()[0], config_toml=C.to_toml(cfg),
                               restart_required=[f"[{s}] {k}" for s, k in restart or []],
                               limits=self.router.limits())

    def tier_states(self) -> list[pb.TierState]:
        r = self.router
        limits, thr, spill = r.limits(), r.threshold, r.spillover
        out = []
        for i, (t, load) in enumerate(zip(r.cfg.tiers, r.loads)):
            last = i == len(limits)
            out.append(pb.TierState(
                name=t.name, max_model_len=t.max_model_len, budget_limit=0 if last else limits[i],
                configured_limit=t.budget_limit or 0, pinned=not last and thr.pinned[i], known=load.known,
                instances=load.instances, running=load.running, waiting=load.waiting, kv_usage=load.kv_usage,
                preemption_rate=load.preemption_rate, age_s=-1.0 if math.isinf(load.age_s) else load.age_s,
                saturated=bool(spill.saturated[i]),
                spilled_out=sum(n for (a, _), n in spill.spilled.items() if a == i)))
        return out

    def get_calibration(self, req: pb.GetCalibrationRequest) -> pb.Calibration:
        cfg = self.router.cfg
        fits = []
        for row in self.router.estimator.table():
            key = (row["model"], row["category"])
            output, source = self.router.outputs.budget(key, None)
            fits.append(pb.Fit(
                model=row["model"], category=row["category"], samples=row["samples"],
                bytes_per_token=row["bytes_per_token"] or 0.0, tokens_per_message=row["tokens_per_message"],
                overhead_tokens=row["overhead"], rel_error=row["rel_error"], long_rms=row["long_rms"],
                margin=margin_for(cfg, row["long_rms"]), output_budget=output, output_source=source))
        return pb.Calibration(
            worker=self.worker.index, workers=cfg.router.workers, b_short=self.router.limits()[0],
            short_max_model_len=cfg.short.max_model_len, long_max_model_len=cfg.long.max_model_len,
            sample_rate=cfg.router.sample_rate, streams=self.worker.streams, fits=fits,
            tiers=self.tier_states(), spillover=cfg.spillover.enabled, adaptive=cfg.adaptive.enabled)

    def set_b_short(self, req: pb.SetBShortRequest) -> pb.ConfigResult:
        try:
            cfg = self.router.cfg.replace(policy={"b_short": int(req.b_short)})
        except C.ConfigError as e:
            raise AdminError(INVALID_ARGUMENT, str(e)) from None
        self._apply(cfg)
        return self._result()

    def set_limit(self, req: pb.SetLimitRequest) -> pb.ConfigResult:
        n = len(self.router.cfg.tiers) - 1
        if req.boundary >= n:
            raise AdminError(INVALID_ARGUMENT, f"boundary {req.boundary}: this router has {n} "
                                               f"(0-{n - 1}, one below each tier but the last)")
        tier = self.router.cfg.tiers[req.boundary].name
        try:
            self.router.pin_limit(req.boundary, None if req.unpin else int(req.budget_limit), time.time())
        except C.ConfigError as e:
            raise AdminError(INVALID_ARGUMENT, str(e)) from None
        log.info("tier %s budget limit %s through the admin API: now %d", tier,
                 "unpinned" if req.unpin else "pinned", self.router.limits()[req.boundary],
                 extra={"fields": {"tier": tier, "limit": self.router.limits()[req.boundary],
                                   "pinned": not req.unpin}})
        return self._result()

    def reload_config(self, req: pb.ReloadConfigRequest) -> pb.ConfigResult:
        path = req.path or self.config_path
        try:
            new = C.load(path)
        except C.ConfigError as e:
            raise AdminError(INVALID_ARGUMENT, str(e)) from None
        old = self.router.cfg
        changed = _changed_keys(old, new)
        restart = [(s, k) for s, k in changed if (s, k) in RESTART_KEYS or (s, "*") in RESTART_KEYS]
        same_names = [t.name for t in old.tiers] == [t.name for t in new.tiers]
        if not same_names:  # Envoy's routes and clusters name the tiers
            restart.append(("tiers", "name"))
        # Take what can change live; keep the rest as the worker runs it.
        live = old.replace(policy=dataclasses.asdict(new.policy),
                           router={k: getattr(new.router, k) for k in ("sample_rate", "inject_include_usage",
                                                                         "max_body_bytes", "snapshot_interval_s",
                                                                         "drain_seconds")},
                           spillover=dataclasses.asdict(new.spillover), adaptive=dataclasses.asdict(new.adaptive),
                           **({"tiers": new.tiers} if same_names else {}))
        self._apply(live)
        if path:
            self.config_path = path
        return self._result(restart)

    def take_snapshot(self, req: pb.TakeSnapshotRequest) -> pb.Snapshot:
        state = self.router.snapshot()
        if req.write:
            self.worker.save_state()
        return pb.Snapshot(state_json=orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY),
                           samples=self.router.estimator.root.samples)

    def restore_snapshot(self, req: pb.Snapshot) -> pb.RestoreSnapshotResponse:
        try:
            state = orjson.loads(req.state_json)
            fresh = type(self.router)(self.router.cfg)
            fresh.restore(state)
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as e:
            raise AdminError(INVALID_ARGUMENT, f"not a calibration snapshot of this version: {e}") from None
        self.router.estimator = fresh.estimator
        self.router.outputs = fresh.outputs
        return pb.RestoreSnapshotResponse(samples=self.router.estimator.root.samples)
