"""The admin service's logic: request messages in, response messages out.

Transport-independent (``extproc.admin.plane`` serves it on the admin port).
Operates on one worker: its Router, config and snapshot file. Errors are
``AdminError`` with a gRPC status code and a message for people.

Every method gets ``caller`` (peer address and token fingerprint); every
change writes one audit line to the ``budget_router.audit`` logger: who,
what, old -> new. Nothing is replaced before it is validated: a snapshot
passes the estimator's plausibility check (the same one a state file at
start passes), B_short the config's bounds, a reloaded config the whole
config validation.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import time
from typing import Any, Callable

import orjson

from .. import config as C
from ..core.policy import margin_for
from .v1 import admin_pb2 as pb

SERVICE = "budget_router.admin.v1.Admin"

INVALID_ARGUMENT = 3
FAILED_PRECONDITION = 9
RESOURCE_EXHAUSTED = 8
INTERNAL = 13

audit_log = logging.getLogger("budget_router.audit")

#: Config keys that a running worker cannot take over: they are bound to
#: sockets, processes or Envoy's own config, which only a restart re-reads.
RESTART_KEYS = {
    ("router", "listen"), ("router", "port"), ("router", "workers"), ("router", "transport"),
    ("router", "routing_header"), ("router", "decision_header"), ("router", "metadata_namespace"),
    ("router", "state_file"), ("envoy", "*"), ("telemetry", "*"), ("estimator", "*"), ("admin", "*"),
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
        elif f.name == "tiers":  # [[tiers]]: one key per tier and field, "<tier>.<field>"
            for ta, tb in zip(a, b):
                out += [(f.name, f"{ta.name}.{g.name}") for g in dataclasses.fields(ta)
                        if getattr(ta, g.name) != getattr(tb, g.name)]
    return out


class AdminService:
    """``worker`` is an ``extproc.serve.server.Worker`` (router, cfg, streams, ...)."""

    def __init__(self, worker: Any, config_path: str | None):
        self.worker = worker
        self.config_path = config_path

    # name -> (request parser, handler(request, caller))
    def methods(self) -> dict[str, tuple[Callable[[bytes], Any], Callable[[Any, str], Any]]]:
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

    def _audit(self, caller: str, what: str, old: Any, new: Any) -> None:
        audit_log.info("admin change: %s by %s: %s -> %s", what, caller, old, new,
                       extra={"fields": {"worker": self.worker.index, "caller": caller, "change": what,
                                         "old": old, "new": new}})

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

    def get_calibration(self, req: pb.GetCalibrationRequest, caller: str = "") -> pb.Calibration:
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

    def set_b_short(self, req: pb.SetBShortRequest, caller: str = "") -> pb.ConfigResult:
        old = self.router.cfg.b_short
        try:
            cfg = self.router.cfg.replace(policy={"b_short": int(req.b_short)})
        except C.ConfigError as e:
            raise AdminError(INVALID_ARGUMENT, str(e)) from None
        self._apply(cfg)
        self._audit(caller, "b_short", old, cfg.b_short)
        return self._result()

    def set_limit(self, req: pb.SetLimitRequest, caller: str = "") -> pb.ConfigResult:
        n = len(self.router.cfg.tiers) - 1
        if req.boundary >= n:
            raise AdminError(INVALID_ARGUMENT, f"boundary {req.boundary}: this router has {n} "
                                               f"(0-{n - 1}, one below each tier but the last)")
        tier = self.router.cfg.tiers[req.boundary].name
        old = self.router.limits()[req.boundary]
        try:
            self.router.pin_limit(req.boundary, None if req.unpin else int(req.budget_limit), time.time())
        except C.ConfigError as e:
            raise AdminError(INVALID_ARGUMENT, str(e)) from None
        self._audit(caller, f"tier {tier} budget_limit ({'unpinned' if req.unpin else 'pinned'})", old,
                    self.router.limits()[req.boundary])
        return self._result()

    def reload_config(self, req: pb.ReloadConfigRequest, caller: str = "") -> pb.ConfigResult:
        """Re-read the file the worker started with (and the environment).
        A caller cannot name another file: reading any path the caller names
        let one call read /dev/zero into memory."""
        if req.path and req.path != self.config_path:
            raise AdminError(INVALID_ARGUMENT, "ReloadConfig re-reads only the config file the router started with "
                                               f"({self.config_path or 'none: defaults and environment'}); "
                                               "a path argument is not accepted")
        try:
            new = C.load(self.config_path)
        except C.ConfigError as e:
            raise AdminError(INVALID_ARGUMENT, str(e)) from None
        old = self.router.cfg
        changed = _changed_keys(old, new)
        restart = [(s, k) for s, k in changed if (s, k) in RESTART_KEYS or (s, "*") in RESTART_KEYS]
        same_names = [t.name for t in old.tiers] == [t.name for t in new.tiers]
        if not same_names:  # Envoy's routes and clusters name the tiers
            restart.append(("tiers", "name"))
        # Take what can change live; keep the rest as the worker runs it.
        try:
            live = old.replace(policy=dataclasses.asdict(new.policy),
                               router={k: getattr(new.router, k) for k in ("sample_rate", "inject_include_usage",
                                                                             "max_body_bytes", "snapshot_interval_s",
                                                                             "snapshot_samples", "drain_seconds",
                                                                             "drain_delay_s")},
                               spillover=dataclasses.asdict(new.spillover), adaptive=dataclasses.asdict(new.adaptive),
                               **({"tiers": new.tiers} if same_names else {}))
        except C.ConfigError as e:
            raise AdminError(INVALID_ARGUMENT, str(e)) from None
        applied = [f"[{s}] {k}" for s, k in _changed_keys(old, live)]
        self._apply(live)
        self._audit(caller, "config reload", self.config_path or "(environment)",
                    ", ".join(f"{k} = {_value(live, k)}" for k in applied) or "no change")
        return self._result(restart)

    def take_snapshot(self, req: pb.TakeSnapshotRequest, caller: str = "") -> pb.Snapshot:
        state = self.router.snapshot()
        if req.write:
            err = self.worker.save_state()
            if err is not None:
                # A full disk is RESOURCE_EXHAUSTED (as gRPC's own guide
                # names "out of disk space"); any other write error INTERNAL.
                code = RESOURCE_EXHAUSTED if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else INTERNAL
                raise AdminError(code, f"calibration snapshot not written to {self.worker.state_path}: {err} "
                                       "(the previous file is unchanged)")
        return pb.Snapshot(state_json=orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY),
                           samples=self.router.estimator.root.samples)

    def restore_snapshot(self, req: pb.Snapshot, caller: str = "") -> pb.RestoreSnapshotResponse:
        before = self.router.samples()
        try:
            # The plausibility check a state file passes: a bad root refuses
            # the whole snapshot, a bad fit or sketch costs only itself.
            dropped = restore_json(self.router, req.state_json)
        except ValueError as e:
            raise AdminError(INVALID_ARGUMENT, f"calibration snapshot refused, nothing changed: {e}") from None
        after = self.router.samples()
        log_dropped(f"worker {self.worker.index}: admin RestoreSnapshot", dropped)
        self._audit(caller, "calibration restored", f"{before} samples",
                    f"{after} samples" + (f" ({len(dropped)} bad part(s) dropped)" if dropped else ""))
        return pb.RestoreSnapshotResponse(samples=after)


def log_dropped(where: str, dropped: list[str]) -> None:
    """One warning per part of a snapshot that a restore dropped."""
    for what in dropped:
        logging.getLogger("budget_router").warning("%s: calibration snapshot part dropped, learned afresh: %s",
                                                   where, what)


def restore_json(router: Any, state_json: bytes) -> list[str]:
    """Restore ``router`` from a snapshot's JSON (``Router.restore``,
    plausibility-checked); returns the parts dropped; ValueError if it is
    not a snapshot this router can take at all."""
    try:
        state = orjson.loads(state_json)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    return router.restore(state)


def _value(cfg: C.Config, key: str) -> Any:
    section, name = key[1:].split("] ")
    if section == "tiers":
        tier, field = name.split(".", 1)
        return getattr(next(t for t in cfg.tiers if t.name == tier), field)
    return getattr(getattr(cfg, section), name)
