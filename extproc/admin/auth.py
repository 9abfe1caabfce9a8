"""Who may call the admin plane: a bearer token, and where it may listen.

The token comes from ``$BUDGET_ROUTER_ADMIN_TOKEN`` or ``[admin] token_file``
(the environment wins, as for every other setting). Callers send
``authorization: Bearer <token>`` gRPC metadata; the server compares it in
constant time (``hmac.compare_digest``) with every configured token.

Several tokens (separated by whitespace or commas) make a rotation without a
cold start: the server accepts each of them, clients (the CLI, warm start)
send the first. Rotate with ``OLD NEW`` (roll out), then ``NEW OLD`` (roll
out), then ``NEW``. With no token the admin plane only
listens on a loopback address: whoever can reach it is on the same host (or
in the same pod / container network namespace) already.

Audit lines name a token by its fingerprint (first 12 hex digits of its
SHA-256), never by its value.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from typing import Iterable, Mapping

from .. import config as C

TOKEN_ENV = C.ENV_PREFIX + "ADMIN_TOKEN"

#: Largest token file read. Bearer tokens, JWTs included, stay far below the
#: 8 KiB HTTP header budgets of Envoy and nginx; 4 KiB fits any of them.
MAX_TOKEN_BYTES = 4096

#: Shortest token accepted: 16 characters of a random hex or base64 string are
#: 64-96 bits, beyond online guessing at any rate a gRPC port answers (and
#: `openssl rand -hex 32` gives 64 characters).
MIN_TOKEN_CHARS = 16

METADATA_KEY = "authorization"
SCHEME = "bearer "


def load_tokens(cfg: C.Config, env: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """The configured tokens (the first is the one clients send), or None
    when there is none; ConfigError for a token source that is unreadable,
    too long, or holds a token that is too short."""
    env = os.environ if env is None else env
    text = env.get(TOKEN_ENV)
    where = f"${TOKEN_ENV}"
    if text is None and cfg.admin.token_file:
        where = f"[admin] token_file {cfg.admin.token_file}"
        try:
            raw = C.read_bounded(cfg.admin.token_file, MAX_TOKEN_BYTES, "[admin] token_file")
        except OSError as e:
            raise C.ConfigError(f"{where}: cannot read it: {e.strerror}") from None
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise C.ConfigError(f"{where}: a token is printable ASCII") from None
    if text is None:
        return None
    tokens = tuple(t for t in text.replace(",", " ").split() if t)
    if not tokens or any(len(t) < MIN_TOKEN_CHARS or not t.isprintable() for t in tokens):
        raise C.ConfigError(f"{where}: expected tokens of at least {MIN_TOKEN_CHARS} printable characters, "
                            "separated by whitespace or commas (e.g. `openssl rand -hex 32`)")
    return tokens


def load_token(cfg: C.Config, env: Mapping[str, str] | None = None) -> str | None:
    """The token a client sends (the first configured one), or None."""
    tokens = load_tokens(cfg, env)
    return tokens[0] if tokens else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: C.Config, tokens: object) -> None:
    """ConfigError if the admin plane would listen beyond loopback unprotected
    (``tokens``: the configured token(s), None for none)."""
    if not tokens and not is_loopback(cfg.admin.listen):
        raise C.ConfigError(
            f"[admin] listen = {cfg.admin.listen!r} is not a loopback address, and no admin token is set: "
            f"anyone who reaches that address could steer the router. Set ${TOKEN_ENV} or [admin] token_file, "
            "or keep [admin] listen = \"127.0.0.1\"")


def fingerprint(token: str | None) -> str:
    if token is None:
        return "none"
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def call_metadata(token: str | None) -> list[tuple[str, str]]:
    """Metadata a client sends with each admin call."""
    return [(METADATA_KEY, "Bearer " + token)] if token else []


class Authenticator:
    """Checks the bearer token of one call (every call, no sessions)."""

    def __init__(self, tokens: str | Iterable[str] | None):
        if isinstance(tokens, str):
            tokens = (tokens,)
        self._tokens = [(t.encode(), fingerprint(t)) for t in tokens or ()]

    def identify(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """The fingerprint of the token the call carries ("none" when no
        token is configured: loopback only), or None: refuse the call."""
        if not self._tokens:
            return "none"
        presented = None
        for key, value in metadata:
            if key == METADATA_KEY and isinstance(value, str) and value[:len(SCHEME)].lower() == SCHEME:
                presented = value[len(SCHEME):].strip().encode()
                break
        if presented is None:
            return None
        found = None
        for token, fp in self._tokens:  # every one, so the time does not say which matched
            if hmac.compare_digest(presented, token):
                found = fp
        return found

    def allows(self, metadata: Iterable[tuple[str, str | bytes]]) -> bool:
        return self.identify(metadata) is not None
