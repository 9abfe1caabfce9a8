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


def max_tokens_too_large(param: str, max_output: int, limit: int) -> bytes:
    """vLLM's wording for an output cap above the context (its ``param`` is the
    key the request used; OpenAI's code for an out-of-range value)."""
    return error_body(
        f"'max_tokens' or 'max_completion_tokens' is too large: {max_output}. This model's maximum "
        f"context length is {limit} tokens, and the prompt needs at least one of them "
        f"({max_output} >= {limit}).",
        "invalid_request_error", "invalid_value", param or "max_tokens",
    )


def unsupported_content_encoding(coding: str, supported: tuple[str, ...]) -> bytes:
    return error_body(
        f"Content-Encoding {coding!r} is not supported: send the body uncompressed or as "
        f"{', '.join(supported)}.",
        "invalid_request_error", "unsupported_content_encoding",
    )


def undecodable_body(coding: str, why: str) -> bytes:
    return error_body(
        f"The request body does not decode as its Content-Encoding {coding!r} says ({why}).",
        "invalid_request_error", "invalid_body_encoding",
    )


def decoded_body_too_large(limit: int) -> bytes:
    return error_body(
        f"Request body is too large once decompressed: the limit is {limit} bytes.",
        "invalid_request_error", "request_too_large",
    )
