"""The interface between the ext_proc stream machine and the router.

``extproc.core.machine.StreamMachine`` talks to the router only through
``RouterPort`` (implemented by ``extproc.core.router.Router``) and reads the
config only through its ``StreamSettings``: the machine turns messages into
responses, the router decides and learns, and either can change without the
other as long as this contract holds (a test double needs these methods and
nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .policy import Decision


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """The config values one ext_proc stream reads (from ``[router]`` and
    the last tier), taken once per config so the machine never walks it."""

    max_body_bytes: int        # request bodies above it are refused (413)
    inject_include_usage: bool  # add stream_options.include_usage to watched streams
    routing_header: str        # header that carries the chosen pool to Envoy's route
    decision_header: str       # header of an immediate (refused) response
    metadata_namespace: str    # dynamic metadata namespace of the decision
    fallback_pool: str         # where a stream goes when the core fails: the last tier

    @classmethod
    def from_config(cls, cfg: Any) -> "StreamSettings":
        r = cfg.router
        return cls(r.max_body_bytes, r.inject_include_usage, r.routing_header, r.decision_header,
                   r.metadata_namespace, cfg.long.name)


@runtime_checkable
class RouterPort(Protocol):
    """What the stream machine asks of the router, by phase of the stream."""

    #: The config values a stream reads; replaced when the config is.
    stream_settings: StreamSettings

    # -- request headers: decisions made before any body (immediate answers) --
    def not_llm(self, why: str) -> Decision: ...
    def too_large(self, size: int | None) -> Decision: ...
    def unsupported_encoding(self, coding: str) -> Decision: ...

    # -- request body: decode, route, and whether to watch the response --------
    def undecodable(self, coding: str, why: str) -> Decision: ...
    def decoded_too_large(self) -> Decision: ...
    def route(self, path: str, body: bytes) -> Decision: ...
    def want_sample(self, d: Decision, u: float) -> bool: ...
    def near_threshold_short(self, d: Decision) -> bool: ...

    # -- response: was it a misroute, and what to learn ------------------------
    def truncation_misroute(self, d: Decision, prompt_tokens: int | None,
                            completion_tokens: int | None) -> bool: ...
    def learn(self, d: Decision, prompt_tokens: Any, completion_tokens: Any) -> float | None: ...
