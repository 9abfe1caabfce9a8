"""Admin token and exposure rules (extproc.admin.auth)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from extproc import config as C
from extproc.admin import auth

TOKEN = "0123456789abcdef0123"


def test_token_from_env_wins_over_file(tmp_path):
    f = tmp_path / "token"
    f.write_text("file-token-0123456789\n")
    cfg = C.Config().replace(admin={"token_file": str(f)})
    assert auth.load_token(cfg, env={}) == "file-token-0123456789"
    assert auth.load_token(cfg, env={auth.TOKEN_ENV: TOKEN}) == TOKEN
    assert auth.load_token(C.Config(), env={}) is None


@pytest.mark.parametrize("content, match", [
    ("short", "at least 16"), ("a-good-one-0123456789 short", "at least 16"), (" \n", "at least 16"),
    ("x" * (auth.MAX_TOKEN_BYTES + 1), "larger than"),
])
def test_bad_tokens_are_config_errors(tmp_path, content, match):
    f = tmp_path / "token"
    f.write_text(content)
    with pytest.raises(C.ConfigError, match=match):
        auth.load_token(C.Config().replace(admin={"token_file": str(f)}), env={})


def test_token_file_must_be_a_regular_file():
    with pytest.raises(C.ConfigError, match="not a regular file"):
        auth.load_token(C.Config().replace(admin={"token_file": "/dev/zero"}), env={})


def test_no_token_means_loopback_only():
    auth.check_exposure(C.Config(), None)
    auth.check_exposure(C.Config().replace(admin={"listen": "::1"}), None)
    exposed = C.Config().replace(admin={"listen": "0.0.0.0"})
    with pytest.raises(C.ConfigError, match="not a loopback address"):
        auth.check_exposure(exposed, None)
    auth.check_exposure(exposed, TOKEN)


def test_serve_refuses_to_expose_an_unprotected_admin_plane():
    env = {k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV}
    env["BUDGET_ROUTER_ADMIN_LISTEN"] = "0.0.0.0"
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "serve"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 2
    assert "configuration error" in out.stderr and "BUDGET_ROUTER_ADMIN_TOKEN" in out.stderr


def test_authenticator_compares_the_bearer_token():
    a = auth.Authenticator(TOKEN)
    assert a.allows([("authorization", "Bearer " + TOKEN)])
    assert a.allows([("authorization", "bearer " + TOKEN)])
    assert not a.allows([("authorization", "Bearer " + TOKEN + "x")])
    assert not a.allows([("authorization", TOKEN)])
    assert not a.allows([])
    assert auth.Authenticator(None).identify([]) == "none"
    assert a.identify([("authorization", "Bearer " + TOKEN)]) == auth.fingerprint(TOKEN)
    assert TOKEN not in auth.fingerprint(TOKEN)


def test_several_tokens_for_rotation(tmp_path):
    """Servers accept every listed token, clients send the first."""
    old, new = "old-token-0123456789", "new-token-0123456789"
    f = tmp_path / "token"
    f.write_text(f"{old}\n{new}\n")
    cfg = C.Config().replace(admin={"token_file": str(f)})
    assert auth.load_tokens(cfg, env={}) == (old, new)
    assert auth.load_token(cfg, env={}) == old
    assert auth.load_tokens(cfg, env={auth.TOKEN_ENV: f"{new},{old}"}) == (new, old)
    a = auth.Authenticator((old, new))
    assert a.identify([("authorization", "Bearer " + new)]) == auth.fingerprint(new)
    assert a.identify([("authorization", "Bearer " + old)]) == auth.fingerprint(old)
    assert a.identify([("authorization", "Bearer other-token-0123456789")]) is None


def test_config_validation_of_the_admin_section():
    with pytest.raises(C.ConfigError, match="overlaps the ext_proc ports"):
        C.Config().replace(admin={"port": 50051})
    with pytest.raises(C.ConfigError, match="warm_start_timeout_s"):
        C.Config().replace(admin={"warm_start_timeout_s": 600})
    with pytest.raises(C.ConfigError, match="warm_start_peers"):
        C.Config().replace(admin={"warm_start_peers": ("no-port",)})
    assert C.from_mapping({}, {"BUDGET_ROUTER_ADMIN_WARM_START_PEERS": "a:1, b:2"}).admin.warm_start_peers == ("a:1", "b:2")
    with pytest.raises(C.ConfigError, match="at least 512"):
        C.Config().replace(policy={"b_short": 1})


def test_config_file_is_bounded(tmp_path):
    with pytest.raises(C.ConfigError, match="not a regular file"):
        C.load("/dev/zero", env={})
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * C.MAX_CONFIG_BYTES + "\n")
    with pytest.raises(C.ConfigError, match="larger than"):
        C.load(str(big), env={})
