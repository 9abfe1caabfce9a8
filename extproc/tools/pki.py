"""Throw-away certificates for tests and benchmarks, made with the openssl CLI.

``make_pki(dir)`` writes a CA, a server certificate for 127.0.0.1 and a client
certificate (extendedKeyUsage clientAuth), each valid for a day, and returns
their paths; ``client_hello(ca)`` is the first flight of a TLS client (for
handshake floods). Never for production: the keys are unencrypted and short-lived.
"""

from __future__ import annotations

import os
import ssl
import subprocess

#: Each openssl call makes at most one 2048-bit RSA key: seconds even on a
#: loaded machine.
OPENSSL_TIMEOUT_S = 60


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=OPENSSL_TIMEOUT_S)


def make_pki(d: str) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate in ``d``:
    paths under keys ca, server, server_key, client, client_key."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
    return {k: os.path.join(d, v) for k, v in (("ca", "ca.pem"), ("server", "server.pem"), ("server_key", "server.key"),
                                                ("client", "client.pem"), ("client_key", "client.key"))}


def client_hello(ca: str, server_hostname: str = "127.0.0.1") -> bytes:
    """The ClientHello (ALPN h2) a real TLS client sends first, made by an
    in-memory client that trusts ``ca``."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:  # waiting for the server's answer: the hello is out
        return out.read()
    raise RuntimeError("an in-memory TLS client finished a handshake without a server")
