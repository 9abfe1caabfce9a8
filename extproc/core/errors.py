"""OpenAI-style error bodies the router answers with itself.

Same shape as OpenAI's API and vLLM's server, so clients' existing error
handling (the ``openai`` client raises ``BadRequestError`` etc.) just works:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import orjson


def error_body(message: str, type_: str, code: str | int | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


#: vLLM 0.32's answer to a prompt over max_model_len (vllm/renderers/params.py
#: ``_token_len_check`` raising VLLMValidationError, rendered by
#: ``create_error_response``): type "BadRequestError", param "input_tokens",
#: code the HTTP status as an integer, and the exception's text with its
#: "(parameter=..., value=...)" suffix. The router answers the same body, so
#: a client sees one shape whoever refused the prompt (tests/vllm/test_contract.py
#: compares it with the real server).
VLLM_BAD_REQUEST_TYPE = "BadRequestError"
VLLM_PROMPT_PARAM = "input_tokens"


def context_length_exceeded(tokens: int, limit: int) -> bytes:
    """vLLM 0.32's body for a prompt over ``limit`` tokens. The router knows
    only a lower bound (``tokens``: the estimate less its reject margin), hence
    vLLM's own "at least" wording."""
    return error_body(
        f"This model's maximum context length is {limit} tokens. However, your prompt contains at least "
        f"{tokens} input tokens, which exceeds this limit even without any output tokens. "
        f"Please reduce the length of the input prompt. (parameter={VLLM_PROMPT_PARAM}, value={tokens})",
        VLLM_BAD_REQUEST_TYPE, 400, VLLM_PROMPT_PARAM,
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
