"""Regenerate the admin API's Python code from protos/ (one command):

    python -m extproc.admin.generate          # writes extproc/admin/v1/admin_pb2*.py
    python -m extproc.admin.generate --check  # exit 1 if the checked-in code is stale

Uses grpcio-tools' bundled protoc, so the output depends only on the pinned
grpcio-tools version and the .proto file.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROTO_DIR = os.path.join(ROOT, "protos")
PROTO = "budget_router/admin/v1/admin.proto"
OUT_DIR = os.path.join(ROOT, "extproc", "admin", "v1")
FILES = ("admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py")


def generate(out: str) -> None:
    from grpc_tools import protoc
    tmp = tempfile.mkdtemp()
    try:
        args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", os.path.join(PROTO_DIR, PROTO)]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        src = os.path.join(tmp, os.path.dirname(PROTO))
        os.makedirs(out, exist_ok=True)
        for name in FILES:
            with open(os.path.join(src, name)) as f:
                text = f.read()
            # The generated grpc module imports its messages by proto package
            # path; make it relative to this package.
            text = text.replace("from budget_router.admin.v1 import admin_pb2", "from . import admin_pb2")
            with open(os.path.join(out, name), "w") as f:
                f.write(text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the checked-in code instead of writing")
    a = ap.parse_args(argv)
    if not a.check:
        generate(OUT_DIR)
        print(f"wrote {', '.join(FILES)} to {OUT_DIR}")
        return 0
    tmp = tempfile.mkdtemp()
    try:
        generate(tmp)
        stale = [n for n in FILES if not os.path.exists(os.path.join(OUT_DIR, n))
                 or not filecmp.cmp(os.path.join(tmp, n), os.path.join(OUT_DIR, n), shallow=False)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run python -m extproc.admin.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
