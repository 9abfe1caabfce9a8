"""mTLS on the admin plane: certificates made with the openssl CLI, a real
router process; the CLI with a client certificate (and the token) gets in,
a client without a certificate does not, and a token cannot replace it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import grpc
import pytest

from extproc import config as C
from extproc.admin import auth
from extproc.admin.v1 import admin_pb2 as pb
from extproc.admin.v1 import admin_pb2_grpc as pbg
from extproc.tools.pki import make_pki

from .test_warm_start import TOKEN, Router, _config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def test_mtls_admin_plane(tmp_path):
    pki = make_pki(str(tmp_path))
    cfg, path = _config(tmp_path, "tls", tls_cert_file=pki["server"], tls_key_file=pki["server_key"],
                        tls_client_ca_file=pki["ca"])
    r = Router(cfg, path, str(tmp_path / "tls.log"))
    try:
        r.wait_ready()
        # the CLI as an operator: its config names the client cert/key and the CA
        client_cfg = cfg.replace(admin={"tls_cert_file": pki["client"], "tls_key_file": pki["client_key"]})
        client_path = str(tmp_path / "client.toml")
        with open(client_path, "w") as f:
            f.write(C.to_toml(client_cfg))
        out = subprocess.run([sys.executable, "-m", "extproc.cli", "status", "--json", "--config", client_path],
                             capture_output=True, text=True, timeout=60, env={**os.environ, auth.TOKEN_ENV: TOKEN})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)[0]["b_short"] == "8192"
        target = f"127.0.0.1:{cfg.admin.port}"
        # TLS without a client certificate: refused by the handshake, token or not
        no_cert = grpc.ssl_channel_credentials(root_certificates=open(pki["ca"], "rb").read())
        with grpc.secure_channel(target, no_cert) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pbg.AdminStub(ch).SetBShort(pb.SetBShortRequest(b_short=1024), timeout=5,
                                            metadata=auth.call_metadata(TOKEN))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # plaintext: refused
        with grpc.insecure_channel(target) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pbg.AdminStub(ch).GetCalibration(pb.GetCalibrationRequest(), timeout=5,
                                                 metadata=auth.call_metadata(TOKEN))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        r.stop()
