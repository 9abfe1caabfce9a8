"""TLS files of a listening port: read, checked and turned into credentials.

One set of helpers for both gRPC ports, ``[admin]`` and ``[router]`` (the
ext_proc port), each configured by ``tls_cert_file``, ``tls_key_file`` and
``tls_client_ca_file`` (mTLS when the CA is set: the peer must present a
certificate that CA signed). Every file is read bounded (``MAX_PEM_BYTES``,
a regular file only) and every error is a ``ConfigError`` naming the section
and key, raised at start, before a port opens.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from . import config as C

#: Largest PEM file read (certificate chain, key, CA bundle): a chain of a few
#: certificates is a few KB, a full public CA bundle ~200 KB.
MAX_PEM_BYTES = 1024 * 1024

#: Oldest TLS version the ext_proc port accepts: RFC 9113 section 9.2 makes
#: TLS 1.2 the floor for HTTP/2 (Envoy's upstream default is 1.2 as well).
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2

#: The only application protocol negotiated: gRPC is HTTP/2 (RFC 7301 ALPN
#: id "h2"); Envoy's ext_proc cluster offers it (extproc.envoy.bootstrap).
ALPN_PROTOCOLS = ("h2",)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one port's TLS; ``section`` names it in errors."""

    section: str
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""

    @classmethod
    def of(cls, section: str, cfg: Any) -> "TlsFiles | None":
        """From a config section with tls_cert_file/tls_key_file/
        tls_client_ca_file; None when TLS is off (no certificate)."""
        if not cfg.tls_cert_file:
            return None
        return cls(section, cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)

    def read(self, key: str) -> bytes:
        """The bytes of ``tls_<key>`` (``cert_file``, ``key_file``, ``client_ca_file``)."""
        path = getattr(self, key)
        what = f"[{self.section}] tls_{key}"
        try:
            return C.read_bounded(path, MAX_PEM_BYTES, what)
        except OSError as e:
            raise C.ConfigError(f"{what} {path}: cannot read it: {e.strerror}") from None


def grpc_server_credentials(files: TlsFiles | None):
    """grpc.ServerCredentials for ``files`` (mTLS with a client CA), or None."""
    if files is None:
        return None
    import grpc
    ca = files.read("client_ca_file") if files.mutual else None
    return grpc.ssl_server_credentials([(files.read("key_file"), files.read("cert_file"))],
                                       root_certificates=ca, require_client_auth=ca is not None)


def grpc_channel_credentials(files: TlsFiles | None):
    """Client side of grpc_server_credentials (peers of one fleet share a CA:
    the client CA verifies the server, this host's cert/key are the client
    certificate), or None."""
    if files is None:
        return None
    import grpc
    return grpc.ssl_channel_credentials(
        root_certificates=files.read("client_ca_file") if files.mutual else None,
        private_key=files.read("key_file"), certificate_chain=files.read("cert_file"))


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """An asyncio server SSLContext for ``files``: TLS 1.2+, ALPN h2, no
    renegotiation (RFC 9113 9.2.1), client certificate required and verified
    when a client CA is set. Loading it also checks that the files are PEM
    and that the key matches the certificate, so a wrong file fails at start."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_TLS_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    files.read("cert_file"), files.read("key_file")  # readable, regular, bounded
    where = f"[{files.section}] tls_cert_file/tls_key_file"
    try:
        ctx.load_cert_chain(files.cert_file, files.key_file)
    except ssl.SSLError as e:
        raise C.ConfigError(f"{where} {files.cert_file}, {files.key_file}: not a PEM certificate chain "
                            f"and its private key ({e.reason or e})") from None
    if files.mutual:
        try:
            ctx.load_verify_locations(cadata=files.read("client_ca_file").decode("ascii", "replace"))
        except ssl.SSLError as e:
            raise C.ConfigError(f"[{files.section}] tls_client_ca_file {files.client_ca_file}: "
                                f"not PEM CA certificates ({e.reason or e})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
