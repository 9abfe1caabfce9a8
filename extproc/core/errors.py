"""OpenAI-style error bodies the router answers with itself.

Same shape as OpenAI's API and vLLM's server, so clients' existing error
handling (the ``openai`` client raises ``BadRequestError`` etc.) just works:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import orjson


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def context_length_exceeded(estimate: int, limit: int, output: int) -> bytes:
    return error_body(
        f"This request's prompt is about {estimate} tokens (estimated before tokenization), "
        f"more than this deployment's maximum context length of {limit} tokens "
        f"({output} more were asked for the completion). Please reduce the length of the messages.",
        "invalid_request_error", "context_length_exceeded", "messages",
    )


def body_too_large(size: int | None, limit: int) -> bytes:
    got = f"{size} bytes, " if size is not None else ""
    return error_body(
        f"Request body is too large: {got}the limit is {limit} bytes.",
        "invalid_request_error", "request_too_large",
    )


def pool_unavailable(details: str) -> bytes:
    """Envoy's answer when no pool that may serve a request is up (rendered
    into the bootstrap: ``details`` is Envoy's %RESPONSE_CODE_DETAILS%)."""
    return error_body(
        f"No model server can take this request right now ({details}). Please retry later.",
        "server_error", "pool_unavailable",
    )
